//! Setting up a mount: the checks that refuse a bad command line with a message
//! naming the fix, the FUSE session, and a clean unmount on a signal.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, bounded, select};
use fuser::{Config, MountOption, SessionACL, SessionUnmounter};
use tracing::{error, info, warn};

use crate::fuse::{FuseAdapter, FuseOptions};
use crate::journal::exclude::Exclusions;
use crate::journal::{Journal, JournalError, JournalOptions};
use crate::volume::recorder::Recorder;
use crate::volume::{Volume, VolumeOptions};

/// Name of the default state directory inside the backing dir.
pub const STATE_DIR_NAME: &str = ".replicafs";

/// Everything `replicafs mount` needs.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    /// Where journal and keys live; `BACKING/.replicafs` when not given.
    pub state_dir: Option<PathBuf>,
    pub allow_other: bool,
    pub read_only: bool,
    /// Threads serving kernel requests.
    pub threads: usize,
    pub fuse: FuseOptions,
    /// Journal settings; None records nothing.
    pub journal: Option<JournalOptions>,
    /// Exclusion globs (see [`Exclusions`]).
    pub exclude: Vec<String>,
}

impl MountOptions {
    pub fn new(backing: impl Into<PathBuf>, mountpoint: impl Into<PathBuf>) -> Self {
        MountOptions {
            backing: backing.into(),
            mountpoint: mountpoint.into(),
            state_dir: None,
            allow_other: false,
            read_only: false,
            threads: default_threads(),
            fuse: FuseOptions::default(),
            journal: Some(JournalOptions::default()),
            exclude: Vec::new(),
        }
    }
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().clamp(2, 16) * 2)
        .unwrap_or(4)
}

/// Why a mount was refused; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("backing dir {0} does not exist: create it first (mkdir -p {0})")]
    BackingMissing(String),
    #[error("backing dir {0} is not a directory: pass the directory that holds the VM disks")]
    BackingNotDir(String),
    #[error("mountpoint {0} does not exist: create it first (mkdir -p {0})")]
    MountpointMissing(String),
    #[error("mountpoint {0} is not a directory: pass an empty directory")]
    MountpointNotDir(String),
    #[error("mountpoint {0} is not empty: pass an empty directory (files there would be hidden)")]
    MountpointNotEmpty(String),
    #[error(
        "mountpoint {0} is already a mount point: unmount it first (umount {0}) or pick another"
    )]
    MountpointIsMount(String),
    #[error("the mountpoint {mountpoint} is inside the backing dir {backing}: mount outside it")]
    MountpointInsideBacking { mountpoint: String, backing: String },
    #[error("the backing dir {backing} is inside the mountpoint {mountpoint}: keep them apart")]
    BackingInsideMountpoint { mountpoint: String, backing: String },
    #[error("the state dir {0} is inside the mountpoint: put it elsewhere (--state-dir)")]
    StateInsideMountpoint(String),
    #[error(
        "the state dir {state_dir} contains {other}: it is made private (0700) recursively, so give it a directory of its own"
    )]
    StateContains { state_dir: String, other: String },
    #[error("/dev/fuse is missing: load the module (modprobe fuse) or install fuse3")]
    NoFuseDevice,
    #[error("mounting needs root (replicafs calls mount(2) itself): run it as root or with sudo")]
    NotRoot,
    #[error("cannot use state dir {0}: {1}")]
    StateDir(String, std::io::Error),
    #[error("mount of {0} was not permitted: run as root, outside a restricted container")]
    NotPermitted(String),
    #[error("cannot open backing dir: {0}")]
    Volume(crate::error::Error),
    #[error("cannot open the journal: {0}")]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Exclusions(String),
    #[error("mount failed: {0}")]
    Io(#[from] std::io::Error),
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// The result of the checks: canonical paths ready to mount.
#[derive(Debug, Clone)]
pub struct Checked {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
}

/// Validates the paths of a mount and creates the state dir.
pub fn check(opts: &MountOptions) -> Result<Checked, MountError> {
    let backing_meta = std::fs::metadata(&opts.backing)
        .map_err(|_| MountError::BackingMissing(show(&opts.backing)))?;
    if !backing_meta.is_dir() {
        return Err(MountError::BackingNotDir(show(&opts.backing)));
    }
    let mp_meta = std::fs::metadata(&opts.mountpoint)
        .map_err(|_| MountError::MountpointMissing(show(&opts.mountpoint)))?;
    if !mp_meta.is_dir() {
        return Err(MountError::MountpointNotDir(show(&opts.mountpoint)));
    }
    let backing = opts.backing.canonicalize()?;
    let mountpoint = opts.mountpoint.canonicalize()?;
    if is_mount_point(&mountpoint) {
        return Err(MountError::MountpointIsMount(show(&mountpoint)));
    }
    // Nesting first: a backing dir inside the mountpoint also makes the
    // mountpoint non-empty, and "not empty" would hide the real problem.
    if mountpoint.starts_with(&backing) {
        return Err(MountError::MountpointInsideBacking {
            mountpoint: show(&mountpoint),
            backing: show(&backing),
        });
    }
    if backing.starts_with(&mountpoint) {
        return Err(MountError::BackingInsideMountpoint {
            mountpoint: show(&mountpoint),
            backing: show(&backing),
        });
    }
    if std::fs::read_dir(&mountpoint)?.next().is_some() {
        return Err(MountError::MountpointNotEmpty(show(&mountpoint)));
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoFuseDevice);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(MountError::NotRoot);
    }
    let state_dir = opts
        .state_dir
        .clone()
        .unwrap_or_else(|| backing.join(STATE_DIR_NAME));
    create_private_dir(&state_dir).map_err(|e| MountError::StateDir(show(&state_dir), e))?;
    let state_dir = state_dir.canonicalize()?;
    if state_dir.starts_with(&mountpoint) {
        return Err(MountError::StateInsideMountpoint(show(&state_dir)));
    }
    for other in [&backing, &mountpoint] {
        if other.starts_with(&state_dir) {
            return Err(MountError::StateContains {
                state_dir: show(&state_dir),
                other: show(other),
            });
        }
    }
    secure_state_dir(&state_dir).map_err(|e| MountError::StateDir(show(&state_dir), e))?;
    Ok(Checked {
        backing,
        mountpoint,
        state_dir,
    })
}

/// Creates `dir` (and missing parents, with default modes) with mode 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        r => r,
    }
}

/// Makes a state dir private: the dir and every dir in it 0700, every other
/// file 0600 (journal frames are shipped to replicas, keys are secrets, and the
/// status socket answers anyone who can reach it). Also repairs the modes an
/// older version left. Symlinks are neither followed nor changed.
pub fn secure_state_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a directory",
        ));
    }
    let mut stack = vec![(dir.to_path_buf(), meta)];
    while let Some((path, meta)) = stack.pop() {
        let ft = meta.file_type();
        let want = if ft.is_dir() {
            0o700
        } else if ft.is_symlink() {
            continue;
        } else {
            0o600
        };
        if meta.permissions().mode() & 0o7777 != want {
            match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(want)) {
                // Removed meanwhile (a sled file, a socket): nothing to secure.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                r => r?,
            }
        }
        if ft.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                let entry = entry?;
                match entry.metadata() {
                    Ok(m) => stack.push((entry.path(), m)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// True if `path` is the root of a mount (its device differs from its parent's,
/// or it is listed in /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    if let (Ok(me), Some(parent)) = (std::fs::metadata(path), path.parent())
        && let Ok(up) = std::fs::metadata(parent)
        && me.dev() != up.dev()
    {
        return true;
    }
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mount_path(m) == want)
}

fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// FUSE mounts get 128 KiB of readahead (the kernel clamps what INIT asks for),
/// so a cold sequential read costs eight times the requests it does on the
/// backing disk. Give the mount the backing device's readahead (at least 1 MiB)
/// through its bdi, which works once INIT is done. Best effort.
fn raise_readahead(checked: &Checked) {
    use std::os::unix::fs::MetadataExt;
    let Some(mount_dev) = mount_device(&checked.mountpoint) else {
        return;
    };
    let backing_kb = std::fs::metadata(&checked.backing).ok().and_then(|m| {
        let dev = m.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let whole = format!("/sys/dev/block/{major}:{minor}/queue/read_ahead_kb");
        let part = format!("/sys/dev/block/{major}:{minor}/../queue/read_ahead_kb");
        [whole, part]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok())
    });
    let kb = backing_kb.unwrap_or(4096).clamp(1024, 16384);
    let path = format!("/sys/class/bdi/{mount_dev}/read_ahead_kb");
    match std::fs::write(&path, kb.to_string()) {
        Ok(()) => tracing::debug!(kb, "mount readahead set"),
        Err(e) => tracing::debug!(error = %e, path, "could not set the mount's readahead"),
    }
}

/// "major:minor" of the mount at `mountpoint`, from /proc/self/mountinfo (a
/// stat would be a FUSE request).
fn mount_device(mountpoint: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.to_string_lossy();
    info.lines()
        .filter(|l| l.split(' ').nth(4).map(unescape_mount_path).as_deref() == Some(&*want))
        .filter_map(|l| l.split(' ').nth(2).map(str::to_string))
        .next_back()
}

/// Catches SIGINT, SIGTERM and SIGHUP from now on; give the result to
/// [`Mounted::run_until_signal`]. Call it before mounting.
pub fn stop_signals() -> std::io::Result<signal_hook::iterator::Signals> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
}

/// A running mount. Dropping it unmounts and waits for the request threads.
pub struct Mounted {
    pub checked: Checked,
    pub volume: Arc<Volume>,
    unmounter: SessionUnmounter,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    done: Receiver<()>,
    unmounted_externally: bool,
}

impl Mounted {
    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.volume.recorder().map(|r| r.journal())
    }

    /// Waits until the mount goes away (`umount`) or SIGINT/SIGTERM arrives, then
    /// unmounts. On SIGHUP, `reload` gives the new exclusion rules (None keeps the old).
    /// `signals` must have been registered before mounting (see [`stop_signals`]),
    /// so that a signal arriving meanwhile is not lost to its default action.
    pub fn run_until_signal(
        mut self,
        mut signals: signal_hook::iterator::Signals,
        reload: impl Fn() -> Option<Vec<String>>,
    ) -> std::io::Result<()> {
        use signal_hook::consts::SIGHUP;
        let (sig_tx, sig_rx) = bounded(4);
        let sig_handle = signals.handle();
        std::thread::spawn(move || {
            for sig in signals.forever() {
                if sig_tx.send(sig).is_err() {
                    break;
                }
            }
        });
        loop {
            select! {
                recv(sig_rx) -> sig => {
                    if sig == Ok(SIGHUP) {
                        self.reload_exclusions(reload());
                        continue;
                    }
                    info!(signal = ?sig.ok(), "signal received; unmounting");
                    break;
                }
                recv(self.done) -> _ => {
                    info!("mount went away; exiting");
                    self.unmounted_externally = true;
                    break;
                }
            }
        }
        sig_handle.close();
        self.unmount()
    }

    fn reload_exclusions(&self, patterns: Option<Vec<String>>) {
        let (Some(patterns), Some(_)) = (patterns, self.volume.recorder()) else {
            return;
        };
        match Exclusions::new(&patterns) {
            Ok(ex) => {
                self.volume.set_exclusions(ex);
                info!(rules = ?patterns, "exclusion rules reloaded");
            }
            Err(e) => error!(error = %e, "exclusion rules not reloaded; keeping the old ones"),
        }
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(&mut self) -> std::io::Result<()> {
        if self.unmounted_externally {
            // Someone ran umount: there is nothing left to unmount.
        } else if let Err(e) = self.unmounter.unmount() {
            warn!(error = %e, "unmount failed");
            return Err(e);
        }
        let mut result = Ok(());
        if let Some(t) = self.thread.take() {
            result = match t.join() {
                Ok(r) => r,
                Err(_) => Err(std::io::Error::other("FUSE session thread panicked")),
            };
        }
        // Every request is answered: the journal can be closed cleanly.
        if let Some(j) = self.journal()
            && let Err(e) = j.close()
        {
            warn!(error = %e, "journal did not close cleanly");
        }
        // Files a library created meanwhile under a loose umask (sled's).
        if let Err(e) = secure_state_dir(&self.checked.state_dir) {
            warn!(error = %e, "cannot make the state dir private");
        }
        result
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.unmount();
        }
    }
}

/// Checks the paths, mounts, and serves requests on background threads.
pub fn mount(opts: &MountOptions) -> Result<Mounted, MountError> {
    let checked = check(opts)?;
    let volume = Volume::new(
        &checked.backing,
        VolumeOptions {
            read_only: opts.read_only,
            writeback_cache: opts.fuse.writeback_cache && !opts.read_only,
            hidden_dir: checked
                .state_dir
                .starts_with(&checked.backing)
                .then(|| checked.state_dir.clone()),
        },
    )
    .map_err(MountError::Volume)?;
    let volume = match (&opts.journal, opts.read_only) {
        (Some(jopts), false) => {
            let exclusions = Exclusions::new(&opts.exclude).map_err(MountError::Exclusions)?;
            let (journal, recovery) = Journal::open(&checked.state_dir, jopts.clone())?;
            journal.set_backing_dir(&checked.backing);
            // The index and logs it just created, whatever this process's umask.
            secure_state_dir(&checked.state_dir)
                .map_err(|e| MountError::StateDir(show(&checked.state_dir), e))?;
            if !recovery.clean {
                warn!(
                    torn_bytes = recovery.torn_bytes,
                    hot_extents = recovery.hot_extents,
                    "previous run did not stop cleanly; hot extents are in the dirty list"
                );
            }
            volume.with_recorder(Recorder::new(
                Arc::new(journal),
                exclusions,
                &checked.backing,
            ))
        }
        _ => volume,
    };
    let volume = Arc::new(volume);
    let adapter = FuseAdapter::new(volume.clone(), opts.fuse.clone());

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("replicafs:{}", checked.backing.display())),
        MountOption::Subtype("replicafs".into()),
        MountOption::DefaultPermissions,
        if opts.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    // Device nodes in a VM datastore are the guest's business, not the host's.
    config.mount_options.push(MountOption::NoDev);
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;

    let mut session = fuser::Session::new(adapter, &checked.mountpoint, &config).map_err(|e| {
        if e.raw_os_error() == Some(libc::EPERM) {
            MountError::NotPermitted(show(&checked.mountpoint))
        } else {
            MountError::Io(e)
        }
    })?;
    let unmounter = session.unmount_callable();
    let (done_tx, done) = bounded(1);
    let thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let r = session.run();
            let _ = done_tx.send(());
            r
        })?;
    raise_readahead(&checked);
    info!(
        backing = %checked.backing.display(),
        mountpoint = %checked.mountpoint.display(),
        "mounted"
    );
    Ok(Mounted {
        checked,
        volume,
        unmounter,
        thread: Some(thread),
        done,
        unmounted_externally: false,
    })
}
