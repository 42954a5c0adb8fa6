//! Applying a full snapshot to a fresh replica's mirror: directories, files
//! and symlinks are made to match what the primary sent (whatever the mirror
//! held before), and at the end every mirror entry the snapshot did not name is
//! removed. Every access goes through the journal's [`Applier`] (paths checked
//! once, resolved beneath the mirror, no symlinks followed), so a snapshot
//! cannot reach outside it. An entry the applier refuses (a bad path, a path
//! through a symlink) is skipped and reported to the replica's refusal log;
//! the snapshot goes on.

use std::collections::HashSet;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use crate::journal::apply::Applier;
use crate::journal::record::{Op, Record};
use crate::path::{RelPath, checked, refusal};
use crate::protocol::message::EntryKind;

use super::RefusalLog;

pub struct SnapshotApplier {
    applier: Applier,
    seen: HashSet<Vec<u8>>,
    /// Entries refused: their data messages are dropped too.
    refused: HashSet<Vec<u8>>,
    log: Option<Arc<RefusalLog>>,
    pub entries: u64,
    pub bytes: u64,
}

fn rec(op: Op, data: Vec<u8>) -> Record {
    Record { seq: 0, op, data }
}

const S_IFMT: u32 = libc::S_IFMT;

impl SnapshotApplier {
    pub fn new(mirror: &Path) -> io::Result<SnapshotApplier> {
        SnapshotApplier::with_log(mirror, None)
    }

    /// Refused entries are recorded in `log`.
    pub fn with_log(mirror: &Path, log: Option<Arc<RefusalLog>>) -> io::Result<SnapshotApplier> {
        Ok(SnapshotApplier {
            applier: Applier::new(mirror)?,
            seen: HashSet::new(),
            refused: HashSet::new(),
            log,
            entries: 0,
            bytes: 0,
        })
    }

    fn apply(&self, op: Op) -> io::Result<()> {
        self.applier.apply(&rec(op, vec![]))
    }

    /// The file type (S_IFMT bits) of what the mirror holds at `path`.
    fn existing(&self, path: &[u8]) -> io::Result<Option<u32>> {
        Ok(self.applier.lstat(path)?.map(|st| st.st_mode & S_IFMT))
    }

    fn remove(&self, path: &[u8]) -> io::Result<()> {
        self.apply(Op::RemoveTree {
            path: path.to_vec(),
        })
    }

    /// A refused entry is logged and skipped; any other error ends the snapshot.
    fn refuse_or_fail(&mut self, path: &[u8], what: &str, e: io::Error) -> io::Result<()> {
        let Some(reason) = refusal(&e) else {
            return Err(e);
        };
        if let Some(log) = &self.log {
            log.refuse(None, what, path, reason);
        } else {
            tracing::warn!(what, path = %String::from_utf8_lossy(path), reason, "snapshot entry refused");
        }
        self.refused.insert(path.to_vec());
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn entry(
        &mut self,
        path: &[u8],
        kind: EntryKind,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        target: &[u8],
        xattrs: &[(Vec<u8>, Vec<u8>)],
    ) -> io::Result<()> {
        match self.entry_inner(path, kind, mode, uid, gid, size, target, xattrs) {
            Ok(()) => Ok(()),
            Err(e) => self.refuse_or_fail(path, "snapshot entry", e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn entry_inner(
        &mut self,
        path: &[u8],
        kind: EntryKind,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        target: &[u8],
        xattrs: &[(Vec<u8>, Vec<u8>)],
    ) -> io::Result<()> {
        checked(path)?;
        let old = self.existing(path)?;
        let p = path.to_vec();
        match kind {
            EntryKind::Dir => {
                if old.is_some_and(|t| t != libc::S_IFDIR) {
                    self.remove(path)?;
                }
                if old != Some(libc::S_IFDIR) {
                    self.apply(Op::Mkdir {
                        path: p.clone(),
                        mode: libc::S_IFDIR | (mode & 0o7777),
                        uid,
                        gid,
                    })?;
                }
            }
            EntryKind::File => {
                if old.is_some_and(|t| t != libc::S_IFREG) {
                    self.remove(path)?;
                }
                if old != Some(libc::S_IFREG) {
                    self.apply(Op::Mknod {
                        path: p.clone(),
                        mode: libc::S_IFREG | (mode & 0o7777),
                        rdev: 0,
                        uid,
                        gid,
                    })?;
                }
                self.apply(Op::Truncate {
                    path: p.clone(),
                    size,
                })?;
            }
            EntryKind::Link => {
                checked(target)?;
                if !self.seen.contains(target) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "snapshot link to a path without its entry",
                    ));
                }
                if old.is_some() {
                    self.remove(path)?;
                }
                self.apply(Op::Link {
                    existing: target.to_vec(),
                    path: p.clone(),
                })?;
                self.seen.insert(p);
                self.entries += 1;
                return Ok(());
            }
            EntryKind::Symlink => {
                if old.is_some() {
                    self.remove(path)?;
                }
                self.apply(Op::Symlink {
                    path: p.clone(),
                    target: target.to_vec(),
                    uid,
                    gid,
                })?;
            }
        }
        if kind != EntryKind::Symlink {
            self.apply(Op::SetAttr {
                path: p.clone(),
                mode: Some(mode & 0o7777),
                uid: Some(uid),
                gid: Some(gid),
                atime: None,
                mtime: None,
            })?;
            for (name, _) in self.applier.xattrs(path)? {
                if !xattrs.iter().any(|(n, _)| *n == name) {
                    self.apply(Op::RemoveXattr {
                        path: p.clone(),
                        name,
                    })?;
                }
            }
            for (name, value) in xattrs {
                self.apply(Op::SetXattr {
                    path: p.clone(),
                    name: name.clone(),
                    value: value.clone(),
                    flags: 0,
                })?;
            }
        }
        self.seen.insert(p);
        self.entries += 1;
        Ok(())
    }

    pub fn data(&mut self, path: &[u8], offset: u64, data: Vec<u8>) -> io::Result<()> {
        if self.refused.contains(path) {
            return Ok(());
        }
        if !self.seen.contains(path) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot data for a path without its entry",
            ));
        }
        self.bytes += data.len() as u64;
        let r = self.applier.apply(&rec(
            Op::Write {
                path: path.to_vec(),
                offset,
            },
            data,
        ));
        match r {
            Ok(()) => Ok(()),
            Err(e) => self.refuse_or_fail(path, "snapshot data", e),
        }
    }

    /// Removes what the snapshot did not name; returns how many were removed.
    pub fn finish(&self) -> io::Result<u64> {
        let mut removed = 0;
        let mut stack: Vec<Option<RelPath>> = vec![None];
        while let Some(dir) = stack.pop() {
            for name in self.applier.list_dir(dir.as_ref())? {
                let rel = match &dir {
                    None => RelPath::parse(&name),
                    Some(d) => d.child(&name),
                }
                .map_err(|e| io::Error::other(format!("mirror entry {name:?}: {e}")))?;
                if !self.seen.contains(rel.as_bytes()) {
                    self.remove(rel.as_bytes())?;
                    removed += 1;
                } else if self.existing(rel.as_bytes())? == Some(libc::S_IFDIR) {
                    stack.push(Some(rel));
                }
            }
        }
        Ok(removed)
    }
}

/// The extended attributes of `path` (not following a final symlink).
pub fn list_xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    read_xattrs(path, false)
}

/// The extended attributes of `path`; `follow`: through a final symlink (for
/// a /proc/self/fd link naming an inode already opened safely).
pub fn read_xattrs(path: &Path, follow: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return vec![];
    };
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: valid C string and buffer.
    let n = unsafe {
        if follow {
            libc::listxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len())
        } else {
            libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len())
        }
    };
    if n <= 0 {
        return vec![];
    }
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        let Ok(cn) = std::ffi::CString::new(name) else {
            continue;
        };
        let mut v = vec![0u8; 64 << 10];
        // SAFETY: valid C strings and buffer.
        let m = unsafe {
            if follow {
                libc::getxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len())
            } else {
                libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len())
            }
        };
        if m >= 0 {
            v.truncate(m as usize);
            out.push((name.to_vec(), v));
        }
    }
    out
}
