//! File operations for reference-model tests: an operation enum, proptest
//! strategies for it, and an [`Actor`] that performs operations under a root
//! directory with plain libc calls (keeping a few descriptors open between
//! operations). Applying the same sequence under the mount and under an
//! ordinary directory must give the same results and trees; later the same
//! operations can drive journal replay tests.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::{check, cpath, fstat, lstat, open};

/// The name pool. Few names, so that operations collide: files where
/// directories are expected and the reverse, renames onto existing names,
/// non-empty directories, names under a parent that is missing or a file.
pub const NAMES: &[&str] = &["a", "b", "c", "d", "e", "d/a", "d/b", "d/f", "d/f/a", "e/a"];

/// Symlink targets, relative to the link's directory; none has "..", so
/// following a link never leaves the root.
pub const TARGETS: &[&str] = &["a", "b", "d", "d/a", "f/a", "missing"];

/// How many descriptors an actor keeps open between operations.
pub const SLOTS: usize = 3;

/// How a write opens its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    Plain,
    Append,
    Trunc,
    Sync,
}

/// How `Open` opens a descriptor that stays in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    ReadOnly,
    WriteOnly,
    ReadWrite,
    Append,
    Truncate,
    /// O_CREAT | O_RDWR, mode 0644.
    Create,
}

impl OpenMode {
    fn flags(self) -> i32 {
        match self {
            OpenMode::ReadOnly => libc::O_RDONLY,
            OpenMode::WriteOnly => libc::O_WRONLY,
            OpenMode::ReadWrite => libc::O_RDWR,
            OpenMode::Append => libc::O_WRONLY | libc::O_APPEND,
            OpenMode::Truncate => libc::O_RDWR | libc::O_TRUNC,
            OpenMode::Create => libc::O_RDWR | libc::O_CREAT,
        }
    }
}

/// A time argument of utimensat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Time {
    Omit,
    Now,
    /// Seconds since the epoch (nanoseconds fixed).
    At(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// open(O_CREAT|O_WRONLY [|O_EXCL], mode) and close.
    Create {
        path: usize,
        mode: u32,
        excl: bool,
    },
    /// open(O_WRONLY | mode flags), pwrite `len` bytes of `byte` at `offset`, close.
    Write {
        path: usize,
        offset: u64,
        len: usize,
        byte: u8,
        mode: WriteMode,
    },
    /// open(O_RDONLY), pread, close; the bytes are the result.
    Read {
        path: usize,
        offset: u64,
        len: usize,
    },
    /// truncate(2) (follows symlinks).
    Truncate {
        path: usize,
        size: u64,
    },
    /// fallocate(PUNCH_HOLE | KEEP_SIZE).
    PunchHole {
        path: usize,
        offset: u64,
        len: u64,
    },
    /// fallocate(ZERO_RANGE [| KEEP_SIZE]).
    ZeroRange {
        path: usize,
        offset: u64,
        len: u64,
        keep_size: bool,
    },
    /// renameat2 with flags 0, RENAME_NOREPLACE or RENAME_EXCHANGE.
    Rename {
        from: usize,
        to: usize,
        flags: u32,
    },
    Unlink {
        path: usize,
    },
    Mkdir {
        path: usize,
        mode: u32,
    },
    Rmdir {
        path: usize,
    },
    /// link(from, to).
    Link {
        from: usize,
        to: usize,
    },
    /// symlink(TARGETS[target], path).
    Symlink {
        target: usize,
        path: usize,
    },
    /// chmod(2) (follows symlinks).
    Chmod {
        path: usize,
        mode: u32,
    },
    /// utimensat, following the link unless `nofollow`.
    Utimens {
        path: usize,
        atime: Time,
        mtime: Time,
        nofollow: bool,
    },
    /// open(O_RDONLY) and fsync or fdatasync (directories too).
    Fsync {
        path: usize,
        data_only: bool,
    },
    /// lstat: type, permission bits, size (files and symlinks), link count.
    Stat {
        path: usize,
    },
    /// Opens `path` into a slot (closing what was there); it stays open.
    Open {
        slot: usize,
        path: usize,
        mode: OpenMode,
    },
    /// close(2) of a slot.
    Close {
        slot: usize,
    },
    /// pwrite through a slot (the file may have been renamed or unlinked since).
    FdWrite {
        slot: usize,
        offset: u64,
        len: usize,
        byte: u8,
    },
    /// pread through a slot.
    FdRead {
        slot: usize,
        offset: u64,
        len: usize,
    },
    /// ftruncate through a slot.
    FdTruncate {
        slot: usize,
        size: u64,
    },
    /// fallocate PUNCH_HOLE|KEEP_SIZE through a slot.
    FdPunchHole {
        slot: usize,
        offset: u64,
        len: u64,
    },
    /// fsync through a slot.
    FdSync {
        slot: usize,
    },
    /// fstat through a slot.
    FdStat {
        slot: usize,
    },
}

/// What a successful operation returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    Done,
    Data(Vec<u8>),
    Stat {
        kind: u32,
        mode: u32,
        size: Option<i64>,
        nlink: u64,
    },
}

/// The result of one operation: what it returned, or its errno.
pub type Outcome = Result<Out, i32>;

fn done(r: Result<i64, i32>) -> Outcome {
    r.map(|_| Out::Done)
}

fn ts(t: Time) -> libc::timespec {
    match t {
        Time::Omit => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Time::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Time::At(s) => libc::timespec {
            tv_sec: s,
            tv_nsec: 123_456_789,
        },
    }
}

fn pwrite_all(fd: &OwnedFd, offset: u64, len: usize, byte: u8) -> Outcome {
    let buf = vec![byte; len];
    let mut off = 0usize;
    while off < len {
        // SAFETY: buf is valid for len - off bytes from off; fd is open.
        let n = check(unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf[off..].as_ptr().cast(),
                len - off,
                (offset + off as u64) as i64,
            )
        } as i64)?;
        if n == 0 {
            return Err(libc::EIO);
        }
        off += n as usize;
    }
    Ok(Out::Done)
}

fn pread_all(fd: &OwnedFd, offset: u64, len: usize) -> Outcome {
    let mut buf = vec![0u8; len];
    let mut got = 0usize;
    while got < len {
        // SAFETY: buf is valid for len - got bytes from got; fd is open.
        let n = check(unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                len - got,
                (offset + got as u64) as i64,
            )
        } as i64)?;
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    buf.truncate(got);
    Ok(Out::Data(buf))
}

fn fallocate(fd: &OwnedFd, mode: i32, offset: u64, len: u64) -> Outcome {
    // SAFETY: fd is open.
    done(check(
        unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as i64, len as i64) }.into(),
    ))
}

fn stat_out(st: libc::stat) -> Out {
    let kind = st.st_mode & libc::S_IFMT;
    Out::Stat {
        kind,
        mode: st.st_mode & 0o7777,
        size: (kind == libc::S_IFREG || kind == libc::S_IFLNK).then_some(st.st_size),
        nlink: st.st_nlink,
    }
}

/// Performs operations under one root, keeping `SLOTS` descriptors between them.
/// Drop it (or call `close_all`) before unmounting.
pub struct Actor {
    root: PathBuf,
    slots: [Option<OwnedFd>; SLOTS],
}

impl Actor {
    pub fn new(root: impl Into<PathBuf>) -> Actor {
        Actor {
            root: root.into(),
            slots: Default::default(),
        }
    }

    pub fn close_all(&mut self) {
        self.slots = Default::default();
    }

    fn at(&self, i: usize) -> CString {
        cpath(&self.root.join(NAMES[i]))
    }

    fn path(&self, i: usize) -> PathBuf {
        self.root.join(NAMES[i])
    }

    fn with_open(&self, path: usize, flags: i32, f: impl FnOnce(&OwnedFd) -> Outcome) -> Outcome {
        let fd = open(&self.path(path), flags, 0)?;
        f(&fd)
    }

    fn slot(&self, slot: usize) -> Result<&OwnedFd, i32> {
        self.slots[slot].as_ref().ok_or(libc::EBADF)
    }

    /// Performs `op` and reports what happened.
    pub fn apply(&mut self, op: &Op) -> Outcome {
        // SAFETY (all the libc calls below): paths are valid C strings, buffers
        // are valid for the lengths passed, descriptors are open for the call.
        match *op {
            Op::Create { path, mode, excl } => {
                let flags = libc::O_CREAT | libc::O_WRONLY | if excl { libc::O_EXCL } else { 0 };
                open(&self.path(path), flags, mode).map(|_| Out::Done)
            }
            Op::Write {
                path,
                offset,
                len,
                byte,
                mode,
            } => {
                let extra = match mode {
                    WriteMode::Plain => 0,
                    WriteMode::Append => libc::O_APPEND,
                    WriteMode::Trunc => libc::O_TRUNC,
                    WriteMode::Sync => libc::O_SYNC,
                };
                self.with_open(path, libc::O_WRONLY | extra, |fd| {
                    pwrite_all(fd, offset, len, byte)
                })
            }
            Op::Read { path, offset, len } => {
                self.with_open(path, libc::O_RDONLY, |fd| pread_all(fd, offset, len))
            }
            Op::Truncate { path, size } => done(check(
                unsafe { libc::truncate(self.at(path).as_ptr(), size as i64) }.into(),
            )),
            Op::PunchHole { path, offset, len } => self.with_open(path, libc::O_WRONLY, |fd| {
                fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
            }),
            Op::ZeroRange {
                path,
                offset,
                len,
                keep_size,
            } => self.with_open(path, libc::O_WRONLY, |fd| {
                let keep = if keep_size {
                    libc::FALLOC_FL_KEEP_SIZE
                } else {
                    0
                };
                fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | keep, offset, len)
            }),
            Op::Rename { from, to, flags } => done(check(
                unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        self.at(from).as_ptr(),
                        libc::AT_FDCWD,
                        self.at(to).as_ptr(),
                        flags,
                    )
                }
                .into(),
            )),
            Op::Unlink { path } => done(check(
                unsafe { libc::unlink(self.at(path).as_ptr()) }.into(),
            )),
            Op::Mkdir { path, mode } => done(check(
                unsafe { libc::mkdir(self.at(path).as_ptr(), mode) }.into(),
            )),
            Op::Rmdir { path } => {
                done(check(unsafe { libc::rmdir(self.at(path).as_ptr()) }.into()))
            }
            Op::Link { from, to } => done(check(
                unsafe { libc::link(self.at(from).as_ptr(), self.at(to).as_ptr()) }.into(),
            )),
            Op::Symlink { target, path } => {
                let t = CString::new(TARGETS[target]).expect("no NUL");
                done(check(
                    unsafe { libc::symlink(t.as_ptr(), self.at(path).as_ptr()) }.into(),
                ))
            }
            Op::Chmod { path, mode } => done(check(
                unsafe { libc::chmod(self.at(path).as_ptr(), mode) }.into(),
            )),
            Op::Utimens {
                path,
                atime,
                mtime,
                nofollow,
            } => {
                let times = [ts(atime), ts(mtime)];
                let flags = if nofollow {
                    libc::AT_SYMLINK_NOFOLLOW
                } else {
                    0
                };
                done(check(
                    unsafe {
                        libc::utimensat(
                            libc::AT_FDCWD,
                            self.at(path).as_ptr(),
                            times.as_ptr(),
                            flags,
                        )
                    }
                    .into(),
                ))
            }
            Op::Fsync { path, data_only } => self.with_open(path, libc::O_RDONLY, |fd| {
                let r = unsafe {
                    if data_only {
                        libc::fdatasync(fd.as_raw_fd())
                    } else {
                        libc::fsync(fd.as_raw_fd())
                    }
                };
                done(check(r.into()))
            }),
            Op::Stat { path } => lstat(&self.path(path)).map(stat_out),
            Op::Open { slot, path, mode } => {
                self.slots[slot] = None;
                let fd = open(&self.path(path), mode.flags(), 0o644)?;
                self.slots[slot] = Some(fd);
                Ok(Out::Done)
            }
            Op::Close { slot } => self.slots[slot]
                .take()
                .map(|_| Out::Done)
                .ok_or(libc::EBADF),
            Op::FdWrite {
                slot,
                offset,
                len,
                byte,
            } => pwrite_all(self.slot(slot)?, offset, len, byte),
            Op::FdRead { slot, offset, len } => pread_all(self.slot(slot)?, offset, len),
            Op::FdTruncate { slot, size } => done(check(
                unsafe { libc::ftruncate(self.slot(slot)?.as_raw_fd(), size as i64) }.into(),
            )),
            Op::FdPunchHole { slot, offset, len } => fallocate(
                self.slot(slot)?,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            Op::FdSync { slot } => done(check(
                unsafe { libc::fsync(self.slot(slot)?.as_raw_fd()) }.into(),
            )),
            Op::FdStat { slot } => fstat(self.slot(slot)?).map(stat_out),
        }
    }
}

/// Performs one operation with no descriptors kept (slot operations get EBADF).
pub fn apply(root: &Path, op: &Op) -> Outcome {
    Actor::new(root).apply(op)
}

/// A starting tree for a sequence, so that random operations find something to
/// act on: directories `d`, `d/f`, `e`, files `a`, `d/a` with data, a hard link
/// `d/b` to `a`, and a symlink `c` -> `d/a`.
pub fn prelude() -> Vec<Op> {
    vec![
        Op::Mkdir {
            path: 3,
            mode: 0o755,
        },
        Op::Mkdir {
            path: 7,
            mode: 0o755,
        },
        Op::Mkdir {
            path: 4,
            mode: 0o700,
        },
        Op::Create {
            path: 0,
            mode: 0o644,
            excl: true,
        },
        Op::Write {
            path: 0,
            offset: 0,
            len: 20_000,
            byte: 0xa1,
            mode: WriteMode::Plain,
        },
        Op::Create {
            path: 5,
            mode: 0o600,
            excl: true,
        },
        Op::Write {
            path: 5,
            offset: 8_000,
            len: 300,
            byte: 0x5a,
            mode: WriteMode::Plain,
        },
        Op::Link { from: 0, to: 6 },
        Op::Symlink { target: 3, path: 2 },
    ]
}

// ----- strategies --------------------------------------------------------------

fn name() -> impl Strategy<Value = usize> {
    0..NAMES.len()
}

fn slot() -> impl Strategy<Value = usize> {
    0..SLOTS
}

/// Offsets: mostly near the start (overlaps), sometimes far past the end
/// (holes), now and then past 4 GiB and past 2^40 (VM images are large; an
/// offset cut to 32 bits must show).
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0u64..16_384,
        4 => 0u64..262_144,
        2 => 0u64..4_194_304,
        1 => (5u64 << 30)..(5u64 << 30) + 65_536,
        1 => (1u64 << 40)..(1u64 << 40) + 65_536,
    ]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 1u64..4_096,
        2 => 1u64..70_000,
        1 => 1u64..600_000,
    ]
}

fn file_mode() -> impl Strategy<Value = u32> {
    prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o400, 0o000, 0o777, 0o2755])
}

fn dir_mode() -> impl Strategy<Value = u32> {
    prop::sample::select(vec![0o755u32, 0o700, 0o777, 0o1777, 0o500, 0o2775])
}

fn time() -> impl Strategy<Value = Time> {
    prop_oneof![
        Just(Time::Omit),
        Just(Time::Now),
        (0i64..2_000_000_000).prop_map(Time::At),
    ]
}

fn write_mode() -> impl Strategy<Value = WriteMode> {
    prop_oneof![
        6 => Just(WriteMode::Plain),
        1 => Just(WriteMode::Append),
        1 => Just(WriteMode::Trunc),
        1 => Just(WriteMode::Sync),
    ]
}

fn open_mode() -> impl Strategy<Value = OpenMode> {
    prop_oneof![
        1 => Just(OpenMode::ReadOnly),
        1 => Just(OpenMode::WriteOnly),
        2 => Just(OpenMode::ReadWrite),
        1 => Just(OpenMode::Append),
        1 => Just(OpenMode::Truncate),
        1 => Just(OpenMode::Create),
    ]
}

fn rename_flags() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => Just(0u32),
        1 => Just(libc::RENAME_NOREPLACE),
        1 => Just(libc::RENAME_EXCHANGE),
    ]
}

/// One random operation, weighted towards the ones that change data.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (name(), file_mode(), any::<bool>())
            .prop_map(|(path, mode, excl)| Op::Create { path, mode, excl }),
        6 => (name(), offset(), length(), any::<u8>(), write_mode()).prop_map(
            |(path, offset, len, byte, mode)| Op::Write {
                path,
                offset,
                len: len as usize,
                byte,
                mode,
            }
        ),
        2 => (name(), offset(), length())
            .prop_map(|(path, offset, len)| Op::Read { path, offset, len: len as usize }),
        2 => (name(), prop_oneof![offset(), 0u64..8_192])
            .prop_map(|(path, size)| Op::Truncate { path, size }),
        2 => (name(), offset(), length())
            .prop_map(|(path, offset, len)| Op::PunchHole { path, offset, len }),
        2 => (name(), offset(), length(), any::<bool>()).prop_map(
            |(path, offset, len, keep_size)| Op::ZeroRange { path, offset, len, keep_size }
        ),
        3 => (name(), name(), rename_flags())
            .prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        2 => name().prop_map(|path| Op::Unlink { path }),
        3 => (name(), dir_mode()).prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        2 => name().prop_map(|path| Op::Rmdir { path }),
        2 => (name(), name()).prop_map(|(from, to)| Op::Link { from, to }),
        2 => (0..TARGETS.len(), name()).prop_map(|(target, path)| Op::Symlink { target, path }),
        1 => (name(), prop_oneof![file_mode(), dir_mode()])
            .prop_map(|(path, mode)| Op::Chmod { path, mode }),
        1 => (name(), time(), time(), any::<bool>()).prop_map(
            |(path, atime, mtime, nofollow)| Op::Utimens { path, atime, mtime, nofollow }
        ),
        1 => (name(), any::<bool>()).prop_map(|(path, data_only)| Op::Fsync { path, data_only }),
        1 => name().prop_map(|path| Op::Stat { path }),
        3 => (slot(), name(), open_mode())
            .prop_map(|(slot, path, mode)| Op::Open { slot, path, mode }),
        1 => slot().prop_map(|slot| Op::Close { slot }),
        4 => (slot(), offset(), length(), any::<u8>()).prop_map(
            |(slot, offset, len, byte)| Op::FdWrite { slot, offset, len: len as usize, byte }
        ),
        2 => (slot(), offset(), length())
            .prop_map(|(slot, offset, len)| Op::FdRead { slot, offset, len: len as usize }),
        1 => (slot(), prop_oneof![offset(), 0u64..8_192])
            .prop_map(|(slot, size)| Op::FdTruncate { slot, size }),
        1 => (slot(), offset(), length())
            .prop_map(|(slot, offset, len)| Op::FdPunchHole { slot, offset, len }),
        1 => slot().prop_map(|slot| Op::FdSync { slot }),
        1 => slot().prop_map(|slot| Op::FdStat { slot }),
    ]
}

/// A sequence of up to `max` operations.
pub fn ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..=max)
}
