//! Ordered, crash-safe application of records to the mirror.
//!
//! Data records (write, truncate, fallocate, setattr, xattr) are re-applied
//! after a crash: any run of them replayed onto a state that already contains
//! it ends in the same state. Namespace records are applied exactly once:
//! before one is applied the mirror is synced (so everything before it is
//! durable) and the state file records, durably, applied = seq - 1 and an
//! *intent* (its seq, and for a rename the (dev, ino) of its source). The
//! intent stays until a later sync of the mirror persists an applied seq at or
//! past it (the persister's, or the next namespace record's): the persisted
//! applied seq never runs ahead of what is durable in the mirror.
//! Restarting with an intent pending, the mirror itself says whether the
//! record took effect (a created name exists, a removed one does not, a
//! renamed source no longer has its old inode), so it is never applied twice.
//!
//! Runs: the applier takes several stored batches at once and applies their
//! data records in groups ([`group_len`]): writes to one file, each starting
//! where the one before ended, go out as one pwritev straight from the
//! decoded records, and a run opens each file once ([`OpenFiles`], cleared
//! at every namespace record). A group that fails is applied again record by
//! record, which names the record and tells a refusal from a failure (data
//! records may be applied twice).
//!
//! Readers of the replica's read-only mount: a reader may see the mirror
//! between two records of one run (as it may on the primary), and a
//! coalesced write is torn only as a pwrite is (page by page).

use std::io;
use std::path::{Path, PathBuf};

use crate::journal::apply::{Applier, OpenFiles, check, write_all_vectored_at};
use crate::journal::record::{Op, Record};

use super::store::{ApplyState, StateFile};
use super::{MirrorSync, SyncFs};

/// Most records one coalesced write takes (one pwritev: IOV_MAX buffers).
const GROUP_MAX: usize = 1024;

/// How many records from the start of `recs` apply as one unit: writes to
/// one file, each starting where the one before ended, are one unit; any
/// other record is a unit by itself.
pub fn group_len(recs: &[Record]) -> usize {
    let Some(Record {
        op: Op::Write { path, offset },
        data,
        ..
    }) = recs.first()
    else {
        return recs.len().min(1);
    };
    let Some(mut end) = offset.checked_add(data.len() as u64) else {
        return 1;
    };
    let mut n = 1;
    for r in &recs[1..] {
        match &r.op {
            Op::Write { path: p, offset: o } if n < GROUP_MAX && p == path && *o == end => {
                match o.checked_add(r.data.len() as u64) {
                    Some(e) => end = e,
                    None => break,
                }
                n += 1;
            }
            _ => break,
        }
    }
    n
}

pub struct MirrorApplier {
    root: PathBuf,
    applier: Applier,
    sync: std::sync::Arc<dyn MirrorSync>,
}

impl MirrorApplier {
    pub fn new(root: &Path) -> io::Result<MirrorApplier> {
        MirrorApplier::with_sync(root, std::sync::Arc::new(SyncFs))
    }

    /// `sync` makes the mirror durable before a namespace intent is stored.
    pub fn with_sync(
        root: &Path,
        sync: std::sync::Arc<dyn MirrorSync>,
    ) -> io::Result<MirrorApplier> {
        Ok(MirrorApplier {
            root: root.to_path_buf(),
            applier: Applier::new(root)?,
            sync,
        })
    }

    /// (dev, ino) of what the mirror holds at `p`, beneath the root, not
    /// following symlinks; None when nothing is there.
    fn lstat(&self, p: &[u8]) -> io::Result<Option<(u64, u64)>> {
        Ok(self.applier.lstat(p)?.map(|st| (st.st_dev, st.st_ino)))
    }

    /// Applies a data record (no state needed: see [`MirrorApplier::apply`]).
    pub fn apply_data_record(&self, lenient: bool, r: &Record) -> io::Result<()> {
        check(r)?;
        tolerate(lenient, r, self.apply_data(r))
    }

    /// Applies one group of data records (see [`group_len`]) through the
    /// run's open files. An error says only that the group did not go
    /// through: the caller applies its records one by one.
    pub fn apply_group(&self, files: &mut OpenFiles, group: &[Record]) -> io::Result<()> {
        for r in group {
            check(r)?;
        }
        let Some(first) = group.first() else {
            return Ok(());
        };
        if first.op.is_namespace() {
            return Err(io::Error::other("a namespace record is not a data group"));
        }
        match &first.op {
            Op::Write { path, offset } => {
                let f = self.applier.data_file(files, path)?;
                if let [r] = group {
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(&r.data, *offset)
                } else {
                    let bufs: Vec<&[u8]> = group.iter().map(|r| &r.data[..]).collect();
                    write_all_vectored_at(f, *offset, &bufs)
                }
            }
            Op::Truncate { path, size } => self.applier.data_file(files, path)?.set_len(*size),
            Op::Fallocate {
                path,
                mode,
                offset,
                len,
            } => {
                use std::os::fd::AsRawFd;
                let f = self.applier.data_file(files, path)?;
                // SAFETY: fallocate on an open fd; check() bounded the range.
                let rc =
                    unsafe { libc::fallocate(f.as_raw_fd(), *mode, *offset as i64, *len as i64) };
                if rc == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            _ => self.apply_data(first),
        }
    }

    /// Applies a data record; the errors a re-application can meet are ignored.
    fn apply_data(&self, r: &Record) -> io::Result<()> {
        match self.applier.apply(r) {
            Err(e)
                if matches!(r.op, Op::SetXattr { .. } | Op::RemoveXattr { .. })
                    && matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENODATA)) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Applies `r` (the record after the applier's last one, in order).
    /// Namespace records sync the mirror and persist an intent first; data
    /// records persist nothing.
    pub fn apply(&self, state: &mut StateFile, r: &Record) -> io::Result<()> {
        // A record refused outright changes nothing, not even the state file.
        check(r)?;
        let lenient = r.seq <= state.state.lenient_through;
        if !r.op.is_namespace() {
            return tolerate(lenient, r, self.apply_data(r));
        }
        let (dev, ino) = match &r.op {
            Op::Rename { from, .. } => self.lstat(from)?.unwrap_or((0, 0)),
            _ => (0, 0),
        };
        // Records before this one may still be in the page cache: applied =
        // seq - 1 may be stored only once they are durable.
        self.sync.sync(&self.root)?;
        let s = state.state;
        state.store(ApplyState {
            applied: r.seq - 1,
            intent_seq: r.seq,
            intent_dev: dev,
            intent_ino: ino,
            ..s
        })?;
        // The intent stays: the record's own effect is not durable yet.
        tolerate(lenient, r, self.applier.apply(r))
    }

    /// After a restart with `state.intent_seq == r.seq`: finishes `r` without
    /// applying it twice. The intent stays stored until a sync of the mirror
    /// persists a later applied seq.
    pub fn resolve_intent(&self, state: &mut StateFile, r: &Record) -> io::Result<()> {
        let s = state.state;
        let done = match &r.op {
            Op::Mknod { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Link { path, .. } => self.lstat(path)?.is_some(),
            Op::Unlink { path } | Op::Rmdir { path } => self.lstat(path)?.is_none(),
            // Removing a tree is finished by running it again, if anything is left.
            Op::RemoveTree { path } => self.lstat(path)?.is_none(),
            Op::Rename { from, .. } => match self.lstat(from)? {
                None => true,
                Some(id) => id != (s.intent_dev, s.intent_ino),
            },
            _ => false,
        };
        if done {
            // A create may have stopped before its owner and mode were set.
            let fix = match &r.op {
                Op::Mknod {
                    path,
                    mode,
                    uid,
                    gid,
                    ..
                }
                | Op::Mkdir {
                    path,
                    mode,
                    uid,
                    gid,
                } => Some(Op::SetAttr {
                    path: path.clone(),
                    mode: Some(*mode),
                    uid: Some(*uid),
                    gid: Some(*gid),
                    atime: None,
                    mtime: None,
                }),
                Op::Symlink { path, uid, gid, .. } => Some(Op::SetAttr {
                    path: path.clone(),
                    mode: None,
                    uid: Some(*uid),
                    gid: Some(*gid),
                    atime: None,
                    mtime: None,
                }),
                _ => None,
            };
            if let Some(op) = fix {
                self.applier.apply(&Record {
                    seq: r.seq,
                    op,
                    data: vec![],
                })?;
            }
            tracing::info!(
                seq = r.seq,
                op = r.op.name(),
                "namespace record found applied after a restart; not applying it again"
            );
        } else {
            tolerate(r.seq <= s.lenient_through, r, self.applier.apply(r))?;
        }
        Ok(())
    }
}

/// Records right after a fuzzy snapshot may find their effect already in the
/// copy: a name already created or already removed, a source already renamed
/// away, a directory already filled or replaced, an attribute already gone.
/// Only those errors are ignored, and only within the lenient window; a full
/// disk, an I/O error or anything else is a real error.
fn tolerate(lenient: bool, r: &Record, res: io::Result<()>) -> io::Result<()> {
    match res {
        Err(e) if lenient && overlap_explains(&r.op, &e) => {
            tracing::debug!(seq = r.seq, op = r.op.name(), error = %e, "ignored after snapshot");
            Ok(())
        }
        other => other,
    }
}

/// Whether the fuzzy copy's overlap with the journal explains `e` for `op`.
fn overlap_explains(op: &Op, e: &io::Error) -> bool {
    let Some(errno) = e.raw_os_error() else {
        return false;
    };
    match errno {
        libc::ENOENT | libc::EEXIST | libc::ENOTEMPTY | libc::ENOTDIR | libc::EISDIR => true,
        libc::ENODATA => matches!(op, Op::SetXattr { .. } | Op::RemoveXattr { .. }),
        // A directory renamed beneath itself by moves the copy already shows.
        libc::EINVAL => matches!(op, Op::Rename { .. }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Within the lenient window only the errors the fuzzy copy explains are
    /// ignored; a full disk or an I/O error is an error there too.
    #[test]
    fn lenient_window_ignores_only_overlap_errors() {
        let err = |n| Err(io::Error::from_raw_os_error(n));
        let mkdir = rec(
            5,
            Op::Mkdir {
                path: b"d".to_vec(),
                mode: 0o40755,
                uid: 0,
                gid: 0,
            },
        );
        let write = Record {
            seq: 5,
            op: Op::Write {
                path: b"f".to_vec(),
                offset: 0,
            },
            data: vec![1],
        };
        for r in [&mkdir, &write] {
            for n in [
                libc::ENOSPC,
                libc::EIO,
                libc::EDQUOT,
                libc::EROFS,
                libc::EACCES,
            ] {
                assert!(tolerate(true, r, err(n)).is_err(), "errno {n} ignored");
            }
            for n in [libc::ENOENT, libc::EEXIST, libc::ENOTEMPTY] {
                assert!(tolerate(true, r, err(n)).is_ok(), "errno {n} not ignored");
                assert!(tolerate(false, r, err(n)).is_err());
            }
            assert!(tolerate(true, r, Err(io::Error::other("no errno"))).is_err());
        }

        // End to end: a mkdir already in the copy passes; a device node in
        // the window is still refused.
        let d = tempfile::tempdir().unwrap();
        let mirror = d.path().join("m");
        std::fs::create_dir_all(mirror.join("d")).unwrap();
        let mut st = StateFile::open(&d.path().join("s")).unwrap();
        st.store(ApplyState {
            applied: 4,
            lenient_through: 10,
            ..Default::default()
        })
        .unwrap();
        let ap = MirrorApplier::new(&mirror).unwrap();
        ap.apply(&mut st, &mkdir).unwrap();
        let dev = rec(
            6,
            Op::Mknod {
                path: b"b".to_vec(),
                mode: libc::S_IFBLK | 0o600,
                rdev: 0,
                uid: 0,
                gid: 0,
            },
        );
        let e = ap.apply(&mut st, &dev).unwrap_err();
        assert!(crate::path::refusal(&e).is_some());
        assert_eq!(st.state.intent_seq, 5, "a refused record stores no intent");
    }

    fn write(seq: u64, path: &[u8], offset: u64, data: &[u8]) -> Record {
        Record {
            seq,
            op: Op::Write {
                path: path.to_vec(),
                offset,
            },
            data: data.to_vec(),
        }
    }

    /// Records in, groups out: only writes to one file that continue each
    /// other coalesce; applied by groups through the run's open files, the
    /// mirror ends with the same bytes as applied record by record.
    #[test]
    fn coalesced_runs_write_the_same_bytes() {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut recs = vec![
            write(1, b"f", 0, b"abc"),
            write(2, b"f", 3, b"def"),
            write(3, b"f", 6, &big),
            // Overlaps what came before: a new group (an empty write and
            // the next continue it).
            write(4, b"f", 4, b"XY"),
            write(5, b"f", 6, b""),
            write(6, b"f", 6, b"Z"),
            // Another file.
            write(7, b"g", 7, b"g7"),
            // Not adjacent to the last write of f.
            write(8, b"f", 3, b"Q"),
            rec(
                9,
                Op::Truncate {
                    path: b"f".to_vec(),
                    size: 100_000,
                },
            ),
            write(10, b"f", 100_000, b"tail"),
            write(11, b"f", 100_004, b"more"),
        ];
        // More than one pwritev's worth of buffers, back to back.
        for k in 0..2500u64 {
            recs.push(write(12 + k, b"g", 9 + 3 * k, &[k as u8, 1, 2]));
        }
        let mut groups = vec![];
        let mut i = 0;
        while i < recs.len() {
            let n = group_len(&recs[i..]);
            groups.push((recs[i].seq, n));
            i += n;
        }
        assert_eq!(
            groups,
            vec![
                (1, 3),
                (4, 3),
                (7, 1),
                (8, 1),
                (9, 1),
                (10, 2),
                (12, GROUP_MAX),
                (12 + GROUP_MAX as u64, GROUP_MAX),
                (12 + 2 * GROUP_MAX as u64, 2500 - 2 * GROUP_MAX),
            ]
        );

        let d = tempfile::tempdir().unwrap();
        let (one, run) = (d.path().join("one"), d.path().join("run"));
        for m in [&one, &run] {
            std::fs::create_dir(m).unwrap();
            std::fs::write(m.join("f"), b"").unwrap();
            std::fs::write(m.join("g"), b"old contents of g").unwrap();
        }
        let a = MirrorApplier::new(&one).unwrap();
        for r in &recs {
            a.apply_data_record(false, r).unwrap();
        }
        let a = MirrorApplier::new(&run).unwrap();
        let mut files = OpenFiles::default();
        let mut i = 0;
        while i < recs.len() {
            let n = group_len(&recs[i..]);
            a.apply_group(&mut files, &recs[i..i + n]).unwrap();
            i += n;
        }
        assert_eq!(files.len(), 2, "each file opened once");
        // Many files in one run: the open set stays bounded.
        let many: Vec<Record> = (0..OpenFiles::MAX as u64 + 10)
            .map(|k| {
                let name = format!("n{k}");
                std::fs::write(run.join(&name), b"").unwrap();
                write(k + 1, name.as_bytes(), 0, b"x")
            })
            .collect();
        for r in &many {
            a.apply_group(&mut files, std::slice::from_ref(r)).unwrap();
            assert!(files.len() <= OpenFiles::MAX);
        }
        assert_eq!(std::fs::read(run.join("n3")).unwrap(), b"x");
        for name in ["f", "g"] {
            let (x, y) = (
                std::fs::read(one.join(name)).unwrap(),
                std::fs::read(run.join(name)).unwrap(),
            );
            assert!(x == y, "{name} differs");
        }
        // A group the run cannot apply fails as a whole (the caller then
        // applies it record by record): a symlink is never written through.
        std::os::unix::fs::symlink("f", run.join("l")).unwrap();
        let bad = [write(1, b"l", 0, b"a"), write(2, b"l", 1, b"b")];
        assert_eq!(group_len(&bad), 2);
        let e = a.apply_group(&mut files, &bad).unwrap_err();
        assert!(crate::path::refusal(&e).is_some(), "{e}");
        assert!(
            a.apply_group(
                &mut files,
                &[rec(
                    3,
                    Op::Unlink {
                        path: b"f".to_vec()
                    }
                )]
            )
            .is_err()
        );
        assert!(run.join("f").exists());
    }

    fn rec(seq: u64, op: Op) -> Record {
        Record {
            seq,
            op,
            data: vec![],
        }
    }

    /// A crash after the namespace op hit the mirror but before the applied
    /// seq was stored: the restart must not apply it again.
    #[test]
    fn namespace_records_apply_once_across_a_crash() {
        let d = tempfile::tempdir().unwrap();
        let mirror = d.path().join("m");
        std::fs::create_dir(&mirror).unwrap();
        std::fs::write(mirror.join("a"), b"A").unwrap();
        std::fs::write(mirror.join("b"), b"B").unwrap();
        let mut st = StateFile::open(&d.path().join("s")).unwrap();
        let ap = MirrorApplier::new(&mirror).unwrap();
        // Exchange a and b, "crash" after the syscall: the intent is stored.
        let r = rec(
            1,
            Op::Rename {
                from: b"a".to_vec(),
                to: b"b".to_vec(),
                flags: libc::RENAME_EXCHANGE,
            },
        );
        let m = std::fs::symlink_metadata(mirror.join("a")).unwrap();
        st.store(ApplyState {
            applied: 0,
            intent_seq: 1,
            intent_dev: m.dev(),
            intent_ino: m.ino(),
            ..Default::default()
        })
        .unwrap();
        Applier::new(&mirror).unwrap().apply(&r).unwrap();
        // Restart.
        let mut st = StateFile::open(&d.path().join("s")).unwrap();
        ap.resolve_intent(&mut st, &r).unwrap();
        assert_eq!(std::fs::read(mirror.join("a")).unwrap(), b"B");
        // Resolved, but not durable yet: the intent stays for the persister.
        assert_eq!(st.state.applied, 0);
        assert_eq!(st.state.intent_seq, 1);
        // Resolving it again (another restart before a sync) is still a no-op.
        ap.resolve_intent(&mut st, &r).unwrap();
        assert_eq!(std::fs::read(mirror.join("a")).unwrap(), b"B");
        assert_eq!(std::fs::read(mirror.join("b")).unwrap(), b"A");

        // Crash before the syscall: the restart applies it.
        let r2 = rec(
            2,
            Op::Unlink {
                path: b"a".to_vec(),
            },
        );
        st.store(ApplyState {
            applied: 1,
            intent_seq: 2,
            ..Default::default()
        })
        .unwrap();
        ap.resolve_intent(&mut st, &r2).unwrap();
        assert!(!mirror.join("a").exists());

        // A mkdir that happened but lost its mode.
        let r3 = rec(
            3,
            Op::Mkdir {
                path: b"d".to_vec(),
                mode: 0o40751,
                uid: 0,
                gid: 0,
            },
        );
        std::fs::create_dir(mirror.join("d")).unwrap();
        st.store(ApplyState {
            applied: 2,
            intent_seq: 3,
            ..Default::default()
        })
        .unwrap();
        ap.resolve_intent(&mut st, &r3).unwrap();
        assert_eq!(
            std::fs::metadata(mirror.join("d")).unwrap().mode() & 0o7777,
            0o751
        );
    }

    #[test]
    fn data_records_reapply_idempotently() {
        let d = tempfile::tempdir().unwrap();
        let mirror = d.path().join("m");
        std::fs::create_dir(&mirror).unwrap();
        std::fs::write(mirror.join("f"), b"").unwrap();
        let mut st = StateFile::open(&d.path().join("s")).unwrap();
        let ap = MirrorApplier::new(&mirror).unwrap();
        let recs = vec![
            Record {
                seq: 1,
                op: Op::Write {
                    path: b"f".to_vec(),
                    offset: 100,
                },
                data: vec![7; 100],
            },
            rec(
                2,
                Op::Truncate {
                    path: b"f".to_vec(),
                    size: 50,
                },
            ),
            Record {
                seq: 3,
                op: Op::Write {
                    path: b"f".to_vec(),
                    offset: 10,
                },
                data: vec![9; 5],
            },
            rec(
                4,
                Op::SetXattr {
                    path: b"f".to_vec(),
                    name: b"user.k".to_vec(),
                    value: b"v".to_vec(),
                    flags: libc::XATTR_CREATE,
                },
            ),
        ];
        for r in &recs {
            ap.apply(&mut st, r).unwrap();
        }
        let once = std::fs::read(mirror.join("f")).unwrap();
        for r in &recs {
            ap.apply(&mut st, r).unwrap();
        }
        assert_eq!(std::fs::read(mirror.join("f")).unwrap(), once);
        assert_eq!(once.len(), 50);
    }
}
