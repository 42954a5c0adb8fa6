//! Applying records to a directory: journal replay and the replica's applier.
//!
//! Every record is treated as hostile. Its paths are parsed once into
//! [`RelPath`]s (see [`check`]); every access resolves beneath the target root
//! with openat2 (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) for the parent and
//! no-follow for the last component, so no record reaches outside the root.
//! Data ops (write, truncate, fallocate) open only regular files, without
//! blocking (O_NONBLOCK, then an fstat check); mode changes never go through a
//! symlink; device nodes are never created. What breaks these rules fails with
//! a [`crate::path::Refused`] error.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::record::{Op, Record, Timestamp};
use crate::path::{MAX_PATH, RelPath, checked, refused};

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
    CString::new(b).map_err(|_| refused("NUL byte in a name or value"))
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

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and stat buffer.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `name` in `dir` as an O_PATH fd, never following a symlink (the fd is then
/// the symlink itself).
fn open_o_path_nofollow(dir: &OwnedFd, name: &CString) -> io::Result<OwnedFd> {
    // SAFETY: valid fd and C string; we own the result.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Largest offset or size a data op may name (off_t is signed).
const MAX_OFFSET: u64 = i64::MAX as u64;

/// Checks everything about `r` that does not depend on the mirror: its paths,
/// its file type (no device nodes), its offsets and sizes. A failure is a
/// refusal; nothing has been touched.
pub fn check(r: &Record) -> io::Result<()> {
    let range = |offset: u64, len: u64| {
        if offset.checked_add(len).is_none_or(|end| end > MAX_OFFSET) {
            Err(refused(format!(
                "range {offset}+{len} is beyond the largest file offset"
            )))
        } else {
            Ok(())
        }
    };
    match &r.op {
        Op::Write { path, offset } => {
            checked(path)?;
            range(*offset, r.data.len() as u64)
        }
        Op::Truncate { path, size } => {
            checked(path)?;
            range(*size, 0)
        }
        Op::Fallocate {
            path, offset, len, ..
        } => {
            checked(path)?;
            range(*offset, *len)
        }
        Op::Mknod { path, mode, .. } => {
            checked(path)?;
            match mode & libc::S_IFMT {
                0 | libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => Ok(()),
                libc::S_IFBLK | libc::S_IFCHR => {
                    Err(refused("device nodes are never created on a replica"))
                }
                t => Err(refused(format!("mknod of file type {t:#o}"))),
            }
        }
        Op::Symlink { path, target, .. } => {
            checked(path)?;
            if target.is_empty() || target.len() > MAX_PATH || target.contains(&0) {
                return Err(refused("symlink target is empty, too long or has a NUL"));
            }
            Ok(())
        }
        Op::Link { existing, path } => checked(existing).and(checked(path)).map(drop),
        Op::Rename { from, to, .. } => checked(from).and(checked(to)).map(drop),
        Op::SetXattr { path, name, .. } | Op::RemoveXattr { path, name } => {
            checked(path)?;
            if name.is_empty() || name.contains(&0) {
                return Err(refused("xattr name is empty or has a NUL"));
            }
            Ok(())
        }
        Op::Mkdir { path, .. }
        | Op::Unlink { path }
        | Op::Rmdir { path }
        | Op::RemoveTree { path }
        | Op::SetAttr { path, .. } => checked(path).map(drop),
        // A primary sends every write with its bytes.
        Op::WriteBacked { .. } => Err(refused("a write record without its bytes")),
        // Changes nothing.
        Op::Preimage { .. } => Ok(()),
    }
}

impl Applier {
    pub fn new(root: &Path) -> io::Result<Applier> {
        let c = CString::new(root.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in root path"))?;
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

    /// Opens `rel` (a directory path, may be empty for the root) beneath the
    /// root; a symlink anywhere on the way, or a way out, is a refusal.
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
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::EXDEV) => refused(format!(
                    "{:?} goes through a symlink or out of the mirror",
                    String::from_utf8_lossy(rel)
                )),
                _ => e,
            });
        }
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// The parent directory of `path` and the last component.
    fn parent(&self, path: &RelPath) -> io::Result<(OwnedFd, CString)> {
        let fd = self.open_beneath(path.split().0, (libc::O_PATH | libc::O_DIRECTORY) as u64)?;
        Ok((fd, path.name_c()))
    }

    /// An O_PATH fd for the object at `path` itself (a final symlink is not
    /// followed: the fd is the symlink).
    fn open_path(&self, path: &RelPath) -> io::Result<OwnedFd> {
        let (dir, name) = self.parent(path)?;
        open_o_path_nofollow(&dir, &name)
    }

    /// The lstat of `path` beneath the root; None when it does not exist.
    pub fn lstat(&self, path: &[u8]) -> io::Result<Option<libc::stat>> {
        let path = checked(path)?;
        let dir = match self.parent(&path) {
            Ok(d) => d.0,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, C string and stat buffer.
        match cvt(unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                path.name_c().as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        }) {
            Ok(_) => Ok(Some(st)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens a regular file for writing: never through a symlink, never
    /// blocking (a fifo), never anything but a regular file.
    fn open_file(&self, path: &[u8]) -> io::Result<std::fs::File> {
        let path = checked(path)?;
        let (dir, name) = self.parent(&path)?;
        // SAFETY: valid fd and C string.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_WRONLY
                    | libc::O_NONBLOCK
                    | libc::O_NOFOLLOW
                    | libc::O_NOCTTY
                    | libc::O_CLOEXEC,
            )
        };
        if fd == -1 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ELOOP) => refused(format!("data op on a symlink {path:?}")),
                // A fifo without a reader.
                Some(libc::ENXIO) | Some(libc::EISDIR) => {
                    refused(format!("data op on a non-regular file {path:?}"))
                }
                _ => e,
            });
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(&fd)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(refused(format!(
                "data op on a non-regular file {path:?} (type {:#o})",
                st.st_mode & libc::S_IFMT
            )));
        }
        Ok(std::fs::File::from(fd))
    }

    /// chmod of the object named `name` in `dir`, never through a symlink
    /// (a symlink's own mode means nothing on Linux: it is left alone).
    fn chmod_nofollow(&self, dir: &OwnedFd, name: &CString, mode: u32) -> io::Result<()> {
        let fd = open_o_path_nofollow(dir, name)?;
        if fstat(&fd)?.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Ok(());
        }
        // The fd is not a symlink: its /proc link names exactly that inode
        // (fchmod itself does not take an O_PATH fd).
        let p = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
        // SAFETY: valid C string.
        cvt(unsafe { libc::chmod(p.as_ptr(), mode & 0o7777) }).map(drop)
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
            self.chmod_nofollow(dir, name, mode)?;
        }
        Ok(())
    }

    pub fn apply(&self, r: &Record) -> io::Result<()> {
        check(r)?;
        // Paths are checked: parsing again cannot fail.
        let p = |b: &Vec<u8>| checked(b);
        match &r.op {
            Op::Write { path, offset } => {
                use std::os::unix::fs::FileExt;
                self.open_file(path)?.write_all_at(&r.data, *offset)
            }
            Op::Truncate { path, size } => self.open_file(path)?.set_len(*size),
            Op::Preimage { .. } => Ok(()),
            Op::WriteBacked { .. } => Err(refused("a write record without its bytes")),
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
                let (dir, name) = self.parent(&p(path)?)?;
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
                    // A fifo or socket (check() refused the rest): an inert node.
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
                let (dir, name) = self.parent(&p(path)?)?;
                cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) })?;
                self.chown_chmod(&dir, &name, Some(*mode), *uid, *gid)
            }
            Op::Symlink {
                path,
                target,
                uid,
                gid,
            } => {
                let (dir, name) = self.parent(&p(path)?)?;
                let t = cstring(target)?;
                cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
                self.chown_chmod(&dir, &name, None, *uid, *gid)
            }
            Op::Link { existing, path } => {
                let (odir, oname) = self.parent(&p(existing)?)?;
                let (ndir, nname) = self.parent(&p(path)?)?;
                // Flags 0: a symlink is linked itself, never followed.
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
                let (dir, name) = self.parent(&p(path)?)?;
                cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
            }
            Op::Rmdir { path } => {
                let (dir, name) = self.parent(&p(path)?)?;
                cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) })
                    .map(drop)
            }
            Op::RemoveTree { path } => self.remove_tree(&p(path)?),
            Op::Rename { from, to, flags } => {
                let (odir, oname) = self.parent(&p(from)?)?;
                let (ndir, nname) = self.parent(&p(to)?)?;
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
                let (dir, name) = self.parent(&p(path)?)?;
                if let Some(mode) = mode {
                    self.chmod_nofollow(&dir, &name, *mode)?;
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
                let f = self.open_proc(&p(path)?)?;
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
                let f = self.open_proc(&p(path)?)?;
                let n = cstring(xname)?;
                cvt(unsafe { libc::removexattr(f.as_ptr(), n.as_ptr()) }).map(drop)
            }
        }
    }

    /// A /proc path to the object at `path` (O_PATH, not following a final
    /// symlink), for calls that take only paths. The fd stays open as long as
    /// the returned guard.
    fn open_proc(&self, path: &RelPath) -> io::Result<ProcPath> {
        let fd = self.open_path(path)?;
        let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
        Ok(ProcPath { _fd: fd, path })
    }

    /// The extended attributes of `path` (a symlink's are not read); empty
    /// when it has none or cannot be read.
    pub fn xattrs(&self, path: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let path = checked(path)?;
        let fd = self.open_path(&path)?;
        if fstat(&fd)?.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Ok(vec![]);
        }
        let p = std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        Ok(crate::replica::snapshot::read_xattrs(&p, true))
    }

    /// The names in directory `dir` (None: the root), never through a symlink.
    pub fn list_dir(&self, dir: Option<&RelPath>) -> io::Result<Vec<Vec<u8>>> {
        let rel = dir.map(|d| d.as_bytes()).unwrap_or(b"");
        let sub = self.open_beneath(rel, (libc::O_RDONLY | libc::O_DIRECTORY) as u64)?;
        Ok(
            std::fs::read_dir(format!("/proc/self/fd/{}", sub.as_raw_fd()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().as_bytes().to_vec())
                .collect(),
        )
    }

    fn remove_tree(&self, path: &RelPath) -> io::Result<()> {
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
        for e in self.list_dir(Some(path))? {
            let child = path
                .child(&e)
                .map_err(|e| refused(format!("cannot remove beneath {path:?}: {e}")))?;
            self.remove_tree(&child)?;
        }
        cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) }).map(drop)
    }
}

/// Regular files opened for data during one apply run, by path, so a run
/// opens each file once. Valid only while no namespace record is applied (a
/// rename or unlink changes what a path names): the caller clears it first.
#[derive(Default)]
pub struct OpenFiles {
    files: std::collections::HashMap<Vec<u8>, std::fs::File>,
}

impl OpenFiles {
    /// Most files kept open at once.
    pub const MAX: usize = 256;

    pub fn clear(&mut self) {
        self.files.clear();
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl Applier {
    /// The file a data record at `path` writes, opened (with the checks of
    /// every data op) once per run and kept in `files`.
    pub fn data_file<'a>(
        &self,
        files: &'a mut OpenFiles,
        path: &[u8],
    ) -> io::Result<&'a std::fs::File> {
        // Bounded: a run over many files must not run out of descriptors.
        if files.files.len() >= OpenFiles::MAX && !files.files.contains_key(path) {
            files.files.clear();
        }
        match files.files.entry(path.to_vec()) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => Ok(e.insert(self.open_file(path)?)),
        }
    }
}

/// Writes `bufs` back to back at `offset` of `f` with pwritev, in groups of
/// at most IOV_MAX buffers, finishing short writes. No byte is copied.
pub fn write_all_vectored_at(f: &std::fs::File, mut offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    let (mut i, mut skip) = (0usize, 0usize);
    while i < bufs.len() {
        if bufs[i].len() == skip {
            i += 1;
            skip = 0;
            continue;
        }
        let iov: Vec<libc::iovec> = bufs[i..bufs.len().min(i + IOV_MAX)]
            .iter()
            .enumerate()
            .map(|(k, b)| {
                let b = if k == 0 { &b[skip..] } else { b };
                libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                }
            })
            .collect();
        let off = i64::try_from(offset)
            .map_err(|_| refused(format!("offset {offset} is beyond the largest file offset")))?;
        // SAFETY: the iovecs point into live slices for the length given.
        let n = unsafe { libc::pwritev(f.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 {
            let left = bufs[i].len() - skip;
            if n >= left {
                n -= left;
                i += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    Ok(())
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

    /// More buffers than one pwritev takes, empty ones among them: the file
    /// holds exactly their concatenation at the offset.
    #[test]
    fn vectored_write_writes_every_buffer_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"head").unwrap();
        let bufs: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 256) as u8; (i % 7) as usize])
            .collect();
        let slices: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        write_all_vectored_at(&f, 4, &slices).unwrap();
        let mut want = b"head".to_vec();
        want.extend(bufs.concat());
        assert!(std::fs::read(&path).unwrap() == want);
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
            let e = r.expect_err("accepted");
            assert!(
                crate::path::refusal(&e).is_some(),
                "{:?}: {e}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn refused_reason(r: io::Result<()>) -> String {
        let e = r.expect_err("the record was applied");
        crate::path::refusal(&e)
            .unwrap_or_else(|| panic!("an error, not a refusal: {e}"))
            .to_string()
    }

    fn mode_of(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// A symlink to an outside file, then a chmod of it: the outside file
    /// keeps its mode (the mirror's symlink is left as it is).
    #[test]
    fn chmod_never_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"s").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let a = Applier::new(&root).unwrap();
        a.apply(&rec(
            Op::Symlink {
                path: b"s".to_vec(),
                target: secret.as_os_str().as_bytes().to_vec(),
                uid: 0,
                gid: 0,
            },
            b"",
        ))
        .unwrap();
        a.apply(&rec(
            Op::SetAttr {
                path: b"s".to_vec(),
                mode: Some(0o4777),
                uid: None,
                gid: None,
                atime: None,
                mtime: None,
            },
            b"",
        ))
        .unwrap();
        assert_eq!(mode_of(&secret), 0o600);
        // A mode on a symlink's own create goes nowhere either.
        a.apply(&rec(
            Op::Mkdir {
                path: b"d".to_vec(),
                mode: 0o40751,
                uid: 0,
                gid: 0,
            },
            b"",
        ))
        .unwrap();
        assert_eq!(mode_of(&root.join("d")), 0o751);
        assert_eq!(mode_of(&secret), 0o600);
    }

    #[test]
    fn device_nodes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Applier::new(dir.path()).unwrap();
        for ty in [libc::S_IFBLK, libc::S_IFCHR, libc::S_IFDIR, libc::S_IFLNK] {
            let why = refused_reason(a.apply(&rec(
                Op::Mknod {
                    path: b"d".to_vec(),
                    mode: ty | 0o666,
                    rdev: libc::makedev(7, 0),
                    uid: 0,
                    gid: 0,
                },
                b"",
            )));
            assert!(!why.is_empty());
            assert!(a.lstat(b"d").unwrap().is_none(), "type {ty:o} created");
        }
    }

    /// Data ops on a fifo (with or without a reader), a char device and a
    /// symlink are refused, and none blocks.
    #[test]
    fn data_ops_touch_only_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        let a = Applier::new(&root).unwrap();
        a.apply(&rec(
            Op::Mknod {
                path: b"p".to_vec(),
                mode: libc::S_IFIFO | 0o644,
                rdev: 0,
                uid: 0,
                gid: 0,
            },
            b"",
        ))
        .unwrap();
        // A char device left in the mirror by someone else (/dev/null's numbers).
        let c = CString::new(root.join("null").as_os_str().as_bytes()).unwrap();
        assert_eq!(
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) },
            0
        );
        std::os::unix::fs::symlink(&outside, root.join("l")).unwrap();
        // A reader on the fifo: opening it for writing would succeed.
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(root.join("p"))
            .unwrap();
        use std::os::unix::fs::OpenOptionsExt;
        for name in [&b"p"[..], b"null", b"l"] {
            for op in [
                Op::Write {
                    path: name.to_vec(),
                    offset: 0,
                },
                Op::Truncate {
                    path: name.to_vec(),
                    size: 0,
                },
                Op::Fallocate {
                    path: name.to_vec(),
                    mode: 0,
                    offset: 0,
                    len: 4096,
                },
            ] {
                refused_reason(a.apply(&rec(op, b"data")));
            }
        }
        drop(reader);
        refused_reason(a.apply(&rec(
            Op::Write {
                path: b"p".to_vec(),
                offset: 0,
            },
            b"x",
        )));
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
    }

    #[test]
    fn huge_ranges_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"").unwrap();
        let a = Applier::new(dir.path()).unwrap();
        for op in [
            Op::Write {
                path: b"f".to_vec(),
                offset: u64::MAX - 1,
            },
            Op::Truncate {
                path: b"f".to_vec(),
                size: 1 << 63,
            },
            Op::Fallocate {
                path: b"f".to_vec(),
                mode: 0,
                offset: 1 << 62,
                len: 1 << 62,
            },
        ] {
            refused_reason(a.apply(&rec(op, b"xy")));
        }
        assert_eq!(std::fs::metadata(dir.path().join("f")).unwrap().len(), 0);
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
