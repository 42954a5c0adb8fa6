//! Exclusions on a replicating primary: directory renames across the boundary
//! carry their subtrees (the primary's backing dir minus the excluded part is
//! what the mirror holds), and a hard-linked file with an included name is
//! replicated whichever name it is written through.

mod repl_common;

use repl_common::*;

fn skip_scratch(rel: &str) -> bool {
    rel == "scratch" || rel.starts_with("scratch/")
}

#[test]
fn directory_renames_across_the_exclusion_boundary_carry_their_subtree() {
    let mut c = Cluster::new(1, &["--exclude", "scratch/**", "--exclude", "scratch"]);
    c.start_all();
    let m = c.primary.mnt.clone();
    // The first case: out, written while excluded, back in.
    std::fs::create_dir(m.join("vm")).unwrap();
    std::fs::write(m.join("vm/d.img"), b"AAAA").unwrap();
    std::fs::rename(m.join("vm"), m.join("scratch")).unwrap();
    std::fs::write(m.join("scratch/d.img"), b"BBBB").unwrap();
    std::fs::rename(m.join("scratch"), m.join("vm")).unwrap();
    // The second: made while excluded, moved in, nested and sparse.
    std::fs::create_dir_all(m.join("scratch/sub/deeper")).unwrap();
    std::fs::write(m.join("scratch/a.img"), b"a image").unwrap();
    std::fs::write(m.join("scratch/sub/deeper/b.img"), vec![9u8; 300_000]).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(m.join("scratch/sub/sparse.img"))
            .unwrap();
        f.write_all_at(b"far", 64 << 20).unwrap();
    }
    std::os::unix::fs::symlink("a.img", m.join("scratch/link")).unwrap();
    std::fs::hard_link(m.join("scratch/a.img"), m.join("scratch/sub/a2.img")).unwrap();
    std::fs::rename(m.join("scratch"), m.join("vm2")).unwrap();
    std::fs::write(m.join("vm2/sub/after"), b"written after the move").unwrap();
    c.wait_converged();
    let r = &c.replicas[0];
    assert_eq!(std::fs::read(r.mirror.join("vm/d.img")).unwrap(), b"BBBB");
    assert_eq!(
        std::fs::read(r.mirror.join("vm2/a.img")).unwrap(),
        b"a image"
    );
    {
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(r.mirror.join("vm2/a.img")).unwrap();
        let a2 = std::fs::metadata(r.mirror.join("vm2/sub/a2.img")).unwrap();
        assert_eq!(
            a.ino(),
            a2.ino(),
            "the hard link inside the tree is a link on the mirror"
        );
    }
    // Moving a replicated tree into the excluded area removes it from the mirror.
    std::fs::create_dir_all(m.join("keep/inner")).unwrap();
    std::fs::write(m.join("keep/inner/f"), b"f").unwrap();
    c.wait_converged();
    assert!(r.mirror.join("keep/inner/f").exists());
    std::fs::rename(m.join("keep"), m.join("scratch")).unwrap();
    c.wait_converged();
    assert!(!r.mirror.join("keep").exists());
    assert!(!r.mirror.join("scratch").exists());
    assert_same_tree(&c.primary.backing, &r.mirror, &skip_scratch);
    // Carried by records: no fall back to a full snapshot of the volume.
    let snapshots = r
        .daemon
        .log_text()
        .matches("receiving a full snapshot")
        .count();
    assert_eq!(snapshots, 1, "only the initial snapshot:\n{}", c.logs());
}

#[test]
fn a_hard_link_with_an_included_name_is_replicated_through_any_name() {
    let mut c = Cluster::new(1, &["--exclude", "*.swap"]);
    c.start_all();
    let m = c.primary.mnt.clone();
    std::fs::write(m.join("disk.img"), b"first").unwrap();
    std::fs::hard_link(m.join("disk.img"), m.join("disk.swap")).unwrap();
    c.wait_converged();
    // Remount: the new mount looks the file up by its excluded name first.
    c.primary.daemon.stop();
    c.primary.daemon.start();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.join("disk.swap"))
            .unwrap();
        f.write_all_at(b"SWAP", 0).unwrap();
        let g = std::fs::OpenOptions::new()
            .write(true)
            .open(m.join("disk.img"))
            .unwrap();
        g.write_all_at(b"IMG", 10).unwrap();
        g.sync_all().unwrap();
    }
    c.wait_converged();
    let r = &c.replicas[0];
    let want = std::fs::read(c.primary.backing.join("disk.img")).unwrap();
    assert_eq!(&want[..5], b"SWAPt");
    assert_eq!(std::fs::read(r.mirror.join("disk.img")).unwrap(), want);
    assert!(!r.mirror.join("disk.swap").exists());
}

#[test]
fn sighup_sends_newly_included_files_and_removes_newly_excluded_ones() {
    let base = tempfile::tempdir().unwrap();
    let config = base.path().join("replicafs.toml");
    std::fs::write(&config, "exclude = [\"*.tmp\"]\n").unwrap();
    let mut c = Cluster::new(1, &["--config", config.to_str().unwrap()]);
    c.start_all();
    let m = c.primary.mnt.clone();
    std::fs::create_dir(m.join("dir.tmp")).unwrap();
    std::fs::write(m.join("dir.tmp/inner"), b"inside an excluded dir").unwrap();
    std::fs::write(m.join("keep.tmp"), b"excluded at first").unwrap();
    std::fs::write(m.join("x.swap"), b"included at first").unwrap();
    c.wait_converged();
    let r = &c.replicas[0];
    assert!(!r.mirror.join("keep.tmp").exists());
    assert!(r.mirror.join("x.swap").exists());

    std::fs::write(&config, "exclude = [\"*.swap\"]\n").unwrap();
    let pid = c.primary.daemon.pid().expect("primary running");
    // SAFETY: kill(2) on the primary daemon this test started.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    let start = std::time::Instant::now();
    while !c
        .primary
        .daemon
        .log_text()
        .contains("exclusion rules reloaded")
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "{}",
            c.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.join("keep.tmp"))
            .unwrap();
        f.write_all_at(b"EXCLUDED", 0).unwrap();
        f.sync_all().unwrap();
    }
    c.wait_converged();
    assert_eq!(
        std::fs::read(r.mirror.join("keep.tmp")).unwrap(),
        b"EXCLUDED at first"
    );
    assert_eq!(
        std::fs::read(r.mirror.join("dir.tmp/inner")).unwrap(),
        b"inside an excluded dir"
    );
    assert!(!r.mirror.join("x.swap").exists());
    assert_same_tree(&c.primary.backing, &r.mirror, &|rel: &str| {
        rel.ends_with(".swap")
    });
    // Carried by records: no fall back to a full snapshot of the volume.
    let snapshots = r
        .daemon
        .log_text()
        .matches("receiving a full snapshot")
        .count();
    assert_eq!(snapshots, 1, "only the initial snapshot:\n{}", c.logs());
}
