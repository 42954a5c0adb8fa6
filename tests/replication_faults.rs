//! Hostile and broken peers: garbage, truncated, oversized and foreign frames,
//! records out of order, a peer that stops reading. The connection is closed
//! with a logged reason; the daemon survives and the mirror is untouched.

mod repl_common;

use std::time::{Duration, Instant};

use repl_common::*;
use replicafs::journal::record::{Op, Record};
use replicafs::protocol::frame::{self, HEADER_LEN, MAGIC, MAX_BODY, PROTOCOL_VERSION};
use replicafs::protocol::message::{Message, encode_records};
use replicafs::transport::tls::{self, Fingerprint, Identity};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Connects as the (trusted) primary, sends `bytes`, finishes the stream and
/// returns what the replica said before closing.
async fn send_raw(id: &Identity, replica_fp: Fingerprint, port: u16, bytes: Vec<u8>) -> String {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let cfg = tls::client_config(id, replica_fp).unwrap();
    let conn = ep
        .connect_with(
            cfg,
            format!("127.0.0.1:{port}").parse().unwrap(),
            tls::SERVER_NAME,
        )
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(&bytes).await;
    let _ = send.finish();
    let mut dec = frame::Decoder::new();
    let mut said = String::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok(Some(n))) =
        tokio::time::timeout(Duration::from_secs(30), recv.read(&mut buf)).await
    {
        dec.push(&buf[..n]);
        while let Ok(Some((m, _))) = dec.next_message() {
            said.push_str(&format!("{m:?}\n"));
        }
    }
    if let Some(r) = conn.close_reason() {
        said.push_str(&format!("close: {r}\n"));
    }
    conn.close(0u32.into(), b"");
    ep.wait_idle().await;
    said
}

fn hello() -> Vec<u8> {
    frame::encode(
        &Message::Hello {
            volume_id: 77,
            last_seq: 10,
        },
        0,
    )
    .bytes
}

fn write_rec(seq: u64) -> Record {
    Record {
        seq,
        op: Op::Write {
            path: b"evil".to_vec(),
            offset: 0,
        },
        data: b"x".to_vec(),
    }
}

#[test]
fn garbage_truncated_oversized_and_out_of_order_frames_close_the_connection() {
    let mut c = Cluster::new(1, &[]);
    c.replicas[0].daemon.start();
    let id = Identity::load(&c.primary.daemon.state).unwrap();
    let rfp = Fingerprint::parse(&c.replicas[0].fp).unwrap();
    let port = c.replicas[0].port;
    let rt = runtime();

    let mut oversized = hello()[..HEADER_LEN].to_vec();
    oversized[8..12].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
    oversized[12..16].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
    let mut version = hello();
    version[4] = PROTOCOL_VERSION + 1;
    let mut flipped = hello();
    let n = flipped.len();
    flipped[n - 1] ^= 0xff;
    let mut truncated = hello();
    let batch = frame::encode(
        &Message::Batch {
            first: 1,
            last: 1,
            primary_last: 1,
            frames: encode_records(&[write_rec(1)]),
        },
        0,
    )
    .bytes;
    truncated.extend_from_slice(&batch[..batch.len() - 3]);
    let mut out_of_order = hello();
    out_of_order.extend(
        frame::encode(
            &Message::Batch {
                first: 5,
                last: 5,
                primary_last: 5,
                frames: encode_records(&[write_rec(5)]),
            },
            0,
        )
        .bytes,
    );
    let mut bad_record = hello();
    let mut frames = encode_records(&[write_rec(1)]);
    let fl = frames.len();
    frames[fl - 1] ^= 1;
    bad_record.extend(
        frame::encode(
            &Message::Batch {
                first: 1,
                last: 1,
                primary_last: 1,
                frames,
            },
            0,
        )
        .bytes,
    );
    let mut magicless = vec![0u8; 64];
    magicless[..4].copy_from_slice(&(MAGIC ^ 1).to_le_bytes());
    let mut seed = 5u64;
    let garbage: Vec<u8> = (0..5000)
        .map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            (seed >> 33) as u8
        })
        .collect();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", garbage, "bad magic"),
        ("magic", magicless, "bad magic"),
        ("oversized", oversized, "frame too large"),
        ("version", version, "unsupported protocol version"),
        ("checksum", flipped, "checksum"),
        ("truncated", truncated, "inside a frame"),
        ("out of order", out_of_order, "out of order"),
        ("bad record", bad_record, "bad record"),
    ];
    for (name, bytes, reason) in cases {
        let said = rt.block_on(send_raw(&id, rfp, port, bytes));
        assert!(said.contains(reason), "{name}: replica said {said:?}");
        let log = c.replicas[0].daemon.log_text();
        assert!(log.contains(reason), "{name}: reason not logged:\n{log}");
        assert!(c.replicas[0].daemon.running(), "replica died on {name}");
    }
    assert_eq!(std::fs::read_dir(&c.replicas[0].mirror).unwrap().count(), 0);

    // The daemon still serves the real primary afterwards.
    c.primary.daemon.start();
    std::fs::write(c.primary.mnt.join("after"), b"fine").unwrap();
    c.wait_converged();
    assert_same_tree(&c.primary.backing, &c.replicas[0].mirror, &|_| false);
}

/// A replica that accepts, welcomes, and then never reads: the primary gives
/// the connection up with a reason, and the mount stays fast and writable.
#[test]
fn a_peer_that_stops_reading_is_dropped() {
    let mut c = Cluster::new(1, &[]);
    let rid = Identity::load(&c.replicas[0].daemon.state).unwrap();
    let pfp = Fingerprint::parse(&c.primary.fp).unwrap();
    let port = c.replicas[0].port;
    let rt = runtime();
    let _guard = rt.enter();
    let cfg = tls::server_config(&rid, vec![pfp]).unwrap();
    let ep = quinn::Endpoint::server(cfg, format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
    let ep2 = ep.clone();
    rt.spawn(async move {
        while let Some(inc) = ep2.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let mut dec = frame::Decoder::new();
                let mut buf = vec![0u8; 4096];
                // Read the hello only.
                let volume_id = loop {
                    match dec.next_message() {
                        Ok(Some((Message::Hello { volume_id, .. }, _))) => break volume_id,
                        Ok(Some(_)) | Err(_) => return,
                        Ok(None) => {}
                    }
                    match recv.read(&mut buf).await {
                        Ok(Some(n)) => dec.push(&buf[..n]),
                        _ => return,
                    }
                };
                let w = frame::encode(
                    &Message::Welcome {
                        volume_id,
                        received: 0,
                        applied: 0,
                    },
                    0,
                );
                let _ = send.write_all(&w.bytes).await;
                // Keep the connection open, never read again.
                tokio::time::sleep(Duration::from_secs(600)).await;
                drop(conn);
            });
        }
    });
    c.primary.daemon.start();
    // Writes keep succeeding while the peer does not read.
    let mut rng = Rng(11);
    for i in 0..40 {
        let data: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
        std::fs::write(c.primary.mnt.join(format!("f{i}")), data).unwrap();
    }
    let start = Instant::now();
    loop {
        let s = status(&c.primary.daemon.state).unwrap();
        if let Some(e) = s["peers"][0]["error"].as_str()
            && (e.contains("acknowledged nothing") || e.contains("stopped reading"))
        {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no error shown: {s}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(c.primary.daemon.running());
    ep.close(0u32.into(), b"");
}
