//! Reference-model test: random operation sequences applied to the mount and to
//! a plain directory must give the same result (value or errno) op by op, and
//! the same trees at the end (through the mount and in the backing dir); and
//! replaying the journal reproduces the backing dir.

mod common;

use common::TestMount;
use common::model::{Actor, Op, ops, prelude};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 300,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

fn run_sequence(m: TestMount, seq: &[Op]) -> Result<(), TestCaseError> {
    run_sequence_excluding(m, seq, &[])
}

/// Exclusions for the model: `d/**` keeps `d` and excludes what is in it (a
/// rename of `d` moves its contents across the boundary), `e` excludes `e`
/// and everything beneath it, and `b` at any depth.
const EXCLUDED: &[&str] = &["d/**", "e", "b"];

/// The included part of `dir`: a copy with every excluded path removed (hard
/// links within the copy are kept, so link counts are those a replica can see).
fn included_copy(dir: &std::path::Path, patterns: &[&str]) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("copy dir");
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", dir.display()))
        .arg(copy.path())
        .status()
        .expect("cp");
    assert!(ok.success());
    let ex = replicafs::journal::exclude::Exclusions::new(
        &patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
    )
    .expect("exclusions");
    fn prune(ex: &replicafs::journal::exclude::Exclusions, root: &std::path::Path, rel: &str) {
        let here = if rel.is_empty() {
            root.to_owned()
        } else {
            root.join(rel)
        };
        for e in std::fs::read_dir(&here).expect("list").flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if rel.is_empty() && name == ".replicafs" {
                continue;
            }
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let is_dir = e.file_type().expect("type").is_dir();
            if ex.is_excluded(r.as_bytes()) {
                if is_dir {
                    std::fs::remove_dir_all(e.path()).expect("prune dir");
                } else {
                    std::fs::remove_file(e.path()).expect("prune file");
                }
            } else if is_dir {
                prune(ex, root, &r);
            }
        }
    }
    prune(&ex, copy.path(), "");
    copy
}

/// As `run_sequence`, with exclusion rules: the mount must still behave as a
/// plain directory, and the journal replay must give the included part of
/// the backing dir (what a replica holds).
fn run_sequence_excluding(
    mut m: TestMount,
    seq: &[Op],
    excluded: &[&str],
) -> Result<(), TestCaseError> {
    let plain = tempfile::tempdir().expect("plain dir");
    let mut mount_side = Actor::new(&m.mnt);
    let mut plain_side = Actor::new(plain.path());
    for op in prelude() {
        let (got, want) = (mount_side.apply(&op), plain_side.apply(&op));
        prop_assert_eq!(&got, &want, "prelude {:?}", op);
        prop_assert!(got.is_ok(), "prelude {:?}: {:?}", op, got);
    }
    let debug = std::env::var("MODEL_DEBUG").is_ok();
    for (i, op) in seq.iter().enumerate() {
        let got = mount_side.apply(op);
        let want = plain_side.apply(op);
        if debug {
            eprintln!("{op:?} -> {got:?}");
        }
        prop_assert_eq!(
            &got,
            &want,
            "op #{} {:?}: mount (left) and plain dir (right) disagree",
            i,
            op
        );
    }
    // Close what is still open (the kernel flushes on close), then compare.
    mount_side.close_all();
    plain_side.close_all();
    let diffs = common::compare_trees(&m.mnt, plain.path());
    prop_assert!(
        diffs.is_empty(),
        "mount vs plain dir:\n  {}",
        diffs.join("\n  ")
    );
    let diffs = common::compare_trees(&m.backing, plain.path());
    prop_assert!(
        diffs.is_empty(),
        "backing vs plain dir:\n  {}",
        diffs.join("\n  ")
    );
    // Replaying the journal onto the starting directory (empty: the prelude
    // went through the mount) reproduces the backing dir.
    drop(mount_side);
    m.unmount();
    let replayed = tempfile::tempdir().expect("replay dir");
    common::replay_journal(&m.backing.join(".replicafs"), replayed.path(), u64::MAX);
    let expected = included_copy(&m.backing, excluded);
    let diffs = common::compare_trees(expected.path(), replayed.path());
    prop_assert!(
        diffs.is_empty(),
        "backing vs journal replay:\n  {}",
        diffs.join("\n  ")
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(cases(200)))]

    #[test]
    fn mount_matches_plain_directory(seq in ops(60)) {
        run_sequence(TestMount::new(), &seq)?;
    }
}

proptest! {
    #![proptest_config(config(cases(60)))]

    /// The same without the kernel's writeback cache: every write and append
    /// offset then comes straight from the kernel to us.
    #[test]
    fn mount_without_writeback_cache_matches_plain_directory(seq in ops(60)) {
        let m = TestMount::with_options(|o| o.fuse.writeback_cache = false);
        run_sequence(m, &seq)?;
    }
}

proptest! {
    #![proptest_config(config(cases(60)))]

    /// With exclusions set, the journal replays to the included part of the
    /// backing dir: renames and links across the boundary carry their
    /// subtrees, and a hard-linked file with any included name is journaled.
    #[test]
    fn journal_with_exclusions_replays_the_included_part(seq in ops(60)) {
        let m = TestMount::with_options(|o| {
            o.exclude = EXCLUDED.iter().map(|s| s.to_string()).collect()
        });
        run_sequence_excluding(m, &seq, EXCLUDED)?;
    }
}

fn excluding(seq: &[Op]) {
    let m =
        TestMount::with_options(|o| o.exclude = EXCLUDED.iter().map(|s| s.to_string()).collect());
    if let Err(e) = run_sequence_excluding(m, seq, EXCLUDED) {
        panic!("{e}");
    }
}

/// Fixed cases across the exclusion boundary, from the prelude's tree: `d`
/// (included, its contents excluded), `d/f`, `e` (excluded), files `a` and
/// `d/a`, `d/b` a hard link to `a`, `c` a symlink to `d/a`. Names: 0 = a,
/// 2 = c, 3 = d, 4 = e, 5 = d/a, 8 = d/f/a, 9 = e/a.
#[test]
fn exclusion_boundary_cases() {
    use common::model::WriteMode;
    let w = |path, byte| Op::Write {
        path,
        offset: 10,
        len: 100,
        byte,
        mode: WriteMode::Plain,
    };
    let create = |path| Op::Create {
        path,
        mode: 0o644,
        excl: false,
    };
    let mv = |from, to| Op::Rename { from, to, flags: 0 };
    // A directory whose contents are excluded, renamed to an included name:
    // its contents enter (d/b, a link to a, stays a link).
    excluding(&[
        create(8),
        w(8, 2),
        Op::Unlink { path: 2 },
        mv(3, 2),
        w(0, 3),
    ]);
    // A hard-linked file out and back in.
    excluding(&[Op::Unlink { path: 2 }, mv(0, 9), w(9, 1), mv(9, 2), w(2, 4)]);
    // A directory in, out, written while out, and in again.
    excluding(&[
        Op::Unlink { path: 2 },
        create(9),
        w(9, 1),
        mv(4, 2),
        mv(2, 4),
        w(9, 2),
        mv(4, 2),
    ]);
    // A link into the excluded area, then a rename of it out again.
    excluding(&[
        create(2),
        Op::Link { from: 2, to: 9 },
        mv(9, 5),
        w(5, 7),
        mv(5, 0),
        w(0, 8),
    ]);
    // The excluded name is the only one left; a new included link to it.
    excluding(&[
        create(9),
        w(9, 1),
        Op::Unlink { path: 2 },
        Op::Link { from: 9, to: 2 },
        w(9, 2),
        Op::Unlink { path: 2 },
        w(9, 3),
        Op::Link { from: 9, to: 2 },
    ]);
    // Exchange across the boundary, both ways (a dir with a file).
    excluding(&[
        create(9),
        w(9, 1),
        Op::Rename {
            from: 4,
            to: 0,
            flags: libc::RENAME_EXCHANGE,
        },
        w(4, 3),
        Op::Rename {
            from: 0,
            to: 4,
            flags: libc::RENAME_EXCHANGE,
        },
    ]);
}

/// Offsets past 4 GiB and past 2^40 (sparse files): through the mount, in the
/// backing dir, and in every journal prefix replayed.
#[test]
fn large_offsets_once() {
    use common::model::WriteMode;
    let big = |offset: u64, byte| Op::Write {
        path: 0,
        offset,
        len: 5000,
        byte,
        mode: WriteMode::Plain,
    };
    let seq = vec![
        Op::Create {
            path: 0,
            mode: 0o644,
            excl: false,
        },
        big((4 << 30) - 100, 1),
        big((5 << 30) + 7, 2),
        big((1 << 40) + 4097, 3),
        Op::Read {
            path: 0,
            offset: (1 << 40) + 4000,
            len: 6000,
        },
        Op::PunchHole {
            path: 0,
            offset: (5 << 30) + 4096,
            len: 4096,
        },
        Op::ZeroRange {
            path: 0,
            offset: (1 << 40) + 5000,
            len: 100,
            keep_size: true,
        },
        Op::Truncate {
            path: 0,
            size: (1 << 40) + 6000,
        },
        Op::Rename {
            from: 0,
            to: 2,
            flags: 0,
        },
        Op::Mkdir {
            path: 4,
            mode: 0o755,
        },
        Op::Rename {
            from: 2,
            to: 9,
            flags: 0,
        },
    ];
    if let Err(e) = run_sequence(TestMount::new(), &seq) {
        panic!("{e}");
    }
    if let Err(e) = run_prefixes(&seq) {
        panic!("{e}");
    }
    // A large sparse file entering replication is sent by its data extents.
    excluding(&[
        Op::Mkdir {
            path: 4,
            mode: 0o755,
        },
        Op::Create {
            path: 9,
            mode: 0o644,
            excl: false,
        },
        Op::Write {
            path: 9,
            offset: (1 << 40) + 4097,
            len: 5000,
            byte: 4,
            mode: WriteMode::Plain,
        },
        Op::Write {
            path: 9,
            offset: 5 << 30,
            len: 3000,
            byte: 5,
            mode: WriteMode::Plain,
        },
        Op::Rename {
            from: 4,
            to: 0,
            flags: 0,
        },
    ]);
}

/// A fixed sequence that touches every operation kind once, so a broken
/// operation fails here with a readable case even before proptest shrinks.
#[test]
fn every_operation_once() {
    use common::model::{Time, WriteMode};
    let seq = vec![
        Op::Mkdir {
            path: 3,
            mode: 0o755,
        },
        Op::Create {
            path: 0,
            mode: 0o644,
            excl: true,
        },
        Op::Create {
            path: 0,
            mode: 0o644,
            excl: true,
        },
        Op::Write {
            path: 0,
            offset: 100_000,
            len: 5000,
            byte: 7,
            mode: WriteMode::Plain,
        },
        Op::Write {
            path: 0,
            offset: 0,
            len: 10,
            byte: 8,
            mode: WriteMode::Append,
        },
        Op::Read {
            path: 0,
            offset: 99_990,
            len: 100,
        },
        Op::PunchHole {
            path: 0,
            offset: 4096,
            len: 8192,
        },
        Op::ZeroRange {
            path: 0,
            offset: 100_100,
            len: 100,
            keep_size: false,
        },
        Op::ZeroRange {
            path: 0,
            offset: 200_000,
            len: 100,
            keep_size: true,
        },
        Op::Truncate {
            path: 0,
            size: 50_000,
        },
        Op::Link { from: 0, to: 5 },
        Op::Symlink { target: 3, path: 1 },
        Op::Write {
            path: 1,
            offset: 3,
            len: 3,
            byte: 9,
            mode: WriteMode::Sync,
        },
        Op::Rename {
            from: 0,
            to: 5,
            flags: libc::RENAME_NOREPLACE,
        },
        Op::Rename {
            from: 0,
            to: 1,
            flags: libc::RENAME_EXCHANGE,
        },
        Op::Rename {
            from: 3,
            to: 4,
            flags: 0,
        },
        Op::Rmdir { path: 4 },
        Op::Unlink { path: 4 },
        Op::Chmod {
            path: 0,
            mode: 0o600,
        },
        Op::Utimens {
            path: 1,
            atime: Time::At(1000),
            mtime: Time::Omit,
            nofollow: true,
        },
        Op::Utimens {
            path: 0,
            atime: Time::Now,
            mtime: Time::At(5),
            nofollow: false,
        },
        Op::Fsync {
            path: 4,
            data_only: false,
        },
        Op::Fsync {
            path: 0,
            data_only: true,
        },
        Op::Stat { path: 0 },
        Op::Stat { path: 1 },
        Op::Unlink { path: 1 },
        Op::Write {
            path: 0,
            offset: 0,
            len: 1,
            byte: 1,
            mode: WriteMode::Trunc,
        },
    ];
    if let Err(e) = run_sequence(TestMount::new(), &seq) {
        panic!("{e}");
    }
}

/// Descriptors kept open across renames, unlinks, truncation and hole punching.
#[test]
fn descriptor_operations_once() {
    use common::model::OpenMode;
    let seq = vec![
        Op::Open {
            slot: 0,
            path: 5,
            mode: OpenMode::ReadWrite,
        },
        Op::Open {
            slot: 1,
            path: 5,
            mode: OpenMode::Append,
        },
        Op::FdWrite {
            slot: 0,
            offset: 70_000,
            len: 100,
            byte: 3,
        },
        Op::Rename {
            from: 5,
            to: 9,
            flags: 0,
        },
        Op::FdWrite {
            slot: 1,
            offset: 0,
            len: 10,
            byte: 4,
        },
        Op::Unlink { path: 9 },
        Op::FdStat { slot: 0 },
        Op::FdWrite {
            slot: 0,
            offset: 10,
            len: 10,
            byte: 5,
        },
        Op::FdRead {
            slot: 1,
            offset: 0,
            len: 100,
        },
        Op::FdRead {
            slot: 0,
            offset: 0,
            len: 200_000,
        },
        Op::FdTruncate {
            slot: 0,
            size: 1000,
        },
        Op::FdTruncate { slot: 1, size: 10 },
        Op::FdPunchHole {
            slot: 0,
            offset: 100,
            len: 100,
        },
        Op::FdSync { slot: 0 },
        Op::FdRead {
            slot: 0,
            offset: 0,
            len: 2000,
        },
        Op::Close { slot: 1 },
        Op::Close { slot: 1 },
        Op::FdWrite {
            slot: 2,
            offset: 0,
            len: 1,
            byte: 1,
        },
        Op::Open {
            slot: 2,
            path: 8,
            mode: OpenMode::Create,
        },
        Op::Open {
            slot: 2,
            path: 7,
            mode: OpenMode::ReadOnly,
        },
        Op::FdRead {
            slot: 2,
            offset: 0,
            len: 10,
        },
        Op::FdSync { slot: 2 },
        Op::Open {
            slot: 2,
            path: 3,
            mode: OpenMode::Truncate,
        },
    ];
    if let Err(e) = run_sequence(TestMount::new(), &seq) {
        panic!("{e}");
    }
}

/// Every prefix of the journal, replayed onto the starting directory, gives a
/// state the backing dir really had: after each operation the backing dir is
/// copied with the journal's newest seq, and the replay is compared at each.
/// Without the writeback cache, so that an operation's changes reach the
/// backing dir before its syscall returns.
///
/// Writes keep their bytes in the backing file, held as for a peer that never
/// applies anything, with a ring of 16 KiB. The records are read twice: by a reader racing the
/// operations, as a shipper does (each overwrite must preserve the bytes it
/// replaces before the reader gets to them), and after the unmount from the
/// reopened journal (the held writes put away at the clean close and taken
/// back). Both must replay every prefix.
fn run_prefixes(seq: &[Op]) -> Result<(), TestCaseError> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut m = TestMount::with_options(|o| {
        o.fuse.writeback_cache = false;
        // A ring of a few writes: held writes are served from it, from the
        // file and from preimages (overwrites and evictions) in one run.
        if let Some(j) = o.journal.as_mut() {
            j.ring_bytes = 16 << 10;
        }
    });
    let snaps = tempfile::tempdir().expect("snapshot dir");
    let journal = m
        .volume()
        .recorder()
        .expect("journaling mount")
        .journal()
        .clone();
    let stop = Arc::new(AtomicBool::new(false));
    let racing = {
        let (journal, stop) = (journal.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut next = 1;
            loop {
                let done = stop.load(Ordering::Acquire);
                let last = journal.last_seq();
                journal.wait_written(last);
                for r in journal.records(next, last) {
                    let r = journal.resolve(r.expect("record"));
                    next = r.seq + 1;
                    got.push(r);
                }
                if done {
                    return got;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let mut side = Actor::new(&m.mnt);
    let mut points = Vec::new();
    let all: Vec<Op> = prelude().into_iter().chain(seq.iter().cloned()).collect();
    for (i, op) in all.iter().enumerate() {
        let _ = side.apply(op);
        let snap = snaps.path().join(i.to_string());
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(&m.backing)
            .arg(&snap)
            .status()
            .expect("cp");
        prop_assert!(ok.success());
        std::fs::remove_dir_all(snap.join(".replicafs")).expect("drop state dir from snapshot");
        points.push((journal.last_seq(), snap, op.clone()));
    }
    drop(side);
    stop.store(true, Ordering::Release);
    let raced = racing.join().expect("racing reader");
    drop(journal);
    m.unmount();
    let journal = common::open_journal(&m.backing.join(".replicafs"), &m.backing);
    let reopened: Vec<_> = journal
        .records(1, u64::MAX)
        .map(|r| journal.resolve(r.expect("record")))
        .collect();
    for (how, records) in [("racing reader", raced), ("reopened journal", reopened)] {
        let replayed = tempfile::tempdir().expect("replay dir");
        let applier = replicafs::journal::apply::Applier::new(replayed.path()).expect("applier");
        let mut records = records.into_iter().peekable();
        for (seq, snap, op) in &points {
            while let Some(r) = records.next_if(|r| r.seq <= *seq) {
                applier.apply(&r).expect("apply");
            }
            let diffs = common::compare_trees(snap, replayed.path());
            prop_assert!(
                diffs.is_empty(),
                "{}: journal through seq {} (after {:?}) vs backing dir then:\n  {}",
                how,
                seq,
                op,
                diffs.join("\n  ")
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(cases(20)))]

    #[test]
    fn every_journal_prefix_is_a_state_the_mount_had(seq in ops(40)) {
        run_prefixes(&seq)?;
    }
}
