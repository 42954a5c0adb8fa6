//! Two nodes on loopback: a primary mount replicating over QUIC to replica
//! daemons, each with its read-only mount. Real processes, real FUSE.

mod repl_common;

use repl_common::*;

fn skip_swap(rel: &str) -> bool {
    rel.ends_with(".swap")
}

#[test]
fn workload_through_the_mount_reaches_the_mirror() {
    let mut c = Cluster::new(1, &["--exclude", "*.swap"]);
    c.start_all();
    let mnt = c.primary.mnt.clone();
    random_workload(&mnt, 1, 400);
    std::fs::write(mnt.join("pagefile.swap"), vec![7u8; 100_000]).unwrap();
    qemu_workload(&mnt);
    random_workload(&mnt, 2, 200);
    c.wait_converged();
    let r = &c.replicas[0];
    assert_same_tree(&c.primary.backing, &r.mirror, &skip_swap);
    assert!(!r.mirror.join("pagefile.swap").exists());
    // The replica's own mount shows the mirror, read-only.
    assert_same_tree(&r.mirror, &r.mnt, &|_| false);
    let e = std::fs::write(r.mnt.join("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    // Both ends report the same progress.
    let ps = status(&c.primary.daemon.state).unwrap();
    let rs = status(&r.daemon.state).unwrap();
    assert_eq!(ps["peers"][0]["applied"], rs["peers"][0]["applied"]);
    assert_eq!(ps["peers"][0]["state"], "replicating");
    assert!(ps["peers"][0]["wire_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn two_peers_progress_independently() {
    let mut c = Cluster::new(2, &[]);
    c.start_all();
    let mnt = c.primary.mnt.clone();
    random_workload(&mnt, 3, 150);
    // The second replica goes away for a while; the first keeps up.
    c.replicas[1].daemon.stop();
    random_workload(&mnt, 4, 150);
    sync_path(&mnt);
    c.replicas[1].daemon.start();
    random_workload(&mnt, 5, 100);
    c.wait_converged();
    for r in &c.replicas {
        assert_same_tree(&c.primary.backing, &r.mirror, &|_| false);
    }
}

#[test]
fn kill_replica_then_primary_mid_stream_and_converge() {
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    let mnt = c.primary.mnt.clone();
    random_workload(&mnt, 6, 200);
    // Big writes so that the stream is busy when the replica dies.
    let big = vec![0x5au8; 4 << 20];
    for i in 0..6 {
        std::fs::write(mnt.join(format!("big{i}")), &big).unwrap();
    }
    c.replicas[0].daemon.kill9();
    random_workload(&mnt, 7, 150);
    c.replicas[0].daemon.start();
    for i in 0..6 {
        std::fs::write(mnt.join(format!("big-b{i}")), &big).unwrap();
    }
    random_workload(&mnt, 8, 100);
    // Now the primary dies mid-stream (its journal holds every record: the
    // journal cannot replay a namespace record it never wrote, see the report).
    sync_path(&mnt);
    c.primary.daemon.kill9();
    c.primary.daemon.start();
    random_workload(&mnt, 9, 150);
    c.wait_converged();
    assert_same_tree(&c.primary.backing, &c.replicas[0].mirror, &|_| false);
}

#[test]
fn a_primary_with_a_wrong_certificate_is_refused() {
    let mut c = Cluster::new(1, &[]);
    c.replicas[0].daemon.start();
    // Another identity, unknown to the replica, claims to be the primary.
    let rogue_state = c.base.path().join("rogue-state");
    std::fs::create_dir_all(&rogue_state).unwrap();
    let rogue_fp = keygen(&rogue_state);
    assert_ne!(rogue_fp, c.primary.fp);
    let backing = c.base.path().join("rogue-backing");
    let mnt = c.base.path().join("rogue-mnt");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let r = &c.replicas[0];
    let mut rogue = Daemon::new(
        "rogue",
        vec![
            "mount".into(),
            backing.display().to_string(),
            mnt.display().to_string(),
            "--state-dir".into(),
            rogue_state.display().to_string(),
            "--peer".into(),
            format!("127.0.0.1:{}={}", r.port, r.fp),
        ],
        c.base.path().join("rogue.log"),
        rogue_state.clone(),
        Some(mnt.clone()),
    );
    rogue.start();
    std::fs::write(mnt.join("x"), b"should not arrive").unwrap();
    // Wait until the replica logged the refusal (deadline, not a timing check).
    let start = std::time::Instant::now();
    while !r
        .daemon
        .log_text()
        .contains("certificate fingerprint is not pinned")
    {
        assert!(
            start.elapsed() < DEADLINE,
            "no refusal logged:\n{}",
            r.daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(r.daemon.log_text().contains(&rogue_fp));
    // The primary side shows why.
    let start = std::time::Instant::now();
    loop {
        let s = status(&rogue_state).unwrap();
        if let Some(e) = s["peers"][0]["error"].as_str() {
            assert_eq!(s["peers"][0]["connected"], false);
            assert!(!e.is_empty());
            break;
        }
        assert!(start.elapsed() < DEADLINE);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    rogue.stop();
    assert!(!r.mirror.join("x").exists());
    assert_eq!(std::fs::read_dir(&r.mirror).unwrap().count(), 0);

    // A replica the primary does not pin is refused by the primary too.
    let other_state = c.base.path().join("other-state");
    std::fs::create_dir_all(&other_state).unwrap();
    let other_fp = keygen(&other_state);
    let other_mirror = c.base.path().join("other-mirror");
    std::fs::create_dir_all(&other_mirror).unwrap();
    let port = free_udp_port();
    let mut other = Daemon::new(
        "other-replica",
        vec![
            "replica".into(),
            "--mirror".into(),
            other_mirror.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--state-dir".into(),
            other_state.display().to_string(),
            "--trust".into(),
            c.primary.fp.clone(),
        ],
        c.base.path().join("other.log"),
        other_state,
        None,
    );
    other.start();
    // The primary expects the real replica's fingerprint at this address.
    let pstate = c.primary.daemon.state.clone();
    let pmnt = c.primary.mnt.clone();
    let mut p = Daemon::new(
        "primary-to-impostor",
        vec![
            "mount".into(),
            c.primary.backing.display().to_string(),
            pmnt.display().to_string(),
            "--state-dir".into(),
            pstate.display().to_string(),
            "--peer".into(),
            format!("127.0.0.1:{port}={}", r.fp),
        ],
        c.base.path().join("p2.log"),
        pstate,
        Some(pmnt.clone()),
    );
    p.start();
    std::fs::write(pmnt.join("y"), b"secret").unwrap();
    let start = std::time::Instant::now();
    while !p
        .log_text()
        .contains("certificate fingerprint is not pinned")
    {
        assert!(
            start.elapsed() < DEADLINE,
            "primary did not refuse:\n{}",
            p.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(p.log_text().contains(&other_fp));
    assert_eq!(std::fs::read_dir(&other_mirror).unwrap().count(), 0);
}

/// The replica is killed again and again while a namespace-heavy workload
/// streams (creates, renames, unlinks, links, mkdir/rmdir): every restart
/// resumes from its receive log without applying a namespace record twice
/// (which would fail and stop the applier) and the mirror converges.
#[test]
fn replica_killed_repeatedly_during_namespace_churn() {
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    let mnt = c.primary.mnt.clone();
    let writer = std::thread::spawn(move || {
        for seed in 100..112 {
            random_workload(&mnt, seed, 120);
        }
    });
    let mut rng = Rng(5);
    let mut kills = 0;
    while !writer.is_finished() && kills < 8 {
        std::thread::sleep(std::time::Duration::from_millis(200 + rng.below(600)));
        c.replicas[0].daemon.kill9();
        kills += 1;
        c.replicas[0].daemon.start();
    }
    writer.join().unwrap();
    c.wait_converged();
    assert_same_tree(&c.primary.backing, &c.replicas[0].mirror, &|_| false);
    assert!(kills > 0);
    let log = c.replicas[0].daemon.log_text();
    assert!(!log.contains("replica cannot apply"), "{log}");
}

/// A replica that joins a primary whose backing dir already holds files the
/// journal never saw gets them by a full snapshot, then the stream.
#[test]
fn a_fresh_replica_gets_pre_existing_files_by_snapshot() {
    let mut c = Cluster::new(1, &[]);
    // Files that exist before the mount (never journaled).
    let b = c.primary.backing.clone();
    std::fs::create_dir_all(b.join("old/deeper")).unwrap();
    let mut rng = Rng(77);
    std::fs::write(b.join("old/disk.raw"), rng.bytes(3 << 20)).unwrap();
    std::fs::write(b.join("old/deeper/small"), b"x").unwrap();
    std::os::unix::fs::symlink("disk.raw", b.join("old/link")).unwrap();
    // A file in the mirror that the primary does not have goes away.
    std::fs::write(c.replicas[0].mirror.join("stale"), b"old").unwrap();
    c.start_all();
    let mnt = c.primary.mnt.clone();
    // Changes while the snapshot may be running, and after.
    random_workload(&mnt, 31, 200);
    std::fs::rename(mnt.join("old/deeper/small"), mnt.join("old/moved")).unwrap();
    c.wait_converged();
    assert_same_tree(&c.primary.backing, &c.replicas[0].mirror, &|_| false);
}

#[test]
fn demo_runs_and_verifies() {
    let d = tempfile::Builder::new()
        .prefix("replicafs-demo-test")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = d.path().join("demo");
    let port = free_udp_port();
    let out = std::process::Command::new(BIN)
        .args([
            "demo",
            "--image-size",
            "64M",
            "--port",
            &port.to_string(),
            "--dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // Whatever happened, nothing stays mounted.
    lazy_umount(&dir.join("primary/mnt"));
    lazy_umount(&dir.join("replica/mnt"));
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("OK: the mirror"), "{text}");
}

/// The primary is killed while a workload runs, without a sync first: the
/// journal may lose its unwritten tail (data regions come back through the
/// activity log and catch-up; a lost name makes the replica diverge, which the
/// primary answers with a snapshot). Whatever was lost, the mirror converges
/// to the backing dir.
#[test]
fn primary_killed_during_a_workload_converges() {
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    for round in 0..3u64 {
        let mnt = c.primary.mnt.clone();
        let writer = std::thread::spawn(move || {
            // Operations fail once the mount is gone; that is expected.
            let _ = std::panic::catch_unwind(|| random_workload(&mnt, 200 + round, 400));
        });
        std::thread::sleep(std::time::Duration::from_millis(300 + 200 * round));
        c.primary.daemon.kill9();
        let _ = writer.join();
        c.primary.daemon.start();
    }
    random_workload(&c.primary.mnt.clone(), 300, 100);
    c.wait_converged();
    assert_same_tree(&c.primary.backing, &c.replicas[0].mirror, &|_| false);
}

/// The replica's applied seq as it reports it: (durable and acknowledged,
/// brought into the mirror).
fn replica_applied(state: &std::path::Path) -> (u64, u64) {
    let s = status(state).expect("replica status");
    let p = &s["peers"][0];
    (
        p["applied"].as_u64().expect("applied"),
        p["mirror_applied"].as_u64().expect("mirror_applied"),
    )
}

/// An idle replica that has applied everything is restarted (stopped, then
/// killed): it comes back with exactly the applied seq it acknowledged (not
/// one more, not less), and what the primary writes next reaches the mirror.
#[test]
fn idle_caught_up_replica_restarts_and_takes_more() {
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    let mnt = c.primary.mnt.clone();
    random_workload(&mnt, 40, 150);
    for (round, seed) in [41u64, 42].into_iter().enumerate() {
        c.wait_converged();
        let last = status(&c.primary.daemon.state).unwrap()["last_seq"]
            .as_u64()
            .unwrap();
        let rstate = c.replicas[0].daemon.state.clone();
        assert_eq!(replica_applied(&rstate), (last, last));
        assert_same_tree(&c.primary.backing, &c.replicas[0].mirror, &|_| false);
        if round == 0 {
            c.replicas[0].daemon.stop();
        } else {
            c.replicas[0].daemon.kill9();
        }
        c.replicas[0].daemon.start();
        // Straight from replica.state: what it acknowledged, nothing more.
        assert_eq!(replica_applied(&rstate), (last, last), "round {round}");
        random_workload(&mnt, seed, 100);
        std::fs::write(mnt.join(format!("after-restart-{round}")), b"more").unwrap();
    }
    c.wait_converged();
    assert_same_tree(&c.primary.backing, &c.replicas[0].mirror, &|_| false);
    let last = status(&c.primary.daemon.state).unwrap()["last_seq"]
        .as_u64()
        .unwrap();
    assert_eq!(replica_applied(&c.replicas[0].daemon.state), (last, last));
}

/// After an unclean stop the primary owes every peer a snapshot (it cannot
/// tell what its journal lost). The debt is kept in the state dir, so a clean
/// restart made while the peer is down does not forget it: the peer still
/// gets its repair when it comes back, and then the debt is gone.
#[test]
fn resync_owed_after_a_crash_survives_a_clean_restart() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    let mnt = c.primary.mnt.clone();
    random_workload(&mnt, 60, 100);
    c.wait_converged();
    c.replicas[0].daemon.stop();
    random_workload(&mnt, 61, 50);
    c.primary.daemon.kill9();
    c.primary.daemon.start();
    let owed = c.primary.daemon.state.join("resync-owed");
    let fp = c.replicas[0].fp.clone();
    assert!(
        std::fs::read_to_string(&owed)
            .unwrap_or_default()
            .contains(&fp),
        "no debt recorded after an unclean stop"
    );
    let mode = std::fs::metadata(&owed).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A clean stop and start, the peer still away.
    c.primary.daemon.stop();
    c.primary.daemon.start();
    // What only a snapshot repairs: an entry the primary does not have (the
    // kind of divergence records lost in a crash leave behind).
    std::fs::write(c.replicas[0].mirror.join("lost-in-the-crash"), b"stale").unwrap();
    c.replicas[0].daemon.start();
    random_workload(&mnt, 62, 50);
    c.wait_converged();
    assert_same_tree(&c.primary.backing, &c.replicas[0].mirror, &|_| false);
    assert!(
        !std::fs::read_to_string(&owed)
            .unwrap_or_default()
            .contains(&fp),
        "the debt outlived the snapshot"
    );
    assert!(
        c.primary
            .daemon
            .log_text()
            .contains("this peer gets a full snapshot")
    );
}

/// A primary whose journal lost records a replica already holds (here the
/// whole journal is gone, as after restoring an old state dir) hands those
/// seqs out again for other content. The replica is then owed a snapshot,
/// never a resume past its received seq that would skip the new records.
#[test]
fn a_replica_ahead_of_a_lost_journal_gets_a_snapshot_not_a_resume() {
    use std::os::unix::fs::FileExt;
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    let mnt = c.primary.mnt.clone();
    std::fs::write(mnt.join("pages.img"), vec![0u8; 1 << 20]).unwrap();
    random_workload(&mnt, 70, 30);
    c.wait_converged();
    let held = status(&c.primary.daemon.state).unwrap()["last_seq"]
        .as_u64()
        .unwrap();
    c.primary.daemon.stop();
    std::fs::remove_dir_all(c.primary.daemon.state.join("journal")).unwrap();
    c.primary.daemon.start();
    // New records 1..=held and beyond, each its own page of `pages.img`.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("pages.img"))
        .unwrap();
    let mut page = 0u64;
    loop {
        let last = status(&c.primary.daemon.state).unwrap()["last_seq"]
            .as_u64()
            .unwrap();
        if last > held + 5 {
            break;
        }
        assert!(page < 256, "{page} pages did not make {} records", held + 5);
        f.write_all_at(&[page as u8 + 1; 4096], page * 4096)
            .unwrap();
        f.sync_data().unwrap();
        page += 1;
    }
    drop(f);
    c.wait_converged();
    assert_same_tree(&c.primary.backing, &c.replicas[0].mirror, &|_| false);
    assert!(
        c.primary
            .daemon
            .log_text()
            .contains("this peer gets a full snapshot")
    );
}
