//! How the journal names files: a renamed file's hot extents in the activity
//! log (the crash-time dirty list), writes through a hard link whose known
//! names are gone, and the O_TRUNC branch of open.

mod common;
mod proc_common;

use std::os::unix::fs::FileExt;

use replicafs::journal::Op;

fn records(m: &common::TestMount) -> Vec<Op> {
    let j = m.volume().recorder().expect("journaling").journal().clone();
    j.sync_through(j.last_seq()).unwrap();
    j.records(1, j.last_seq()).map(|r| r.unwrap().op).collect()
}

#[test]
fn after_a_rename_the_crash_dirty_list_names_the_new_path() {
    use proc_common::*;
    let d = Dirs::new();
    let mut m = MountProc::start(&d, &[]);
    {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(d.mnt.join("a.img"))
            .unwrap();
        f.write_all_at(&[1u8; 65536], 1 << 20).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(d.mnt.join("a.img"), d.mnt.join("b.img")).unwrap();
        // The same extent again, now under the new name, through the same handle.
        f.write_all_at(&[2u8; 4096], 1 << 20).unwrap();
        f.sync_all().unwrap();
    }
    m.kill9();
    let stats = journal_cmd(&["stats", "--json"], &d.state());
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let hot = v["hot_extents"].as_array().unwrap();
    assert!(
        hot.iter().any(|e| e[0] == "b.img"),
        "the extent written after the rename is not hot under the new name: {v}"
    );
    // The next mount's recovery puts it in the dirty list under that name.
    let mut m = MountProc::start(&d, &[]);
    m.stop();
    let stats = journal_cmd(&["stats", "--json"], &d.state());
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let dirty = v["dirty"].as_array().unwrap();
    let named = |p: &str| {
        dirty.iter().any(|e| {
            e["path"]
                .as_array()
                .map(|b| {
                    b.iter()
                        .map(|x| x.as_u64().unwrap() as u8)
                        .collect::<Vec<_>>()
                })
                .as_deref()
                == Some(p.as_bytes())
        })
    };
    assert!(named("b.img"), "the dirty list does not name b.img: {v}");
}

#[test]
fn a_write_through_a_link_whose_known_names_were_removed_is_journaled() {
    let m = common::TestMount::new();
    std::fs::write(m.path("x"), b"original").unwrap();
    // A second name the mount never saw: made in the backing dir directly.
    std::fs::hard_link(m.backing_path("x"), m.backing_path("hidden-link")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("x"))
        .unwrap();
    std::fs::remove_file(m.path("x")).unwrap();
    f.write_all_at(b"CHANGED", 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        std::fs::read(m.backing_path("hidden-link")).unwrap(),
        b"CHANGEDl"
    );
    let ops = records(&m);
    assert!(
        ops.iter()
            .any(|op| matches!(op, Op::Write { path, offset: 0 } | Op::WriteBacked { path, offset: 0, .. } if path == b"hidden-link")),
        "the write is not journaled under the surviving name: {ops:?}"
    );
}

#[test]
fn open_with_o_trunc_is_journaled() {
    use replicafs::volume::Caller;
    let m = common::TestMount::new();
    std::fs::write(m.path("t"), vec![5u8; 10_000]).unwrap();
    let v = m.volume();
    let e = v.lookup(1, std::ffi::OsStr::new("t")).unwrap();
    let opened = v
        .open(e.attr.ino, libc::O_RDWR | libc::O_TRUNC, Caller::ROOT)
        .unwrap();
    v.release(opened.fh);
    v.forget(e.attr.ino, 1);
    assert_eq!(std::fs::metadata(m.backing_path("t")).unwrap().len(), 0);
    let ops = records(&m);
    assert!(
        matches!(ops.last(), Some(Op::Truncate { path, size: 0 }) if path == b"t"),
        "O_TRUNC in open is not journaled: {ops:?}"
    );
}
