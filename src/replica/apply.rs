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
//! Readers of the replica's read-only mount: each record is applied with one
//! system call on the mirror (a write record is a single pwrite), and the
//! kernel serialises a pwrite against concurrent reads of the same pages of a
//! regular file page by page; a reader can therefore see a record's effect or
//! not, but not a torn page of it. Records of a batch whose overwrites were
//! coalesced are applied as a unit with no reader lock: a reader may see the
//! mirror between two records of one batch (as it may on the primary).

use std::io;
use std::path::{Path, PathBuf};

use crate::journal::apply::{Applier, check};
use crate::journal::record::{Op, Record};

use super::store::{ApplyState, StateFile};
use super::{MirrorSync, SyncFs};

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
