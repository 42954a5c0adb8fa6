//! Shared harness of the integration tests: a real in-process mount that is
//! always unmounted, a directory tree comparison, small libc helpers, and the
//! reference-model operations (see `model`).
//!
//! Each test binary includes this module with `mod common;` and uses only part
//! of it, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod model;
pub mod tree;

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replicafs::mount::{self, MountOptions, Mounted};
use replicafs::volume::Volume;

#[allow(unused_imports)]
pub use tree::{assert_trees_equal, compare_trees};

/// A FUSE mount of a fresh temporary backing dir, served by this process.
///
/// Layout: `<tmp>/backing` (the real files) and `<tmp>/mnt` (the mount).
/// Dropping it unmounts, also while a test is panicking; declare it before the
/// files and directory handles of the test so that those are dropped first.
pub struct TestMount {
    dir: Option<tempfile::TempDir>,
    pub root: PathBuf,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    mounted: Option<Mounted>,
}

impl TestMount {
    /// Mounts with the default options.
    pub fn new() -> TestMount {
        Self::with_options(|_| {})
    }

    /// Mounts after letting the caller adjust the options (read-only, allow_other, …).
    pub fn with_options(adjust: impl FnOnce(&mut MountOptions)) -> TestMount {
        let dir = tempfile::Builder::new()
            .prefix("replicafs-test-")
            .tempdir()
            .expect("create temp dir");
        // Other users (the permission tests) must be able to walk down to the mount.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        let root = dir.path().canonicalize().expect("canonical temp dir");
        let backing = root.join("backing");
        let mnt = root.join("mnt");
        // Explicit modes, whatever the umask of the test process.
        for d in [&backing, &mnt] {
            std::fs::create_dir(d).expect("mkdir");
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let mut opts = MountOptions::new(&backing, &mnt);
        // Enough to serve the concurrency tests, few enough for a 2-core machine
        // running several tests at once.
        opts.threads = 4;
        // As with a peer that never applies anything: every write stays held
        // in the backing file, and every overwrite must preserve what it
        // replaces (the journal replays below check that it did).
        if let Some(j) = opts.journal.as_mut() {
            j.hold_for_peers = true;
        }
        adjust(&mut opts);
        let mounted = match mount::mount(&opts) {
            Ok(m) => m,
            Err(e) => panic!("mount {} on {}: {e}", backing.display(), mnt.display()),
        };
        TestMount {
            dir: Some(dir),
            root,
            backing,
            mnt,
            mounted: Some(mounted),
        }
    }

    /// The volume behind the mount, for white-box checks such as `inode_count`.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.mounted.as_ref().expect("still mounted").volume
    }

    /// A path inside the mount.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The same path in the backing dir.
    pub fn backing_path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.backing.join(rel)
    }

    /// Unmounts now (what Drop does), for tests that look at the backing dir afterwards.
    pub fn unmount(&mut self) {
        if let Some(m) = self.mounted.take() {
            unmount_mounted(m, &self.mnt);
        }
    }

    pub fn is_mounted(&self) -> bool {
        is_listed_mount(&self.mnt)
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        self.unmount();
        if is_listed_mount(&self.mnt) {
            // Removing the temp dir would walk into a live mount: leave it.
            eprintln!(
                "replicafs test: {} is still mounted; leaving {} behind",
                self.mnt.display(),
                self.root.display()
            );
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
        }
    }
}

/// True if `path` is listed as a mount point in /proc/self/mountinfo.
pub fn is_listed_mount(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines().filter_map(|l| l.split(' ').nth(4)).any(|m| {
        m.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
            == want
    })
}

fn umount2(path: &Path, flags: i32) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).expect("no NUL in path");
    // SAFETY: c is a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unmounts through `Mounted` (which also joins the session). If the mount is
/// busy, retries for a while (a child forked by a parallel test may hold a
/// descriptor until its exec), then detaches it with `umount -l`.
fn unmount_mounted(mut m: Mounted, mnt: &Path) {
    let err = match m.unmount() {
        Ok(()) => return,
        Err(e) => e,
    };
    // fuser forgets its mount after one failed attempt; go on by hand.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut gone = false;
    while Instant::now() < deadline {
        match umount2(mnt, 0) {
            Ok(()) => {
                gone = true;
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !is_listed_mount(mnt) => {
                gone = true;
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    if !gone {
        eprintln!(
            "replicafs test: unmount of {} failed ({err}); falling back to umount -l",
            mnt.display()
        );
        let ok = std::process::Command::new("umount")
            .arg("-l")
            .arg(mnt)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = umount2(mnt, libc::MNT_DETACH);
        }
    }
    // Dropping `Mounted` joins the session threads, which end once the kernel
    // lets go of the connection; do not hang the test run if something still
    // holds a file of the detached mount open.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(m);
        let _ = tx.send(());
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        eprintln!(
            "replicafs test: session of {} did not end; leaving it",
            mnt.display()
        );
    }
}

// ----- small libc helpers ------------------------------------------------------

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in path")
}

/// The errno of a failed std::io call (panics on errors without one).
pub fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("error without errno: {e}"))
}

pub fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Turns a libc return value into Ok(value) or Err(errno).
pub fn check(ret: i64) -> Result<i64, i32> {
    if ret < 0 { Err(last_errno()) } else { Ok(ret) }
}

/// open(2) with O_CLOEXEC added (a parallel test's fork must not inherit it).
pub fn open(p: &Path, flags: i32, mode: u32) -> Result<OwnedFd, i32> {
    let c = cpath(p);
    // SAFETY: c is a valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        Err(last_errno())
    } else {
        // SAFETY: fd was just returned by open and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

pub fn lstat(p: &Path) -> Result<libc::stat, i32> {
    let c = cpath(p);
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: valid pointers.
    if unsafe { libc::lstat(c.as_ptr(), st.as_mut_ptr()) } < 0 {
        return Err(last_errno());
    }
    // SAFETY: lstat filled it.
    Ok(unsafe { st.assume_init() })
}

pub fn fstat(fd: &OwnedFd) -> Result<libc::stat, i32> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: valid pointers.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
        return Err(last_errno());
    }
    // SAFETY: fstat filled it.
    Ok(unsafe { st.assume_init() })
}

/// Drops clean dentries and inodes so that the kernel sends FORGETs.
pub fn drop_caches() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "2").expect("write /proc/sys/vm/drop_caches");
}

/// Deterministic pseudo-random numbers (xorshift64*), so tests need no extra crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align).expect("layout");
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        AlignedBuf { ptr, len, layout }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}

/// Fails the test if a FUSE mount under `root` is still listed.
pub fn assert_no_mount_under(root: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = root.to_string_lossy();
    let left: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(prefix.as_ref()))
        .collect();
    assert!(left.is_empty(), "mounts left under {prefix}: {left:?}");
}

/// The journal of `state_dir` (not mounted), opened as the mount does, with
/// the writes it held at its clean close held again from `backing`.
pub fn open_journal(state_dir: &Path, backing: &Path) -> replicafs::journal::Journal {
    let opts = replicafs::journal::JournalOptions {
        hold_for_peers: true,
        ..Default::default()
    };
    let (journal, _) = replicafs::journal::Journal::open(state_dir, opts).expect("open journal");
    journal.set_backing_dir(backing);
    journal
}

/// Applies the journal of `state_dir` (not mounted; its backing dir is its
/// parent) onto `target`, records 1..=`to`, each as a replica receives it
/// (writes with the bytes the journal serves); returns how many were applied.
pub fn replay_journal(state_dir: &Path, target: &Path, to: u64) -> u64 {
    let journal = open_journal(state_dir, state_dir.parent().expect("backing dir"));
    let applier = replicafs::journal::apply::Applier::new(target).expect("replay target");
    let mut n = 0;
    for r in journal.records(0, to) {
        let r = journal.resolve(r.expect("read record"));
        if matches!(r.op, replicafs::journal::Op::Preimage { of } if of == r.seq) {
            panic!("record {}: the journal could not serve its bytes", r.seq);
        }
        if let Err(e) = applier.apply(&r) {
            panic!("replaying record {} {:?}: {e}", r.seq, r.op);
        }
        n += 1;
    }
    n
}
