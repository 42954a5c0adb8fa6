//! The filesystem core: every operation the mount serves, done on the backing
//! directory. Knows nothing of fuser; `fuse.rs` adapts kernel requests to it and
//! tests drive it directly.

pub mod boundary;
pub mod handle;
pub mod inode;
pub mod recorder;
pub mod sys;

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirEntryExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::journal::{Op, Timestamp};
use handle::{DirEntry, Handle, HandleTable, OpenDir, OpenFile};
use inode::{BackingKey, Inode, InodeTable, ROOT_INO};
use recorder::Recorder;
pub use sys::XattrReply;

/// Who is asking: the credentials of the process behind a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

impl Caller {
    pub const ROOT: Caller = Caller { uid: 0, gid: 0 };
}

/// A point in time for setattr: the caller's clock or a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSpec {
    Now,
    At(SystemTime),
}

/// The attribute changes of one setattr request; `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSpec>,
    pub mtime: Option<TimeSpec>,
    /// A size change by a caller without CAP_FSETID: clear set-id bits too.
    pub kill_suidgid: bool,
}

/// Attributes of a file as the mount reports them (backing stat, our inode number).
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: u64,
    pub stat: libc::stat,
}

impl Attr {
    pub fn file_type(&self) -> u32 {
        self.stat.st_mode & libc::S_IFMT
    }
}

/// A name resolved to an inode, with its attributes; the kernel now holds one reference.
#[derive(Debug, Clone, Copy)]
pub struct EntryOut {
    pub attr: Attr,
}

/// The answer to open/create.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub fh: u64,
    /// The caller asked for O_DIRECT: bypass the page cache for this handle.
    pub direct_io: bool,
}

/// One directory entry as readdir returns it.
#[derive(Debug, Clone)]
pub struct DirListing {
    pub ino: u64,
    pub offset: u64,
    pub file_type: u32,
    pub name: OsString,
}

/// How the volume is set up.
#[derive(Debug, Clone, Default)]
pub struct VolumeOptions {
    /// Refuse every mutation with EROFS.
    pub read_only: bool,
    /// The kernel caches writes (FUSE writeback cache): it may read through
    /// write-only handles and handles O_APPEND itself.
    pub writeback_cache: bool,
    /// A directory under the backing dir that the mount must neither show nor reach.
    pub hidden_dir: Option<PathBuf>,
}

/// The hidden directory: where it sits (parent object + name) and what it is.
#[derive(Debug, Clone)]
struct Hidden {
    parent: BackingKey,
    name: OsString,
}

pub struct Volume {
    backing: PathBuf,
    inodes: InodeTable,
    handles: HandleTable,
    options: VolumeOptions,
    hidden: Option<Hidden>,
    /// (dev, ino) of the hidden state dir and of every dir between it and the
    /// root: moving or removing one of them through the mount is refused.
    state_keys: Vec<BackingKey>,
    /// Journaling; None for a volume that records nothing (read-only, replica).
    recorder: Option<Recorder>,
}

impl Volume {
    pub fn new(backing: &Path, options: VolumeOptions) -> Result<Volume> {
        let c = CString::new(backing.as_os_str().as_bytes()).map_err(|_| Error::EINVAL)?;
        let root_fd = sys::open_path(&c, libc::O_PATH | libc::O_DIRECTORY)?;
        let root_st = sys::fstat(root_fd.as_fd())?;
        let hidden = match &options.hidden_dir {
            Some(dir) => {
                let parent = dir.parent().ok_or(Error::EINVAL)?;
                let name = dir.file_name().ok_or(Error::EINVAL)?;
                let pc = CString::new(parent.as_os_str().as_bytes()).map_err(|_| Error::EINVAL)?;
                let pfd = sys::open_path(&pc, libc::O_PATH | libc::O_DIRECTORY)?;
                let pst = sys::fstat(pfd.as_fd())?;
                Some(Hidden {
                    parent: inode::key_of(&pst),
                    name: name.to_owned(),
                })
            }
            None => None,
        };
        let mut state_keys = Vec::new();
        if let Some(dir) = &options.hidden_dir {
            for a in dir.ancestors().take_while(|a| *a != backing) {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::symlink_metadata(a)?;
                state_keys.push((m.dev(), m.ino()));
            }
        }
        Ok(Volume {
            backing: backing.to_owned(),
            inodes: InodeTable::new(root_fd, &root_st),
            handles: HandleTable::default(),
            options,
            hidden,
            state_keys,
            recorder: None,
        })
    }

    /// Journals every mutation from now on.
    pub fn with_recorder(mut self, recorder: Recorder) -> Volume {
        self.recorder = Some(recorder);
        self
    }

    pub fn recorder(&self) -> Option<&Recorder> {
        self.recorder.as_ref()
    }

    /// New exclusion rules (SIGHUP): replicas get what they newly include
    /// and lose what they newly exclude. The hidden state dir is never walked.
    pub fn set_exclusions(&self, ex: crate::journal::exclude::Exclusions) {
        let Some(r) = &self.recorder else { return };
        let hidden = self
            .options
            .hidden_dir
            .as_ref()
            .and_then(|d| d.strip_prefix(&self.backing).ok())
            .map(|p| p.as_os_str().as_bytes().to_vec());
        r.set_exclusions(ex, &|rel| Some(rel) == hidden.as_deref());
    }

    pub fn backing_dir(&self) -> &Path {
        &self.backing
    }

    pub fn options(&self) -> &VolumeOptions {
        &self.options
    }

    /// Number of inodes the kernel holds references to (the root included).
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    pub fn handle_count(&self) -> usize {
        self.handles.len()
    }

    /// (dev, ino) of the hidden state dir, if it is inside the backing dir.
    pub fn state_dir_key(&self) -> Option<BackingKey> {
        self.state_keys.first().copied()
    }

    /// EBUSY if `name` in `parent` is the state dir or holds it: renaming it
    /// away would cut the journal off and let a snapshot copy the keys.
    fn guard_state_dir(&self, parent: &Inode, name: &CString) -> Result<()> {
        if self.state_keys.is_empty() {
            return Ok(());
        }
        match sys::fstatat(parent.fd(), name) {
            Ok(st) if self.state_keys.contains(&inode::key_of(&st)) => {
                Err(Error::from_errno(libc::EBUSY))
            }
            _ => Ok(()),
        }
    }

    fn is_hidden(&self, parent: &Inode, name: &OsStr) -> bool {
        matches!(&self.hidden, Some(h) if h.parent == parent.key && h.name == name)
    }

    fn writable(&self) -> Result<()> {
        if self.options.read_only {
            Err(Error::EROFS)
        } else {
            Ok(())
        }
    }

    /// A name in a directory, checked: no '/', not empty, not the hidden dir.
    fn child_name(&self, parent: &Inode, name: &OsStr) -> Result<CString> {
        if !parent.is_dir() {
            return Err(Error::ENOTDIR);
        }
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.contains(&b'/') {
            return Err(Error::EINVAL);
        }
        if bytes.len() > 255 {
            return Err(Error::ENAMETOOLONG);
        }
        if self.is_hidden(parent, name) {
            return Err(Error::EPERM);
        }
        sys::cstr(name)
    }

    /// Path of an inode's backing object for log messages.
    pub fn describe(&self, ino: u64) -> String {
        match self.inodes.get(ino) {
            Ok(inode) => std::fs::read_link(format!("/proc/self/fd/{}", inode.fd().as_raw_fd()))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| format!("inode {ino}")),
            Err(_) => format!("inode {ino} (forgotten)"),
        }
    }

    fn attr_of(&self, inode: &Inode) -> Result<Attr> {
        Ok(Attr {
            ino: inode.ino,
            stat: sys::fstat(inode.fd())?,
        })
    }

    // ----- names -------------------------------------------------------------

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<EntryOut> {
        let parent = self.inodes.get(parent)?;
        let cname = match self.child_name(&parent, name) {
            Err(e) if e == Error::EPERM => return Err(Error::ENOENT),
            other => other?,
        };
        self.lookup_in(&parent, &cname)
    }

    fn lookup_in(&self, parent: &Inode, name: &CString) -> Result<EntryOut> {
        let fd = sys::openat(parent.fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let st = sys::fstat(fd.as_fd())?;
        let inode = self.inodes.remember(fd, &st);
        Ok(EntryOut {
            attr: Attr {
                ino: inode.ino,
                stat: st,
            },
        })
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        self.inodes.forget(ino, nlookup);
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let inode = self.inodes.get(ino)?;
        self.attr_of(&inode)
    }

    pub fn setattr(&self, ino: u64, fh: Option<u64>, changes: &SetAttr) -> Result<Attr> {
        self.writable()?;
        let inode = self.inodes.get(ino)?;
        let file = match fh {
            Some(fh) => self.handles.file(fh).ok(),
            None => None,
        };
        let proc = sys::proc_path(inode.fd().as_raw_fd());
        let rec = self.recorder.as_ref();
        let _ns = rec.map(|r| r.data_lock());
        let _order = inode.mutation.lock().unwrap_or_else(|e| e.into_inner());
        let path = rec.and_then(|r| r.journaled_path(&inode));
        if let Some(mode) = changes.mode {
            if inode.is_symlink() {
                return Err(Error::from_errno(libc::EOPNOTSUPP));
            }
            match &file {
                Some(f) => sys::fchmod(f.file.as_raw_fd(), mode & 0o7777)?,
                None => sys::chmod_path(&proc, mode & 0o7777)?,
            }
        }
        if changes.uid.is_some() || changes.gid.is_some() {
            sys::fchownat_empty(inode.fd(), changes.uid, changes.gid)?;
        }
        if let Some(size) = changes.size {
            if changes.kill_suidgid && changes.mode.is_none() {
                self.kill_suidgid(&inode, path.as_deref())?;
            }
            if let Some(r) = rec {
                r.preserve(&inode, path.as_deref(), size, u64::MAX);
            }
            match &file {
                Some(f) if f.writable() => sys::ftruncate(f.file.as_raw_fd(), size)?,
                _ => sys::truncate_path(&proc, size)?,
            }
            if let (Some(r), Some(p)) = (rec, &path) {
                r.record(
                    Some(&inode),
                    &Op::Truncate {
                        path: p.to_vec(),
                        size,
                    },
                    &[],
                );
            }
        }
        if changes.atime.is_some() || changes.mtime.is_some() {
            let times = [to_timespec(changes.atime), to_timespec(changes.mtime)];
            sys::utimens_fd(inode.fd(), &times)?;
        }
        let attr = self.attr_of(&inode)?;
        if let (Some(r), Some(p)) = (rec, &path) {
            let st = &attr.stat;
            let mode = changes.mode.map(|_| st.st_mode & 0o7777);
            let uid = changes.uid.map(|_| st.st_uid);
            let gid = changes.gid.map(|_| st.st_gid);
            // Chown by root clears set-id bits: journal the mode that resulted.
            let mode = mode.or((uid.is_some() || gid.is_some()).then_some(st.st_mode & 0o7777));
            let atime = changes.atime.map(|_| Timestamp {
                sec: st.st_atime,
                nsec: st.st_atime_nsec as u32,
            });
            let mtime = changes.mtime.map(|_| Timestamp {
                sec: st.st_mtime,
                nsec: st.st_mtime_nsec as u32,
            });
            if mode.is_some()
                || uid.is_some()
                || gid.is_some()
                || atime.is_some()
                || mtime.is_some()
            {
                let op = Op::SetAttr {
                    path: p.to_vec(),
                    mode,
                    uid,
                    gid,
                    atime,
                    mtime,
                };
                r.record(Some(&inode), &op, &[]);
            }
        }
        Ok(attr)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let inode = self.inodes.get(ino)?;
        if !inode.is_symlink() {
            return Err(Error::EINVAL);
        }
        sys::readlink_fd(inode.fd())
    }

    /// Gives a new object the caller's ownership (we create as root). The group
    /// follows a set-gid parent as the backing filesystem already arranged.
    fn own(&self, parent: &Inode, entry: &EntryOut, caller: Caller) -> Result<()> {
        let parent_st = sys::fstat(parent.fd())?;
        let gid = if parent_st.st_mode & libc::S_ISGID != 0 {
            entry.attr.stat.st_gid
        } else {
            caller.gid
        };
        if entry.attr.stat.st_uid == caller.uid && entry.attr.stat.st_gid == gid {
            return Ok(());
        }
        let inode = self.inodes.get(entry.attr.ino)?;
        sys::fchownat_empty(inode.fd(), Some(caller.uid), Some(gid))?;
        // chown clears set-id bits on files; give back what the caller asked for.
        let mode = entry.attr.stat.st_mode;
        if mode & (libc::S_ISUID | libc::S_ISGID) != 0 && !inode.is_symlink() && !inode.is_dir() {
            sys::chmod_path(&sys::proc_path(inode.fd().as_raw_fd()), mode & 0o7777)?;
        }
        Ok(())
    }

    /// After creating `name` in `parent`: give it the caller's ownership, look it
    /// up, and journal its creation (the namespace lock is held by the caller).
    fn finish_new(&self, parent: &Inode, name: &CString, caller: Caller) -> Result<EntryOut> {
        let mut entry = self.lookup_in(parent, name)?;
        if let Err(e) = self.own(parent, &entry, caller) {
            self.forget(entry.attr.ino, 1);
            return Err(e);
        }
        let inode = self.inodes.get(entry.attr.ino)?;
        entry.attr.stat = sys::fstat(inode.fd())?;
        if let Some(r) = &self.recorder
            && let Some(info) = r.child_info(parent, name.as_bytes())
            && !info.excluded
        {
            let op = creation_op(info.rel.to_vec(), &entry.attr.stat, inode.fd())?;
            r.record(Some(&inode), &op, &[]);
        }
        Ok(entry)
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        caller: Caller,
    ) -> Result<EntryOut> {
        self.writable()?;
        let parent = self.inodes.get(parent)?;
        let cname = self.child_name(&parent, name)?;
        let _ns = self.recorder.as_ref().map(|r| r.namespace_lock());
        unmasked(|| sys::mknodat(parent.fd(), &cname, mode, rdev))?;
        self.finish_new(&parent, &cname, caller)
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Result<EntryOut> {
        self.writable()?;
        let parent = self.inodes.get(parent)?;
        let cname = self.child_name(&parent, name)?;
        let _ns = self.recorder.as_ref().map(|r| r.namespace_lock());
        unmasked(|| sys::mkdirat(parent.fd(), &cname, mode & 0o7777))?;
        self.finish_new(&parent, &cname, caller)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        caller: Caller,
    ) -> Result<EntryOut> {
        self.writable()?;
        let parent = self.inodes.get(parent)?;
        let cname = self.child_name(&parent, name)?;
        let ctarget = sys::cstr(target.as_os_str())?;
        let _ns = self.recorder.as_ref().map(|r| r.namespace_lock());
        sys::symlinkat(&ctarget, parent.fd(), &cname)?;
        self.finish_new(&parent, &cname, caller)
    }

    pub fn link(&self, ino: u64, new_parent: u64, new_name: &OsStr) -> Result<EntryOut> {
        self.writable()?;
        let inode = self.inodes.get(ino)?;
        let parent = self.inodes.get(new_parent)?;
        let cname = self.child_name(&parent, new_name)?;
        if inode.is_dir() {
            return Err(Error::EPERM);
        }
        let rec = self.recorder.as_ref();
        let _ns = rec.map(|r| r.namespace_lock());
        let existing = rec.and_then(|r| r.path_info(&inode));
        sys::link_fd(inode.fd(), parent.fd(), &cname)?;
        if let Some(r) = rec
            && let Some(new) = r.child_info(&parent, cname.as_bytes())
        {
            match existing {
                Some(old) if !old.excluded && !new.excluded => {
                    let op = Op::Link {
                        existing: old.rel.to_vec(),
                        path: new.rel.to_vec(),
                    };
                    r.record(Some(&inode), &op, &[]);
                }
                // A journaled name for content the replica does not have.
                _ if !new.excluded => r.send_tree(&new.rel),
                _ => {}
            }
        }
        self.lookup_in(&parent, &cname)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> Result<()> {
        self.writable()?;
        let parent = self.inodes.get(parent)?;
        let cname = self.child_name(&parent, name)?;
        let rec = self.recorder.as_ref();
        let _ns = rec.map(|r| r.namespace_lock());
        self.guard_state_dir(&parent, &cname)?;
        let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
        sys::unlinkat(parent.fd(), &cname, flags)?;
        if let Some(r) = rec
            && let Some(info) = r.child_info(&parent, cname.as_bytes())
            && !info.excluded
        {
            let path = info.rel.to_vec();
            let op = if dir {
                Op::Rmdir { path }
            } else {
                Op::Unlink { path }
            };
            r.record(None, &op, &[]);
        }
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> Result<()> {
        self.writable()?;
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE | libc::RENAME_WHITEOUT;
        if flags & !known != 0 {
            return Err(Error::EINVAL);
        }
        let parent = self.inodes.get(parent)?;
        let new_parent = self.inodes.get(new_parent)?;
        let old = self.child_name(&parent, name)?;
        let new = self.child_name(&new_parent, new_name)?;
        let rec = self.recorder.as_ref();
        let _ns = rec.map(|r| r.namespace_lock());
        self.guard_state_dir(&parent, &old)?;
        self.guard_state_dir(&new_parent, &new)?;
        let is_dir = |dir: &Inode, name: &CString| {
            sys::fstatat(dir.fd(), name)
                .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
                .ok()
        };
        let src_is_dir = is_dir(&parent, &old).unwrap_or(false);
        let dst_was = is_dir(&new_parent, &new);
        sys::renameat2(parent.fd(), &old, new_parent.fd(), &new, flags)?;
        let Some(r) = rec else { return Ok(()) };
        let (Some(from), Some(to)) = (
            r.child_info(&parent, old.as_bytes()),
            r.child_info(&new_parent, new.as_bytes()),
        ) else {
            return Ok(());
        };
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        match (from.excluded, to.excluded) {
            (false, false) => {
                let op = Op::Rename {
                    from: from.rel.to_vec(),
                    to: to.rel.to_vec(),
                    flags,
                };
                r.record(None, &op, &[]);
                r.follow_rename(&from.rel, &to.rel, flags);
                // Names inside a moved directory may cross the boundary.
                if src_is_dir {
                    r.settle_moved_tree(&from.rel, &to.rel);
                }
                if exchange && dst_was == Some(true) {
                    r.settle_moved_tree(&to.rel, &from.rel);
                }
            }
            (true, true) => {}
            // Leaving replication: the replica drops the old name (and what
            // is beneath it).
            (false, true) => {
                r.record_removal(&from.rel, src_is_dir);
                if exchange {
                    // What was excluded at `to` is replicated at `from` now.
                    r.send_tree(&from.rel);
                }
            }
            // Entering replication: whatever the replica had there is replaced
            // by the object and its subtree, sent whole.
            (true, false) => {
                if let Some(was_dir) = dst_was {
                    r.record_removal(&to.rel, was_dir);
                }
                r.send_tree(&to.rel);
            }
        }
        Ok(())
    }

    // ----- files -------------------------------------------------------------

    /// Flags for the backing open: the kernel computes append offsets and, with
    /// the writeback cache, reads pages through handles opened write-only.
    fn backing_flags(&self, flags: i32) -> i32 {
        let mut f = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_APPEND);
        // Our pwrite buffers are not block aligned; the kernel already bypasses
        // its own cache for O_DIRECT callers.
        f &= !libc::O_DIRECT;
        if self.options.writeback_cache && f & libc::O_ACCMODE == libc::O_WRONLY {
            f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
        }
        f
    }

    fn check_open_flags(&self, flags: i32) -> Result<()> {
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writes {
            self.writable()?;
        }
        Ok(())
    }

    /// Opens a file; `caller` matters only for O_TRUNC (set-id bits go unless root).
    pub fn open(&self, ino: u64, flags: i32, caller: Caller) -> Result<Opened> {
        self.check_open_flags(flags)?;
        let inode = self.inodes.get(ino)?;
        if inode.is_dir() {
            return Err(Error::from_errno(libc::EISDIR));
        }
        let proc = sys::proc_path(inode.fd().as_raw_fd());
        let truncates = flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY;
        let fd = if let (Some(r), true) = (&self.recorder, truncates) {
            let _ns = r.data_lock();
            let _order = inode.mutation.lock().unwrap_or_else(|e| e.into_inner());
            let path = r.journaled_path(&inode);
            r.preserve(&inode, path.as_deref(), 0, u64::MAX);
            let fd = sys::open_path(&proc, self.backing_flags(flags))?;
            if caller.uid != 0 {
                self.kill_suidgid(&inode, path.as_deref())?;
            }
            if let Some(p) = path {
                r.record(
                    Some(&inode),
                    &Op::Truncate {
                        path: p.to_vec(),
                        size: 0,
                    },
                    &[],
                );
            }
            fd
        } else {
            let fd = sys::open_path(&proc, self.backing_flags(flags))?;
            if truncates && caller.uid != 0 {
                let _order = inode.mutation.lock().unwrap_or_else(|e| e.into_inner());
                self.kill_suidgid(&inode, None)?;
            }
            fd
        };
        Ok(self.register_file(inode, fd, flags))
    }

    fn register_file(&self, inode: Arc<Inode>, fd: OwnedFd, flags: i32) -> Opened {
        let direct = (flags & libc::O_DIRECT != 0)
            .then(|| direct_reopen(&fd, self.backing_flags(flags)))
            .flatten();
        let file = File::from(fd);
        let fh = self.handles.insert(Handle::File(Arc::new(OpenFile {
            inode,
            file,
            direct,
            flags,
        })));
        Opened {
            fh,
            direct_io: flags & libc::O_DIRECT != 0,
        }
    }

    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(EntryOut, Opened)> {
        self.writable()?;
        let parent = self.inodes.get(parent)?;
        let cname = self.child_name(&parent, name)?;
        let rec = self.recorder.as_ref();
        let _ns = rec.map(|r| r.namespace_lock());
        // O_EXCL here tells whether we made the file: only a new file is
        // given to the caller.
        let oflags = self.backing_flags(flags) | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let (fd, entry) = match unmasked(|| sys::openat(parent.fd(), &cname, oflags, mode & 0o7777))
        {
            Ok(fd) => (fd, self.finish_new(&parent, &cname, caller)?),
            Err(e) if e == Error::EEXIST && flags & libc::O_EXCL == 0 => {
                let (fd, entry) = self.open_existing(&parent, &cname, flags, caller)?;
                // O_CREAT on an existing file is an open, maybe truncating.
                if let Some(r) = rec
                    && flags & libc::O_TRUNC != 0
                    && flags & libc::O_ACCMODE != libc::O_RDONLY
                    && let Some(info) = r.child_info(&parent, cname.as_bytes())
                    && !info.excluded
                {
                    let inode = self.inodes.get(entry.attr.ino)?;
                    let op = Op::Truncate {
                        path: info.rel.to_vec(),
                        size: 0,
                    };
                    r.record(Some(&inode), &op, &[]);
                }
                (fd, entry)
            }
            Err(e) => return Err(e),
        };
        let inode = self.inodes.get(entry.attr.ino)?;
        let opened = self.register_file(inode, fd, flags);
        Ok((entry, opened))
    }

    /// Create without O_EXCL of a name that exists (made since the kernel's
    /// lookup): open it as open(2) would, with the caller's permissions checked
    /// (we run as root), and leave its owner alone.
    fn open_existing(
        &self,
        parent: &Inode,
        name: &CString,
        flags: i32,
        caller: Caller,
    ) -> Result<(OwnedFd, EntryOut)> {
        let mut entry = self.lookup_in(parent, name)?;
        let ino = entry.attr.ino;
        let opened = self.inodes.get(ino).and_then(|inode| {
            let acc = flags & libc::O_ACCMODE;
            let mut mask = 0;
            if acc != libc::O_WRONLY {
                mask |= libc::R_OK;
            }
            if acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                mask |= libc::W_OK;
            }
            self.access(ino, mask, caller)?;
            // Create holds the namespace lock exclusively: no write to the
            // file runs meanwhile.
            if let Some(r) = &self.recorder
                && flags & libc::O_TRUNC != 0
                && acc != libc::O_RDONLY
            {
                r.preserve(&inode, None, 0, u64::MAX);
            }
            if inode.is_symlink() {
                return Err(Error::from_errno(libc::ELOOP));
            }
            if inode.is_dir() {
                return Err(Error::from_errno(libc::EISDIR));
            }
            let proc = sys::proc_path(inode.fd().as_raw_fd());
            let fd = sys::open_path(&proc, self.backing_flags(flags))?;
            // O_TRUNC may have changed the size since the lookup.
            entry.attr.stat = sys::fstat(fd.as_fd())?;
            Ok(fd)
        });
        match opened {
            Ok(fd) => Ok((fd, entry)),
            Err(e) => {
                self.forget(ino, 1);
                Err(e)
            }
        }
    }

    /// The open file behind a handle (the FUSE adapter needs its descriptor for passthrough).
    pub fn open_file(&self, fh: u64) -> Result<Arc<OpenFile>> {
        self.handles.file(fh)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        self.handles.file(fh)?.read_at(offset, size)
    }

    /// Writes `data` at `offset`. `kill_suidgid`: the writer lacks CAP_FSETID, so
    /// set-id bits go (the kernel leaves that to us with FUSE_HANDLE_KILLPRIV_V2,
    /// and our own writes as root would keep them).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_suidgid: bool) -> Result<u32> {
        self.writable()?;
        let f = self.handles.file(fh)?;
        let len = u32::try_from(data.len()).map_err(|_| Error::EINVAL)?;
        let rec = self.recorder.as_ref();
        let ns = rec.map(|r| r.data_lock());
        let end = offset.saturating_add(data.len() as u64);
        let mut state = f.inode.mutation.lock_for_write(offset, end);
        let path = rec.and_then(|r| r.journaled_path(&f.inode));
        if kill_suidgid {
            self.kill_suidgid(&f.inode, path.as_deref())?;
        }
        let mut overfull = false;
        if let (Some(r), Some(p)) = (rec, &path) {
            overfull = r.ensure_hot(&mut state, p, offset, data.len() as u64);
        }
        if let Some(r) = rec {
            r.preserve(&f.inode, path.as_deref(), offset, end);
        }
        // The pwrite runs unlocked; overlapping writes wait for its record.
        let flight = f.inode.mutation.begin_flight(state, offset, end);
        let written = f.write_all_at(data, offset);
        let state = flight.finish();
        written?;
        let seq = match (rec, &path) {
            (Some(r), Some(p)) => {
                Some(r.record_write(&f.inode, p, offset, data, f.flags & libc::O_DIRECT != 0))
            }
            _ => None,
        };
        drop(state);
        drop(ns);
        if let Some(r) = rec {
            if overfull {
                r.retire_cold();
            }
            // O_SYNC/O_DSYNC: the backing write was synchronous; the record must be too.
            if let Some(seq) = seq
                && f.flags & (libc::O_SYNC | libc::O_DSYNC) != 0
            {
                // Not journaled durably: the write is not synchronous either.
                r.journal().sync_through(seq).map_err(|_| Error::EIO)?;
            }
        }
        Ok(len)
    }

    pub fn flush(&self, fh: u64) -> Result<()> {
        self.handles.file(fh).map(drop)
    }

    pub fn release(&self, fh: u64) {
        self.handles.remove(fh);
    }

    /// Clears S_ISUID, and S_ISGID when group-executable, as a write or truncate
    /// by an unprivileged caller does; journals the new mode. Called with the
    /// inode's mutation lock held.
    fn kill_suidgid(&self, inode: &Inode, path: Option<&[u8]>) -> Result<()> {
        let st = sys::fstat(inode.fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(());
        }
        let mut mode = st.st_mode & 0o7777;
        mode &= !libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            mode &= !libc::S_ISGID;
        }
        if mode == st.st_mode & 0o7777 {
            return Ok(());
        }
        sys::chmod_path(&sys::proc_path(inode.fd().as_raw_fd()), mode)?;
        if let (Some(r), Some(p)) = (&self.recorder, path) {
            let op = Op::SetAttr {
                path: p.to_vec(),
                mode: Some(mode),
                uid: None,
                gid: None,
                atime: None,
                mtime: None,
            };
            r.record(Some(inode), &op, &[]);
        }
        Ok(())
    }

    /// fsync/fdatasync: the backing file and the journal through the file's
    /// newest record, before the reply.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let f = self.handles.file(fh)?;
        sys::fsync(f.file.as_raw_fd(), datasync)?;
        if let Some(r) = &self.recorder {
            // A record the journal could not make durable fails the fsync.
            r.journal()
                .sync_through(f.inode.last_seq.load(std::sync::atomic::Ordering::Acquire))
                .map_err(|_| Error::EIO)?;
        }
        Ok(())
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        self.writable()?;
        let f = self.handles.file(fh)?;
        let rec = self.recorder.as_ref();
        let ns = rec.map(|r| r.data_lock());
        let mut state = f.inode.mutation.lock().unwrap_or_else(|e| e.into_inner());
        let path = rec.and_then(|r| r.journaled_path(&f.inode));
        let mut overfull = false;
        if let (Some(r), Some(p)) = (rec, &path) {
            overfull = r.ensure_hot(&mut state, p, offset, length);
        }
        if let Some(r) = rec {
            // Punching, zeroing or shifting bytes changes them.
            let shifts =
                mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0;
            let clears = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
            if shifts {
                r.preserve(&f.inode, path.as_deref(), offset, u64::MAX);
            } else if clears {
                r.preserve(
                    &f.inode,
                    path.as_deref(),
                    offset,
                    offset.saturating_add(length),
                );
            }
        }
        sys::fallocate(f.file.as_raw_fd(), mode, offset, length)?;
        if let (Some(r), Some(p)) = (rec, &path) {
            let op = Op::Fallocate {
                path: p.to_vec(),
                mode,
                offset,
                len: length,
            };
            r.record(Some(&f.inode), &op, &[]);
        }
        drop(state);
        drop(ns);
        if overfull && let Some(r) = rec {
            r.retire_cold();
        }
        Ok(())
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let f = self.handles.file(fh)?;
        match whence {
            libc::SEEK_SET
            | libc::SEEK_CUR
            | libc::SEEK_END
            | libc::SEEK_DATA
            | libc::SEEK_HOLE => sys::lseek(f.file.as_raw_fd(), offset, whence),
            _ => Err(Error::EINVAL),
        }
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> Result<u32> {
        self.writable()?;
        if flags != 0 {
            return Err(Error::EINVAL);
        }
        let fin = self.handles.file(fh_in)?;
        let fout = self.handles.file(fh_out)?;
        // A FUSE reply carries a u32 count.
        let len = len.min(u32::MAX as u64 & !0xfff);
        let rec = self.recorder.as_ref();
        let ns = rec.map(|r| r.data_lock());
        let mut state = fout
            .inode
            .mutation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let path = rec.and_then(|r| r.journaled_path(&fout.inode));
        let mut overfull = false;
        if let (Some(r), Some(p)) = (rec, &path) {
            overfull = r.ensure_hot(&mut state, p, offset_out, len);
        }
        if let Some(r) = rec {
            r.preserve(
                &fout.inode,
                path.as_deref(),
                offset_out,
                offset_out.saturating_add(len),
            );
        }
        let n = sys::copy_file_range(
            fin.file.as_raw_fd(),
            offset_in,
            fout.file.as_raw_fd(),
            offset_out,
            len,
        )?;
        if let (Some(r), Some(p)) = (rec, &path) {
            // The replica gets the copied bytes as writes, read back from the
            // destination while it is still locked.
            const CHUNK: usize = 1 << 20;
            let mut buf = vec![0u8; CHUNK.min(n)];
            let mut done = 0usize;
            while done < n {
                let want = CHUNK.min(n - done);
                let got = sys::pread(
                    fout.file.as_raw_fd(),
                    &mut buf[..want],
                    offset_out + done as u64,
                )?;
                if got == 0 {
                    break;
                }
                let op = Op::Write {
                    path: p.to_vec(),
                    offset: offset_out + done as u64,
                };
                r.record(Some(&fout.inode), &op, &buf[..got]);
                done += got;
            }
        }
        drop(state);
        drop(ns);
        if overfull && let Some(r) = rec {
            r.retire_cold();
        }
        Ok(n as u32)
    }

    // ----- directories -------------------------------------------------------

    pub fn opendir(&self, ino: u64, _flags: i32) -> Result<u64> {
        let inode = self.inodes.get(ino)?;
        if !inode.is_dir() {
            return Err(Error::ENOTDIR);
        }
        Ok(self.handles.insert(Handle::Dir(Arc::new(OpenDir {
            inode,
            entries: Mutex::new(None),
        }))))
    }

    fn read_entries(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let st = sys::fstat(dir.fd())?;
        let mut out = vec![
            DirEntry {
                name: ".".into(),
                backing_ino: st.st_ino,
                file_type: libc::S_IFDIR,
            },
            DirEntry {
                name: "..".into(),
                backing_ino: 0,
                file_type: libc::S_IFDIR,
            },
        ];
        let path = format!("/proc/self/fd/{}", dir.fd().as_raw_fd());
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let name = entry.file_name();
            if matches!(&self.hidden, Some(h) if h.parent == dir.key && h.name == name) {
                continue;
            }
            let ft = entry.file_type()?;
            out.push(DirEntry {
                backing_ino: entry.ino(),
                file_type: file_type_bits(&ft),
                name,
            });
        }
        Ok(out)
    }

    /// Entries from `offset` on. Offset 0 (re)reads the directory, as rewinddir does.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<DirListing>> {
        let dir = self.handles.dir(fh)?;
        let entries = {
            let mut cached = dir.entries.lock().unwrap_or_else(|e| e.into_inner());
            match (&*cached, offset) {
                (Some(e), o) if o != 0 => e.clone(),
                _ => {
                    let fresh = Arc::new(self.read_entries(&dir.inode)?);
                    *cached = Some(fresh.clone());
                    fresh
                }
            }
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        Ok(entries
            .iter()
            .enumerate()
            .skip(start)
            .map(|(i, e)| DirListing {
                // Report the kernel's inode number where it has one, so that d_ino
                // agrees with stat's st_ino.
                ino: self
                    .inodes
                    .ino_of((dir.inode.key.0, e.backing_ino))
                    .unwrap_or(e.backing_ino.max(2)),
                offset: i as u64 + 1,
                file_type: e.file_type,
                name: e.name.clone(),
            })
            .collect())
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.remove(fh);
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> Result<()> {
        let dir = self.handles.dir(fh)?;
        let proc = sys::proc_path(dir.inode.fd().as_raw_fd());
        let fd = sys::open_path(&proc, libc::O_RDONLY | libc::O_DIRECTORY)?;
        sys::fsync(fd.as_raw_fd(), datasync)?;
        // Names in the directory are namespace records: make all of them durable.
        if let Some(r) = &self.recorder {
            r.journal()
                .sync_through(r.journal().last_seq())
                .map_err(|_| Error::EIO)?;
        }
        Ok(())
    }

    // ----- the rest ----------------------------------------------------------

    pub fn statfs(&self, ino: u64) -> Result<libc::statvfs> {
        let inode = self
            .inodes
            .get(ino)
            .or_else(|_| self.inodes.get(ROOT_INO))?;
        sys::statvfs(&sys::proc_path(inode.fd().as_raw_fd()))
    }

    /// access(2) against the file's mode bits for the caller (root passes all but
    /// execute, which needs one x bit, as in the kernel).
    pub fn access(&self, ino: u64, mask: i32, caller: Caller) -> Result<()> {
        let attr = self.getattr(ino)?;
        if mask & libc::W_OK != 0 && self.options.read_only {
            return Err(Error::EROFS);
        }
        if mask == libc::F_OK {
            return Ok(());
        }
        let mode = attr.stat.st_mode;
        if caller.uid == 0 {
            let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
            if mask & libc::X_OK != 0 && !is_dir && mode & 0o111 == 0 {
                return Err(Error::from_errno(libc::EACCES));
            }
            return Ok(());
        }
        let bits = if caller.uid == attr.stat.st_uid {
            (mode >> 6) & 7
        } else if caller.gid == attr.stat.st_gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        if (mask as u32) & 7 & !bits != 0 {
            return Err(Error::from_errno(libc::EACCES));
        }
        Ok(())
    }

    fn xattr_target(&self, ino: u64) -> Result<(Arc<Inode>, CString)> {
        let inode = self.inodes.get(ino)?;
        let proc = sys::proc_path(inode.fd().as_raw_fd());
        Ok((inode, proc))
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<XattrReply> {
        let (inode, proc) = self.xattr_target(ino)?;
        if inode.is_symlink() {
            // No race-free way to reach a symlink's own xattrs through /proc.
            return Err(Error::from_errno(libc::ENODATA));
        }
        sys::getxattr(&proc, &sys::cstr(name)?, size)
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> Result<XattrReply> {
        let (inode, proc) = self.xattr_target(ino)?;
        if inode.is_symlink() {
            return Ok(if size == 0 {
                XattrReply::Size(0)
            } else {
                XattrReply::Data(Vec::new())
            });
        }
        sys::listxattr(&proc, size)
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        self.writable()?;
        let (inode, proc) = self.xattr_target(ino)?;
        if inode.is_symlink() {
            return Err(Error::EPERM);
        }
        let rec = self.recorder.as_ref();
        let _ns = rec.map(|r| r.data_lock());
        let _order = inode.mutation.lock().unwrap_or_else(|e| e.into_inner());
        sys::setxattr(&proc, &sys::cstr(name)?, value, flags)?;
        if let Some(r) = rec
            && let Some(p) = r.journaled_path(&inode)
        {
            let op = Op::SetXattr {
                path: p.to_vec(),
                name: name.as_bytes().to_vec(),
                value: value.to_vec(),
                flags,
            };
            r.record(Some(&inode), &op, &[]);
        }
        Ok(())
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        self.writable()?;
        let (inode, proc) = self.xattr_target(ino)?;
        if inode.is_symlink() {
            return Err(Error::EPERM);
        }
        let rec = self.recorder.as_ref();
        let _ns = rec.map(|r| r.data_lock());
        let _order = inode.mutation.lock().unwrap_or_else(|e| e.into_inner());
        sys::removexattr(&proc, &sys::cstr(name)?)?;
        if let Some(r) = rec
            && let Some(p) = r.journaled_path(&inode)
        {
            let op = Op::RemoveXattr {
                path: p.to_vec(),
                name: name.as_bytes().to_vec(),
            };
            r.record(Some(&inode), &op, &[]);
        }
        Ok(())
    }
}

/// A second descriptor of an opened backing file, with O_DIRECT, for a caller
/// that opened with O_DIRECT. None where the backing filesystem refuses
/// O_DIRECT (tmpfs): that caller is then served through the page cache.
fn direct_reopen(fd: &OwnedFd, backing_flags: i32) -> Option<File> {
    let keep = libc::O_ACCMODE | libc::O_SYNC | libc::O_DSYNC;
    let flags = (backing_flags & keep) | libc::O_DIRECT;
    match sys::open_path(&sys::proc_path(fd.as_raw_fd()), flags) {
        Ok(d) => Some(File::from(d)),
        Err(e) => {
            tracing::debug!(error = %e, "backing O_DIRECT open refused; buffered I/O for this handle");
            None
        }
    }
}

/// Runs a create on a caller's behalf with no umask: the kernel already applied
/// the caller's umask to the mode, and the daemon's own (0077, for its state
/// dir) must not mask it again. The request thread gets a private umask
/// (unshare CLONE_FS), so zeroing it for the call affects no other thread.
fn unmasked<T>(create: impl FnOnce() -> Result<T>) -> Result<T> {
    thread_local!(static PRIVATE_UMASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if !PRIVATE_UMASK.get() {
        // SAFETY: unshare(CLONE_FS) only detaches this thread's fs attributes.
        if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
            return Err(Error::last_os_error());
        }
        PRIVATE_UMASK.set(true);
    }
    // SAFETY: umask has no preconditions; it is this thread's own now.
    let old = unsafe { libc::umask(0) };
    let r = create();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    r
}

/// The record that creates an object like the one `st` describes at `path`.
fn creation_op(path: Vec<u8>, st: &libc::stat, fd: std::os::fd::BorrowedFd<'_>) -> Result<Op> {
    Ok(match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Op::Mkdir {
            path,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
        },
        libc::S_IFLNK => Op::Symlink {
            path,
            target: sys::readlink_fd(fd)?,
            uid: st.st_uid,
            gid: st.st_gid,
        },
        _ => Op::Mknod {
            path,
            mode: st.st_mode,
            rdev: st.st_rdev,
            uid: st.st_uid,
            gid: st.st_gid,
        },
    })
}

fn to_timespec(t: Option<TimeSpec>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeSpec::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeSpec::At(t)) => {
            let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    // Before 1970: negative seconds, non-negative nanoseconds.
                    let d = e.duration();
                    let mut s = -(d.as_secs() as i64);
                    let mut n = d.subsec_nanos() as i64;
                    if n > 0 {
                        s -= 1;
                        n = 1_000_000_000 - n;
                    }
                    (s, n)
                }
            };
            libc::timespec {
                tv_sec: secs,
                tv_nsec: nanos,
            }
        }
    }
}

fn file_type_bits(ft: &std::fs::FileType) -> u32 {
    if ft.is_dir() {
        libc::S_IFDIR
    } else if ft.is_symlink() {
        libc::S_IFLNK
    } else if ft.is_fifo() {
        libc::S_IFIFO
    } else if ft.is_socket() {
        libc::S_IFSOCK
    } else if ft.is_char_device() {
        libc::S_IFCHR
    } else if ft.is_block_device() {
        libc::S_IFBLK
    } else {
        libc::S_IFREG
    }
}
