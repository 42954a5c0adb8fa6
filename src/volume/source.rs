//! What the primary's replication source (`crate::primary`) may do to the
//! volume: short holds, each around one metadata operation or one chunk
//! read, never the exclusive namespace lock across I/O.
//!
//! * [`Volume::observe`]: the namespace lock *shared*, as a data mutation
//!   holds it. Guest writes go on; a namespace mutation (create, rename,
//!   unlink …) waits until the hold ends, and guest writes queued behind that
//!   mutation wait at most as long. While a hold lives, the namespace is the
//!   one after every namespace record at or below [`Hold::seq`] and before
//!   every one above it: namespace records get their seq under the exclusive
//!   lock, so none is assigned during a shared hold.
//! * [`Volume::quiet_file`]: one regular file with its mutations excluded,
//!   for "read a chunk and journal it" with no mutation of that file between
//!   the read and the append: the namespace lock shared (no rename or unlink
//!   moves the path) plus the file's own mutation lock exclusively (no write
//!   in flight, none starts; every data mutation of a file takes it).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::RwLockReadGuard;

use super::Volume;
use super::inode::Inode;
use super::recorder::{NamespaceGuard, Recorder};

/// A short hold of the namespace lock (shared); see the module docs.
pub struct Hold<'a> {
    _shared: Option<RwLockReadGuard<'a, ()>>,
    _exclusive: Option<NamespaceGuard<'a>>,
    seq: u64,
}

impl Hold<'_> {
    /// The journal's last seq during the hold: the namespace is the one that
    /// followed namespace record `seq` (or the last one before it).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// A regular file held still for the source: see [`Volume::quiet_file`].
pub struct Quiet<'a> {
    pub file: &'a File,
    pub recorder: &'a Recorder,
    pub inode: &'a Inode,
}

impl Volume {
    /// A short shared hold of the namespace lock (see the module docs).
    pub fn observe(&self) -> Hold<'_> {
        let shared = self.recorder.as_ref().map(|r| r.data_lock());
        let seq = self
            .recorder
            .as_ref()
            .map(|r| r.journal().last_seq())
            .unwrap_or(0);
        Hold {
            _shared: shared,
            _exclusive: None,
            seq,
        }
    }

    /// The exclusive hold, for the last round of a snapshot listing that
    /// namespace changes kept disturbing: it stops every mutation, so callers
    /// keep it around the few names those changes touched, never a tree.
    pub fn observe_exclusive(&self) -> Hold<'_> {
        let exclusive = self.recorder.as_ref().map(|r| r.namespace_lock());
        let seq = self
            .recorder
            .as_ref()
            .map(|r| r.journal().last_seq())
            .unwrap_or(0);
        Hold {
            _shared: None,
            _exclusive: exclusive,
            seq,
        }
    }

    /// Runs `f` on the regular file at `rel` (opened beneath the backing dir,
    /// no symlink followed, never a fifo) while no mutation of it can happen:
    /// the namespace lock shared, then the file's mutation lock exclusively,
    /// the order every data mutation takes them in. Ok(None) when `rel` is
    /// not a regular file (or cannot be opened), or the volume records nothing.
    ///
    /// The inode is the volume's own (writes through the mount use the same
    /// lock); a file the kernel does not know is entered in the inode table
    /// for the duration, so a lookup meanwhile finds that entry.
    pub fn quiet_file<T>(
        &self,
        rel: &[u8],
        f: impl FnOnce(Quiet<'_>) -> std::io::Result<T>,
    ) -> std::io::Result<Option<T>> {
        let Some(recorder) = self.recorder.as_ref() else {
            return Ok(None);
        };
        let _shared = recorder.data_lock();
        let Ok(p) = crate::path::RelPath::parse(rel) else {
            return Ok(None);
        };
        // An error opening it counts as "not a regular file", as a missing
        // path does (catch-up then leaves the repair to a snapshot).
        let Some(file) = crate::path::open_regular_beneath(&self.backing, &p).unwrap_or(None)
        else {
            return Ok(None);
        };
        let proc = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(std::io::Error::other)?;
        let opath = super::sys::open_path(&proc, libc::O_PATH).map_err(os_error)?;
        let st = super::sys::fstat(std::os::fd::AsFd::as_fd(&opath)).map_err(os_error)?;
        let inode = self.inodes.remember(opath, &st);
        let r = {
            let _order = inode.mutation.lock().unwrap_or_else(|e| e.into_inner());
            f(Quiet {
                file: &file,
                recorder,
                inode: &inode,
            })
        };
        self.inodes.forget(inode.ino, 1);
        r.map(Some)
    }
}

fn os_error(e: crate::error::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::exclude::Exclusions;
    use crate::journal::{Journal, JournalOptions, Op};
    use crate::volume::{Caller, inode::ROOT_INO};
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Inside a quiet hold no write of the file completes, so a chunk read
    /// there and journaled there is never older than a write journaled
    /// before it. (The hold waits a while for a write that could slip
    /// through; a correct hold lets none through however long it waits.)
    #[test]
    fn no_write_of_a_quiet_file_completes_inside_the_hold() {
        let dir = tempfile::tempdir().unwrap();
        let (backing, state) = (dir.path().join("b"), dir.path().join("s"));
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::write(backing.join("f"), vec![1u8; 8192]).unwrap();
        let (journal, _) = Journal::open(&state, JournalOptions::default()).unwrap();
        journal.set_backing_dir(&backing);
        let journal = Arc::new(journal);
        let v = Volume::new(&backing, Default::default())
            .unwrap()
            .with_recorder(Recorder::new(
                journal.clone(),
                Exclusions::default(),
                &backing,
            ));
        let e = v.lookup(ROOT_INO, std::ffi::OsStr::new("f")).unwrap();
        let fh = v.open(e.attr.ino, libc::O_RDWR, Caller::ROOT).unwrap().fh;
        let done = AtomicBool::new(false);
        let (inside, chunk_seq) = std::thread::scope(|s| {
            v.quiet_file(b"f", |q| {
                s.spawn(|| {
                    v.write(fh, 0, b"new", false).unwrap();
                    done.store(true, Ordering::Release);
                });
                for _ in 0..300 {
                    if done.load(Ordering::Acquire) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                let inside = done.load(Ordering::Acquire);
                let mut buf = vec![0u8; 3];
                q.file.read_exact_at(&mut buf, 0)?;
                let op = Op::Write {
                    path: b"f".to_vec(),
                    offset: 0,
                };
                Ok((inside, q.recorder.record(Some(q.inode), &op, &buf)))
            })
            .unwrap()
            .unwrap()
        });
        assert!(
            !inside,
            "a write of the file completed inside its quiet hold"
        );
        assert!(done.load(Ordering::Acquire));
        // The guest's write is journaled after the chunk, which is the old
        // content.
        let last = journal.last_seq();
        assert!(last > chunk_seq, "write seq {last}, chunk seq {chunk_seq}");
        journal.wait_written(last);
        let chunk = journal.read(chunk_seq).unwrap().unwrap();
        assert_eq!(chunk.data, vec![1u8; 3]);
        // A path that is no regular file is not held.
        std::fs::create_dir(backing.join("d")).unwrap();
        assert!(v.quiet_file(b"d", |_| Ok(())).unwrap().is_none());
        assert!(v.quiet_file(b"../x", |_| Ok(())).unwrap().is_none());
    }
}
