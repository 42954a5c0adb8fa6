//! Applying records to a directory: journal replay and, later, the replica's
//! applier. Paths are resolved beneath the target root only (openat2 with
//! RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS for the parent, no-follow for the last
//! component), so no record can reach outside it, whatever its path says.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::record::{Op, Record, Timestamp};

pub struct Applier {
    root: OwnedFd,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// Splits a record path into (parent components, last name), refusing anything
/// that is not a plain relative path.
fn split(path: &[u8]) -> io::Result<(&[u8], &[u8])> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsafe path {:?}", String::from_utf8_lossy(path)),
        )
    };
    if path.is_empty() || path[0] == b'/' || path.contains(&0) {
        return Err(bad());
    }
    for comp in path.split(|&c| c == b'/') {
        if comp.is_empty() || comp == b"." || comp == b".." {
            return Err(bad());
        }
    }
    Ok(match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&b""[..], path),
    })
}

fn ts(t: Option<Timestamp>) -> libc::timespec {
    match t {
        Some(t) => libc::timespec {
            tv_sec: t.sec,
            tv_nsec: t.nsec as i64,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

impl Applier {
    pub fn new(root: &Path) -> io::Result<Applier> {
        let c = cstring(root.as_os_str().as_bytes())?;
        // SAFETY: valid C string; we own the returned fd.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        Ok(Applier {
            root: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Opens `rel` (a directory path, may be empty) beneath the root.
    fn open_beneath(&self, rel: &[u8], flags: u64) -> io::Result<OwnedFd> {
        let path = if rel.is_empty() {
            cstring(b".")?
        } else {
            cstring(rel)?
        };
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = flags | libc::O_CLOEXEC as u64;
        how.resolve =
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2 with a valid open_how of the right size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// The parent directory of `path` and the last component.
    fn parent(&self, path: &[u8]) -> io::Result<(OwnedFd, CString)> {
        let (dir, name) = split(path)?;
        let fd = self.open_beneath(dir, (libc::O_PATH | libc::O_DIRECTORY) as u64)?;
        Ok((fd, cstring(name)?))
    }

    /// Opens a regular file for writing (never following a symlink).
    fn open_file(&self, path: &[u8]) -> io::Result<std::fs::File> {
        let (dir, name) = self.parent(path)?;
        let fd = cvt(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        Ok(unsafe { std::fs::File::from_raw_fd(fd) })
    }

    fn chown_chmod(
        &self,
        dir: &OwnedFd,
        name: &CString,
        mode: Option<u32>,
        uid: u32,
        gid: u32,
    ) -> io::Result<()> {
        cvt(unsafe {
            libc::fchownat(
                dir.as_raw_fd(),
                name.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        if let Some(mode) = mode {
            cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode & 0o7777, 0) })?;
        }
        Ok(())
    }

    pub fn apply(&self, r: &Record) -> io::Result<()> {
        match &r.op {
            Op::Write { path, offset } => {
                use std::os::unix::fs::FileExt;
                self.open_file(path)?.write_all_at(&r.data, *offset)
            }
            Op::Truncate { path, size } => self.open_file(path)?.set_len(*size),
            Op::Fallocate {
                path,
                mode,
                offset,
                len,
            } => {
                let f = self.open_file(path)?;
                cvt(unsafe { libc::fallocate(f.as_raw_fd(), *mode, *offset as i64, *len as i64) })
                    .map(drop)
            }
            Op::Mknod {
                path,
                mode,
                rdev,
                uid,
                gid,
            } => {
                let (dir, name) = self.parent(path)?;
                if mode & libc::S_IFMT == libc::S_IFREG || mode & libc::S_IFMT == 0 {
                    let fd = cvt(unsafe {
                        libc::openat(
                            dir.as_raw_fd(),
                            name.as_ptr(),
                            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o600,
                        )
                    })?;
                    unsafe { libc::close(fd) };
                } else {
                    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), *mode, *rdev) })?;
                }
                self.chown_chmod(&dir, &name, Some(*mode), *uid, *gid)
            }
            Op::Mkdir {
                path,
                mode,
                uid,
                gid,
            } => {
                let (dir, name) = self.parent(path)?;
                cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) })?;
                self.chown_chmod(&dir, &name, Some(*mode), *uid, *gid)
            }
            Op::Symlink {
                path,
                target,
                uid,
                gid,
            } => {
                let (dir, name) = self.parent(path)?;
                let t = cstring(target)?;
                cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
                self.chown_chmod(&dir, &name, None, *uid, *gid)
            }
            Op::Link { existing, path } => {
                let (odir, oname) = self.parent(existing)?;
                let (ndir, nname) = self.parent(path)?;
                cvt(unsafe {
                    libc::linkat(
                        odir.as_raw_fd(),
                        oname.as_ptr(),
                        ndir.as_raw_fd(),
                        nname.as_ptr(),
                        0,
                    )
                })
                .map(drop)
            }
            Op::Unlink { path } => {
                let (dir, name) = self.parent(path)?;
                cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
            }
            Op::Rmdir { path } => {
                let (dir, name) = self.parent(path)?;
                cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) })
                    .map(drop)
            }
            Op::RemoveTree { path } => self.remove_tree(path),
            Op::Rename { from, to, flags } => {
                let (odir, oname) = self.parent(from)?;
                let (ndir, nname) = self.parent(to)?;
                cvt(unsafe {
                    libc::renameat2(
                        odir.as_raw_fd(),
                        oname.as_ptr(),
                        ndir.as_raw_fd(),
                        nname.as_ptr(),
                        *flags,
                    )
                })
                .map(drop)
            }
            Op::SetAttr {
                path,
                mode,
                uid,
                gid,
                atime,
                mtime,
            } => {
                let (dir, name) = self.parent(path)?;
                if let Some(mode) = mode {
                    cvt(unsafe {
                        libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode & 0o7777, 0)
                    })?;
                }
                if uid.is_some() || gid.is_some() {
                    cvt(unsafe {
                        libc::fchownat(
                            dir.as_raw_fd(),
                            name.as_ptr(),
                            uid.unwrap_or(u32::MAX),
                            gid.unwrap_or(u32::MAX),
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    })?;
                }
                if atime.is_some() || mtime.is_some() {
                    let times = [ts(*atime), ts(*mtime)];
                    cvt(unsafe {
                        libc::utimensat(
                            dir.as_raw_fd(),
                            name.as_ptr(),
                            times.as_ptr(),
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    })?;
                }
                Ok(())
            }
            Op::SetXattr {
                path,
                name: xname,
                value,
                flags,
            } => {
                let f = self.open_proc(path)?;
                let n = cstring(xname)?;
                cvt(unsafe {
                    libc::setxattr(
                        f.as_ptr(),
                        n.as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        *flags,
                    )
                })
                .map(drop)
            }
            Op::RemoveXattr { path, name: xname } => {
                let f = self.open_proc(path)?;
                let n = cstring(xname)?;
                cvt(unsafe { libc::removexattr(f.as_ptr(), n.as_ptr()) }).map(drop)
            }
        }
    }

    /// A /proc path to the object at `path` (O_PATH, not following a final symlink),
    /// for calls that take only paths. The fd is leaked into the path's lifetime by
    /// keeping it in the returned guard.
    fn open_proc(&self, path: &[u8]) -> io::Result<ProcPath> {
        let (dir, name) = self.parent(path)?;
        let fd = cvt(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
        Ok(ProcPath { _fd: fd, path })
    }

    fn remove_tree(&self, path: &[u8]) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        cvt(unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop);
        }
        let sub = self.open_beneath(path, (libc::O_RDONLY | libc::O_DIRECTORY) as u64)?;
        let entries: Vec<Vec<u8>> =
            std::fs::read_dir(format!("/proc/self/fd/{}", sub.as_raw_fd()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().as_bytes().to_vec())
                .collect();
        for e in entries {
            let mut child = path.to_vec();
            child.push(b'/');
            child.extend_from_slice(&e);
            self.remove_tree(&child)?;
        }
        cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) }).map(drop)
    }
}

struct ProcPath {
    _fd: OwnedFd,
    path: CString,
}

impl ProcPath {
    fn as_ptr(&self) -> *const libc::c_char {
        self.path.as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(op: Op, data: &[u8]) -> Record {
        Record {
            seq: 1,
            op,
            data: data.to_vec(),
        }
    }

    #[test]
    fn paths_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink("/tmp", root.join("link")).unwrap();
        let a = Applier::new(&root).unwrap();
        for bad in [
            &b"../x"[..],
            b"/etc/passwd",
            b"a/../../x",
            b"",
            b"a//b",
            b"link/x",
            b"./x",
        ] {
            let r = a.apply(&rec(
                Op::Mknod {
                    path: bad.to_vec(),
                    mode: libc::S_IFREG | 0o644,
                    rdev: 0,
                    uid: 0,
                    gid: 0,
                },
                b"",
            ));
            assert!(
                r.is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn ops_apply() {
        let dir = tempfile::tempdir().unwrap();
        let a = Applier::new(dir.path()).unwrap();
        let ops = [
            (
                Op::Mkdir {
                    path: b"d".to_vec(),
                    mode: 0o40755,
                    uid: 0,
                    gid: 0,
                },
                &b""[..],
            ),
            (
                Op::Mknod {
                    path: b"d/f".to_vec(),
                    mode: libc::S_IFREG | 0o640,
                    rdev: 0,
                    uid: 0,
                    gid: 0,
                },
                b"",
            ),
            (
                Op::Write {
                    path: b"d/f".to_vec(),
                    offset: 3,
                },
                b"abc",
            ),
            (
                Op::Link {
                    existing: b"d/f".to_vec(),
                    path: b"g".to_vec(),
                },
                b"",
            ),
            (
                Op::Rename {
                    from: b"d/f".to_vec(),
                    to: b"d/h".to_vec(),
                    flags: 0,
                },
                b"",
            ),
            (
                Op::Truncate {
                    path: b"g".to_vec(),
                    size: 4,
                },
                b"",
            ),
        ];
        for (op, data) in ops {
            a.apply(&rec(op, data)).unwrap();
        }
        assert_eq!(std::fs::read(dir.path().join("d/h")).unwrap(), b"\0\0\0a");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(dir.path().join("g"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o640
        );
        a.apply(&rec(
            Op::RemoveTree {
                path: b"d".to_vec(),
            },
            b"",
        ))
        .unwrap();
        assert!(!dir.path().join("d").exists());
    }
}
