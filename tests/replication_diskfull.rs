//! The replica's disk fills up: both ends show the error, the primary keeps its
//! journal within the cap (dropping into the dirty list), and replication
//! resumes by itself once space returns.

mod repl_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use repl_common::*;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(p: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(p).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(p)
            .status()
            .unwrap();
        assert!(st.success());
        Tmpfs(p.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn journal_bytes(state: &Path) -> u64 {
    std::fs::read_dir(state.join("journal"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn wait_for(what: &str, c: &Cluster, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "{what}\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn replica_disk_full_shows_on_both_sides_and_recovers() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("p.toml");
    std::fs::write(
        &cfg,
        "[journal]\nsegment_bytes = 1048576\ncap_bytes = 8388608\n",
    )
    .unwrap();
    let mut c = Cluster::new(1, &["--config", &cfg.display().to_string()]);
    // The replica's mirror and state live on a small tmpfs.
    let fs = Tmpfs::mount(&c.base.path().join("rfs"), "12m");
    let mirror = fs.0.join("mirror");
    let state = fs.0.join("state");
    std::fs::create_dir_all(&mirror).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    for f in ["node-cert.der", "node-key.der"] {
        std::fs::copy(c.replicas[0].daemon.state.join(f), state.join(f)).unwrap();
    }
    let old_mirror = c.replicas[0].mirror.display().to_string();
    let old_state = c.replicas[0].daemon.state.display().to_string();
    for a in c.replicas[0].daemon.args.iter_mut() {
        if *a == old_mirror {
            *a = mirror.display().to_string();
        } else if *a == old_state {
            *a = state.display().to_string();
        }
    }
    c.replicas[0].daemon.state = state.clone();
    c.replicas[0].mirror = mirror.clone();
    c.start_all();

    let mnt = c.primary.mnt.clone();
    for i in 0..4 {
        std::fs::write(mnt.join(format!("disk{i}.img")), b"").unwrap();
    }
    c.wait_converged();

    // 32 MiB of incompressible writes into a 12 MiB replica.
    let mut rng = Rng(99);
    for round in 0..4 {
        for i in 0..4 {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(mnt.join(format!("disk{i}.img")))
                .unwrap();
            let data: Vec<u8> = (0..(2 << 20)).map(|_| rng.next() as u8).collect();
            f.write_all_at(&data, round * (2 << 20)).unwrap();
        }
    }
    sync_path(&mnt);
    wait_for("the primary shows no disk-full error", &c, || {
        status(&c.primary.daemon.state).is_some_and(|s| {
            s["peers"][0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("No space left"))
        })
    });
    wait_for("the replica shows no disk-full error", &c, || {
        status(&state).is_some_and(|s| {
            s["peers"][0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("No space left"))
        })
    });
    // The journal stays within its cap (plus the active segment).
    let jb = journal_bytes(&c.primary.daemon.state);
    assert!(jb <= 8 * 1048576 + 2 * 1048576, "journal holds {jb} bytes");
    assert!(c.primary.daemon.running() && c.replicas[0].daemon.running());

    // Space returns: replication resumes by itself.
    fs.resize("256m");
    c.wait_converged();
    assert_same_tree(&c.primary.backing, &mirror, &|_| false);
    let s = status(&state).unwrap();
    assert!(s["peers"][0]["error"].is_null(), "{s}");
}

/// A replica is away while the journal overflows and drops records, names
/// included (creates, renames, unlinks): on its return the dirty regions are
/// sent again and, since names were lost, it gets a fresh snapshot; the mirror
/// converges either way.
#[test]
fn a_peer_behind_a_journal_overflow_converges() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("p.toml");
    std::fs::write(
        &cfg,
        // Few writes are held in the backing file for the peer: the rest
        // carry their bytes and fill the journal past its cap.
        "[journal]\nsegment_bytes = 1048576\ncap_bytes = 8388608\nheld_records = 64\n",
    )
    .unwrap();
    let mut c = Cluster::new(1, &["--config", &cfg.display().to_string()]);
    c.start_all();
    let mnt = c.primary.mnt.clone();
    random_workload(&mnt, 41, 100);
    c.wait_converged();
    c.replicas[0].daemon.stop();
    // Far more than the cap while the replica is away.
    random_workload(&mnt, 42, 300);
    let mut rng = Rng(43);
    for i in 0..6 {
        std::fs::write(mnt.join(format!("big{i}")), rng.bytes(3 << 20)).unwrap();
        if i % 2 == 0 {
            std::fs::rename(mnt.join(format!("big{i}")), mnt.join(format!("moved{i}"))).unwrap();
        }
    }
    std::fs::remove_file(mnt.join("big1")).unwrap();
    sync_path(&mnt);
    let log = c.primary.daemon.log_text();
    assert!(log.contains("journal cap reached"), "no overflow:\n{log}");
    c.replicas[0].daemon.start();
    random_workload(&mnt, 44, 50);
    c.wait_converged();
    assert_same_tree(&c.primary.backing, &c.replicas[0].mirror, &|_| false);
    let log = c.primary.daemon.log_text();
    assert!(
        log.contains("the journal cannot bring this peer forward"),
        "no snapshot after the overflow:\n{log}"
    );
}
