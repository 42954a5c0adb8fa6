//! Applying a full snapshot to a fresh replica's mirror: directories, files
//! and symlinks are made to match what the primary sent (whatever the mirror
//! held before), and at the end every mirror entry the snapshot did not name is
//! removed. Paths go through the journal's [`Applier`] (resolved beneath the
//! mirror, no symlinks followed), so a snapshot cannot reach outside it.

use std::collections::HashSet;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::journal::apply::Applier;
use crate::journal::record::{Op, Record};
use crate::protocol::message::EntryKind;

pub struct SnapshotApplier {
    mirror: PathBuf,
    applier: Applier,
    seen: HashSet<Vec<u8>>,
    pub entries: u64,
    pub bytes: u64,
}

fn rec(op: Op, data: Vec<u8>) -> Record {
    Record { seq: 0, op, data }
}

impl SnapshotApplier {
    pub fn new(mirror: &Path) -> io::Result<SnapshotApplier> {
        Ok(SnapshotApplier {
            mirror: mirror.to_path_buf(),
            applier: Applier::new(mirror)?,
            seen: HashSet::new(),
            entries: 0,
            bytes: 0,
        })
    }

    fn apply(&self, op: Op) -> io::Result<()> {
        self.applier.apply(&rec(op, vec![]))
    }

    fn existing(&self, path: &[u8]) -> Option<std::fs::Metadata> {
        // Only for a type check; the Applier does the safe resolution.
        std::fs::symlink_metadata(self.mirror.join(std::ffi::OsStr::from_bytes(path))).ok()
    }

    fn remove(&self, path: &[u8]) -> io::Result<()> {
        self.apply(Op::RemoveTree {
            path: path.to_vec(),
        })
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
        let old = self.existing(path);
        let p = path.to_vec();
        match kind {
            EntryKind::Dir => {
                if old.as_ref().is_some_and(|m| !m.is_dir()) {
                    self.remove(path)?;
                }
                if !old.as_ref().is_some_and(|m| m.is_dir()) {
                    self.apply(Op::Mkdir {
                        path: p.clone(),
                        mode: libc::S_IFDIR | (mode & 0o7777),
                        uid,
                        gid,
                    })?;
                }
            }
            EntryKind::File => {
                if old.as_ref().is_some_and(|m| !m.is_file()) {
                    self.remove(path)?;
                }
                if !old.as_ref().is_some_and(|m| m.is_file()) {
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
                if old.is_some() {
                    self.remove(path)?;
                }
                if !self.seen.contains(target) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "snapshot link to a path without its entry",
                    ));
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
        }
        if kind != EntryKind::Symlink {
            let abs = self.mirror.join(std::ffi::OsStr::from_bytes(path));
            for (name, _) in list_xattrs(&abs) {
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
        if !self.seen.contains(path) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot data for a path without its entry",
            ));
        }
        self.bytes += data.len() as u64;
        self.applier.apply(&rec(
            Op::Write {
                path: path.to_vec(),
                offset,
            },
            data,
        ))
    }

    /// Removes what the snapshot did not name; returns how many were removed.
    pub fn finish(&self) -> io::Result<u64> {
        let mut removed = 0;
        let mut stack = vec![Vec::<u8>::new()];
        while let Some(dir) = stack.pop() {
            let abs = if dir.is_empty() {
                self.mirror.clone()
            } else {
                self.mirror.join(std::ffi::OsStr::from_bytes(&dir))
            };
            for e in std::fs::read_dir(&abs)? {
                let e = e?;
                let mut rel = dir.clone();
                if !rel.is_empty() {
                    rel.push(b'/');
                }
                rel.extend_from_slice(e.file_name().as_bytes());
                if !self.seen.contains(&rel) {
                    self.remove(&rel)?;
                    removed += 1;
                } else if e.file_type()?.is_dir() {
                    stack.push(rel);
                }
            }
        }
        Ok(removed)
    }
}

/// The extended attributes of `path` (not following a final symlink).
pub fn list_xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return vec![];
    };
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: valid C string and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
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
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if m >= 0 {
            v.truncate(m as usize);
            out.push((name.to_vec(), v));
        }
    }
    out
}
