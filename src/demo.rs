//! `replicafs demo`: a primary mount and a replica on 127.0.0.1 in a local
//! folder, a VM disk image written through the mount with qemu-img/qemu-io,
//! live status until the replica has applied everything, then a hash compare
//! of the mirror against the backing dir.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use sha2::{Digest, Sha256};

use crate::transport::status;
use crate::transport::tls::Identity;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder for the demo (created; must be absent or empty).
    #[arg(long, default_value = "./replicafs-demo")]
    pub dir: PathBuf,
    /// UDP port of the replica on 127.0.0.1.
    #[arg(long, default_value_t = 17070)]
    pub port: u16,
    /// Size of the VM disk image (at least 64M).
    #[arg(long, default_value = "256M")]
    pub image_size: String,
}

type BoxError = Box<dyn std::error::Error>;

struct Proc {
    name: &'static str,
    child: Option<Child>,
    mountpoint: PathBuf,
}

impl Proc {
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if crate::mount::is_mount_point(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(
    name: &'static str,
    args: &[String],
    log: &Path,
    mountpoint: &Path,
) -> Result<Proc, BoxError> {
    let exe = std::env::current_exe()?;
    let logf = std::fs::File::create(log)?;
    let child = Command::new(exe)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .spawn()?;
    Ok(Proc {
        name,
        child: Some(child),
        mountpoint: mountpoint.to_path_buf(),
    })
}

fn wait_ready(p: &mut Proc, state: &Path, log: &Path) -> Result<(), BoxError> {
    let start = Instant::now();
    loop {
        if crate::mount::is_mount_point(&p.mountpoint) && status::query(state).is_ok() {
            return Ok(());
        }
        if let Some(Ok(Some(st))) = p.child.as_mut().map(|c| c.try_wait()) {
            return Err(format!(
                "{} exited ({st}); its log:\n{}",
                p.name,
                std::fs::read_to_string(log).unwrap_or_default()
            )
            .into());
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!("{} did not start; see {}", p.name, log.display()).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_tool(args: &[&str]) -> Result<(), BoxError> {
    println!("$ {}", args.join(" "));
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e} (apt-get install qemu-utils)", args[0]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines().take(12) {
        println!("  {l}");
    }
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            args[0],
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// path → (kind, mode, size, sha256) of every entry under `root`.
pub fn tree_digest(root: &Path) -> std::io::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .map(|r| r.to_string_lossy().to_string())
                .unwrap_or_default();
            let m = std::fs::symlink_metadata(&p)?;
            let mode = m.permissions().mode() & 0o7777;
            let desc = if m.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&p)?)
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {mode:o}")
            } else if m.is_file() {
                let mut h = Sha256::new();
                let mut f = std::fs::File::open(&p)?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    use std::io::Read;
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                format!("file {mode:o} {} {}", m.len(), hex::encode(h.finalize()))
            } else {
                format!("other {mode:o}")
            };
            out.insert(rel, desc);
        }
    }
    Ok(out)
}

pub fn run(args: DemoArgs) -> Result<(), BoxError> {
    let dir = &args.dir;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        return Err(format!(
            "{} is not empty: remove it (rm -rf {}) or pass --dir elsewhere",
            dir.display(),
            dir.display()
        )
        .into());
    }
    let d = |p: &str| dir.join(p);
    for p in [
        "primary/backing",
        "primary/mnt",
        "primary/state",
        "replica/mirror",
        "replica/mnt",
        "replica/state",
    ] {
        std::fs::create_dir_all(d(p))?;
    }
    let dir = dir.canonicalize()?;
    let d = |p: &str| dir.join(p);
    let s = |p: &str| d(p).display().to_string();

    println!("== identities");
    let pid = Identity::generate()?;
    pid.save(&d("primary/state"), false)?;
    let rid = Identity::generate()?;
    rid.save(&d("replica/state"), false)?;
    println!("primary fingerprint {}", pid.fingerprint());
    println!("replica fingerprint {}", rid.fingerprint());

    println!("== starting the replica on 127.0.0.1:{}", args.port);
    let mut replica = spawn(
        "replica",
        &[
            "replica".into(),
            "--mirror".into(),
            s("replica/mirror"),
            "--listen".into(),
            format!("127.0.0.1:{}", args.port),
            "--state-dir".into(),
            s("replica/state"),
            "--trust".into(),
            pid.fingerprint().to_string(),
            "--mount".into(),
            s("replica/mnt"),
        ],
        &d("replica.log"),
        &d("replica/mnt"),
    )?;
    wait_ready(&mut replica, &d("replica/state"), &d("replica.log"))?;
    println!("== mounting the primary at {}", s("primary/mnt"));
    let mut primary = spawn(
        "primary",
        &[
            "mount".into(),
            s("primary/backing"),
            s("primary/mnt"),
            "--state-dir".into(),
            s("primary/state"),
            "--peer".into(),
            format!("127.0.0.1:{}={}", args.port, rid.fingerprint()),
        ],
        &d("primary.log"),
        &d("primary/mnt"),
    )?;
    wait_ready(&mut primary, &d("primary/state"), &d("primary.log"))?;

    println!("== writing a VM disk image through the mount");
    let img = d("primary/mnt/vm-disk.qcow2").display().to_string();
    run_tool(&["qemu-img", "create", "-f", "qcow2", &img, &args.image_size])?;
    run_tool(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x5a 0 16M",
        "-c",
        "write -P 0xa5 40M 8M",
        "-c",
        "write -z 4M 1M",
        "-c",
        "discard 8M 512k",
        &img,
    ])?;
    run_tool(&["qemu-img", "check", &img])?;
    let raw = d("primary/mnt/seed.raw").display().to_string();
    run_tool(&["qemu-img", "create", "-f", "raw", &raw, "32M"])?;
    run_tool(&["qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 4M", &raw])?;
    // Flush what the kernel caches into the mount.
    if let Ok(f) = std::fs::File::open(d("primary/mnt")) {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on an fd we own.
        unsafe { libc::syncfs(f.as_raw_fd()) };
    }

    println!("== live status (primary side)");
    let start = Instant::now();
    loop {
        let st = status::query(&d("primary/state"))?;
        print!("{}", status::render(&st));
        let done = !st.peers.is_empty()
            && st
                .peers
                .iter()
                .all(|p| p.applied >= st.last_seq && p.error.is_none());
        if done {
            println!(
                "replica applied everything (seq {}) after {:.1} s",
                st.last_seq,
                start.elapsed().as_secs_f64()
            );
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err("the replica did not catch up within 120 s; see replica.log".into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("== replica side");
    print!("{}", status::render(&status::query(&d("replica/state"))?));

    println!("== verifying the mirror against the backing dir (sha256 of every file)");
    let a = tree_digest(&d("primary/backing"))?;
    let b = tree_digest(&d("replica/mirror"))?;
    let c = tree_digest(&d("replica/mnt"))?;
    let bytes: u64 = a
        .values()
        .filter_map(|v| v.split(' ').nth(2).and_then(|n| n.parse::<u64>().ok()))
        .sum();
    for (k, v) in &a {
        println!("  {k}: {v}");
    }
    let ok = a == b && b == c;
    primary.stop();
    replica.stop();
    if ok {
        println!(
            "OK: the mirror (and the replica's read-only mount) match the primary: {} entries, {} bytes",
            a.len(),
            bytes
        );
        println!("logs and directories are in {}", dir.display());
        Ok(())
    } else {
        for (k, v) in &a {
            if b.get(k) != Some(v) {
                println!("  differs: {k}: {v} vs {:?}", b.get(k));
            }
        }
        Err("the mirror does not match the backing dir".into())
    }
}
