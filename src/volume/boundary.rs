//! Names crossing the exclusion boundary. A replica holds only included
//! paths; when a rename or link makes objects included that the replica never
//! saw, they are journaled as new (creation records plus their data), and when
//! it makes replicated objects excluded, they are removed from the replica.
//! A directory carries its whole subtree across. All of this runs under the
//! exclusive namespace lock, after the backing change.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

use tracing::error;

use super::inode::BackingKey;
use super::recorder::{Recorder, find_names};
use super::sys;
use crate::journal::Op;
use crate::journal::exclude::Exclusions;

/// Payload size of the write records that carry a file's data.
const CHUNK: usize = 1 << 20;

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut rel = dir.to_vec();
    if !rel.is_empty() {
        rel.push(b'/');
    }
    rel.extend_from_slice(name);
    rel
}

fn under(path: &[u8], top: &[u8]) -> bool {
    path == top || (path.starts_with(top) && path.get(top.len()) == Some(&b'/'))
}

impl Recorder {
    /// Removes `rel` (a tree if `is_dir`) from replicas.
    pub fn record_removal(&self, rel: &[u8], is_dir: bool) {
        let path = rel.to_vec();
        let op = if is_dir {
            Op::RemoveTree { path }
        } else {
            Op::Unlink { path }
        };
        self.record(None, &op, &[]);
    }

    /// Journals the object now at `rel`, and everything beneath it, as new:
    /// directories, special files and symlinks by their creation records,
    /// regular files by a create, their size and their data (holes stay
    /// holes). A file with another included name already on the replica is
    /// linked to it instead. Excluded paths inside are left out.
    pub fn send_tree(&self, rel: &[u8]) {
        let ex = self.exclusions();
        let mut seen = HashMap::new();
        self.send(&ex, rel, rel, &mut seen);
    }

    fn send(
        &self,
        ex: &Exclusions,
        rel: &[u8],
        top: &[u8],
        seen: &mut HashMap<BackingKey, Vec<u8>>,
    ) {
        if ex.is_excluded(rel) {
            return;
        }
        let abs = self.abs(rel);
        let Ok(c) = std::ffi::CString::new(abs.as_os_str().as_bytes()) else {
            return;
        };
        let Ok(fd) = sys::open_path(&c, libc::O_PATH | libc::O_NOFOLLOW) else {
            // Gone meanwhile: nothing to send.
            return;
        };
        let Ok(st) = sys::fstat(fd.as_fd()) else {
            return;
        };
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFDIR && st.st_nlink > 1 {
            let key = super::inode::key_of(&st);
            let existing = seen.get(&key).cloned().or_else(|| {
                find_names(self.abs(b"").as_path(), key, st.st_nlink as usize, |n| {
                    !ex.is_excluded(n) && !under(n, top)
                })
                .into_iter()
                .find(|n| !ex.is_excluded(n) && !under(n, top))
            });
            if let Some(existing) = existing {
                let op = Op::Link {
                    existing,
                    path: rel.to_vec(),
                };
                self.record(None, &op, &[]);
                return;
            }
            seen.insert(key, rel.to_vec());
        }
        let op = match super::creation_op(rel.to_vec(), &st, fd.as_fd()) {
            Ok(op) => op,
            Err(e) => {
                error!(error = %e, path = %String::from_utf8_lossy(rel), "cannot journal an object entering replication");
                return;
            }
        };
        self.record(None, &op, &[]);
        match kind {
            libc::S_IFREG => {
                if let Err(e) = self.send_data(rel, &c, st.st_size as u64) {
                    error!(error = %e, path = %String::from_utf8_lossy(rel), "cannot journal a file entering replication; marking it dirty");
                    self.mark_whole_dirty(rel);
                }
            }
            libc::S_IFDIR => {
                let Ok(entries) = std::fs::read_dir(&abs) else {
                    error!(path = %String::from_utf8_lossy(rel), "cannot list a directory entering replication");
                    return;
                };
                let mut names: Vec<Vec<u8>> = entries
                    .flatten()
                    .map(|e| e.file_name().as_bytes().to_vec())
                    .collect();
                names.sort();
                for name in names {
                    self.send(ex, &join(rel, &name), top, seen);
                }
            }
            _ => {}
        }
    }

    /// The size and data of the regular file at `abs` as records for `rel`.
    fn send_data(&self, rel: &[u8], abs: &std::ffi::CStr, size: u64) -> crate::error::Result<()> {
        let fd = sys::open_path(abs, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK)?;
        let raw = fd.as_raw_fd();
        self.record(
            None,
            &Op::Truncate {
                path: rel.to_vec(),
                size,
            },
            &[],
        );
        let mut buf = vec![0u8; CHUNK];
        let mut pos: i64 = 0;
        loop {
            let start = match sys::lseek(raw, pos, libc::SEEK_DATA) {
                Ok(s) => s,
                // No data past pos.
                Err(e) if e == crate::error::Error::from_errno(libc::ENXIO) => break,
                Err(e) => return Err(e),
            };
            let end = sys::lseek(raw, start, libc::SEEK_HOLE)?;
            let mut at = start as u64;
            while at < end as u64 {
                let want = CHUNK.min((end as u64 - at) as usize);
                let n = sys::pread(raw, &mut buf[..want], at)?;
                if n == 0 {
                    return Ok(());
                }
                let op = Op::Write {
                    path: rel.to_vec(),
                    offset: at,
                };
                self.record(None, &op, &buf[..n]);
                at += n as u64;
            }
            pos = end;
        }
        Ok(())
    }

    /// After a directory moved from `old` to `new` with both names included,
    /// the replica has the moved tree at `new`; but a name inside may change
    /// sides (`d/**` excluded, `d` renamed to `c`). Such names are sent or
    /// removed here.
    pub fn settle_moved_tree(&self, old: &[u8], new: &[u8]) {
        let ex = self.exclusions();
        if ex.is_empty() {
            return;
        }
        self.settle(&ex, old, new);
    }

    /// The names in `dir` (relative), sorted, each with whether it is a
    /// directory; None when it cannot be read.
    fn sorted_entries(&self, dir: &[u8]) -> Option<Vec<(Vec<u8>, bool)>> {
        let entries = std::fs::read_dir(self.abs(dir)).ok()?;
        let mut names: Vec<(Vec<u8>, bool)> = entries
            .flatten()
            .map(|e| {
                let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
                (e.file_name().as_bytes().to_vec(), is_dir)
            })
            .collect();
        names.sort();
        Some(names)
    }

    fn settle(&self, ex: &Exclusions, old: &[u8], new: &[u8]) {
        let Some(names) = self.sorted_entries(new) else {
            return;
        };
        for (name, is_dir) in names {
            let (o, n) = (join(old, &name), join(new, &name));
            match (ex.is_excluded(&o), ex.is_excluded(&n)) {
                (true, true) => {}
                (false, true) => self.record_removal(&n, is_dir),
                (true, false) => self.send_tree(&n),
                (false, false) if is_dir => self.settle(ex, &o, &n),
                (false, false) => {}
            }
        }
    }

    /// After the rules changed from `old` to `new`: names under `dir` that
    /// became included are sent whole, names that became excluded are
    /// removed from replicas.
    pub fn settle_new_rules(
        &self,
        old: &Exclusions,
        new: &Exclusions,
        dir: &[u8],
        skip: &dyn Fn(&[u8]) -> bool,
    ) {
        let Some(names) = self.sorted_entries(dir) else {
            return;
        };
        for (name, is_dir) in names {
            let rel = join(dir, &name);
            if skip(&rel) {
                continue;
            }
            match (old.is_excluded(&rel), new.is_excluded(&rel)) {
                (true, true) => {}
                (false, true) => self.record_removal(&rel, is_dir),
                (true, false) => self.send_tree(&rel),
                (false, false) if is_dir => self.settle_new_rules(old, new, &rel, skip),
                (false, false) => {}
            }
        }
    }
}
