//! The state dir on both sides is private (dirs 0700, files 0600, the status
//! socket owner-only), while files made through the mount keep the caller's
//! modes; a state dir nested in the backing dir cannot be moved or removed
//! through the mount, and the daemon still stops on SIGTERM.

mod repl_common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use repl_common::*;

/// Every entry under `dir` (itself included) whose mode is not private, and
/// how many files were checked.
fn loose_modes(dir: &Path) -> (Vec<String>, usize) {
    let mut bad = Vec::new();
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        let mode = m.permissions().mode() & 0o7777;
        let ft = m.file_type();
        if ft.is_dir() {
            if mode != 0o700 {
                bad.push(format!("{} dir {mode:o}", p.display()));
            }
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if !ft.is_symlink() {
            files += 1;
            if mode != 0o600 {
                bad.push(format!("{} file {mode:o}", p.display()));
            }
        }
    }
    (bad, files)
}

/// What an older version left: a world-writable state dir and readable keys.
fn loosen(state: &Path) {
    fs::set_permissions(state, fs::Permissions::from_mode(0o777)).unwrap();
    for e in fs::read_dir(state).unwrap() {
        fs::set_permissions(e.unwrap().path(), fs::Permissions::from_mode(0o644)).unwrap();
    }
    fs::write(state.join("left-over"), b"x").unwrap();
    fs::set_permissions(state.join("left-over"), fs::Permissions::from_mode(0o666)).unwrap();
}

fn socket_mode(state: &Path) -> u32 {
    let m = fs::symlink_metadata(state.join("status.sock")).unwrap();
    assert!(m.file_type().is_socket());
    m.permissions().mode() & 0o7777
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn state_dirs_are_private_on_both_sides_and_caller_modes_are_kept() {
    let mut c = Cluster::new(1, &[]);
    let pstate = c.primary.daemon.state.clone();
    let rstate = c.replicas[0].daemon.state.clone();
    loosen(&pstate);
    loosen(&rstate);
    c.start_all();
    assert_eq!(socket_mode(&pstate), 0o600, "primary status.sock");
    assert_eq!(socket_mode(&rstate), 0o600, "replica status.sock");

    // Made through the mount: the caller's modes, not the daemon's umask.
    let mnt = c.primary.mnt.clone();
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(mnt.join("disk.img"))
        .unwrap();
    fs::write(mnt.join("disk.img"), vec![7u8; 1 << 20]).unwrap();
    fs::DirBuilder::new()
        .mode(0o750)
        .create(mnt.join("vms"))
        .unwrap();
    fs::write(mnt.join("vms/conf"), b"cpu=2").unwrap();
    c.wait_converged();
    let mirror = c.replicas[0].mirror.clone();
    for root in [&c.primary.backing, &mirror] {
        assert_eq!(mode_of(&root.join("disk.img")), 0o640, "{}", root.display());
        assert_eq!(mode_of(&root.join("vms")), 0o750, "{}", root.display());
    }
    let (bad, _) = loose_modes(&pstate);
    assert!(bad.is_empty(), "primary state while running: {bad:?}");

    c.primary.daemon.stop();
    c.replicas[0].daemon.stop();
    for (name, state) in [("primary", &pstate), ("replica", &rstate)] {
        let (bad, files) = loose_modes(state);
        assert!(bad.is_empty(), "{name} state dir after a run: {bad:?}");
        // Keys, journal or receive log, index: not an empty walk.
        assert!(
            files >= 4,
            "{name}: only {files} files in {}",
            state.display()
        );
    }
    assert!(pstate.join("journal").is_dir());
}

fn errno_of(r: i32) -> i32 {
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn rename2(from: &Path, to: &Path, flags: u32) -> i32 {
    let (a, b) = (cstr(from), cstr(to));
    // SAFETY: valid C strings.
    errno_of(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

#[test]
fn a_nested_state_dir_cannot_be_moved_or_removed_and_sigterm_stops() {
    let base = tempfile::Builder::new()
        .prefix("replicafs-test")
        .tempdir_in("/tmp")
        .unwrap();
    let backing = base.path().join("backing");
    let mnt = base.path().join("mnt");
    fs::create_dir_all(&backing).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    let state: PathBuf = backing.join("meta/state");
    let mut d = Daemon::new(
        "primary",
        vec![
            "mount".into(),
            backing.display().to_string(),
            mnt.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
        ],
        base.path().join("p.log"),
        state.clone(),
        Some(mnt.clone()),
    );
    d.start();
    fs::create_dir(mnt.join("other")).unwrap();
    fs::write(mnt.join("meta/notes"), b"x").unwrap();

    let ebusy = |what: &str, errno: i32| {
        assert_eq!(
            errno,
            libc::EBUSY,
            "{what}: got errno {errno}, want EBUSY; log:\n{}",
            d.log_text()
        );
    };
    ebusy(
        "mv meta meta2",
        rename2(&mnt.join("meta"), &mnt.join("meta2"), 0),
    );
    ebusy(
        "mv meta other/meta",
        rename2(&mnt.join("meta"), &mnt.join("other/meta"), 0),
    );
    ebusy(
        "exchange other and meta",
        rename2(&mnt.join("other"), &mnt.join("meta"), libc::RENAME_EXCHANGE),
    );
    let c = cstr(&mnt.join("meta"));
    // SAFETY: a valid C string.
    ebusy("rmdir meta", errno_of(unsafe { libc::rmdir(c.as_ptr()) }));
    assert!(state.join("journal").is_dir(), "the state dir moved");
    // Everything else in there is an ordinary directory.
    fs::rename(mnt.join("meta/notes"), mnt.join("other/notes")).unwrap();
    fs::rename(mnt.join("other"), mnt.join("other2")).unwrap();
    assert!(backing.join("other2/notes").is_file());

    // SIGTERM ends the daemon cleanly (a deadline against a hang).
    let pid = d.pid().unwrap() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = Instant::now();
    while d.running() {
        assert!(
            start.elapsed() < DEADLINE,
            "no exit after SIGTERM; log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        state.join("journal/CLEAN").exists(),
        "not closed cleanly; log:\n{}",
        d.log_text()
    );
    assert!(!is_mounted(&mnt));
}

/// Every path under `root` whose name is `name`.
fn find_named(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            if e.file_name() == name {
                out.push(e.path());
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// Moved behind the daemon's back (in the backing dir, not through the
/// mount), the state dir is still not copied to a replica: snapshots skip it
/// by identity, not by the path it had at start.
#[test]
fn a_snapshot_skips_the_state_dir_wherever_it_was_moved() {
    let base = tempfile::Builder::new()
        .prefix("replicafs-test")
        .tempdir_in("/tmp")
        .unwrap();
    let b = base.path();
    let backing = b.join("backing");
    let mnt = b.join("mnt");
    let mirror = b.join("mirror");
    let rstate = b.join("r-state");
    for d in [&backing, &mnt, &mirror, &rstate] {
        fs::create_dir_all(d).unwrap();
    }
    let pstate = backing.join("meta/state");
    fs::create_dir_all(&pstate).unwrap();
    let pfp = keygen(&pstate);
    let rfp = keygen(&rstate);
    let port = free_udp_port();
    let mut primary = Daemon::new(
        "primary",
        vec![
            "mount".into(),
            backing.display().to_string(),
            mnt.display().to_string(),
            "--state-dir".into(),
            pstate.display().to_string(),
            "--peer".into(),
            format!("127.0.0.1:{port}={rfp}"),
        ],
        b.join("p.log"),
        pstate.clone(),
        Some(mnt.clone()),
    );
    let mut replica = Daemon::new(
        "replica",
        vec![
            "replica".into(),
            "--mirror".into(),
            mirror.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--state-dir".into(),
            rstate.display().to_string(),
            "--trust".into(),
            pfp,
        ],
        b.join("r.log"),
        rstate.clone(),
        None,
    );
    primary.start();
    fs::write(mnt.join("meta/disk.img"), vec![4u8; 100_000]).unwrap();
    sync_path(&mnt);
    // Behind the daemon's back: the journal and the keys are now elsewhere.
    fs::rename(backing.join("meta"), backing.join("meta2")).unwrap();
    replica.start();
    let start = Instant::now();
    while fs::read(mirror.join("meta2/disk.img")).ok() != Some(vec![4u8; 100_000]) {
        assert!(
            start.elapsed() < DEADLINE,
            "the snapshot did not arrive; primary log:\n{}\nreplica log:\n{}",
            primary.log_text(),
            replica.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for name in ["node-key.der", "journal", "state"] {
        let found = find_named(&mirror, name);
        assert!(found.is_empty(), "copied to the mirror: {found:?}");
    }
}
