//! One error type for the filesystem core: it carries the errno the kernel gets.

use std::fmt;
use std::io;

/// An error from the volume, carrying the errno that the FUSE reply will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    errno: i32,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub const fn from_errno(errno: i32) -> Self {
        Error { errno }
    }

    /// The errno last set by a libc call on this thread (EIO if there is none).
    pub fn last_os_error() -> Self {
        io::Error::last_os_error().into()
    }

    pub fn errno(&self) -> i32 {
        self.errno
    }

    pub const ENOENT: Error = Error::from_errno(libc::ENOENT);
    pub const EIO: Error = Error::from_errno(libc::EIO);
    pub const EBADF: Error = Error::from_errno(libc::EBADF);
    pub const EINVAL: Error = Error::from_errno(libc::EINVAL);
    pub const EPERM: Error = Error::from_errno(libc::EPERM);
    pub const EROFS: Error = Error::from_errno(libc::EROFS);
    pub const ENOTDIR: Error = Error::from_errno(libc::ENOTDIR);
    pub const EEXIST: Error = Error::from_errno(libc::EEXIST);
    pub const ERANGE: Error = Error::from_errno(libc::ERANGE);
    pub const ENAMETOOLONG: Error = Error::from_errno(libc::ENAMETOOLONG);
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(n) if n > 0 => Error { errno: n },
            // Errors that did not come from the OS have no better errno than EIO.
            _ => Error::EIO,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.errno))
    }
}

impl std::error::Error for Error {}

/// Turns a libc return value into a Result, reading errno on -1.
pub fn check(ret: libc::c_int) -> Result<libc::c_int> {
    if ret == -1 {
        Err(Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn check_size(ret: libc::ssize_t) -> Result<usize> {
    if ret < 0 {
        Err(Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}
