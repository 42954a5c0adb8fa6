//! Exclusion rules on a mount daemon: reloading them on SIGHUP, and a hard
//! link with an included name journaled whichever name it is reached by.

mod proc_common;

use std::os::unix::fs::FileExt;

use proc_common::*;

fn write_at(p: &std::path::Path, data: &[u8], off: u64) {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .unwrap();
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn sighup_reloads_the_exclusion_rules_and_keeps_them_on_a_bad_config() {
    let d = Dirs::new();
    std::fs::write(
        &d.config,
        format!(
            "{}{}",
            "exclude = [\"*.swap\"]\n",
            proc_common::PAYLOAD_IN_JOURNAL
        ),
    )
    .unwrap();
    let mut m = MountProc::start(&d, &[]);
    write_at(&d.mnt.join("before.swap"), b"1", 0);
    write_at(&d.mnt.join("before.tmp"), b"1", 0);

    std::fs::write(
        &d.config,
        format!(
            "{}{}",
            "exclude = [\"*.tmp\"]\n",
            proc_common::PAYLOAD_IN_JOURNAL
        ),
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    m.wait_log("exclusion rules reloaded", 1);
    write_at(&d.mnt.join("after.swap"), b"2", 0);
    write_at(&d.mnt.join("after.tmp"), b"2", 0);
    // A file that existed before the reload: the new rules apply to it too.
    write_at(&d.mnt.join("before.tmp"), b"3", 1);

    // A bad config: a clear error, the rules in force stay.
    std::fs::write(
        &d.config,
        format!(
            "{}{}",
            "exclude = [\"a[\"]\n",
            proc_common::PAYLOAD_IN_JOURNAL
        ),
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    m.wait_log("not reloaded", 1);
    assert!(m.log_text().contains("ERROR"), "{}", m.log_text());
    write_at(&d.mnt.join("late.swap"), b"4", 0);
    write_at(&d.mnt.join("late.tmp"), b"4", 0);
    m.stop();

    let writes = journaled(&d.state(), "write");
    let has = |p: &str| writes.iter().filter(|w| *w == p).count();
    assert_eq!(has("after.swap"), 1, "{writes:?}");
    assert_eq!(has("after.tmp"), 0, "{writes:?}");
    assert_eq!(has("late.swap"), 1, "{writes:?}");
    assert_eq!(has("late.tmp"), 0, "{writes:?}");
    // What a replica holds: the reload sent before.swap whole and removed
    // before.tmp; nothing under the new rules' exclusions.
    let target = d.backing.parent().unwrap().join("replayed");
    std::fs::create_dir_all(&target).unwrap();
    journal_cmd(
        &["replay", "--target", target.to_str().unwrap()],
        &d.state(),
    );
    let mut names: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["after.swap", "before.swap", "late.swap"]);
    for n in &names {
        assert_eq!(
            std::fs::read(target.join(n)).unwrap(),
            std::fs::read(d.backing.join(n)).unwrap(),
            "{n}"
        );
    }
}

#[test]
fn a_hard_link_looked_up_by_its_excluded_name_first_is_journaled() {
    let d = Dirs::new();
    // The journal replay below reproduces the file only from its own bytes.
    std::fs::write(&d.config, proc_common::PAYLOAD_IN_JOURNAL).unwrap();
    let mut m = MountProc::start(&d, &["--exclude", "*.swap"]);
    write_at(&d.mnt.join("disk.img"), b"first", 0);
    std::fs::hard_link(d.mnt.join("disk.img"), d.mnt.join("disk.swap")).unwrap();
    m.stop();

    // A new mount knows neither name; the excluded one is looked up first.
    let mut m = MountProc::start(&d, &["--exclude", "*.swap"]);
    std::fs::metadata(d.mnt.join("disk.swap")).unwrap();
    write_at(&d.mnt.join("disk.swap"), b"SWAP", 0);
    write_at(&d.mnt.join("disk.img"), b"IMG", 10);
    m.stop();

    let dump = journal_cmd(&["dump"], &d.state());
    let writes = journaled(&d.state(), "write");
    assert!(
        !writes.iter().any(|w| w == "disk.swap"),
        "an excluded name was journaled:\n{dump}"
    );
    // The journal replays to what the backing file holds.
    let target = d.backing.parent().unwrap().join("replayed");
    std::fs::create_dir_all(&target).unwrap();
    journal_cmd(
        &["replay", "--target", target.to_str().unwrap()],
        &d.state(),
    );
    let want = std::fs::read(d.backing.join("disk.img")).unwrap();
    assert_eq!(&want[..], b"SWAPt\0\0\0\0\0IMG");
    assert_eq!(
        std::fs::read(target.join("disk.img")).unwrap(),
        want,
        "writes after the remount are missing from the journal:\n{dump}"
    );
    assert!(!target.join("disk.swap").exists());
}
