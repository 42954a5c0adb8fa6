//! A mount daemon run as its own process, for tests that signal, kill or
//! remount it; and journal inspection through the command line.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_replicafs");

pub fn is_mounted(p: &Path) -> bool {
    let want = p.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

fn force_unmount(mnt: &Path) {
    for _ in 0..100 {
        if !is_mounted(mnt) {
            return;
        }
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A temp dir with `backing`, `mnt` and an (empty) config file.
pub struct Dirs {
    _dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub config: PathBuf,
}

impl Dirs {
    pub fn new() -> Dirs {
        let dir = tempfile::Builder::new()
            .prefix("replicafs-proc")
            .tempdir_in("/tmp")
            .unwrap();
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let config = dir.path().join("replicafs.toml");
        std::fs::write(&config, "").unwrap();
        Dirs {
            _dir: dir,
            backing,
            mnt,
            config,
        }
    }

    pub fn state(&self) -> PathBuf {
        self.backing.join(".replicafs")
    }
}

/// A mount process; killed and lazily unmounted on drop whatever happens.
pub struct MountProc {
    child: Option<Child>,
    mnt: PathBuf,
    pub log: PathBuf,
}

impl MountProc {
    pub fn start(d: &Dirs, extra: &[&str]) -> MountProc {
        let log = d.config.with_extension("log");
        let child = Command::new(BIN)
            .arg("mount")
            .arg(&d.backing)
            .arg(&d.mnt)
            .arg("--config")
            .arg(&d.config)
            .args(extra)
            .env("REPLICAFS_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .expect("spawn replicafs mount");
        let p = MountProc {
            child: Some(child),
            mnt: d.mnt.clone(),
            log,
        };
        let start = Instant::now();
        while !is_mounted(&d.mnt) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "mount did not come up: {}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        let c = self.child.as_ref().expect("running");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, sig) };
    }

    /// Waits (bounded generously) until the log has `n` lines containing `what`.
    pub fn wait_log(&self, what: &str, n: usize) {
        let start = Instant::now();
        while self.log_text().matches(what).count() < n {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no {what:?} in the log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        force_unmount(&self.mnt);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let status = c.wait().expect("wait");
            assert!(
                status.success(),
                "mount exited with {status}: {}",
                self.log_text()
            );
        }
        force_unmount(&self.mnt);
    }
}

impl Drop for MountProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `replicafs journal ARGS --state-dir STATE`, which must succeed.
pub fn journal_cmd(args: &[&str], state: &Path) -> String {
    let out = Command::new(BIN)
        .arg("journal")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env("REPLICAFS_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "journal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The paths that have a record of kind `kind` ("write", "mknod", …) in the
/// journal dump; "write" counts writes whose bytes stayed in the backing file.
pub fn journaled(state: &Path, kind: &str) -> Vec<String> {
    journal_cmd(&["dump"], state)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let _seq = it.next()?;
            let k = it.next()?;
            (k == kind || (kind == "write" && k == "write-backed"))
                .then(|| l.split('"').nth(1).map(str::to_string))?
        })
        .collect()
}

/// Config text that makes the journal keep every write's bytes, so that
/// `journal replay` alone reproduces the mount.
pub const PAYLOAD_IN_JOURNAL: &str = "[journal]\npayload = \"journal\"\n";
