//! The replication protocol, sans-IO: messages, their framing, and the state
//! machines of the sending (primary) and receiving (replica) ends. Nothing here
//! touches a socket or a file; `src/transport` moves the bytes.
//!
//! A connection: the primary sends `Hello`; the replica answers `Welcome` with
//! what it has received and applied; the primary streams `Batch`es from the
//! received seq + 1; the replica answers each stored batch with an `Ack`
//! (received after fsync, applied after applying) and sends further `Ack`s as
//! it applies. Any error closes the connection with a reason (`Goodbye`).

pub mod frame;
pub mod message;
pub mod state;

#[cfg(test)]
mod sim;

pub use frame::{Decoder, FrameError, PROTOCOL_VERSION};
pub use message::{ApplyError, ApplyErrorKind, Message};
pub use state::{
    CloseCode, Gap, GapDecision, KEEPALIVE_INTERVAL, ProtocolError, Receiver, ReceiverEvent,
    Sender, SenderAction, SenderConfig, SenderEvent, SnapshotReason, coalesce,
};

#[cfg(test)]
mod tests {
    use super::frame::*;
    use super::*;

    /// `len` incompressible bytes from `seed` (an LCG: the same every run).
    fn noise(mut seed: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 56) as u8
            })
            .collect()
    }
    use crate::journal::record::{Op, Record};

    fn write(seq: u64, path: &str, offset: u64, data: &[u8]) -> Record {
        Record {
            seq,
            op: Op::Write {
                path: path.as_bytes().to_vec(),
                offset,
            },
            data: data.to_vec(),
        }
    }

    fn unlink(seq: u64, path: &str) -> Record {
        Record {
            seq,
            op: Op::Unlink {
                path: path.as_bytes().to_vec(),
            },
            data: vec![],
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                volume_id: 7,
                last_seq: 99,
            },
            Message::Welcome {
                volume_id: 7,
                received: 5,
                applied: 3,
            },
            Message::Batch {
                first: 1,
                last: 3,
                primary_last: 3,
                frames: message::encode_records(&[
                    write(1, "a", 0, &[1; 5000]),
                    write(3, "b", 9, b"xyz"),
                ]),
            },
            Message::Ack {
                received: 3,
                applied: 2,
                error: Some(ApplyError::new(
                    ApplyErrorKind::DiskFull,
                    "No space left on device",
                )),
            },
            Message::Goodbye {
                reason: "bye".into(),
            },
        ]
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Message>, FrameError> {
        let mut d = Decoder::new();
        d.push(bytes);
        let mut out = Vec::new();
        while let Some((m, _)) = d.next_message()? {
            out.push(m);
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn messages_round_trip_raw_and_compressed() {
        for level in [0, 3] {
            for m in samples() {
                let e = encode(&m, level);
                assert_eq!(decode_all(&e.bytes).unwrap(), vec![m]);
            }
        }
        // The compressible batch really is compressed.
        let m = &samples()[2];
        assert!(encode(m, 3).bytes.len() < encode(m, 0).bytes.len() / 4);
    }

    #[test]
    fn incompressible_payload_goes_raw() {
        let data = noise(9, 100_000);
        let m = Message::Batch {
            first: 1,
            last: 1,
            primary_last: 1,
            frames: message::encode_records(&[write(1, "r", 0, &data)]),
        };
        let e = encode(&m, 3);
        assert_eq!(u16::from_le_bytes([e.bytes[6], e.bytes[7]]) & FLAG_ZSTD, 0);
        assert_eq!(decode_all(&e.bytes).unwrap(), vec![m]);
    }

    /// The sample decides from 32 KiB up: random bodies are not worth
    /// compressing, repetitive ones are, small ones are always tried.
    #[test]
    fn a_sample_decides_whether_a_body_is_compressed() {
        let random = noise(7, 256 << 10);
        assert!(!frame::looks_compressible(&random, 3));
        assert!(!frame::looks_compressible(&random[..(32 << 10)], 3));
        assert!(frame::looks_compressible(&random[..(32 << 10) - 1], 3));
        assert!(frame::looks_compressible(&vec![0u8; 256 << 10], 3));
    }

    /// Incompressible batches in a row make the next ones go raw without a
    /// try, longer each time, up to 63; one that compresses resets it.
    #[test]
    fn compression_backs_off_on_incompressible_batches() {
        let noise = noise(5, 4096);
        let batch = |data: &[u8]| Message::Batch {
            first: 1,
            last: 1,
            primary_last: 1,
            frames: message::encode_records(&[write(1, "r", 0, data)]),
        };
        let mut b = frame::CompressionBackoff::default();
        let mut tried = 0;
        for _ in 0..200 {
            let level = b.level(3);
            if level > 0 {
                tried += 1;
            }
            b.record(level, &encode(&batch(&noise), level));
        }
        // 1 + 1 + 1 + 1 + 1 + 1 tries up to the 63-batch skips, then one per 64.
        assert!((6..=9).contains(&tried), "{tried} tries");
        // A compressible batch resets it.
        while b.level(3) == 0 {}
        b.record(3, &encode(&batch(&[0u8; 4096]), 3));
        assert_eq!(b.level(3), 3);
        assert_eq!(frame::CompressionBackoff::default().level(0), 0);
    }

    #[test]
    fn byte_at_a_time_decoding() {
        let mut all = Vec::new();
        for m in samples() {
            all.extend(encode(&m, 3).bytes);
        }
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &all {
            d.push(std::slice::from_ref(b));
            while let Some((m, _)) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, samples());
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        for m in samples() {
            let e = encode(&m, 3);
            for i in 0..e.bytes.len() {
                let mut bad = e.bytes.clone();
                bad[i] ^= 0x08;
                assert!(
                    decode_all(&bad).is_err(),
                    "flip at {i} of {} accepted",
                    m.name()
                );
            }
        }
    }

    /// Re-stamps a frame's crc after a test edited it.
    fn recrc(f: &mut [u8]) {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&f[..HEADER_LEN]);
        h[16..20].fill(0);
        let mut c = crc32fast::Hasher::new();
        c.update(&h);
        c.update(&f[HEADER_LEN..]);
        let c = c.finalize();
        f[16..20].copy_from_slice(&c.to_le_bytes());
    }

    /// An apply error code this build does not know is refused as a bad
    /// frame (no panic, no guess); the known ones round-trip.
    #[test]
    fn unknown_apply_error_codes_are_refused() {
        for kind in [
            ApplyErrorKind::Divergence,
            ApplyErrorKind::DiskFull,
            ApplyErrorKind::Io,
            ApplyErrorKind::Other,
        ] {
            let m = Message::Ack {
                received: 1,
                applied: 1,
                error: Some(ApplyError::new(kind, "zz")),
            };
            assert_eq!(decode_all(&encode(&m, 0).bytes).unwrap(), vec![m]);
        }
        let m = Message::Ack {
            received: 1,
            applied: 1,
            error: Some(ApplyError::new(ApplyErrorKind::Other, "zz")),
        };
        let mut f = encode(&m, 0).bytes;
        let at = f
            .windows(5)
            .position(|w| w == [1, 3, 2, b'z', b'z'])
            .expect("the encoded error");
        f[at + 1] = 9;
        recrc(&mut f);
        assert!(matches!(decode_all(&f), Err(FrameError::Decode(_))));
    }

    /// The OS errors that mean a diverged mirror, and the others.
    #[test]
    fn apply_errors_are_typed_from_the_os_error() {
        use std::io::Error;
        for e in [
            libc::ENOENT,
            libc::EEXIST,
            libc::ENOTDIR,
            libc::EISDIR,
            libc::ENOTEMPTY,
        ] {
            let k = ApplyError::kind_of(&Error::from_raw_os_error(e));
            assert_eq!(k, ApplyErrorKind::Divergence, "errno {e}");
        }
        let k = ApplyError::kind_of(&Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(k, ApplyErrorKind::DiskFull);
        let k = ApplyError::kind_of(&Error::from_raw_os_error(libc::EIO));
        assert_eq!(k, ApplyErrorKind::Io);
        assert_eq!(
            ApplyError::kind_of(&Error::other("x")),
            ApplyErrorKind::Other
        );
    }

    /// A version 1 peer is refused at its hello; a version 1 batch (its
    /// body is unchanged) still reads, for receive logs written before.
    #[test]
    fn version_1_reads_only_as_a_stored_batch() {
        let mut hello = encode(&samples()[0], 0).bytes;
        hello[4] = 1;
        recrc(&mut hello);
        assert!(matches!(decode_all(&hello), Err(FrameError::Version(1))));
        let mut batch = encode(&samples()[2], 0).bytes;
        batch[4] = 1;
        recrc(&mut batch);
        assert_eq!(decode_all(&batch).unwrap(), vec![samples()[2].clone()]);
    }

    #[test]
    fn truncation_is_an_error_at_end_of_stream() {
        let e = encode(&samples()[2], 0);
        for cut in 1..e.bytes.len() {
            assert!(decode_all(&e.bytes[..cut]).is_err());
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 1u64;
        for len in 0..2000 {
            let mut buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 33) as u8
                })
                .collect();
            let _ = decode_all(&buf);
            // Garbage behind a valid header too.
            if buf.len() > HEADER_LEN {
                buf[..4].copy_from_slice(&MAGIC.to_le_bytes());
                buf[4] = PROTOCOL_VERSION;
                buf[6] = 0;
                buf[7] = 0;
                let n = (buf.len() - HEADER_LEN) as u32;
                buf[8..12].copy_from_slice(&n.to_le_bytes());
                buf[12..16].copy_from_slice(&n.to_le_bytes());
                assert!(decode_all(&buf).is_err());
            }
        }
    }

    #[test]
    fn oversized_and_foreign_headers_are_refused_before_the_body() {
        let mut h = encode(&samples()[0], 0).bytes[..HEADER_LEN].to_vec();
        h[8..12].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        h[12..16].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        let mut d = Decoder::new();
        d.push(&h);
        assert!(matches!(d.next_message(), Err(FrameError::Oversized(..))));

        let mut v = encode(&samples()[0], 0).bytes;
        v[4] = 9;
        assert!(matches!(decode_all(&v), Err(FrameError::Version(9))));
        let mut k = encode(&samples()[0], 0).bytes;
        k[5] = 4;
        assert!(decode_all(&k).is_err());
    }

    /// Drives a sender and a receiver against each other without a network.
    #[test]
    fn handshake_stream_ack_and_resume() {
        let mut s = Sender::new(42, SenderConfig::default());
        let mut r = Receiver::new(None, 0, 0);
        let ReceiverEvent::Welcome { adopt, reply, .. } = r.handle(s.hello(10)).unwrap() else {
            panic!("no welcome");
        };
        assert!(adopt);
        assert_eq!(s.handle(reply).unwrap(), SenderEvent::Resume { from: 1 });
        assert_eq!(s.wants(), Some(1));
        let b = s.batch(vec![write(1, "a", 0, b"x"), write(2, "a", 1, b"y")], 4, 10);
        s.sent(4, 100);
        let ReceiverEvent::Store {
            first,
            last,
            records,
            ..
        } = r.handle(b).unwrap()
        else {
            panic!("no store");
        };
        assert_eq!((first, last, records.len()), (1, 4, 2));
        let ack = r.stored(4, 0, None);
        s.handle(ack).unwrap();
        assert_eq!((s.received(), s.applied()), (4, 0));
        s.handle(r.progress(4, 4, None)).unwrap();
        assert_eq!(s.applied(), 4);

        // A new connection resumes after what the replica received.
        let mut s2 = Sender::new(42, SenderConfig::default());
        let mut r2 = Receiver::new(Some(42), 4, 4);
        let ReceiverEvent::Welcome { adopt, reply, .. } = r2.handle(s2.hello(10)).unwrap() else {
            panic!("no welcome");
        };
        assert!(!adopt);
        assert_eq!(s2.handle(reply).unwrap(), SenderEvent::Resume { from: 5 });
    }

    #[test]
    fn out_of_order_and_bad_records_are_refused() {
        let mut r = Receiver::new(Some(1), 10, 10);
        // Before hello, a batch is refused.
        let early = Message::Batch {
            first: 11,
            last: 11,
            primary_last: 11,
            frames: vec![],
        };
        assert!(matches!(
            r.handle(early.clone()),
            Err(ProtocolError::Unexpected { .. })
        ));
        let mut r = Receiver::new(Some(1), 10, 10);
        r.handle(Message::Hello {
            volume_id: 1,
            last_seq: 20,
        })
        .unwrap();
        for (first, last) in [(12, 12), (10, 11), (11, 10)] {
            let m = Message::Batch {
                first,
                last,
                primary_last: 20,
                frames: vec![],
            };
            assert!(matches!(
                Receiver::new(Some(1), 10, 10).handle(m.clone()),
                Err(ProtocolError::Unexpected { .. })
            ));
            assert!(matches!(r.handle(m), Err(ProtocolError::OutOfOrder { .. })));
        }
        // A record outside its batch, and records going backwards.
        for recs in [
            vec![write(13, "a", 0, b"x")],
            vec![write(12, "a", 0, b"x"), write(11, "a", 0, b"x")],
        ] {
            let m = Message::Batch {
                first: 11,
                last: 12,
                primary_last: 20,
                frames: message::encode_records(&recs),
            };
            assert!(matches!(r.handle(m), Err(ProtocolError::RecordSeq { .. })));
        }
        // A corrupt record frame inside a valid message.
        let mut frames = message::encode_records(&[write(11, "a", 0, b"x")]);
        let n = frames.len();
        frames[n - 1] ^= 1;
        let m = Message::Batch {
            first: 11,
            last: 11,
            primary_last: 20,
            frames,
        };
        assert!(matches!(r.handle(m), Err(ProtocolError::Record(_))));
    }

    #[test]
    fn foreign_volume_and_bad_acks_are_refused() {
        let mut r = Receiver::new(Some(5), 3, 3);
        assert!(matches!(
            r.handle(Message::Hello {
                volume_id: 6,
                last_seq: 0
            }),
            Err(ProtocolError::VolumeMismatch { .. })
        ));
        let mut s = Sender::new(5, SenderConfig::default());
        assert!(
            s.handle(Message::Welcome {
                volume_id: 6,
                received: 0,
                applied: 0
            })
            .is_err()
        );
        let mut s = Sender::new(5, SenderConfig::default());
        s.handle(Message::Welcome {
            volume_id: 5,
            received: 2,
            applied: 1,
        })
        .unwrap();
        // Nothing sent beyond 2: an ack of 3 is a lie.
        for (received, applied) in [(3, 0), (2, 0), (1, 1), (2, 3)] {
            let mut s2 = Sender::new(5, SenderConfig::default());
            s2.handle(Message::Welcome {
                volume_id: 5,
                received: 2,
                applied: 1,
            })
            .unwrap();
            assert!(
                s2.handle(Message::Ack {
                    received,
                    applied,
                    error: None
                })
                .is_err(),
                "{received} {applied}"
            );
        }
        assert!(matches!(
            s.handle(Message::Hello {
                volume_id: 5,
                last_seq: 0
            }),
            Err(ProtocolError::Unexpected { .. })
        ));
    }

    #[test]
    fn extreme_seqs_are_refused_not_overflowed() {
        let mut r = Receiver::new(Some(1), u64::MAX - 1, 0);
        r.handle(Message::Hello {
            volume_id: 1,
            last_seq: 0,
        })
        .unwrap();
        assert!(
            r.handle(Message::Batch {
                first: u64::MAX,
                last: u64::MAX,
                primary_last: 0,
                frames: vec![],
            })
            .is_err()
        );
        let mut s = Sender::new(1, SenderConfig::default());
        assert!(
            s.handle(Message::Welcome {
                volume_id: 1,
                received: u64::MAX,
                applied: 0,
            })
            .is_err()
        );
    }

    #[test]
    fn snapshots_fence_batches_and_never_go_backwards() {
        let hello = Message::Hello {
            volume_id: 1,
            last_seq: 9,
        };
        let entry = Message::SnapshotEntry {
            path: b"a".to_vec(),
            kind: message::EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 1,
            target: vec![],
            xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
        };
        // A snapshot older than what the replica holds: refused.
        let mut r = Receiver::new(Some(1), 10, 3);
        r.handle(hello.clone()).unwrap();
        assert!(r.handle(Message::SnapshotBegin { at: 9 }).is_err());
        // Newer: accepted (a replica behind the journal gets a new copy).
        let mut r = Receiver::new(Some(1), 3, 3);
        r.handle(hello.clone()).unwrap();
        assert!(r.handle(Message::SnapshotBegin { at: 9 }).is_ok());
        // Fresh: begin, entries, no batch in between, end moves the stream on.
        let mut r = Receiver::new(None, 0, 0);
        r.handle(hello).unwrap();
        assert!(r.handle(entry.clone()).is_err());
        let mut r = Receiver::new(None, 0, 0);
        r.handle(Message::Hello {
            volume_id: 1,
            last_seq: 9,
        })
        .unwrap();
        assert!(matches!(
            r.handle(Message::SnapshotBegin { at: 9 }),
            Ok(ReceiverEvent::Snapshot(_))
        ));
        assert!(matches!(r.handle(entry), Ok(ReceiverEvent::Snapshot(_))));
        let b = Message::Batch {
            first: 1,
            last: 1,
            primary_last: 1,
            frames: vec![],
        };
        assert!(r.handle(b).is_err());
        let mut r = Receiver::new(None, 0, 0);
        r.handle(Message::Hello {
            volume_id: 1,
            last_seq: 9,
        })
        .unwrap();
        r.handle(Message::SnapshotBegin { at: 9 }).unwrap();
        assert!(
            r.handle(Message::SnapshotEnd {
                at: 9,
                lenient_through: 8
            })
            .is_err()
        );
        let mut r = Receiver::new(None, 0, 0);
        r.handle(Message::Hello {
            volume_id: 1,
            last_seq: 9,
        })
        .unwrap();
        r.handle(Message::SnapshotBegin { at: 9 }).unwrap();
        assert_eq!(
            r.handle(Message::SnapshotEnd {
                at: 9,
                lenient_through: 12
            })
            .unwrap(),
            ReceiverEvent::SnapshotEnd {
                at: 9,
                lenient_through: 12
            }
        );
        let b = Message::Batch {
            first: 10,
            last: 10,
            primary_last: 12,
            frames: vec![],
        };
        assert!(matches!(r.handle(b), Ok(ReceiverEvent::Store { .. })));
        assert!(r.handle(Message::SnapshotBegin { at: 5 }).is_err());
    }

    #[test]
    fn window_limits_batches_in_flight() {
        let mut s = Sender::new(
            1,
            SenderConfig {
                window_bytes: 1000,
                ..Default::default()
            },
        );
        s.handle(Message::Welcome {
            volume_id: 1,
            received: 0,
            applied: 0,
        })
        .unwrap();
        let _ = s.batch(vec![write(1, "a", 0, b"x")], 1, 1);
        s.sent(1, 600);
        assert!(s.wants().is_some());
        let _ = s.batch(vec![write(2, "a", 0, b"x")], 2, 2);
        s.sent(2, 600);
        assert_eq!(s.wants(), None);
        s.handle(Message::Ack {
            received: 1,
            applied: 0,
            error: None,
        })
        .unwrap();
        assert_eq!(s.wants(), Some(3));
    }

    #[test]
    fn coalescing_drops_only_covered_writes_within_a_run() {
        let recs = vec![
            write(1, "a", 0, &[1; 10]), // covered by 3
            write(2, "b", 0, &[2; 10]), // other file
            write(3, "a", 0, &[3; 20]),
            write(4, "c", 5, &[4; 10]), // covered by 6? no: 6 covers 0..8 only
            unlink(5, "d"),
            write(6, "c", 0, &[5; 8]),
            write(7, "e", 0, &[6; 4]), // covered by 9 across a namespace op? no: 8 ends the run
            unlink(8, "f"),
            write(9, "e", 0, &[7; 4]),
            write(10, "g", 0, &[8; 4]), // covered by 11
            write(11, "g", 0, &[9; 4]),
        ];
        let kept: Vec<u64> = coalesce(recs).iter().map(|r| r.seq).collect();
        assert_eq!(kept, vec![2, 3, 4, 5, 6, 7, 8, 9, 11]);
    }

    /// Applying a coalesced batch gives the same bytes as applying it whole.
    #[test]
    fn coalescing_preserves_the_result() {
        let mut seed = 3u64;
        let mut rnd = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..200 {
            let recs: Vec<Record> = (1..=30)
                .map(|i| {
                    let off = rnd(64);
                    let len = 1 + rnd(32) as usize;
                    write(
                        i,
                        if rnd(2) == 0 { "a" } else { "b" },
                        off,
                        &vec![i as u8; len],
                    )
                })
                .collect();
            let apply = |rs: &[Record]| {
                let mut files: std::collections::HashMap<Vec<u8>, Vec<u8>> = Default::default();
                for r in rs {
                    if let Op::Write { path, offset } = &r.op {
                        let f = files.entry(path.clone()).or_default();
                        let end = *offset as usize + r.data.len();
                        if f.len() < end {
                            f.resize(end, 0);
                        }
                        f[*offset as usize..end].copy_from_slice(&r.data);
                    }
                }
                files
            };
            assert_eq!(apply(&recs), apply(&coalesce(recs.clone())));
        }
    }
}
