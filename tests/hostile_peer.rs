//! A hostile but trusted primary: a peer holding a pinned certificate sends
//! crafted records and snapshot entries over real QUIC to a real replica
//! daemon. Each must take effect inside the mirror only, or be refused with a
//! reason shown in status and written to `refused.log`; nothing outside the
//! mirror (a sentinel dir, the replica's state dir) is touched, and nothing
//! hangs (every wait has a deadline and fails the test).

mod repl_common;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use repl_common::{DEADLINE, Daemon, free_udp_port, keygen};
use replicafs::journal::record::{Op, Record};
use replicafs::protocol::frame::Decoder;
use replicafs::protocol::message::{EntryKind, Message, encode_records};
use replicafs::transport::io::{read_message, write_bytes, write_message};
use replicafs::transport::tls::{self, Fingerprint, Identity};

struct Rig {
    base: tempfile::TempDir,
    state: PathBuf,
    mirror: PathBuf,
    outside: PathBuf,
    port: u16,
    replica_fp: Fingerprint,
    id: Identity,
    daemon: Daemon,
}

/// Every entry beneath `root`: type, mode, size and content (or target).
fn snapshot_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&p).unwrap())
            } else if m.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if m.is_file() {
                format!("file {:?}", std::fs::read(&p).unwrap())
            } else {
                format!("other {:o} rdev {}", m.mode(), m.rdev())
            };
            out.insert(
                p.strip_prefix(root).unwrap().display().to_string(),
                format!("{what} mode {:o} uid {}", m.mode(), m.uid()),
            );
        }
    }
    out
}

impl Rig {
    fn new() -> Rig {
        let base = tempfile::Builder::new()
            .prefix("replicafs-hostile")
            .tempdir_in("/tmp")
            .unwrap();
        let b = base.path();
        let peer_state = b.join("peer-state");
        let state = b.join("r-state");
        let mirror = b.join("mirror");
        let outside = b.join("outside");
        for d in [&peer_state, &state, &mirror, &outside] {
            std::fs::create_dir_all(d).unwrap();
        }
        // The sentinel: what nothing may change.
        std::fs::create_dir(outside.join("sub")).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        std::fs::write(outside.join("sub/data"), b"data").unwrap();
        std::fs::set_permissions(
            outside.join("secret"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let peer_fp = keygen(&peer_state);
        let replica_fp = Fingerprint::parse(&keygen(&state)).unwrap();
        let id = Identity::load(&peer_state).unwrap();
        let port = free_udp_port();
        let args = vec![
            "replica".into(),
            "--mirror".into(),
            mirror.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--state-dir".into(),
            state.display().to_string(),
            "--trust".into(),
            peer_fp,
        ];
        let mut daemon = Daemon::new("replica", args, b.join("r.log"), state.clone(), None);
        daemon.start();
        Rig {
            state,
            mirror,
            outside,
            port,
            replica_fp,
            id,
            daemon,
            base,
        }
    }

    /// The replica's one peer entry in `replicafs status --json`.
    fn peer(&self) -> serde_json::Value {
        let s = repl_common::status(&self.state)
            .unwrap_or_else(|| panic!("status does not answer; log:\n{}", self.log()));
        s["peers"][0].clone()
    }

    fn log(&self) -> String {
        self.daemon.log_text()
    }

    /// Waits (with a deadline against hangs) until `cond` holds on the status.
    fn wait(&self, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let p = self.peer();
            if cond(&p) {
                return p;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{what}: not reached; status {p}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `last` is durably applied with no error and `refused`
    /// records were refused in all.
    fn wait_applied(&self, what: &str, last: u64, refused: u64) {
        let p = self.wait(what, |p| {
            p["applied"].as_u64() >= Some(last) || p["error"].is_string()
        });
        assert!(
            p["error"].is_null(),
            "{what}: the replica reports an error: {p}\nlog:\n{}",
            self.log()
        );
        assert_eq!(
            p["refused"]["count"].as_u64(),
            Some(refused),
            "{what}: refused count; status {p}\nlog:\n{}",
            self.log()
        );
    }
}

/// The test's primary end of one connection.
struct Peer {
    rt: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: Decoder,
    next: u64,
}

impl Peer {
    fn connect(rig: &Rig) -> Peer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (endpoint, conn, send, recv) = rt.block_on(async {
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let cfg = tls::client_config(&rig.id, rig.replica_fp).unwrap();
            let addr = format!("127.0.0.1:{}", rig.port).parse().unwrap();
            let conn = tokio::time::timeout(
                DEADLINE,
                endpoint.connect_with(cfg, addr, tls::SERVER_NAME).unwrap(),
            )
            .await
            .expect("connect deadline")
            .expect("connect");
            let (send, recv) = conn.open_bi().await.unwrap();
            (endpoint, conn, send, recv)
        });
        let mut p = Peer {
            rt,
            endpoint,
            conn,
            send,
            recv,
            dec: Decoder::new(),
            next: 0,
        };
        p.write(&Message::Hello {
            volume_id: 0x5eed,
            last_seq: 0,
        });
        match p.read() {
            Message::Welcome { received, .. } => p.next = received + 1,
            m => panic!("expected a welcome, got {m:?}"),
        }
        p
    }

    fn write(&mut self, m: &Message) {
        self.rt
            .block_on(write_message(&mut self.send, m))
            .expect("write");
    }

    fn read(&mut self) -> Message {
        let r = self.rt.block_on(async {
            tokio::time::timeout(DEADLINE, read_message(&mut self.recv, &mut self.dec)).await
        });
        r.expect("read deadline")
            .expect("read")
            .expect("stream ended")
            .0
    }

    /// Sends one batch of records (consecutive seqs); returns its last seq
    /// once the replica acknowledged storing it.
    fn batch(&mut self, ops: Vec<(Op, &[u8])>) -> u64 {
        let first = self.next;
        let records: Vec<Record> = ops
            .into_iter()
            .enumerate()
            .map(|(i, (op, data))| Record {
                seq: first + i as u64,
                op,
                data: data.to_vec(),
            })
            .collect();
        let last = first + records.len() as u64 - 1;
        self.write(&Message::Batch {
            first,
            last,
            primary_last: last,
            frames: encode_records(&records),
        });
        self.next = last + 1;
        self.await_ack(last);
        last
    }

    fn await_ack(&mut self, received: u64) {
        loop {
            if let Message::Ack { received: r, .. } = self.read()
                && r >= received
            {
                return;
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.conn.close(quinn::VarInt::from_u32(0), b"bye");
        let ep = self.endpoint.clone();
        self.rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(5), ep.wait_idle()).await;
        });
    }
}

fn mknod(path: &[u8], mode: u32, rdev: u64) -> Op {
    Op::Mknod {
        path: path.to_vec(),
        mode,
        rdev,
        uid: 0,
        gid: 0,
    }
}

fn write(path: &[u8], offset: u64) -> Op {
    Op::Write {
        path: path.to_vec(),
        offset,
    }
}

fn fallocate(path: &[u8], offset: u64, len: u64) -> Op {
    Op::Fallocate {
        path: path.to_vec(),
        mode: 0,
        offset,
        len,
    }
}

fn chmod(path: &[u8], mode: u32) -> Op {
    Op::SetAttr {
        path: path.to_vec(),
        mode: Some(mode),
        uid: None,
        gid: None,
        atime: None,
        mtime: None,
    }
}

fn entry(path: &[u8], kind: EntryKind, size: u64, target: &[u8]) -> Message {
    Message::SnapshotEntry {
        path: path.to_vec(),
        kind,
        mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        size,
        target: target.to_vec(),
        xattrs: vec![],
    }
}

#[test]
fn hostile_records_stay_inside_the_mirror() {
    let rig = Rig::new();
    let sentinel = snapshot_tree(&rig.outside);
    let check_outside = |what: &str| {
        assert_eq!(
            snapshot_tree(&rig.outside),
            sentinel,
            "{what}: something outside the mirror changed"
        );
    };
    let outside = rig.outside.as_os_str().as_bytes().to_vec();
    let secret = rig.outside.join("secret").as_os_str().as_bytes().to_vec();
    let mut peer = Peer::connect(&rig);
    let mut refused = 0;

    // Symlink to an outside file, then chmod it; a symlinked dir, then data
    // and names through it.
    let last = peer.batch(vec![
        (
            Op::Symlink {
                path: b"s".to_vec(),
                target: secret.clone(),
                uid: 0,
                gid: 0,
            },
            b"",
        ),
        (chmod(b"s", 0o4777), b""),
        (
            Op::Symlink {
                path: b"l".to_vec(),
                target: outside.clone(),
                uid: 0,
                gid: 0,
            },
            b"",
        ),
        (write(b"l/secret", 0), b"PWNED"),
        (chmod(b"l/secret", 0o777), b""),
        (mknod(b"l/planted", libc::S_IFREG | 0o644, 0), b""),
        (write(b"s", 0), b"PWNED"),
    ]);
    refused += 4;
    rig.wait_applied("symlink + chmod", last, refused);
    check_outside("symlink + chmod");
    assert!(
        std::fs::symlink_metadata(rig.mirror.join("s"))
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // A fifo, then data ops on it: refused, and nothing blocks.
    let last = peer.batch(vec![
        (mknod(b"p", libc::S_IFIFO | 0o644, 0), b""),
        (write(b"p", 0), b"x"),
        (fallocate(b"p", 0, 4096), b""),
        (
            Op::Truncate {
                path: b"p".to_vec(),
                size: 0,
            },
            b"",
        ),
    ]);
    refused += 3;
    rig.wait_applied("fifo + write, fallocate", last, refused);
    assert!(
        std::fs::symlink_metadata(rig.mirror.join("p"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    // With a reader on the fifo, opening it for writing would succeed: the
    // type check alone refuses it.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(rig.mirror.join("p"))
        .unwrap();
    let last = peer.batch(vec![
        (write(b"p", 0), b"x"),
        (fallocate(b"p", 0, 4096), b""),
    ]);
    refused += 2;
    rig.wait_applied("fifo with a reader + write", last, refused);
    drop(reader);

    // A char device someone left in the mirror (/dev/null's numbers): data
    // ops on it are refused too.
    let c = std::ffi::CString::new(rig.mirror.join("null").as_os_str().as_bytes()).unwrap();
    assert_eq!(
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) },
        0
    );
    let last = peer.batch(vec![
        (write(b"null", 0), b"x"),
        (fallocate(b"null", 0, 1), b""),
    ]);
    refused += 2;
    rig.wait_applied("char device + write", last, refused);

    // A refusal, then a record that fails until the mirror is fixed: the
    // batch is retried, and the refusal is reported once.
    let last = peer.batch(vec![
        (write(b"null", 0), b"x"),
        (write(b"missing", 0), b"y"),
    ]);
    refused += 1;
    let p = rig.wait("refusal before a failing record", |p| {
        p["error"].is_string()
    });
    assert!(p["error"].as_str().unwrap().contains("missing"), "{p}");
    std::fs::write(rig.mirror.join("missing"), b"").unwrap();
    rig.wait("the failing record retried", |p| {
        p["applied"].as_u64() >= Some(last)
    });
    rig.wait_applied("the failing record retried", last, refused);
    assert_eq!(std::fs::read(rig.mirror.join("missing")).unwrap(), b"y");

    // Bad paths: each refused, nothing created anywhere.
    let long = vec![b'a'; 5000];
    let long_name = [b"d/".to_vec(), vec![b'n'; 300]].concat();
    let abs = rig.outside.join("planted").as_os_str().as_bytes().to_vec();
    let bad: Vec<&[u8]> = vec![
        b"../planted",
        b"a/../../planted",
        &abs,
        b"nul\0planted",
        b"a//b",
        b"./x",
        b"",
        &long,
        &long_name,
    ];
    let mut ops: Vec<(Op, &[u8])> = Vec::new();
    for p in &bad {
        ops.push((mknod(p, libc::S_IFREG | 0o644, 0), b""));
        ops.push((write(p, 0), b"PWNED"));
    }
    let n = ops.len() as u64;
    let last = peer.batch(ops);
    refused += n;
    rig.wait_applied("bad paths", last, refused);
    check_outside("bad paths");
    assert!(!rig.base.path().join("planted").exists());

    // Huge lengths and offsets.
    let last = peer.batch(vec![
        (mknod(b"f", libc::S_IFREG | 0o644, 0), b""),
        (write(b"f", u64::MAX - 1), b"xy"),
        (
            Op::Truncate {
                path: b"f".to_vec(),
                size: 1 << 63,
            },
            b"",
        ),
        (fallocate(b"f", 1 << 62, 1 << 62), b""),
    ]);
    refused += 3;
    rig.wait_applied("huge lengths", last, refused);
    assert_eq!(std::fs::metadata(rig.mirror.join("f")).unwrap().len(), 0);

    // Renames onto the replica's own state dir.
    let state_before: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(&rig.state)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let state_abs = rig
        .state
        .join("replica.state")
        .as_os_str()
        .as_bytes()
        .to_vec();
    let rename = |to: &[u8]| Op::Rename {
        from: b"f".to_vec(),
        to: to.to_vec(),
        flags: 0,
    };
    let last = peer.batch(vec![
        (rename(b"../r-state/replica.state"), b""),
        (rename(&state_abs), b""),
        (rename(b"../r-state"), b""),
        (
            Op::Link {
                existing: b"../r-state/replica.state".to_vec(),
                path: b"stolen".to_vec(),
            },
            b"",
        ),
    ]);
    refused += 4;
    rig.wait_applied("rename onto the state dir", last, refused);
    assert!(rig.mirror.join("f").is_file());
    assert!(!rig.mirror.join("stolen").exists());
    assert!(
        std::fs::metadata(rig.state.join("replica.state"))
            .unwrap()
            .is_file()
    );
    let state_after: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(&rig.state)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| state_before.contains(n) || n == "refused.log")
            .collect();
        v.sort();
        v
    };
    assert!(state_before.iter().all(|n| state_after.contains(n)));

    // A block device, then a write to it: the node is never created; the
    // write finds nothing (a divergence the replica reports; the primary
    // answers that with a snapshot, as below). Status answers meanwhile.
    let dev_seq = peer.batch(vec![
        (mknod(b"b", libc::S_IFBLK | 0o666, libc::makedev(7, 0)), b""),
        (write(b"b", 0), b"PWNED"),
    ]);
    refused += 1;
    let p = rig.wait("block device + write", |p| {
        p["error"].is_string() || p["applied"].as_u64() >= Some(dev_seq)
    });
    assert!(
        p["error"].as_str().unwrap().contains("(os error 2)"),
        "block device + write: {p}"
    );
    assert_eq!(p["refused"]["count"].as_u64(), Some(refused), "{p}");
    assert!(std::fs::symlink_metadata(rig.mirror.join("b")).is_err());
    check_outside("block device");

    // A snapshot (what a primary sends a diverged replica) naming paths
    // outside: those entries are refused, the rest applied.
    peer.write(&Message::SnapshotBegin { at: dev_seq });
    peer.await_ack(0);
    let snap = vec![
        entry(b"ok", EntryKind::Dir, 0, b""),
        entry(b"ok/f", EntryKind::File, 3, b""),
        Message::SnapshotData {
            path: b"ok/f".to_vec(),
            offset: 0,
            data: b"abc".to_vec(),
        },
        entry(b"../escape", EntryKind::Dir, 0, b""),
        entry(&abs, EntryKind::File, 5, b""),
        Message::SnapshotData {
            path: abs.clone(),
            offset: 0,
            data: b"PWNED".to_vec(),
        },
        entry(b"sl", EntryKind::Symlink, 0, &outside),
        entry(b"sl/planted", EntryKind::File, 5, b""),
        Message::SnapshotData {
            path: b"sl/planted".to_vec(),
            offset: 0,
            data: b"PWNED".to_vec(),
        },
        entry(b"sl/sub", EntryKind::Dir, 0, b""),
        entry(b"lnk", EntryKind::Link, 0, b"../outside/secret"),
        entry(b"nul\0x", EntryKind::File, 0, b""),
    ];
    for m in &snap {
        peer.write(m);
    }
    peer.write(&Message::SnapshotEnd {
        at: dev_seq,
        lenient_through: dev_seq,
    });
    peer.await_ack(dev_seq);
    refused += 6;
    rig.wait_applied("snapshot with outside entries", dev_seq, refused);
    check_outside("snapshot");
    assert_eq!(std::fs::read(rig.mirror.join("ok/f")).unwrap(), b"abc");
    let mut names: Vec<String> = std::fs::read_dir(&rig.mirror)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ok", "sl"]);

    // Replication goes on after all that.
    let last = peer.batch(vec![(write(b"ok/f", 0), b"xyz")]);
    rig.wait_applied("a good record after the hostile ones", last, refused);
    assert_eq!(std::fs::read(rig.mirror.join("ok/f")).unwrap(), b"xyz");
    drop(peer);

    // Every refusal is in refused.log (owner-only), with its seq and reason.
    let log_path = rig.state.join("refused.log");
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(text.lines().count() as u64, refused, "{text}");
    assert!(text.contains("device nodes are never created"), "{text}");
    assert!(
        text.contains(&format!("seq {} mknod", dev_seq - 1)),
        "{text}"
    );
    assert!(text.contains("seq - snapshot entry"), "{text}");
    assert_eq!(std::fs::metadata(&log_path).unwrap().mode() & 0o777, 0o600);
    check_outside("the end");
}

/// A frame header announcing a huge body ends that connection only: the
/// replica stays up and the next connection replicates.
#[test]
fn a_huge_frame_length_closes_only_that_connection() {
    let rig = Rig::new();
    let mut peer = Peer::connect(&rig);
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(b"RFP1");
    h[4] = replicafs::protocol::frame::PROTOCOL_VERSION;
    h[5] = 3;
    h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    h[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    peer.rt
        .block_on(write_bytes(&mut peer.send, &h))
        .expect("write");
    let closed = peer.rt.block_on(async {
        tokio::time::timeout(DEADLINE, async {
            loop {
                match read_message(&mut peer.recv, &mut peer.dec).await {
                    Ok(Some((Message::Goodbye { reason }, _))) => return reason,
                    Ok(Some(_)) => continue,
                    Ok(None) => return "end of stream".to_string(),
                    Err(e) => return e,
                }
            }
        })
        .await
    });
    closed.expect("the replica did not close the connection");
    drop(peer);
    assert!(
        rig.log().contains("frame too large"),
        "no reason logged:\n{}",
        rig.log()
    );
    let mut peer = Peer::connect(&rig);
    let last = peer.batch(vec![(mknod(b"f", libc::S_IFREG | 0o644, 0), b"")]);
    rig.wait_applied("after the huge frame", last, 0);
    assert!(rig.mirror.join("f").is_file());
}

/// A replica in the middle of a snapshot has nothing to acknowledge: it says
/// it is alive with keepalives, so the primary's ack timeout does not cut the
/// snapshot short; the snapshot then completes with its ack.
#[test]
fn a_replica_in_a_snapshot_sends_keepalives() {
    let rig = Rig::new();
    let mut peer = Peer::connect(&rig);
    peer.write(&Message::SnapshotBegin { at: 0 });
    match peer.read() {
        Message::Ack {
            received: 0,
            applied: 0,
            error: None,
        } => {}
        m => panic!("expected the reset ack, got {m:?}"),
    }
    // Nothing sent meanwhile: two keepalives come anyway (read has a deadline).
    for _ in 0..2 {
        match peer.read() {
            Message::Keepalive => {}
            m => panic!("expected a keepalive, got {m:?}\nlog:\n{}", rig.log()),
        }
    }
    peer.write(&Message::SnapshotEnd {
        at: 0,
        lenient_through: 0,
    });
    loop {
        match peer.read() {
            Message::Keepalive => continue,
            Message::Ack { error: None, .. } => break,
            m => panic!(
                "expected the snapshot's ack, got {m:?}\nlog:\n{}",
                rig.log()
            ),
        }
    }
    drop(peer);
    rig.wait("the connection to end", |p| p["connected"] == false);
}
