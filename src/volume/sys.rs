//! Thin, safe wrappers over the *at() system calls the volume needs.
//!
//! Every call works relative to a file descriptor, never to a path string
//! rebuilt from names, so renames elsewhere in the tree cannot redirect it.

use std::ffi::{CStr, CString, OsStr};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use crate::error::{Error, Result, check, check_size};

pub fn cstr(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| Error::EINVAL)
}

/// `/proc/self/fd/N`: lets calls that cannot take an O_PATH descriptor reach its file.
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a formatted number")
}

pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    // SAFETY: name is a valid C string; the returned fd is owned by us.
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    })?;
    // SAFETY: fd was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn open_path(path: &CStr, flags: i32) -> Result<OwnedFd> {
    // SAFETY: as above.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// stat of the object an fd (O_PATH allowed) refers to, without following symlinks.
pub fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: st is a valid out pointer; "" with AT_EMPTY_PATH names the fd itself.
    check(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: valid pointers.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> Result<()> {
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> Result<()> {
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// Hard-links the object behind an O_PATH fd to a new name (needs CAP_DAC_READ_SEARCH).
pub fn link_fd(src: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    check(unsafe {
        libc::linkat(
            src.as_raw_fd(),
            c"".as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })
    .map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> Result<()> {
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> Result<()> {
    check(unsafe {
        libc::renameat2(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn readlink_fd(fd: BorrowedFd<'_>) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = check_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn fchownat_empty(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
    let uid = uid.unwrap_or(u32::MAX);
    let gid = gid.unwrap_or(u32::MAX);
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn chmod_path(path: &CStr, mode: u32) -> Result<()> {
    check(unsafe { libc::chmod(path.as_ptr(), mode) }).map(drop)
}

pub fn fchmod(fd: RawFd, mode: u32) -> Result<()> {
    check(unsafe { libc::fchmod(fd, mode) }).map(drop)
}

pub fn truncate_path(path: &CStr, size: u64) -> Result<()> {
    let size = i64::try_from(size).map_err(|_| Error::from_errno(libc::EFBIG))?;
    check(unsafe { libc::truncate(path.as_ptr(), size) }).map(drop)
}

pub fn ftruncate(fd: RawFd, size: u64) -> Result<()> {
    let size = i64::try_from(size).map_err(|_| Error::from_errno(libc::EFBIG))?;
    check(unsafe { libc::ftruncate(fd, size) }).map(drop)
}

/// Sets times on the object an O_PATH fd names (symlinks included, not followed).
pub fn utimens_fd(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> Result<()> {
    check(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })
    .map(drop)
}

pub fn pread(fd: RawFd, buf: &mut [u8], offset: u64) -> Result<usize> {
    let offset = i64::try_from(offset).map_err(|_| Error::EINVAL)?;
    check_size(unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), offset) })
}

pub fn pwrite(fd: RawFd, buf: &[u8], offset: u64) -> Result<usize> {
    let offset = i64::try_from(offset).map_err(|_| Error::from_errno(libc::EFBIG))?;
    check_size(unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), offset) })
}

pub fn fsync(fd: RawFd, datasync: bool) -> Result<()> {
    check(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(drop)
}

pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> Result<()> {
    let offset = i64::try_from(offset).map_err(|_| Error::EINVAL)?;
    let len = i64::try_from(len).map_err(|_| Error::EINVAL)?;
    check(unsafe { libc::fallocate(fd, mode, offset, len) }).map(drop)
}

pub fn lseek(fd: RawFd, offset: i64, whence: i32) -> Result<i64> {
    let r = unsafe { libc::lseek(fd, offset, whence) };
    if r < 0 {
        Err(Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn copy_file_range(
    fd_in: RawFd,
    off_in: u64,
    fd_out: RawFd,
    off_out: u64,
    len: u64,
) -> Result<usize> {
    let mut off_in = i64::try_from(off_in).map_err(|_| Error::EINVAL)?;
    let mut off_out = i64::try_from(off_out).map_err(|_| Error::EINVAL)?;
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    check_size(unsafe { libc::copy_file_range(fd_in, &mut off_in, fd_out, &mut off_out, len, 0) })
}

pub fn statvfs(path: &CStr) -> Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::zeroed();
    check(unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

/// Reads an xattr-style buffer: size 0 asks only for the length.
fn xattr_buf(size: u32, call: impl Fn(*mut libc::c_void, usize) -> isize) -> Result<XattrReply> {
    if size == 0 {
        let n = check_size(call(std::ptr::null_mut(), 0))?;
        return Ok(XattrReply::Size(n as u32));
    }
    let mut buf = vec![0u8; size as usize];
    let n = check_size(call(buf.as_mut_ptr().cast(), buf.len()))?;
    buf.truncate(n);
    Ok(XattrReply::Data(buf))
}

/// An xattr answer: the size asked for, or the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

pub fn getxattr(path: &CStr, name: &CStr, size: u32) -> Result<XattrReply> {
    xattr_buf(size, |p, n| unsafe {
        libc::getxattr(path.as_ptr(), name.as_ptr(), p, n)
    })
}

pub fn listxattr(path: &CStr, size: u32) -> Result<XattrReply> {
    xattr_buf(size, |p, n| unsafe {
        libc::listxattr(path.as_ptr(), p.cast(), n)
    })
}

pub fn setxattr(path: &CStr, name: &CStr, value: &[u8], flags: i32) -> Result<()> {
    check(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn removexattr(path: &CStr, name: &CStr) -> Result<()> {
    check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}
