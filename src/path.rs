//! Paths received from a peer (records, snapshot entries) or read from the
//! journal's dirty list: parsed once into a [`RelPath`], which holds only a
//! plain relative path (no `..`, no `.`, no empty component, not absolute, no
//! NUL, not over-long). Every place that turns such a path into a file system
//! access takes a `RelPath`, so no unchecked path reaches a join or a syscall.
//!
//! A record that a replica will not apply (a bad path, a device node, data
//! for something that is not a regular file) fails with a [`Refused`] error:
//! the replica logs and counts it and goes on (see `replica`).

use std::ffi::{CString, OsStr};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Longest path accepted, in bytes (PATH_MAX less its NUL).
pub const MAX_PATH: usize = 4095;
/// Longest component accepted, in bytes (NAME_MAX).
pub const MAX_NAME: usize = 255;

/// Why a path is not a plain relative path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("absolute path")]
    Absolute,
    #[error("NUL byte in path")]
    Nul,
    #[error("empty component in path")]
    EmptyComponent,
    #[error("`.` component in path")]
    Dot,
    #[error("`..` component in path")]
    DotDot,
    #[error("path of {0} bytes (at most {MAX_PATH})")]
    TooLong(usize),
    #[error("component of {0} bytes (at most {MAX_NAME})")]
    NameTooLong(usize),
}

/// A validated relative path: one or more components joined by single `/`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    pub fn parse(b: &[u8]) -> Result<RelPath, PathError> {
        if b.is_empty() {
            return Err(PathError::Empty);
        }
        if b.len() > MAX_PATH {
            return Err(PathError::TooLong(b.len()));
        }
        if b[0] == b'/' {
            return Err(PathError::Absolute);
        }
        if b.contains(&0) {
            return Err(PathError::Nul);
        }
        for c in b.split(|&c| c == b'/') {
            match c {
                b"" => return Err(PathError::EmptyComponent),
                b"." => return Err(PathError::Dot),
                b".." => return Err(PathError::DotDot),
                c if c.len() > MAX_NAME => return Err(PathError::NameTooLong(c.len())),
                _ => {}
            }
        }
        Ok(RelPath(b.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The parent's components ("" for a top-level name) and the last name.
    pub fn split(&self) -> (&[u8], &[u8]) {
        match self.0.iter().rposition(|&c| c == b'/') {
            Some(i) => (&self.0[..i], &self.0[i + 1..]),
            None => (&b""[..], &self.0[..]),
        }
    }

    /// The last component as a C string (never contains NUL: checked).
    pub fn name_c(&self) -> CString {
        CString::new(self.split().1).expect("RelPath has no NUL")
    }

    /// `self/name` for a directory entry `name` read from the file system.
    pub fn child(&self, name: &[u8]) -> Result<RelPath, PathError> {
        let mut b = self.0.clone();
        b.push(b'/');
        b.extend_from_slice(name);
        RelPath::parse(&b)
    }

    /// `base` joined with this path; for the side that reads its own tree.
    pub fn under(&self, base: &Path) -> PathBuf {
        base.join(OsStr::from_bytes(&self.0))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// Opens `rel` beneath `root` for reading, with no symlink anywhere on the way
/// (the last component included) and without blocking on a fifo. Ok(None)
/// when it is missing, is not a regular file, or is reached through a symlink.
pub fn open_regular_beneath(root: &Path, rel: &RelPath) -> io::Result<Option<std::fs::File>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let root = std::fs::File::open(root)?;
    let path = CString::new(rel.as_bytes()).expect("RelPath has no NUL");
    // SAFETY: an all-zero open_how is valid; fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    use std::os::fd::AsRawFd;
    // SAFETY: openat2 with a valid open_how of the right size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EXDEV | libc::ENXIO) => {
                Ok(None)
            }
            _ => Err(e),
        };
    }
    // SAFETY: openat2 returned a new fd we own.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    if !f.metadata()?.is_file() {
        return Ok(None);
    }
    Ok(Some(f))
}

/// A record or snapshot entry the replica will not apply, and why.
#[derive(Debug)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused: {}", self.0)
    }
}

impl std::error::Error for Refused {}

/// An io::Error carrying a [`Refused`] reason.
pub fn refused(reason: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, Refused(reason.into()))
}

/// The refusal reason, if `e` is a refusal.
pub fn refusal(e: &io::Error) -> Option<&str> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<Refused>())
        .map(|r| r.0.as_str())
}

/// Parses a path from a record or snapshot entry; a bad one is a refusal.
pub fn checked(b: &[u8]) -> io::Result<RelPath> {
    RelPath::parse(b).map_err(|e| {
        let shown: String = String::from_utf8_lossy(&b[..b.len().min(120)]).into();
        refused(format!("{e}: {shown:?}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_parse() {
        for good in [&b"a"[..], b"a/b", b"a.b/..c/c..", b"...", b" /x"] {
            assert!(RelPath::parse(good).is_ok(), "{good:?}");
        }
        let long_name = vec![b'n'; MAX_NAME + 1];
        let long_path = [&b"a/"[..]].repeat(MAX_PATH / 2 + 1).concat();
        let cases: Vec<(&[u8], PathError)> = vec![
            (b"", PathError::Empty),
            (b"/etc/passwd", PathError::Absolute),
            (b"..", PathError::DotDot),
            (b"../x", PathError::DotDot),
            (b"a/../../x", PathError::DotDot),
            (b"a/..", PathError::DotDot),
            (b".", PathError::Dot),
            (b"./x", PathError::Dot),
            (b"a/./b", PathError::Dot),
            (b"a//b", PathError::EmptyComponent),
            (b"a/", PathError::EmptyComponent),
            (b"a\0b", PathError::Nul),
            (&long_name, PathError::NameTooLong(MAX_NAME + 1)),
            (&long_path, PathError::TooLong(long_path.len())),
        ];
        for (bad, why) in cases {
            assert_eq!(
                RelPath::parse(bad),
                Err(why),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
            let e = checked(bad).unwrap_err();
            assert!(refusal(&e).is_some());
        }
    }

    #[test]
    fn split_and_child() {
        let p = RelPath::parse(b"a/b/c").unwrap();
        assert_eq!(p.split(), (&b"a/b"[..], &b"c"[..]));
        let q = RelPath::parse(b"top").unwrap();
        assert_eq!(q.split(), (&b""[..], &b"top"[..]));
        assert_eq!(q.child(b"x").unwrap().as_bytes(), b"top/x");
        assert!(q.child(b"..").is_err());
    }
}
