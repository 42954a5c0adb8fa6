//! Random and mutated frames through the replica's whole receive path: the
//! frame decoder, the protocol receiver, the receive log, the record applier
//! and the snapshot applier, on a temporary mirror. Nothing may panic, nothing
//! outside the mirror may change, and memory stays bounded.
//!
//! Seeded and reproducible: `FUZZ_SEED=<seed printed by a failing run>`;
//! `FUZZ_FRAMES=<n>` sets how many frames (default 100 000).
//!
//! The mirror and the replica state live on a small tmpfs of their own
//! (mounted by the test, root needed as for the FUSE tests), so a fallocate
//! or a sparse write of any size the fuzzer makes up meets ENOSPC instead of
//! filling the machine's memory or disk.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use replicafs::journal::record::{self, Op, Record, Timestamp};
use replicafs::protocol::frame::{self, Decoder, HEADER_LEN, MAX_BODY};
use replicafs::protocol::message::{EntryKind, Message, encode_records};
use replicafs::protocol::{Receiver, ReceiverEvent};
use replicafs::replica::MirrorSync;
use replicafs::replica::apply::MirrorApplier;
use replicafs::replica::snapshot::SnapshotApplier;
use replicafs::replica::store::{ApplyState, ReceiveLog, StateFile};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The sync the applier calls before a namespace intent: the fuzz mirror is
/// on a tmpfs, nothing to make durable.
struct NoSync;

impl MirrorSync for NoSync {
    fn sync(&self, _: &Path) -> std::io::Result<()> {
        Ok(())
    }
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Scratch {
    _base: tempfile::TempDir,
    fs: PathBuf,
    mounted: bool,
}

impl Scratch {
    fn new() -> Scratch {
        let base = tempfile::Builder::new()
            .prefix("replicafs-fuzz")
            .tempdir_in("/tmp")
            .unwrap();
        let fs = base.path().join("fs");
        std::fs::create_dir(&fs).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=96m,mode=0700", "tmpfs"])
            .arg(&fs)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            mounted,
            "cannot mount a tmpfs for the fuzz mirror (the test runs as root, like the FUSE tests)"
        );
        Scratch {
            _base: base,
            fs,
            mounted,
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.mounted {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.fs)
                .status();
        }
    }
}

/// Every entry beneath `root` with its type, mode and content.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("{:?}", std::fs::read_link(&p).unwrap())
            } else if m.is_dir() {
                stack.push(p.clone());
                String::new()
            } else if m.is_file() {
                format!("{:?}", std::fs::read(&p).unwrap())
            } else {
                format!("rdev {}", m.rdev())
            };
            out.insert(
                p.strip_prefix(root).unwrap().display().to_string(),
                format!("{:o} {} {what}", m.mode(), m.uid()),
            );
        }
    }
    out
}

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

struct Gen {
    outside: Vec<u8>,
}

impl Gen {
    fn path(&self, rng: &mut Rng) -> Vec<u8> {
        const PARTS: &[&[u8]] = &[
            b"a", b"b", b"d", b"f", b"p", b"l", b"s", b"..", b".", b"", b"x\0y", b"state",
            b"outside", b"secret",
        ];
        if rng.chance(4) {
            let mut p = self.outside.clone();
            p.extend_from_slice(b"/secret");
            return p;
        }
        if rng.chance(2) {
            return vec![b'n'; 200 + rng.below(5000) as usize];
        }
        let n = 1 + rng.below(3);
        let mut p = Vec::new();
        for i in 0..n {
            if i > 0 {
                p.push(b'/');
            }
            // Mostly plain names, so that records find what earlier ones made.
            let part = if rng.chance(85) {
                *rng.pick(&PARTS[..7])
            } else {
                *rng.pick(PARTS)
            };
            p.extend_from_slice(part);
        }
        p
    }

    fn offset(&self, rng: &mut Rng) -> u64 {
        match rng.below(10) {
            0 => rng.next(),
            1 => u64::MAX - rng.below(16),
            2 => 1 << (32 + rng.below(31)),
            _ => rng.below(1 << 20),
        }
    }

    fn op(&self, rng: &mut Rng) -> (Op, Vec<u8>) {
        let path = self.path(rng);
        let ts = |rng: &mut Rng| {
            rng.chance(50).then(|| Timestamp {
                sec: rng.next() as i64 >> 20,
                nsec: rng.below(1_000_000_000) as u32,
            })
        };
        let op = match rng.below(15) {
            0..=2 => {
                let len = if rng.chance(90) {
                    rng.below(512)
                } else {
                    rng.below(64 << 10)
                };
                return (
                    Op::Write {
                        path,
                        offset: self.offset(rng),
                    },
                    rng.bytes(len as usize),
                );
            }
            3 => Op::Truncate {
                path,
                size: self.offset(rng),
            },
            4 => Op::Fallocate {
                path,
                mode: {
                    let r = rng.next() as i32;
                    *rng.pick(&[0, 1, 3, 0x10, r])
                },
                offset: self.offset(rng),
                len: self.offset(rng),
            },
            5 => Op::Mknod {
                path,
                mode: *rng.pick(&[
                    libc::S_IFREG,
                    libc::S_IFIFO,
                    libc::S_IFSOCK,
                    libc::S_IFBLK,
                    libc::S_IFCHR,
                    libc::S_IFDIR,
                    0,
                ]) | (rng.next() as u32 & 0o7777),
                rdev: libc::makedev(rng.below(16) as u32, rng.below(16) as u32),
                uid: rng.below(3) as u32,
                gid: rng.below(3) as u32,
            },
            6 => Op::Mkdir {
                path,
                mode: libc::S_IFDIR | (rng.next() as u32 & 0o7777) | 0o700,
                uid: 0,
                gid: 0,
            },
            7 => Op::Symlink {
                path,
                target: if rng.chance(50) {
                    self.outside.clone()
                } else {
                    self.path(rng)
                },
                uid: 0,
                gid: 0,
            },
            8 => Op::Link {
                existing: self.path(rng),
                path,
            },
            9 => Op::Unlink { path },
            10 => Op::Rmdir { path },
            11 => Op::Rename {
                from: path,
                to: self.path(rng),
                flags: {
                    let r = rng.next() as u32;
                    *rng.pick(&[0, 0, 1, 2, 4, r])
                },
            },
            12 => Op::SetAttr {
                path,
                mode: rng.chance(70).then(|| rng.next() as u32 & 0o7777),
                uid: rng.chance(20).then(|| rng.below(3) as u32),
                gid: rng.chance(20).then(|| rng.below(3) as u32),
                atime: ts(rng),
                mtime: ts(rng),
            },
            13 => Op::SetXattr {
                path,
                name: rng
                    .pick(&[&b"user.k"[..], b"user.", b"trusted.x", b"bad\0", b""])
                    .to_vec(),
                value: {
                    let n = rng.below(300) as usize;
                    rng.bytes(n)
                },
                flags: *rng.pick(&[0, 1, 2, 3]),
            },
            _ => {
                if rng.chance(50) {
                    Op::RemoveXattr {
                        path,
                        name: b"user.k".to_vec(),
                    }
                } else {
                    Op::RemoveTree { path }
                }
            }
        };
        (op, vec![])
    }

    /// Journal frames for `first..=last`, some ops' bytes mutated (with a
    /// good record checksum, so they reach the op decoder).
    fn frames(&self, rng: &mut Rng, first: u64, n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in first..first + n {
            let (op, data) = self.op(rng);
            if rng.chance(10) {
                let mut ob = record::encode_op(&op);
                mutate(rng, &mut ob);
                record::encode_frame(seq, &ob, &data, &mut out);
            } else {
                out.extend_from_slice(&encode_records(&[Record { seq, op, data }]));
            }
        }
        if rng.chance(3) {
            mutate(rng, &mut out);
        }
        out
    }

    fn message(&self, rng: &mut Rng, expected: u64, in_snapshot: bool) -> Message {
        let entry = |rng: &mut Rng| Message::SnapshotEntry {
            path: self.path(rng),
            kind: *rng.pick(&[
                EntryKind::Dir,
                EntryKind::File,
                EntryKind::Symlink,
                EntryKind::Link,
            ]),
            mode: rng.next() as u32,
            uid: 0,
            gid: 0,
            size: self.offset(rng),
            target: if rng.chance(50) {
                self.outside.clone()
            } else {
                self.path(rng)
            },
            xattrs: if rng.chance(20) {
                vec![(b"user.k".to_vec(), rng.bytes(8))]
            } else {
                vec![]
            },
        };
        if in_snapshot {
            return match rng.below(10) {
                0..=5 => entry(rng),
                6..=8 => Message::SnapshotData {
                    path: self.path(rng),
                    offset: self.offset(rng),
                    data: {
                        let n = rng.below(1024) as usize;
                        rng.bytes(n)
                    },
                },
                _ => Message::SnapshotEnd {
                    at: expected.saturating_sub(1),
                    lenient_through: expected.saturating_sub(1) + rng.below(8),
                },
            };
        }
        match rng.below(20) {
            0..=13 => {
                let n = 1 + rng.below(6);
                let first = if rng.chance(95) { expected } else { rng.next() };
                Message::Batch {
                    first,
                    last: first.saturating_add(n - 1),
                    primary_last: rng.next(),
                    frames: self.frames(rng, first, n),
                }
            }
            14 => Message::SnapshotBegin {
                at: expected.saturating_sub(1) + rng.below(3),
            },
            15 => entry(rng),
            16 => Message::Ack {
                received: rng.next(),
                applied: rng.next(),
                error: None,
            },
            17 => Message::Goodbye {
                reason: "fuzz".into(),
            },
            18 => Message::Welcome {
                volume_id: 7,
                received: rng.next(),
                applied: rng.next(),
            },
            _ => Message::Hello {
                volume_id: *rng.pick(&[7, 8]),
                last_seq: rng.next(),
            },
        }
    }
}

/// Flips, overwrites, cuts or extends a few bytes.
fn mutate(rng: &mut Rng, b: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(rng.next() as u8);
            continue;
        }
        let i = rng.below(b.len() as u64) as usize;
        match rng.below(5) {
            0 => b[i] ^= 1 << rng.below(8),
            1 => b[i] = rng.next() as u8,
            2 => b.truncate(i),
            3 => b.insert(i, rng.next() as u8),
            _ => {
                let v = *rng.pick(&[0u8, 0x7f, 0x80, 0xff]);
                b[i] = v;
            }
        }
    }
}

/// Recomputes the frame checksum, so a mutated body reaches the decoder.
fn fix_crc(b: &mut [u8]) {
    if b.len() < HEADER_LEN {
        return;
    }
    b[16..20].copy_from_slice(&[0; 4]);
    let mut h = crc32fast::Hasher::new();
    h.update(b);
    let c = h.finalize();
    b[16..20].copy_from_slice(&c.to_le_bytes());
}

/// One encoded frame, valid or damaged in one of several ways.
fn wire_frame(rng: &mut Rng, msg: &Message) -> Vec<u8> {
    let mut b = frame::encode(msg, if rng.chance(30) { 3 } else { 0 }).bytes;
    match rng.below(10) {
        0..=4 => {}
        5 | 6 => {
            // A damaged body with a good checksum.
            let mut body = b.split_off(HEADER_LEN);
            mutate(rng, &mut body);
            let len = body.len() as u32;
            b[8..12].copy_from_slice(&len.to_le_bytes());
            if b[6] & 1 == 0 {
                b[12..16].copy_from_slice(&len.to_le_bytes());
            }
            b.extend_from_slice(&body);
            fix_crc(&mut b);
        }
        7 => {
            // Header fields made up, checksum good.
            let at = *rng.pick(&[5usize, 6, 8, 12]);
            let r = rng.next() as u32;
            let v = *rng.pick(&[0u32, 1, MAX_BODY, MAX_BODY + 1, u32::MAX, r]);
            match at {
                5 => b[5] = v as u8,
                6 => b[6..8].copy_from_slice(&(v as u16).to_le_bytes()),
                _ => b[at..at + 4].copy_from_slice(&v.to_le_bytes()),
            }
            fix_crc(&mut b);
        }
        8 => mutate(rng, &mut b),
        _ => {
            // Noise behind a plausible header.
            let n = rng.below(200) as usize;
            b.truncate(HEADER_LEN);
            b[8..12].copy_from_slice(&(n as u32).to_le_bytes());
            b[12..16].copy_from_slice(&(n as u32).to_le_bytes());
            b[6..8].copy_from_slice(&0u16.to_le_bytes());
            b.extend(rng.bytes(n));
            fix_crc(&mut b);
        }
    }
    b
}

/// The replica's receive path, as the server and the applier thread drive it.
struct Replica {
    mirror: PathBuf,
    state: StateFile,
    log: ReceiveLog,
    applier: MirrorApplier,
    snap: Option<SnapshotApplier>,
    received: u64,
    volume: Option<u64>,
    refused: u64,
    failed: u64,
}

impl Replica {
    fn event(&mut self, ev: ReceiverEvent) {
        match ev {
            ReceiverEvent::Welcome { volume_id, .. } => self.volume = Some(volume_id),
            ReceiverEvent::Snapshot(Message::SnapshotBegin { .. }) => {
                self.log.clear().unwrap();
                self.state.store(ApplyState::default()).unwrap();
                self.snap = Some(SnapshotApplier::new(&self.mirror).unwrap());
            }
            ReceiverEvent::Snapshot(Message::SnapshotEntry {
                path,
                kind,
                mode,
                uid,
                gid,
                size,
                target,
                xattrs,
            }) => {
                let r = self
                    .snap
                    .as_mut()
                    .unwrap()
                    .entry(&path, kind, mode, uid, gid, size, &target, &xattrs);
                self.count(r);
            }
            ReceiverEvent::Snapshot(Message::SnapshotData { path, offset, data }) => {
                let r = self.snap.as_mut().unwrap().data(&path, offset, data);
                self.count(r);
            }
            ReceiverEvent::Snapshot(m) => panic!("unexpected snapshot message {m:?}"),
            ReceiverEvent::SnapshotEnd {
                at,
                lenient_through,
            } => {
                let r = self.snap.take().unwrap().finish().map(drop);
                self.count(r);
                // As the replica's finish_snapshot: records up to
                // lenient_through are then applied leniently.
                self.state
                    .store(ApplyState {
                        applied: at,
                        lenient_through,
                        ..Default::default()
                    })
                    .unwrap();
                self.received = at;
            }
            ReceiverEvent::Store {
                first,
                last,
                frames,
                ..
            } => {
                self.log.append(first, last, &frames).unwrap();
                let (_, _, records) = self
                    .log
                    .batch_with(first)
                    .unwrap()
                    .expect("the batch just stored");
                for r in &records {
                    let res = self.applier.apply(&mut self.state, r);
                    self.count(res);
                }
                self.log.trim(last).unwrap();
                self.received = last;
            }
        }
    }

    fn count(&mut self, r: std::io::Result<()>) {
        if let Err(e) = r {
            if replicafs::path::refusal(&e).is_some() {
                self.refused += 1;
            } else {
                self.failed += 1;
            }
        }
    }
}

#[test]
fn random_and_mutated_frames() {
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let frames: u64 = std::env::var("FUZZ_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    println!("FUZZ_SEED={seed} FUZZ_FRAMES={frames}");
    eprintln!("FUZZ_SEED={seed} FUZZ_FRAMES={frames}");
    let mut rng = Rng(seed);

    let scratch = Scratch::new();
    let mirror = scratch.fs.join("mirror");
    let outside = scratch.fs.join("outside");
    let state_dir = scratch.fs.join("state");
    for d in [&mirror, &outside.join("sub"), &state_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(outside.join("secret"), b"secret").unwrap();
    std::fs::write(outside.join("sub/data"), b"data").unwrap();
    let sentinel = tree(&outside);
    let generator = Gen {
        outside: outside.as_os_str().as_bytes().to_vec(),
    };
    let mut rep = Replica {
        state: StateFile::open(&state_dir.join("replica.state")).unwrap(),
        log: ReceiveLog::open(&state_dir.join("receive")).unwrap(),
        applier: MirrorApplier::with_sync(&mirror, Arc::new(NoSync)).unwrap(),
        snap: None,
        mirror: mirror.clone(),
        received: 0,
        volume: None,
        refused: 0,
        failed: 0,
    };
    let hwm_start = vm_hwm_kib();

    let mut decoded = 0u64;
    let mut events = 0u64;
    let mut sent = 0u64;
    while sent < frames {
        // One connection: a hello (mostly), then frames until one fails.
        let mut dec = Decoder::new();
        let mut rx = Receiver::new(rep.volume, rep.received, rep.received);
        let mut in_snapshot = false;
        let mut msgs: Vec<Vec<u8>> = Vec::new();
        if rng.chance(95) {
            msgs.push(
                frame::encode(
                    &Message::Hello {
                        volume_id: 7,
                        last_seq: 0,
                    },
                    0,
                )
                .bytes,
            );
        }
        'conn: loop {
            if msgs.is_empty() {
                let m = generator.message(&mut rng, rep.received + 1, in_snapshot);
                msgs.push(wire_frame(&mut rng, &m));
            }
            for b in msgs.drain(..) {
                sent += 1;
                // Arrives in pieces.
                let mut rest = &b[..];
                while !rest.is_empty() {
                    let n = 1 + rng.below(rest.len() as u64) as usize;
                    dec.push(&rest[..n]);
                    rest = &rest[n..];
                }
                loop {
                    match dec.next_message() {
                        Ok(Some((m, _))) => {
                            decoded += 1;
                            match rx.handle(m) {
                                Ok(ev) => {
                                    events += 1;
                                    let begins = matches!(
                                        &ev,
                                        ReceiverEvent::Snapshot(Message::SnapshotBegin { .. })
                                    );
                                    if begins {
                                        in_snapshot = true;
                                        rx.snapshot_reset();
                                    }
                                    if let ReceiverEvent::SnapshotEnd { .. } = &ev {
                                        in_snapshot = false;
                                    }
                                    rep.event(ev);
                                }
                                Err(_) => break 'conn,
                            }
                        }
                        Ok(None) => break,
                        Err(_) => break 'conn,
                    }
                }
            }
            // A frame cut short waits for bytes that never come: the
            // connection ends.
            if dec.pending() > 0 && rng.chance(50) {
                assert!(dec.finish().is_err());
                break;
            }
            if sent >= frames {
                break;
            }
        }
        if let Some(s) = rep.snap.take() {
            // A snapshot cut off: the next connection starts another.
            let _ = s.finish();
        }
    }
    let hwm_end = vm_hwm_kib();
    println!(
        "{sent} frames: {decoded} decoded, {events} accepted by the receiver, {} records refused, {} failed; VmHWM {hwm_start} -> {hwm_end} KiB",
        rep.refused, rep.failed
    );
    assert_eq!(
        tree(&outside),
        sentinel,
        "something outside the mirror changed (seed {seed})"
    );
    let mut top: Vec<String> = std::fs::read_dir(&scratch.fs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["mirror", "outside", "state"], "seed {seed}");
    assert!(
        decoded > sent / 4,
        "too few frames decoded: the fuzzer is not reaching the receiver"
    );
    assert!(
        rep.refused > 0 && events > sent / 10,
        "too little reached the applier"
    );
    // One frame buffered (at most MAX_BODY), its decompressed body and the
    // decoded message (each at most MAX_BODY) may be alive at once; per-frame
    // memory that is never freed would pass this after 10^5 frames.
    let bound_kib = 3 * (MAX_BODY as u64 / 1024) + 64 * 1024;
    assert!(
        hwm_end.saturating_sub(hwm_start) < bound_kib,
        "VmHWM grew by {} KiB (bound {bound_kib} KiB; seed {seed})",
        hwm_end - hwm_start
    );
}
