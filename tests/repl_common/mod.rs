//! Harness for the two-node tests: real `replicafs` processes (primary mount and
//! replica daemons) on loopback, killed and unmounted on drop whatever happens.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const BIN: &str = env!("CARGO_BIN_EXE_replicafs");

/// How long the tests wait for anything before failing (not a timing
/// assertion: a deadline against hangs).
pub const DEADLINE: Duration = Duration::from_secs(120);

pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

pub fn keygen(state: &Path) -> String {
    let out = Command::new(BIN)
        .args(["keygen", "--state-dir"])
        .arg(state)
        .output()
        .expect("keygen runs");
    assert!(out.status.success(), "keygen: {out:?}");
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}

pub fn is_mounted(p: &Path) -> bool {
    let want = p.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

pub fn lazy_umount(p: &Path) {
    if is_mounted(p) {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
}

/// One daemon process with its log file.
pub struct Daemon {
    pub name: String,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub state: PathBuf,
    pub mountpoint: Option<PathBuf>,
    child: Option<Child>,
}

impl Daemon {
    pub fn new(
        name: &str,
        args: Vec<String>,
        log: PathBuf,
        state: PathBuf,
        mp: Option<PathBuf>,
    ) -> Daemon {
        Daemon {
            name: name.into(),
            args,
            log,
            state,
            mountpoint: mp,
            child: None,
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(BIN)
            .args(&self.args)
            .env("REPLICAFS_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn replicafs");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let mounted = self.mountpoint.as_ref().is_none_or(|m| is_mounted(m));
            if mounted && status(&self.state).is_some() {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "{} exited with {st} while starting; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} did not start; log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, then clean up a dead FUSE mount.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(m) = &self.mountpoint {
            lazy_umount(m);
        }
    }

    /// SIGTERM and wait (then SIGKILL if it hangs).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(15) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(m) = &self.mountpoint {
            lazy_umount(m);
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The daemon's status, if it answers.
pub fn status(state: &Path) -> Option<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["status", "--json", "--state-dir"])
        .arg(state)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

pub struct Replica {
    pub mirror: PathBuf,
    pub mnt: PathBuf,
    pub port: u16,
    pub fp: String,
    pub daemon: Daemon,
}

pub struct Primary {
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub fp: String,
    pub daemon: Daemon,
}

/// A base directory with one primary and `n` replicas configured (not started).
pub struct Cluster {
    pub base: tempfile::TempDir,
    pub primary: Primary,
    pub replicas: Vec<Replica>,
}

impl Cluster {
    pub fn new(n: usize, extra_mount_args: &[&str]) -> Cluster {
        Cluster::new_via(n, extra_mount_args, &[])
    }

    /// Like `new`, but the primary reaches replica i at port `via[i]` (a relay).
    pub fn new_via(n: usize, extra_mount_args: &[&str], via: &[u16]) -> Cluster {
        let base = tempfile::Builder::new()
            .prefix("replicafs-test")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let b = base.path();
        let pstate = b.join("p-state");
        std::fs::create_dir_all(&pstate).unwrap();
        let pfp = keygen(&pstate);
        let mut replicas = Vec::new();
        for i in 0..n {
            let state = b.join(format!("r{i}-state"));
            let mirror = b.join(format!("r{i}-mirror"));
            let mnt = b.join(format!("r{i}-mnt"));
            for d in [&state, &mirror, &mnt] {
                std::fs::create_dir_all(d).unwrap();
            }
            let fp = keygen(&state);
            let port = free_udp_port();
            let args: Vec<String> = vec![
                "replica".into(),
                "--mirror".into(),
                mirror.display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--state-dir".into(),
                state.display().to_string(),
                "--trust".into(),
                pfp.clone(),
                "--mount".into(),
                mnt.display().to_string(),
            ];
            let daemon = Daemon::new(
                &format!("replica{i}"),
                args,
                b.join(format!("r{i}.log")),
                state,
                Some(mnt.clone()),
            );
            replicas.push(Replica {
                mirror,
                mnt,
                port,
                fp,
                daemon,
            });
        }
        let backing = b.join("p-backing");
        let mnt = b.join("p-mnt");
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let mut args: Vec<String> = vec![
            "mount".into(),
            backing.display().to_string(),
            mnt.display().to_string(),
            "--state-dir".into(),
            pstate.display().to_string(),
        ];
        for (i, r) in replicas.iter().enumerate() {
            args.push("--peer".into());
            let port = via.get(i).copied().unwrap_or(r.port);
            args.push(format!("127.0.0.1:{port}={}", r.fp));
        }
        args.extend(extra_mount_args.iter().map(|s| s.to_string()));
        let daemon = Daemon::new("primary", args, b.join("p.log"), pstate, Some(mnt.clone()));
        Cluster {
            base,
            primary: Primary {
                backing,
                mnt,
                fp: pfp,
                daemon,
            },
            replicas,
        }
    }

    pub fn start_all(&mut self) {
        for r in &mut self.replicas {
            r.daemon.start();
        }
        self.primary.daemon.start();
    }

    pub fn logs(&self) -> String {
        let mut s = format!("--- primary log\n{}", tail(&self.primary.daemon.log_text()));
        for r in &self.replicas {
            s.push_str(&format!(
                "--- {} log\n{}",
                r.daemon.name,
                tail(&r.daemon.log_text())
            ));
        }
        s
    }

    /// Waits until every replica has applied everything the primary journaled
    /// (after a `sync` of the mount so the kernel's cached writes are in).
    pub fn wait_converged(&self) {
        sync_path(&self.primary.mnt);
        let start = Instant::now();
        let mut stable = 0;
        let mut prev = u64::MAX;
        loop {
            if let Some(s) = status(&self.primary.daemon.state) {
                let last = s["last_seq"].as_u64().unwrap_or(0);
                let peers = s["peers"].as_array().cloned().unwrap_or_default();
                let done = peers.len() == self.replicas.len()
                    && peers.iter().all(|p| {
                        p["applied"].as_u64() == Some(last)
                            && p["error"].is_null()
                            && p["state"] == "replicating"
                    });
                if done && last == prev {
                    stable += 1;
                    if stable >= 3 {
                        return;
                    }
                } else {
                    stable = 0;
                }
                prev = last;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "replicas did not converge; primary status {:?}\n{}",
                status(&self.primary.daemon.state),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.primary.daemon.stop();
        for r in &mut self.replicas {
            r.daemon.stop();
        }
        lazy_umount(&self.primary.mnt);
        for r in &self.replicas {
            lazy_umount(&r.mnt);
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let from = lines.len().saturating_sub(40);
    lines[from..].join("\n") + "\n"
}

pub fn sync_path(p: &Path) {
    if let Ok(f) = std::fs::File::open(p) {
        use std::os::fd::AsRawFd;
        unsafe { libc::syncfs(f.as_raw_fd()) };
    }
}

/// (kind, mode, content hash or link target) of every entry under `root`.
pub fn tree(root: &Path, skip: &dyn Fn(&str) -> bool) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, skip, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, skip: &dyn Fn(&str) -> bool, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
        if skip(&rel) {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).expect("lstat");
        let mode = m.permissions().mode() & 0o7777;
        let desc = if m.file_type().is_symlink() {
            format!("link {:?}", std::fs::read_link(&p).unwrap())
        } else if m.is_dir() {
            walk(root, &p, skip, out);
            format!("dir {mode:o}")
        } else if m.is_file() {
            let data = std::fs::read(&p).expect("read");
            format!(
                "file {mode:o} {} {} uid{} {}",
                m.len(),
                hex(&Sha256::digest(&data)),
                m.uid(),
                xattrs(&p)
            )
        } else {
            format!("other {mode:o} {}", m.rdev())
        };
        out.insert(rel, desc);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn xattrs(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return String::new();
    }
    let mut names: Vec<Vec<u8>> = buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty() && s.starts_with(b"user."))
        .map(|s| s.to_vec())
        .collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let cn = std::ffi::CString::new(name.clone()).unwrap();
        let mut v = vec![0u8; 4096];
        let n = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        out.push_str(&format!(
            "{}={:?};",
            String::from_utf8_lossy(&name),
            &v[..n.max(0) as usize]
        ));
    }
    out
}

/// Asserts the mirror holds exactly the backing dir's tree.
pub fn assert_same_tree(backing: &Path, mirror: &Path, skip: &dyn Fn(&str) -> bool) {
    let a = tree(backing, skip);
    let b = tree(mirror, &|_| false);
    if a != b {
        let mut diff = String::new();
        for (k, v) in &a {
            match b.get(k) {
                Some(w) if w == v => {}
                Some(w) => diff.push_str(&format!("differs {k}: {v} vs {w}\n")),
                None => diff.push_str(&format!("missing on mirror {k}: {v}\n")),
            }
        }
        for (k, v) in &b {
            if !a.contains_key(k) {
                diff.push_str(&format!("extra on mirror {k}: {v}\n"));
            }
        }
        panic!("mirror differs from backing dir:\n{diff}");
    }
}

/// A small deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        // Half compressible, half not.
        let pattern = self.below(2) == 0;
        let b = self.next() as u8;
        (0..n)
            .map(|i| {
                if pattern {
                    b.wrapping_add((i / 512) as u8)
                } else {
                    self.next() as u8
                }
            })
            .collect()
    }
}

/// A random workload of file operations through `root` (a mount).
pub fn random_workload(root: &Path, seed: u64, ops: usize) {
    use std::os::unix::fs::FileExt;
    let mut rng = Rng(seed);
    let dirs = ["", "a", "a/b", "c"];
    for d in &dirs[1..] {
        let _ = std::fs::create_dir_all(root.join(d));
    }
    let mut files: Vec<PathBuf> = Vec::new();
    // Names of hard-linked files are never unlinked: the volume journals an
    // unlinked-but-still-linked inode under a "(deleted)" path (a known issue).
    let mut linked: std::collections::HashSet<PathBuf> = Default::default();
    for i in 0..ops {
        let d = root.join(dirs[rng.below(dirs.len() as u64) as usize]);
        match rng.below(14) {
            0..=2 => {
                let p = d.join(format!("f{seed}-{i}"));
                let n = rng.below(200_000) as usize;
                let data = rng.bytes(n);
                std::fs::write(&p, &data).unwrap();
                files.push(p);
            }
            3..=6 if !files.is_empty() => {
                let p = &files[rng.below(files.len() as u64) as usize];
                if let Ok(f) = OpenOptions::new().write(true).open(p) {
                    let off = rng.below(300_000);
                    let n = 1 + rng.below(70_000) as usize;
                    let data = rng.bytes(n);
                    f.write_all_at(&data, off).unwrap();
                    if rng.below(4) == 0 {
                        f.sync_data().unwrap();
                    }
                }
            }
            7 if !files.is_empty() => {
                let p = &files[rng.below(files.len() as u64) as usize];
                if let Ok(f) = OpenOptions::new().write(true).open(p) {
                    f.set_len(rng.below(250_000)).unwrap();
                }
            }
            8 if !files.is_empty() => {
                let k = rng.below(files.len() as u64) as usize;
                let to = root
                    .join(dirs[rng.below(dirs.len() as u64) as usize])
                    .join(format!("r{seed}-{i}"));
                if std::fs::rename(&files[k], &to).is_ok() {
                    if linked.remove(&files[k]) {
                        linked.insert(to.clone());
                    }
                    files[k] = to;
                }
            }
            9 if !files.is_empty() => {
                let k = rng.below(files.len() as u64) as usize;
                if linked.contains(&files[k]) {
                    continue;
                }
                let p = files.swap_remove(k);
                let _ = std::fs::remove_file(p);
            }
            10 => {
                let p = d.join(format!("s{seed}-{i}"));
                let _ = std::os::unix::fs::symlink(format!("target-{i}"), p);
            }
            11 if !files.is_empty() => {
                let k = rng.below(files.len() as u64) as usize;
                let p = d.join(format!("h{seed}-{i}"));
                if std::fs::hard_link(&files[k], &p).is_ok() {
                    linked.insert(files[k].clone());
                    linked.insert(p.clone());
                    files.push(p);
                }
            }
            12 if !files.is_empty() => {
                let k = rng.below(files.len() as u64) as usize;
                let mode = [0o600, 0o644, 0o640, 0o755][rng.below(4) as usize];
                let _ = std::fs::set_permissions(&files[k], std::fs::Permissions::from_mode(mode));
            }
            13 if !files.is_empty() => {
                use std::os::unix::ffi::OsStrExt;
                let k = rng.below(files.len() as u64) as usize;
                let c = std::ffi::CString::new(files[k].as_os_str().as_bytes()).unwrap();
                let v = format!("v{i}");
                unsafe {
                    libc::setxattr(
                        c.as_ptr(),
                        c"user.test".as_ptr(),
                        v.as_ptr().cast(),
                        v.len(),
                        0,
                    )
                };
            }
            _ => {
                let p = d.join(format!("e{seed}-{i}"));
                let _ = std::fs::create_dir(&p);
                if rng.below(2) == 0 {
                    let _ = std::fs::remove_dir(&p);
                }
            }
        }
    }
}

/// qemu-img/qemu-io on an image in `root`.
pub fn qemu_workload(root: &Path) {
    let img = root.join("vm.qcow2");
    let run = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect("qemu tool runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let img_s = img.to_string_lossy().to_string();
    run(&["qemu-img", "create", "-q", "-f", "qcow2", &img_s, "64M"]);
    run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0xab 0 4M",
        "-c",
        "write -P 0xcd 10M 1M",
        "-c",
        "write -z 1M 512k",
        "-c",
        "discard 2M 64k",
        &img_s,
    ]);
    run(&["qemu-img", "check", "-q", &img_s]);
    let raw = root.join("vm.raw");
    run(&[
        "qemu-img",
        "convert",
        "-O",
        "raw",
        &img_s,
        &raw.to_string_lossy(),
    ]);
}
