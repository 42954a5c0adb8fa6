//! The snapshot source: a listing of the backing dir that is exactly the
//! namespace at one journal seq, taken without stopping guest writes, and the
//! entries and data chunks read from it afterwards.
//!
//! **Listing by rounds.** Every name is observed inside its own short
//! [`Volume::observe`] hold (the namespace lock shared, as a guest write
//! holds it): one `openat2` of the full path beneath the backing dir (no
//! symlink followed), one `fstat`, one reopen of a regular file. Holds say
//! the namespace is frozen while they last, so each observation ("path p
//! names object X of type T", "p does not exist") is true of the namespace at
//! the hold's seq. Between holds, namespace mutations go on, and each is a
//! journal record. Round 1 walks the whole tree from the seq `began`; it ends
//! at seq E1 (read in a hold after its last observation). The namespace
//! records in `(began, E1]` name every path whose observation may be stale:
//! the record's path (both for a rename) and everything beneath it. Round 2
//! forgets those paths and observes them again, ending at E2, and so on. A
//! round in whose window no namespace record falls ends the listing at
//! `at = E_r`: every path untouched in that window has kept the state the
//! earlier rounds saw, and every touched one was seen again after its
//! change, so the listing is the namespace at `at` (argued in full in
//! docs/ARCHITECTURE.md, "Snapshot and catch-up without the namespace
//! lock"). After [`MAX_ROUNDS`] disturbed rounds the next one holds the
//! namespace lock exclusively over the paths the previous window touched
//! (the whole tree only if the journal dropped records of that window).
//!
//! **Content afterwards.** Regular files (and directories, symlinks) keep the
//! descriptor opened at their observation; attributes, extended attributes
//! and data are read through it after the listing, by inode, whatever renames
//! follow. That copy is fuzzy, and the replica applies the records after
//! `at` tolerantly, which makes it right (the same argument as before: every
//! byte and attribute a record after `at` does not touch is read as it was at
//! `at` or later and unchanged since; every one it touches ends as the last
//! record sets it).

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use tracing::info;

use crate::journal::Journal;
use crate::journal::record::Op;
use crate::protocol::message::EntryKind;
use crate::volume::Volume;

/// Disturbed rounds before a round holds the namespace lock exclusively.
pub const MAX_ROUNDS: u32 = 16;

/// One name of the listing.
pub struct Item {
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// A symlink's target, or a hard link's first path.
    pub target: Vec<u8>,
    key: (u64, u64),
    /// How to reach the object again. None for links.
    handle: Option<Handle>,
    /// The backing dir's root, for `open_by_handle_at`.
    mount: Arc<OwnedFd>,
}

/// An object seen by the listing, reachable again by identity whatever
/// renames follow: a file handle (`name_to_handle_at`, a few bytes, no
/// descriptor held, so a tree of any size fits the fd limit), or, where the
/// filesystem has none (or it is another filesystem than the backing dir's
/// root), the descriptor itself.
enum Handle {
    /// struct file_handle: handle_bytes u32, handle_type i32, f_handle.
    Fh(Vec<u32>),
    Fd(OwnedFd),
}

/// A listing that is the namespace at `at`.
pub struct Listing {
    /// The journal's last seq when the listing began.
    pub began: u64,
    /// The seq the listing is exact at: the snapshot's start.
    pub at: u64,
    pub rounds: u32,
    /// Namespace records that fell into the listing's rounds.
    pub namespace_changes: u64,
    /// Parents first; further names of a hard-linked file are `Link`s.
    pub items: Vec<Item>,
}

/// What a path was seen as.
struct Seen {
    kind: EntryKind,
    target: Vec<u8>,
    key: (u64, u64),
    handle: Handle,
}

struct Walker<'a> {
    volume: &'a Volume,
    backing: Arc<OwnedFd>,
    /// The device whose file handles are used; None: descriptors only.
    root_dev: Option<u64>,
    hidden: Option<&'a [u8]>,
    state_key: Option<(u64, u64)>,
    map: BTreeMap<Vec<u8>, Seen>,
    seen: &'a mut dyn FnMut(&[u8]),
}

/// Lists the backing dir of `volume` (skipping `hidden`, the state dir and
/// excluded paths). Blocking.
pub fn list(volume: &Volume, backing: &Path, hidden: Option<&[u8]>) -> io::Result<Listing> {
    list_observed(volume, backing, hidden, &mut |_| {})
}

/// [`list`], calling `seen` with each path right after its observation
/// (outside the hold): where tests change the namespace mid-walk.
fn list_observed(
    volume: &Volume,
    backing: &Path,
    hidden: Option<&[u8]>,
    seen: &mut dyn FnMut(&[u8]),
) -> io::Result<Listing> {
    let root: OwnedFd = File::open(backing)?.into();
    // Handles only where they open again here (open_by_handle_at needs
    // CAP_DAC_READ_SEARCH); otherwise descriptors, as a filesystem without
    // handles gets.
    let root_dev = match file_handle(&root).is_some_and(|h| handle_opens(&root, h)) {
        true => Some(fstat(&root)?.st_dev),
        false => None,
    };
    let mut w = Walker {
        volume,
        backing: Arc::new(root),
        root_dev,
        hidden,
        state_key: volume.state_dir_key(),
        map: BTreeMap::new(),
        seen,
    };
    let journal = volume.recorder().map(|r| r.journal().clone());
    let began = volume.observe().seq();
    let mut from = began;
    let mut todo: Vec<Vec<u8>> = vec![Vec::new()];
    let mut rounds = 0u32;
    let mut namespace_changes = 0u64;
    let at = loop {
        rounds += 1;
        let exclusive = rounds > MAX_ROUNDS;
        let end = if exclusive {
            // Nothing changes the namespace during this hold; it covers only
            // what the last window touched.
            let hold = volume.observe_exclusive();
            for root in minimal(std::mem::take(&mut todo)) {
                w.forget(&root);
                w.walk_from(&root, false)?;
            }
            hold.seq()
        } else {
            for root in minimal(std::mem::take(&mut todo)) {
                w.forget(&root);
                w.walk_from(&root, true)?;
            }
            volume.observe().seq()
        };
        if exclusive {
            break end;
        }
        let Some(j) = &journal else { break end };
        let touched = namespace_paths(j, from, end)?;
        namespace_changes += touched.records;
        if touched.paths.is_empty() {
            break end;
        }
        todo = touched.paths;
        from = end;
    };
    let items = w.into_items();
    info!(
        began,
        at,
        rounds,
        namespace_changes,
        records_during = at - began,
        entries = items.len(),
        "snapshot listing done"
    );
    Ok(Listing {
        began,
        at,
        rounds,
        namespace_changes,
        items,
    })
}

struct Touched {
    records: u64,
    /// Paths whose observation may be stale ("" for the whole tree).
    paths: Vec<Vec<u8>>,
}

/// The paths namespace records in `(from, to]` changed. A record the
/// journal no longer holds (a gap) could have changed any: the whole tree.
fn namespace_paths(j: &Journal, from: u64, to: u64) -> io::Result<Touched> {
    let mut t = Touched {
        records: 0,
        paths: Vec::new(),
    };
    if to <= from {
        return Ok(t);
    }
    j.wait_written(to);
    let mut next = from + 1;
    for r in j.records(from + 1, to) {
        let r = r?;
        if r.seq != next {
            t.paths = vec![Vec::new()];
        }
        next = r.seq + 1;
        if !r.op.is_namespace() {
            continue;
        }
        t.records += 1;
        match r.op {
            Op::Rename { from, to, .. } => {
                t.paths.push(from);
                t.paths.push(to);
            }
            Op::Link { path, .. }
            | Op::Mknod { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::RemoveTree { path } => t.paths.push(path),
            _ => {}
        }
    }
    if next <= to {
        t.paths = vec![Vec::new()];
    }
    Ok(t)
}

/// `p` is `root` or beneath it ("" is the whole tree).
fn is_under(p: &[u8], root: &[u8]) -> bool {
    root.is_empty()
        || p == root
        || (p.len() > root.len() && p.starts_with(root) && p[root.len()] == b'/')
}

/// The paths of `v` with none beneath another.
fn minimal(mut v: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    v.sort();
    v.dedup();
    let mut out: Vec<Vec<u8>> = Vec::new();
    for p in v {
        // Sorted: an ancestor comes before everything beneath it, though
        // not always right before (a-b sorts between a and a/x).
        if !out.iter().any(|r| is_under(&p, r)) {
            out.push(p);
        }
    }
    out
}

fn openat2(dir: &OwnedFd, rel: &[u8], flags: i32) -> io::Result<Option<OwnedFd>> {
    let path = CString::new(if rel.is_empty() { &b"."[..] } else { rel })
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: an all-zero open_how is valid; fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid open_how of the right size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
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
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, valid out pointer.
    let r = unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat succeeded and filled it.
    Ok(unsafe { st.assume_init() })
}

fn proc_path(fd: &OwnedFd) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

/// Opens the object behind an O_PATH fd again (no path walk).
fn reopen(fd: &OwnedFd, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: a valid C string.
    let r = unsafe { libc::open(proc_path(fd).as_ptr(), flags | libc::O_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

fn readlink_fd(fd: &OwnedFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: valid fd and buffer; "" names the symlink behind an O_PATH fd.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

impl Walker<'_> {
    /// Drops what was seen at `root` and beneath it.
    fn forget(&mut self, root: &[u8]) {
        if root.is_empty() {
            self.map.clear();
            return;
        }
        self.map.remove(root);
        let mut prefix = root.to_vec();
        prefix.push(b'/');
        let doomed: Vec<Vec<u8>> = self
            .map
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.map.remove(&k);
        }
    }

    /// Observes `root` (unless it is the tree's root) and, if it is a
    /// directory, everything beneath it. `hold`: each observation in its own
    /// shared hold (false when the caller holds the lock exclusively).
    fn walk_from(&mut self, root: &[u8], hold: bool) -> io::Result<()> {
        let mut stack: Vec<Vec<u8>> = Vec::new();
        if root.is_empty() {
            stack.push(Vec::new());
        } else {
            // Beneath a parent the listing does not hold (excluded, the state
            // dir, gone), nothing is listed either.
            let parent = match root.iter().rposition(|&b| b == b'/') {
                Some(i) => &root[..i],
                None => &b""[..],
            };
            if !parent.is_empty()
                && !self
                    .map
                    .get(parent)
                    .is_some_and(|s| s.kind == EntryKind::Dir)
            {
                return Ok(());
            }
            if self.observe(root, hold)? == Some(EntryKind::Dir) {
                stack.push(root.to_vec());
            }
        }
        while let Some(dir) = stack.pop() {
            let names = self.names(&dir)?;
            let mut subdirs = Vec::new();
            for name in names {
                let mut rel = dir.clone();
                if !rel.is_empty() {
                    rel.push(b'/');
                }
                rel.extend_from_slice(&name);
                if self.observe(&rel, hold)? == Some(EntryKind::Dir) {
                    subdirs.push(rel);
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }

    /// The names in the directory now at `dir` (read without a hold: each
    /// name is then observed in its own, and a name a namespace change adds
    /// or removes meanwhile is a path that change's record touches).
    fn names(&self, dir: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        let fd = match dir.is_empty() {
            true => reopen(&self.backing, libc::O_RDONLY | libc::O_DIRECTORY).map(Some)?,
            false => openat2(&self.backing, dir, libc::O_RDONLY | libc::O_DIRECTORY)?,
        };
        let Some(fd) = fd else { return Ok(Vec::new()) };
        let p = std::ffi::OsStr::from_bytes(proc_path(&fd).as_bytes()).to_owned();
        let mut names: Vec<Vec<u8>> = match std::fs::read_dir(&p) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().as_bytes().to_vec())
                .collect(),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Vec::new(),
            Err(e) => return Err(e),
        };
        names.sort();
        Ok(names)
    }

    /// Observes `rel` in one hold; returns what it is, if it is listed.
    fn observe(&mut self, rel: &[u8], hold: bool) -> io::Result<Option<EntryKind>> {
        let r = self.observe_held(rel, hold);
        (self.seen)(rel);
        r
    }

    fn observe_held(&mut self, rel: &[u8], hold: bool) -> io::Result<Option<EntryKind>> {
        if Some(rel) == self.hidden {
            return Ok(None);
        }
        let _hold = hold.then(|| self.volume.observe());
        if self
            .volume
            .recorder()
            .is_some_and(|r| r.exclusions().is_excluded(rel))
        {
            return Ok(None);
        }
        let Some(fd) = openat2(&self.backing, rel, libc::O_PATH)? else {
            return Ok(None);
        };
        let st = fstat(&fd)?;
        let key = (st.st_dev, st.st_ino);
        let (kind, target) = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                // The state dir (keys, journal) by identity, wherever it is.
                if Some(key) == self.state_key {
                    return Ok(None);
                }
                (EntryKind::Dir, Vec::new())
            }
            libc::S_IFREG => (EntryKind::File, Vec::new()),
            libc::S_IFLNK => (EntryKind::Symlink, readlink_fd(&fd)?),
            _ => return Ok(None),
        };
        let handle = match (Some(st.st_dev) == self.root_dev)
            .then(|| file_handle(&fd))
            .flatten()
        {
            Some(h) => Handle::Fh(h),
            // Never a fifo or device: the type was checked in this hold.
            None if kind == EntryKind::File => {
                Handle::Fd(reopen(&fd, libc::O_RDONLY | libc::O_NONBLOCK)?)
            }
            None => Handle::Fd(fd),
        };
        self.map.insert(
            rel.to_vec(),
            Seen {
                kind,
                target,
                key,
                handle,
            },
        );
        Ok(Some(kind))
    }

    fn into_items(self) -> Vec<Item> {
        let mut first: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
        let mut out = Vec::with_capacity(self.map.len());
        for (path, s) in self.map {
            if s.kind == EntryKind::File {
                if let Some(f) = first.get(&s.key) {
                    out.push(Item {
                        path,
                        kind: EntryKind::Link,
                        target: f.clone(),
                        key: s.key,
                        handle: None,
                        mount: self.backing.clone(),
                    });
                    continue;
                }
                first.insert(s.key, path.clone());
            }
            out.push(Item {
                path,
                kind: s.kind,
                target: s.target,
                key: s.key,
                handle: Some(s.handle),
                mount: self.backing.clone(),
            });
        }
        out
    }
}

/// An entry's attributes as they are now: (mode, uid, gid, size, xattrs).
pub type Attrs = (u32, u32, u32, u64, Vec<(Vec<u8>, Vec<u8>)>);

impl Item {
    /// The object again, by identity: `flags` for a regular file (O_PATH for
    /// the others). None when it is gone (freed since the listing).
    fn open(&self, flags: i32) -> Option<OwnedFd> {
        match self.handle.as_ref()? {
            Handle::Fd(fd) => fd.try_clone().ok(),
            Handle::Fh(h) => {
                let mut h = h.clone();
                let flags = if self.kind == EntryKind::File {
                    flags
                } else {
                    libc::O_PATH
                };
                // SAFETY: `h` is a struct file_handle as name_to_handle_at
                // filled it; the mount fd is valid.
                let fd = unsafe {
                    libc::open_by_handle_at(
                        self.mount.as_raw_fd(),
                        h.as_mut_ptr().cast(),
                        flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    )
                };
                // SAFETY: a new fd we own.
                (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
            }
        }
    }

    /// The entry's attributes now, read from the object the listing saw (a
    /// link has none: the replica takes its target's). None if it is gone.
    pub fn attrs(&self) -> Option<Attrs> {
        let fd = self.open(libc::O_PATH)?;
        let st = fstat(&fd).ok()?;
        let xattrs = match self.kind {
            EntryKind::File | EntryKind::Dir => {
                let p = proc_path(&fd);
                crate::replica::snapshot::read_xattrs(
                    Path::new(std::ffi::OsStr::from_bytes(p.as_bytes())),
                    true,
                )
            }
            _ => Vec::new(),
        };
        Some((
            st.st_mode & 0o7777,
            st.st_uid,
            st.st_gid,
            st.st_size as u64,
            xattrs,
        ))
    }

    /// The identity (dev, ino) the listing saw.
    pub fn key(&self) -> (u64, u64) {
        self.key
    }

    /// A reader of a regular file's content (None for other kinds, or when
    /// the file is gone: the records after the snapshot remove its names).
    pub fn reader(&self) -> Option<File> {
        if self.kind != EntryKind::File {
            return None;
        }
        self.open(libc::O_RDONLY | libc::O_NONBLOCK).map(File::from)
    }
}

/// Up to `len` bytes of `f` at `offset` (short only at its end).
pub fn read_chunk(f: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Whether `h` opens again beneath `mount`.
fn handle_opens(mount: &OwnedFd, mut h: Vec<u32>) -> bool {
    // SAFETY: `h` is a struct file_handle as name_to_handle_at filled it.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            h.as_mut_ptr().cast(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: a new fd we own.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    true
}

/// A file handle for the object behind `fd`, if its filesystem gives one.
fn file_handle(fd: &OwnedFd) -> Option<Vec<u32>> {
    const MAX_HANDLE_SZ: usize = 128;
    let mut h = vec![0u32; 2 + MAX_HANDLE_SZ / 4];
    h[0] = MAX_HANDLE_SZ as u32;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `h` is a struct file_handle with room for MAX_HANDLE_SZ bytes.
    let r = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            h.as_mut_ptr().cast(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return None;
    }
    let bytes = h[0] as usize;
    h.truncate(2 + bytes.div_ceil(4));
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::exclude::Exclusions;
    use crate::journal::{Journal, JournalOptions};
    use crate::volume::inode::ROOT_INO;
    use crate::volume::recorder::Recorder;
    use std::ffi::OsStr;

    fn volume(dir: &Path) -> (Volume, std::path::PathBuf) {
        let (backing, state) = (dir.join("b"), dir.join("s"));
        std::fs::create_dir_all(&backing).unwrap();
        let (journal, _) = Journal::open(&state, JournalOptions::default()).unwrap();
        journal.set_backing_dir(&backing);
        let v = Volume::new(&backing, Default::default())
            .unwrap()
            .with_recorder(Recorder::new(
                Arc::new(journal),
                Exclusions::default(),
                &backing,
            ));
        (v, backing)
    }

    fn ino(v: &Volume, path: &str) -> u64 {
        let mut ino = ROOT_INO;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            ino = v.lookup(ino, OsStr::new(c)).unwrap().attr.ino;
        }
        ino
    }

    fn mv(v: &Volume, from: &str, to: &str) {
        let (fp, fname) = from.rsplit_once('/').unwrap_or(("", from));
        let (tp, tname) = to.rsplit_once('/').unwrap_or(("", to));
        v.rename(
            ino(v, fp),
            OsStr::new(fname),
            ino(v, tp),
            OsStr::new(tname),
            0,
        )
        .unwrap();
    }

    /// Every path under `root`, as the listing names them.
    fn tree(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
                if rel == "s" || rel.starts_with("s/") {
                    continue;
                }
                if p.is_dir() && !p.is_symlink() {
                    stack.push(p.clone());
                }
                out.push(rel);
            }
        }
        out.sort();
        out
    }

    /// Renames during the walk that move a subtree from where the walk has
    /// not been into where it has (it would be missed), and a file from
    /// where it has been to where it has not (it would be listed twice):
    /// the next rounds observe both again, and the listing is the tree.
    #[test]
    fn renames_across_the_walk_front_are_observed_again() {
        let dir = tempfile::tempdir().unwrap();
        let (v, backing) = volume(dir.path());
        for p in ["a", "z/sub/deeper"] {
            std::fs::create_dir_all(backing.join(p)).unwrap();
        }
        for p in ["a/x", "a/y", "z/sub/f1", "z/sub/deeper/f2", "z/w"] {
            std::fs::write(backing.join(p), p).unwrap();
        }
        let mut fired = 0;
        let mut hook = |rel: &[u8]| {
            // "a" is listed by now: z/sub lands behind the walk, a/y ahead.
            if rel == b"a/y" && fired == 0 {
                fired += 1;
                mv(&v, "z/sub", "a/sub");
                mv(&v, "a/x", "z/x2");
            }
        };
        let l = list_observed(&v, &backing, Some(b"s"), &mut hook).unwrap();
        let listed: Vec<String> = l
            .items
            .iter()
            .map(|i| String::from_utf8_lossy(&i.path).to_string())
            .collect();
        let mut sorted = listed.clone();
        sorted.sort();
        assert_eq!(sorted, tree(&backing), "rounds {}", l.rounds);
        assert!(l.rounds >= 2 && l.namespace_changes == 2, "{}", l.rounds);
        assert!(l.at >= l.began + 2);
        // Parents first.
        for (i, p) in listed.iter().enumerate() {
            if let Some((parent, _)) = p.rsplit_once('/') {
                assert!(
                    listed[..i].iter().any(|q| q == parent),
                    "{p} before {parent}"
                );
            }
        }
        // Content is read by identity: a file renamed after the listing is
        // still read whole.
        mv(&v, "a/sub/f1", "moved-later");
        let f1 = l.items.iter().find(|i| i.path == b"a/sub/f1").unwrap();
        let data = read_chunk(&f1.reader().unwrap(), 0, 100).unwrap();
        assert_eq!(data, b"z/sub/f1");
    }

    #[test]
    fn minimal_keeps_no_path_beneath_another() {
        let v = |s: &[&str]| s.iter().map(|p| p.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(
            minimal(v(&["a/x", "a-b", "a", "c/d", "c/d/e", "c/de", "a-b"])),
            v(&["a", "a-b", "c/d", "c/de"])
        );
        assert_eq!(minimal(v(&["x", "", "y/z"])), v(&[""]));
        assert!(is_under(b"a/b", b"a") && !is_under(b"ab", b"a") && is_under(b"q", b""));
    }
}
