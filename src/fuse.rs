//! The FUSE adapter: kernel requests in, calls on [`Volume`] out, replies back.
//! fuser's types stop here. The only state kept here is what the kernel protocol
//! itself needs: which opens of an inode use FUSE passthrough.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle,
    FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::volume::{Attr, Caller, Opened, SetAttr, TimeSpec, Volume, XattrReply};

/// Attributes and names change only through this mount, so the kernel may cache them.
const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel sends in one request.
const MAX_WRITE: u32 = 1 << 20;

/// Kernel-side tuning of the mount.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Let the kernel cache writes (FUSE writeback cache).
    pub writeback_cache: bool,
    /// Serve read-only opens by FUSE passthrough when the kernel allows it
    /// (never with the writeback cache). Off by default: the kernel requires
    /// every open of an inode held open by passthrough to be passthrough too,
    /// and writes must come through us, so a writer opening such a file (a VM
    /// starting while a backup reads its image) gets EIO.
    pub passthrough: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            writeback_cache: true,
            passthrough: false,
        }
    }
}

/// How the kernel does I/O for one open handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoMode {
    /// Through the page cache (the kernel's "cached" inode io mode).
    Cached,
    /// Straight to the backing file by the kernel (read-only opens only).
    Passthrough,
    /// Through us without the page cache: O_DIRECT opens, and opens while
    /// passthrough opens exist (the kernel refuses a writable one with EIO;
    /// see `FuseOptions::passthrough`). The kernel keeps the inode's cached
    /// handles coherent with these writes (tests/odirect.rs checks it).
    Direct,
}

/// Per-inode io modes. The kernel refuses (EIO) to mix cached and passthrough opens
/// of one inode, so we count both; our counts lag the kernel's, never lead them.
#[derive(Default)]
struct InodeIo {
    cached: u32,
    passthrough: u32,
    backing: Option<BackingId>,
}

#[derive(Default)]
struct IoModes {
    inodes: HashMap<u64, InodeIo>,
    handles: HashMap<u64, (u64, IoMode)>,
}

pub struct FuseAdapter {
    volume: Arc<Volume>,
    options: FuseOptions,
    passthrough_ok: std::sync::atomic::AtomicBool,
    io: Mutex<IoModes>,
}

impl FuseAdapter {
    pub fn new(volume: Arc<Volume>, options: FuseOptions) -> Self {
        FuseAdapter {
            volume,
            options,
            passthrough_ok: std::sync::atomic::AtomicBool::new(false),
            io: Mutex::new(IoModes::default()),
        }
    }

    /// Maps an error to its errno; I/O failures of the backing dir are logged with the path.
    fn fail(&self, op: &str, ino: u64, e: Error) -> Errno {
        match e.errno() {
            libc::EIO
            | libc::ENOSPC
            | libc::EDQUOT
            | libc::EUCLEAN
            | libc::ENOMEM
            | libc::EROFS => {
                warn!(op, path = %self.volume.describe(ino), error = %e, "backing I/O error");
            }
            _ => debug!(op, ino, error = %e, "request failed"),
        }
        Errno::from_i32(e.errno())
    }

    fn io_lock(&self) -> std::sync::MutexGuard<'_, IoModes> {
        self.io.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chooses the io mode for a new handle and records it.
    fn choose_mode(
        &self,
        ino: u64,
        fh: u64,
        flags: i32,
        open_backing: impl FnOnce() -> io::Result<BackingId>,
    ) -> IoMode {
        let read_only = flags & libc::O_ACCMODE == libc::O_RDONLY && flags & libc::O_TRUNC == 0;
        let mut io = self.io_lock();
        let state = io.inodes.entry(ino).or_default();
        let o_direct = flags & libc::O_DIRECT != 0;
        let mut mode = IoMode::Cached;
        if o_direct {
            // The caller asked not to be cached.
            mode = IoMode::Direct;
        } else if state.passthrough > 0 {
            if read_only {
                mode = IoMode::Passthrough;
            } else {
                warn!(
                    ino,
                    "file is open by FUSE passthrough: the kernel refuses (EIO) to open it for writing"
                );
                mode = IoMode::Direct;
            }
        } else if read_only
            && state.cached == 0
            && self
                .passthrough_ok
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            match open_backing() {
                Ok(id) => {
                    state.backing = Some(id);
                    mode = IoMode::Passthrough;
                }
                Err(e) => {
                    info!(error = %e, "FUSE passthrough unavailable; reads go through the daemon");
                    self.passthrough_ok
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        match mode {
            IoMode::Cached => state.cached += 1,
            IoMode::Passthrough => state.passthrough += 1,
            IoMode::Direct => {}
        }
        io.handles.insert(fh, (ino, mode));
        mode
    }

    fn release_mode(&self, fh: u64) {
        let mut io = self.io_lock();
        let Some((ino, mode)) = io.handles.remove(&fh) else {
            return;
        };
        if let Some(state) = io.inodes.get_mut(&ino) {
            match mode {
                IoMode::Cached => state.cached = state.cached.saturating_sub(1),
                IoMode::Passthrough => {
                    state.passthrough = state.passthrough.saturating_sub(1);
                    if state.passthrough == 0 {
                        state.backing = None;
                    }
                }
                IoMode::Direct => {}
            }
            if state.cached == 0 && state.passthrough == 0 {
                io.inodes.remove(&ino);
            }
        }
    }

    /// Replies to open/create: passthrough, direct or cached, as chosen.
    fn open_flags(&self, opened: &Opened, mode: IoMode) -> FopenFlags {
        let mut flags = FopenFlags::empty();
        if mode == IoMode::Direct {
            flags |= FopenFlags::FOPEN_DIRECT_IO;
        }
        if opened.direct_io || mode == IoMode::Direct {
            flags |= FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        }
        if mode == IoMode::Cached {
            // Every change goes through this mount, so cached pages stay valid.
            flags |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        flags
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec.clamp(0, 999_999_999) as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs())
            + Duration::from_nanos(nsec.clamp(0, 999_999_999) as u64)
    }
}

pub fn file_type(bits: u32) -> FileType {
    match bits & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let st = &a.stat;
    FileAttr {
        ino: INodeNo(a.ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: system_time(st.st_ctime, st.st_ctime_nsec),
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn time_spec(t: TimeOrNow) -> TimeSpec {
    match t {
        TimeOrNow::Now => TimeSpec::Now,
        TimeOrNow::SpecificTime(t) => TimeSpec::At(t),
    }
}

fn reply_xattr(reply: ReplyXattr, r: XattrReply) {
    match r {
        XattrReply::Size(n) => reply.size(n),
        XattrReply::Data(d) => reply.data(&d),
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(e) = config.set_max_write(MAX_WRITE) {
            debug!(max = e, "kernel caps max_write");
        }
        // KILLPRIV_V2: we clear set-id bits ourselves (see Volume::write), so the
        // kernel stops asking for security.capability before every write.
        let mut wanted = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        if self.options.writeback_cache && !self.volume.options().read_only {
            wanted |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        for flag in wanted.iter() {
            if config.add_capabilities(flag).is_err() {
                info!(?flag, "kernel lacks FUSE capability");
            }
        }
        if self.options.passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough_ok
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.volume.lookup(parent.0, name) {
            Ok(e) => reply.entry(&TTL, &file_attr(&e.attr), Generation(0)),
            Err(e) => reply.error(self.fail("lookup", parent.0, e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.volume.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.volume.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(self.fail("getattr", ino.0, e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_spec),
            mtime: mtime.map(time_spec),
            // With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves this to us.
            kill_suidgid: size.is_some() && req.uid() != 0,
        };
        match self.volume.setattr(ino.0, fh.map(|f| f.0), &changes) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(self.fail("setattr", ino.0, e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.volume.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(self.fail("readlink", ino.0, e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        match self
            .volume
            .mknod(parent.0, name, mode, rdev as u64, caller(req))
        {
            Ok(e) => reply.entry(&TTL, &file_attr(&e.attr), Generation(0)),
            Err(e) => reply.error(self.fail("mknod", parent.0, e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.volume.mkdir(parent.0, name, mode, caller(req)) {
            Ok(e) => reply.entry(&TTL, &file_attr(&e.attr), Generation(0)),
            Err(e) => reply.error(self.fail("mkdir", parent.0, e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.volume.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("unlink", parent.0, e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.volume.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("rmdir", parent.0, e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self
            .volume
            .symlink(parent.0, link_name, target, caller(req))
        {
            Ok(e) => reply.entry(&TTL, &file_attr(&e.attr), Generation(0)),
            Err(e) => reply.error(self.fail("symlink", parent.0, e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .volume
            .rename(parent.0, name, newparent.0, newname, flags.bits())
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("rename", parent.0, e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.volume.link(ino.0, newparent.0, newname) {
            Ok(e) => reply.entry(&TTL, &file_attr(&e.attr), Generation(0)),
            Err(e) => reply.error(self.fail("link", ino.0, e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opened = match self.volume.open(ino.0, flags.0, caller(req)) {
            Ok(o) => o,
            Err(e) => return reply.error(self.fail("open", ino.0, e)),
        };
        let file = match self.volume.open_file(opened.fh) {
            Ok(f) => f,
            Err(e) => return reply.error(self.fail("open", ino.0, e)),
        };
        let mode = self.choose_mode(ino.0, opened.fh, flags.0, || reply.open_backing(&file.file));
        let fopen = self.open_flags(&opened, mode);
        if mode == IoMode::Passthrough {
            let io = self.io_lock();
            if let Some(id) = io.inodes.get(&ino.0).and_then(|s| s.backing.as_ref()) {
                reply.opened_passthrough(FileHandle(opened.fh), fopen, id);
                return;
            }
        }
        reply.opened(FileHandle(opened.fh), fopen);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.volume.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(self.fail("read", ino.0, e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.volume.write(fh.0, offset, data, kill) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(self.fail("write", ino.0, e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.volume.flush(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("flush", ino.0, e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_mode(fh.0);
        self.volume.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.volume.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("fsync", ino.0, e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.volume.opendir(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(self.fail("opendir", ino.0, e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.volume.readdir(fh.0, offset) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(INodeNo(e.ino), e.offset, file_type(e.file_type), &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(self.fail("readdir", ino.0, e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.volume.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.volume.fsyncdir(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("fsyncdir", ino.0, e)),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.volume.statfs(ino.0) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(self.fail("statfs", ino.0, e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self.volume.setxattr(ino.0, name, value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("setxattr", ino.0, e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.volume.getxattr(ino.0, name, size) {
            Ok(r) => reply_xattr(reply, r),
            Err(e) => reply.error(self.fail("getxattr", ino.0, e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.volume.listxattr(ino.0, size) {
            Ok(r) => reply_xattr(reply, r),
            Err(e) => reply.error(self.fail("listxattr", ino.0, e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.volume.removexattr(ino.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("removexattr", ino.0, e)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.volume.access(ino.0, mask.bits(), caller(req)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("access", ino.0, e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (entry, opened) = match self.volume.create(parent.0, name, mode, flags, caller(req)) {
            Ok(r) => r,
            Err(e) => return reply.error(self.fail("create", parent.0, e)),
        };
        // A new file has no other opens: cached mode unless it is read-only.
        let mode = self.choose_mode(entry.attr.ino, opened.fh, flags | libc::O_RDWR, || {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        });
        let fopen = self.open_flags(&opened, mode);
        reply.created(
            &TTL,
            &file_attr(&entry.attr),
            Generation(0),
            FileHandle(opened.fh),
            fopen,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.volume.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("fallocate", ino.0, e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        // With the writeback cache, written data can still sit in the kernel's
        // page cache, invisible to SEEK_DATA/SEEK_HOLE on the backing file (the
        // kernel does not flush before FUSE_LSEEK), so holes would be reported
        // over real data and sparse copies would drop it. ENOSYS makes the kernel
        // answer from its own size instead: all data, no hole; never wrong.
        if self.volume.options().writeback_cache
            && (whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE)
        {
            return reply.error(Errno::from_i32(libc::ENOSYS));
        }
        match self.volume.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(self.fail("lseek", ino.0, e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self.volume.copy_file_range(
            fh_in.0,
            offset_in,
            fh_out.0,
            offset_out,
            len,
            flags.bits(),
        ) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(self.fail("copy_file_range", ino_in.0, e)),
        }
    }
}
