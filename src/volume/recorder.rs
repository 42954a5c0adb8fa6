//! The volume's link to the journal: names inodes by path, applies exclusions,
//! keeps the activity log ahead of backing writes, and orders records.
//!
//! Ordering: data mutations hold the namespace lock shared plus the file's own
//! mutation lock around "apply to backing + append"; namespace mutations hold the
//! namespace lock exclusively. So a record's path is the path the object had when
//! the mutation happened, and for any file, journal order is application order.

use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tracing::{error, warn};

use super::inode::{FileState, Inode, PathInfo};
use crate::journal::dirty::DirtyRegion;
use crate::journal::exclude::Exclusions;
use crate::journal::{Journal, Op};

/// The exclusive namespace lock; paths resolved while it was held are not reused.
pub struct NamespaceGuard<'a> {
    _guard: RwLockWriteGuard<'a, ()>,
    generation: &'a AtomicU64,
}

impl Drop for NamespaceGuard<'_> {
    fn drop(&mut self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

pub struct Recorder {
    journal: Arc<Journal>,
    exclusions: RwLock<Arc<Exclusions>>,
    namespace: RwLock<()>,
    /// Bumped by every change that can move an existing object's path.
    generation: AtomicU64,
    /// The backing dir as the kernel prints it in /proc/self/fd links, with a
    /// trailing '/'.
    prefix: Vec<u8>,
    backing: std::path::PathBuf,
}

impl Recorder {
    pub fn new(
        journal: Arc<Journal>,
        exclusions: Exclusions,
        backing: &std::path::Path,
    ) -> Recorder {
        use std::os::unix::ffi::OsStrExt;
        let mut prefix = backing.as_os_str().as_bytes().to_vec();
        if !prefix.ends_with(b"/") {
            prefix.push(b'/');
        }
        Recorder {
            journal,
            exclusions: RwLock::new(Arc::new(exclusions)),
            namespace: RwLock::new(()),
            generation: AtomicU64::new(1),
            prefix,
            backing: backing.to_owned(),
        }
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// Held by data mutations (shared).
    pub fn data_lock(&self) -> RwLockReadGuard<'_, ()> {
        self.namespace.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Held by namespace mutations (exclusive). Paths may change under it, so
    /// cached paths are invalidated when it is taken and again when it is released.
    pub fn namespace_lock(&self) -> NamespaceGuard<'_> {
        let guard = self.namespace.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        NamespaceGuard {
            _guard: guard,
            generation: &self.generation,
        }
    }

    pub fn exclusions(&self) -> Arc<Exclusions> {
        self.exclusions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// New rules (SIGHUP). Takes effect for every mutation that starts
    /// afterwards; paths the change moves across the boundary are sent to or
    /// removed from replicas first (see [`Recorder::settle_new_rules`]), with
    /// no mutation in between. `skip` names a path never to walk into.
    pub fn set_exclusions(&self, ex: Exclusions, skip: &dyn Fn(&[u8]) -> bool) {
        let _ns = self.namespace_lock();
        let old = std::mem::replace(
            &mut *self.exclusions.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(ex),
        );
        let new = self.exclusions();
        self.settle_new_rules(&old, &new, b"", skip);
    }

    fn resolve(&self, inode: &Inode) -> Option<PathInfo> {
        if inode.ino == super::inode::ROOT_INO {
            return Some(PathInfo {
                rel: Arc::from(&b""[..]),
                excluded: false,
            });
        }
        // An unlinked object has no path: nothing to journal for it.
        let st = super::sys::fstat(inode.fd()).ok()?;
        if st.st_nlink == 0 {
            return None;
        }
        let ex = self.exclusions();
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut consider = |n: Option<Vec<u8>>| {
            if let Some(n) = n
                && !names.contains(&n)
            {
                names.push(n);
            }
        };
        consider(self.name_of(inode, inode.fd()));
        {
            let aliases = inode.aliases.lock().unwrap_or_else(|e| e.into_inner());
            for fd in aliases.iter().rev() {
                consider(self.name_of(inode, fd.as_fd()));
            }
        }
        // Exclusion is decided per object: one with any included name is
        // replicated, whichever name it is reached by.
        if let Some(n) = names.iter().find(|n| !ex.is_excluded(n)) {
            return Some(PathInfo {
                rel: Arc::from(n.as_slice()),
                excluded: false,
            });
        }
        // Every known name is excluded, or none is current any more (all were
        // removed while another hard link survives): the other links are
        // found by a bounded search of the backing dir.
        if !inode.is_dir() && (names.is_empty() || st.st_nlink as usize > names.len()) {
            let found = find_names(&self.backing, inode.key, st.st_nlink as usize, |n| {
                !ex.is_excluded(n)
            });
            for n in found {
                if names.contains(&n) {
                    continue;
                }
                // Remembered, so the next lookup of the path needs no search.
                if let Ok(c) = std::ffi::CString::new(self.abs(&n).into_os_string().into_vec())
                    && let Ok(fd) = super::sys::open_path(&c, libc::O_PATH | libc::O_NOFOLLOW)
                {
                    inode.add_alias(fd);
                }
                names.push(n);
            }
            if let Some(n) = names.iter().find(|n| !ex.is_excluded(n)) {
                return Some(PathInfo {
                    rel: Arc::from(n.as_slice()),
                    excluded: false,
                });
            }
        }
        let Some(rel) = names.into_iter().next() else {
            // The search gave up (its bound) or the object is outside the
            // tree. Its changes cannot be named, so the whole volume is
            // marked for resync: a dirty entry that is no regular file makes
            // the peers behind it take a snapshot.
            error!(
                ino = inode.ino,
                "no name found for a linked object; marking the volume for a full resync"
            );
            if !inode.is_dir() {
                self.mark_whole_dirty(b"");
            }
            return None;
        };
        Some(PathInfo {
            rel: Arc::from(rel),
            excluded: true,
        })
    }

    /// The backing path of `rel`.
    pub fn abs(&self, rel: &[u8]) -> std::path::PathBuf {
        use std::os::unix::ffi::OsStrExt;
        if rel.is_empty() {
            return self.backing.clone();
        }
        self.backing.join(std::ffi::OsStr::from_bytes(rel))
    }

    /// The path (relative to the backing dir) the kernel gives `fd`, if it still
    /// names `inode`'s object.
    fn name_of(&self, inode: &Inode, fd: std::os::fd::BorrowedFd<'_>) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        let bytes = link.as_os_str().as_bytes();
        let rel = bytes.strip_prefix(self.prefix.as_slice())?;
        let here = std::fs::symlink_metadata(std::ffi::OsStr::from_bytes(bytes)).ok()?;
        ((here.dev(), here.ino()) == inode.key).then(|| rel.to_vec())
    }

    /// The inode's current path, if it has one (cached per namespace generation).
    pub fn path_info(&self, inode: &Inode) -> Option<PathInfo> {
        let generation = self.generation.load(Ordering::Acquire);
        let mut cache = inode.path_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, info)) = &*cache
            && *g == generation
        {
            return info.clone();
        }
        let info = self.resolve(inode);
        *cache = Some((generation, info.clone()));
        info
    }

    /// The path to journal for `inode`, or None when it is excluded or unlinked.
    pub fn journaled_path(&self, inode: &Inode) -> Option<Arc<[u8]>> {
        self.path_info(inode).filter(|p| !p.excluded).map(|p| p.rel)
    }

    /// The path `name` has (or would have) in `parent`.
    pub fn child_info(&self, parent: &Inode, name: &[u8]) -> Option<PathInfo> {
        let p = self.path_info(parent)?;
        let mut rel = p.rel.to_vec();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name);
        let excluded = p.excluded || self.exclusions().is_excluded(&rel);
        Some(PathInfo {
            rel: Arc::from(rel),
            excluded,
        })
    }

    /// Before a backing write: the extents it touches must be hot in the activity
    /// log. The inode remembers what it already made hot, so the shared log is
    /// consulted only when a write enters a new extent. Returns true when the log
    /// needs a retirement pass (see [`Recorder::retire_cold`]).
    pub fn ensure_hot(&self, state: &mut FileState, path: &[u8], offset: u64, len: u64) -> bool {
        let epoch = self.journal.activity_epoch();
        if state.al_epoch != epoch || state.hot_path.as_deref() != Some(path) {
            state.al_epoch = epoch;
            state.hot_path = Some(Arc::from(path));
            state.hot_extents.clear();
        }
        let (first, last) = self.journal.extent_range(offset, len);
        if (first..=last).all(|e| state.hot_extents.contains(&e)) {
            return false;
        }
        match self.journal.activate(path, first, last) {
            Ok(overfull) => {
                for e in first..=last {
                    if !state.hot_extents.contains(&e) {
                        state.hot_extents.push(e);
                    }
                }
                // Keep the per-file cache small; forgetting only costs a lookup.
                if state.hot_extents.len() > 64 {
                    state.hot_extents.drain(..32);
                }
                overfull
            }
            Err(e) => {
                error!(error = %e, "activity log write failed; marking the range dirty");
                self.journal.mark_dirty(&DirtyRegion {
                    path: path.to_vec(),
                    offset,
                    len,
                });
                false
            }
        }
    }

    /// Retires the coldest hot extents: no data mutation may be between its
    /// backing write and its append meanwhile, hence the exclusive lock.
    pub fn retire_cold(&self) {
        let _ns = self.namespace.write().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = self.journal.retire_cold_extents() {
            warn!(error = %e, "activity log retirement failed");
        }
    }

    /// Appends a record for `inode` (None for records of no single object).
    pub fn record(&self, inode: Option<&Inode>, op: &Op, data: &[u8]) -> u64 {
        let seq = self.journal.append(op, data);
        if let Some(i) = inode {
            i.last_seq.fetch_max(seq, Ordering::AcqRel);
        }
        seq
    }

    /// Appends the record of a guest write of `data` at `offset`, already in
    /// the backing file: the journal may keep the bytes there (see
    /// [`Journal::append_write`]), held through a readable descriptor of
    /// the inode.
    pub fn record_write(
        &self,
        inode: &Inode,
        path: &[u8],
        offset: u64,
        data: &[u8],
        direct: bool,
    ) -> u64 {
        use std::os::fd::AsRawFd;
        let open = || -> std::io::Result<std::fs::File> {
            let proc = super::sys::proc_path(inode.fd().as_raw_fd());
            super::sys::open_path(&proc, libc::O_RDONLY | libc::O_CLOEXEC)
                .map(std::fs::File::from)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        };
        let src = crate::journal::HeldSource {
            key: inode.key,
            open: &open,
            direct,
        };
        let seq = self.journal.append_write(path, offset, data, Some(src));
        inode.last_seq.fetch_max(seq, Ordering::AcqRel);
        seq
    }

    /// Before bytes `start..end` of `inode` change (whether or not the change
    /// is journaled: the file may be excluded or unlinked now, and still hold
    /// writes recorded earlier): the writes held there are preserved first.
    /// The caller holds the inode's mutation lock.
    pub fn preserve(&self, inode: &Inode, path: Option<&[u8]>, start: u64, end: u64) {
        self.journal
            .preserve(inode.key, path.unwrap_or(b""), start, end);
    }

    /// Dirty regions follow their files through renames (and swap on exchange).
    pub fn follow_rename(&self, from: &[u8], to: &[u8], flags: u32) {
        let dirty = self.journal.dirty();
        let res = if flags & libc::RENAME_EXCHANGE != 0 {
            let tmp = b"\0exchange".to_vec();
            dirty
                .rename_prefix(from, &tmp)
                .and(dirty.rename_prefix(to, from))
                .and(dirty.rename_prefix(&tmp, to))
        } else {
            dirty.rename_prefix(from, to)
        };
        if let Err(e) = res {
            error!(error = %e, "dirty list did not follow a rename");
        }
    }

    pub fn mark_whole_dirty(&self, path: &[u8]) {
        self.journal.mark_dirty(&DirtyRegion {
            path: path.to_vec(),
            offset: 0,
            len: crate::journal::dirty::WHOLE_FILE,
        });
    }
}

/// Most directory entries one search for an object's names reads: a bound on
/// the time a write can wait for it.
const MAX_SEARCH: usize = 200_000;

/// Up to `want` paths (relative to `root`) naming the non-directory object
/// `key`, found by walking the tree under `root` without leaving its
/// filesystem; stops early at a name `enough` accepts.
pub fn find_names(
    root: &std::path::Path,
    key: super::inode::BackingKey,
    want: usize,
    enough: impl Fn(&[u8]) -> bool,
) -> Vec<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    let mut found = Vec::new();
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    let mut read = 0usize;
    while let Some(dir) = stack.pop() {
        let abs = if dir.is_empty() {
            root.to_owned()
        } else {
            root.join(std::ffi::OsStr::from_bytes(&dir))
        };
        let Ok(entries) = std::fs::read_dir(&abs) else {
            continue;
        };
        for entry in entries.flatten() {
            read += 1;
            if read > MAX_SEARCH {
                warn!(
                    entries = MAX_SEARCH,
                    "search for an object's other names stopped at its bound"
                );
                return found;
            }
            let mut rel = dir.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(entry.file_name().as_bytes());
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                // Never into another filesystem (a mount inside the backing dir).
                if let Ok(m) = std::fs::symlink_metadata(entry.path())
                    && m.dev() == key.0
                {
                    stack.push(rel);
                }
                continue;
            }
            if entry.ino() != key.1 {
                continue;
            }
            if let Ok(m) = std::fs::symlink_metadata(entry.path())
                && (m.dev(), m.ino()) == key
            {
                let stop = enough(&rel);
                found.push(rel);
                if stop || found.len() >= want {
                    return found;
                }
            }
        }
    }
    found
}
