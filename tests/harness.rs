//! Tests of the test harness itself: the mount goes away when a test panics or
//! keeps a file open for a while, and the tree comparison sees differences.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::time::Duration;

use common::{TestMount, compare_trees};

#[test]
fn unmounts_when_the_test_panics() {
    let mut mnt = None;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let m = TestMount::new();
        mnt = Some(m.mnt.clone());
        fs::write(m.path("f"), b"x").unwrap();
        let _open = fs::File::open(m.path("f")).unwrap();
        panic!("deliberate");
    }));
    assert!(r.is_err());
    let mnt = mnt.unwrap();
    assert!(!common::is_listed_mount(&mnt), "mount left after a panic");
    assert!(!mnt.exists(), "temp dir left behind");
}

#[test]
fn unmounts_when_a_file_is_still_open_for_a_while() {
    let m = TestMount::new();
    let mnt = m.mnt.clone();
    fs::write(m.path("f"), b"x").unwrap();
    let f = fs::File::open(m.path("f")).unwrap();
    let holder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(f);
    });
    // The first unmount meets a busy mount; the harness retries.
    drop(m);
    holder.join().unwrap();
    assert!(!common::is_listed_mount(&mnt), "mount left behind");
}

#[test]
fn explicit_unmount_leaves_backing_readable() {
    let mut m = TestMount::new();
    fs::write(m.path("f"), b"kept").unwrap();
    m.unmount();
    assert!(!m.is_mounted());
    assert_eq!(fs::read(m.backing_path("f")).unwrap(), b"kept");
}

#[test]
fn compare_trees_sees_differences() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for root in [a.path(), b.path()] {
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/f"), b"same").unwrap();
        fs::write(root.join("g"), b"content").unwrap();
        // Explicit modes: the trees must not depend on the process umask.
        for f in ["d/f", "g"] {
            fs::set_permissions(root.join(f), fs::Permissions::from_mode(0o644)).unwrap();
        }
        symlink("d/f", root.join("s")).unwrap();
        fs::create_dir(root.join(".replicafs")).unwrap();
    }
    // The state dir at the top is ignored.
    fs::write(a.path().join(".replicafs/journal"), b"only here").unwrap();
    assert!(compare_trees(a.path(), b.path()).is_empty());

    fs::write(b.path().join("g"), b"contenT").unwrap();
    fs::set_permissions(b.path().join("d/f"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(b.path().join("s")).unwrap();
    symlink("elsewhere", b.path().join("s")).unwrap();
    fs::hard_link(b.path().join("d/f"), b.path().join("d/h")).unwrap();
    fs::write(a.path().join("d/h"), b"same").unwrap();
    fs::write(a.path().join("only-a"), b"").unwrap();
    let diffs = compare_trees(a.path(), b.path()).join("\n");
    for needle in [
        "g: content differs at byte 6",
        "d/f: mode",
        "d/f: nlink",
        "s: symlink",
        "only-a: only in",
    ] {
        assert!(diffs.contains(needle), "missing {needle:?} in:\n{diffs}");
    }
    // A file and a directory of the same name.
    fs::remove_file(b.path().join("g")).unwrap();
    fs::create_dir(b.path().join("g")).unwrap();
    assert!(
        compare_trees(a.path(), b.path())
            .iter()
            .any(|d| d.contains("g: type file vs dir"))
    );
}

/// The umask of this thread, which must have its own (see below).
fn thread_umask() -> libc::mode_t {
    // SAFETY: umask has no preconditions; the old value is put back at once,
    // and the umask is private to this thread.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    }
}

/// The cause of a flaky `compare_trees_sees_differences`: mounting used to set
/// the umask of the whole process to 0, under the feet of tests creating files.
#[test]
fn mounting_leaves_the_process_umask_alone() {
    // A umask of this thread's own (threads it starts share it), so that
    // other tests of this binary neither disturb nor see what happens here.
    // SAFETY: unshare(CLONE_FS) only detaches this thread's fs attributes.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_FS) }, 0);
    // SAFETY: as above.
    unsafe { libc::umask(0o027) };
    let mut m = TestMount::new();
    fs::write(m.path("f"), b"x").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    assert_eq!(thread_umask(), 0o027, "mounting changed the umask");
    // The caller's umask applied once, by the kernel.
    let mode = |p: &str| {
        fs::metadata(m.backing_path(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("f"), 0o640);
    assert_eq!(mode("d"), 0o750);
    m.unmount();
    assert_eq!(thread_umask(), 0o027, "unmounting changed the umask");
}
