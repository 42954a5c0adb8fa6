//! One test (or a few) per filesystem operation, through a real mount: results,
//! errnos, and what lands in the backing dir.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{
    DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink,
};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{AlignedBuf, Rng, TestMount, check, cpath, errno_of, lstat, open};

/// The errno of an operation that must fail.
#[track_caller]
fn err<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => errno_of(&e),
    }
}

/// The errno of a libc-style result that must fail.
#[track_caller]
fn lerr<T: std::fmt::Debug>(r: Result<T, i32>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e,
    }
}

fn rename2(from: &Path, to: &Path, flags: u32) -> Result<i64, i32> {
    // SAFETY: valid C strings.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cpath(from).as_ptr(),
            libc::AT_FDCWD,
            cpath(to).as_ptr(),
            flags,
        )
    } as i64)
}

fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> Result<i64, i32> {
    // SAFETY: f is open.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) } as i64)
}

fn utimens(p: &Path, times: [libc::timespec; 2], flags: i32) -> Result<i64, i32> {
    // SAFETY: valid C string and array of two timespecs.
    check(
        unsafe { libc::utimensat(libc::AT_FDCWD, cpath(p).as_ptr(), times.as_ptr(), flags) } as i64,
    )
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

fn mknod(p: &Path, mode: u32, dev: u64) -> Result<i64, i32> {
    // SAFETY: valid C string.
    check(unsafe { libc::mknod(cpath(p).as_ptr(), mode, dev) } as i64)
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

fn read_at(f: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f
            .read_at(&mut buf[got..], offset + got as u64)
            .expect("pread");
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    buf
}

// ----- lookup / getattr ----------------------------------------------------------

#[test]
fn lookup_finds_files_and_reports_errors() {
    let m = TestMount::new();
    // Made in the backing dir directly: the mount shows what is there.
    fs::write(m.backing_path("pre"), b"existing").unwrap();
    fs::create_dir(m.backing_path("pre-dir")).unwrap();
    assert_eq!(fs::read(m.path("pre")).unwrap(), b"existing");
    assert!(m.path("pre-dir").is_dir());

    assert_eq!(err(fs::metadata(m.path("missing"))), libc::ENOENT);
    assert_eq!(err(fs::metadata(m.path("pre/x"))), libc::ENOTDIR);
    assert_eq!(err(fs::metadata(m.path("missing/x"))), libc::ENOENT);
    let long = "n".repeat(256);
    assert_eq!(err(fs::metadata(m.path(&long))), libc::ENAMETOOLONG);
    let max = "m".repeat(255);
    fs::write(m.path(&max), b"").unwrap();
    assert!(m.path(&max).exists());
    assert!(m.backing_path(&max).exists());
}

#[test]
fn getattr_matches_backing() {
    let m = TestMount::new();
    fs::write(m.path("f"), vec![1u8; 12345]).unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::create_dir(m.path("d/sub")).unwrap();
    for name in ["f", "d", "d/sub"] {
        let a = fs::symlink_metadata(m.path(name)).unwrap();
        let b = fs::symlink_metadata(m.backing_path(name)).unwrap();
        assert_eq!(a.mode(), b.mode(), "{name} mode");
        assert_eq!(a.nlink(), b.nlink(), "{name} nlink");
        assert_eq!(a.uid(), b.uid(), "{name} uid");
        assert_eq!(a.gid(), b.gid(), "{name} gid");
        assert_eq!(a.len(), b.len(), "{name} size");
        // With the writeback cache the kernel keeps a written file's mtime
        // itself (it can differ from the backing file's by the delay of the
        // write-back), so only directories are compared here; setattr_times
        // checks explicitly set times on both sides.
        if a.is_dir() {
            assert_eq!(
                (a.mtime(), a.mtime_nsec()),
                (b.mtime(), b.mtime_nsec()),
                "{name} mtime"
            );
        }
    }
    // FUSE inode numbers hold while the kernel remembers the inode; pin both
    // (a parallel test may drop caches).
    let _pins = (
        File::open(m.path("f")).unwrap(),
        File::open(m.path("d")).unwrap(),
    );
    let f = fs::metadata(m.path("f")).unwrap();
    assert_eq!(f.len(), 12345);
    assert!(f.is_file());
    assert_eq!(fs::metadata(m.path("d")).unwrap().nlink(), 3);
    // The inode number is stable while the kernel knows the file.
    assert_eq!(fs::metadata(m.path("f")).unwrap().ino(), f.ino());
    assert_ne!(
        fs::metadata(m.path("d")).unwrap().ino(),
        f.ino(),
        "distinct files share an inode number"
    );
    // getattr through an open handle.
    let file = File::open(m.path("f")).unwrap();
    assert_eq!(file.metadata().unwrap().len(), 12345);
}

// ----- setattr -------------------------------------------------------------------

#[test]
fn setattr_size_grows_and_shrinks() {
    let m = TestMount::new();
    let p = m.path("f");
    fs::write(&p, vec![0xaau8; 10_000]).unwrap();
    // Through a handle (ftruncate).
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.set_len(3000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 3000);
    f.set_len(20_000).unwrap();
    let data = read_at(&f, 0, 20_000);
    assert_eq!(data.len(), 20_000);
    assert!(data[..3000].iter().all(|&b| b == 0xaa));
    assert!(data[3000..].iter().all(|&b| b == 0), "grown part not zero");
    drop(f);
    // By path (truncate(2), no handle).
    // SAFETY: valid C string.
    check(unsafe { libc::truncate(cpath(&p).as_ptr(), 100) } as i64).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 100);
    assert_eq!(fs::metadata(m.backing_path("f")).unwrap().len(), 100);
    assert_eq!(fs::read(m.backing_path("f")).unwrap(), vec![0xaau8; 100]);
    // Errors.
    fs::create_dir(m.path("d")).unwrap();
    assert_eq!(
        lerr(check(
            unsafe { libc::truncate(cpath(&m.path("d")).as_ptr(), 0) } as i64
        )),
        libc::EISDIR
    );
    assert_eq!(
        lerr(check(
            unsafe { libc::truncate(cpath(&m.path("nope")).as_ptr(), 0) } as i64
        )),
        libc::ENOENT
    );
    // Read-only handle: ftruncate refuses (EINVAL for a handle not open for writing).
    let ro = File::open(&p).unwrap();
    assert_eq!(err(ro.set_len(5)), libc::EINVAL);
}

#[test]
fn setattr_mode() {
    let m = TestMount::new();
    let p = m.path("f");
    fs::write(&p, b"x").unwrap();
    for mode in [0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000] {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, mode, "mount");
        assert_eq!(
            fs::metadata(m.backing_path("f")).unwrap().mode() & 0o7777,
            mode,
            "backing"
        );
    }
    // fchmod through a handle.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_permissions(fs::Permissions::from_mode(0o640))
        .unwrap();
    assert_eq!(
        fs::metadata(m.backing_path("f")).unwrap().mode() & 0o7777,
        0o640
    );
    fs::create_dir(m.path("d")).unwrap();
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o3711)).unwrap();
    assert_eq!(fs::metadata(m.path("d")).unwrap().mode() & 0o7777, 0o3711);
    assert_eq!(
        err(fs::set_permissions(
            m.path("nope"),
            fs::Permissions::from_mode(0o600)
        )),
        libc::ENOENT
    );
}

#[test]
fn setattr_owner() {
    let m = TestMount::new();
    let p = m.path("f");
    fs::write(&p, b"x").unwrap();
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let a = fs::metadata(&p).unwrap();
    assert_eq!((a.uid(), a.gid()), (1234, 5678));
    let b = fs::metadata(m.backing_path("f")).unwrap();
    assert_eq!((b.uid(), b.gid()), (1234, 5678));
    // Only the group.
    std::os::unix::fs::chown(&p, None, Some(42)).unwrap();
    let a = fs::metadata(&p).unwrap();
    assert_eq!((a.uid(), a.gid()), (1234, 42));
    // A symlink's own owner (lchown), not its target's.
    symlink("f", m.path("s")).unwrap();
    std::os::unix::fs::lchown(m.path("s"), Some(7), Some(8)).unwrap();
    let s = fs::symlink_metadata(m.backing_path("s")).unwrap();
    assert_eq!((s.uid(), s.gid()), (7, 8));
    let t = fs::metadata(m.backing_path("f")).unwrap();
    assert_eq!((t.uid(), t.gid()), (1234, 42));
    // chown of a set-uid file clears set-uid, as on a local filesystem.
    fs::write(m.path("suid"), b"x").unwrap();
    fs::set_permissions(m.path("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::chown(m.path("suid"), Some(99), None).unwrap();
    assert_eq!(
        fs::metadata(m.backing_path("suid")).unwrap().mode() & 0o7777,
        0o755
    );
}

#[test]
fn setattr_times() {
    let m = TestMount::new();
    let p = m.path("f");
    fs::write(&p, b"x").unwrap();
    utimens(&p, [ts(1_000_000, 111), ts(2_000_000, 222)], 0).unwrap();
    for q in [&p, &m.backing_path("f")] {
        let md = fs::metadata(q).unwrap();
        assert_eq!((md.atime(), md.atime_nsec()), (1_000_000, 111));
        assert_eq!((md.mtime(), md.mtime_nsec()), (2_000_000, 222));
    }
    // UTIME_OMIT leaves atime alone.
    utimens(&p, [ts(0, libc::UTIME_OMIT), ts(3_000_000, 0)], 0).unwrap();
    let md = fs::metadata(m.backing_path("f")).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000, 111));
    assert_eq!(md.mtime(), 3_000_000);
    // UTIME_NOW sets the current time; leaves mtime alone with OMIT.
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    utimens(&p, [ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_OMIT)], 0).unwrap();
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for q in [&p, &m.backing_path("f")] {
        let md = fs::metadata(q).unwrap();
        assert!(
            md.atime() >= before - 2 && md.atime() <= after + 2,
            "atime {} not now ({before}..{after})",
            md.atime()
        );
        assert_eq!(md.mtime(), 3_000_000);
    }
    // Both NOW.
    utimens(&p, [ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_NOW)], 0).unwrap();
    let md = fs::metadata(m.backing_path("f")).unwrap();
    assert!(md.mtime() >= before - 2);
    // A symlink's own times with AT_SYMLINK_NOFOLLOW; the target keeps its own.
    symlink("f", m.path("s")).unwrap();
    let target_before = fs::metadata(m.backing_path("f")).unwrap().mtime();
    utimens(
        &m.path("s"),
        [ts(500, 5), ts(600, 6)],
        libc::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    let s = fs::symlink_metadata(m.backing_path("s")).unwrap();
    assert_eq!((s.atime(), s.mtime(), s.mtime_nsec()), (500, 600, 6));
    assert_eq!(
        fs::metadata(m.backing_path("f")).unwrap().mtime(),
        target_before
    );
    // Following the link sets the target's.
    utimens(&m.path("s"), [ts(700, 0), ts(800, 0)], 0).unwrap();
    assert_eq!(fs::metadata(m.backing_path("f")).unwrap().mtime(), 800);
    assert_eq!(
        lerr(utimens(&m.path("nope"), [ts(1, 0), ts(1, 0)], 0)),
        libc::ENOENT
    );
    // Times through a handle (futimens), after a write through it.
    let mut f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all(b"more").unwrap();
    let times = [ts(9_000, 9), ts(10_000, 10)];
    // SAFETY: f is open, times is two timespecs.
    check(unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) } as i64).unwrap();
    drop(f);
    let md = fs::metadata(m.backing_path("f")).unwrap();
    assert_eq!(
        (md.mtime(), md.mtime_nsec()),
        (10_000, 10),
        "mtime after close"
    );
}

// ----- create / mknod / mkdir ----------------------------------------------------

#[test]
fn create_files() {
    let m = TestMount::new();
    let p = m.path("new");
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&p)
        .unwrap();
    drop(f);
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o640);
    assert_eq!(
        fs::metadata(m.backing_path("new")).unwrap().mode() & 0o7777,
        0o640
    );
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
    // O_EXCL on an existing name.
    assert_eq!(
        err(OpenOptions::new().write(true).create_new(true).open(&p)),
        libc::EEXIST
    );
    // O_CREAT without O_EXCL opens the existing file.
    fs::write(&p, b"abc").unwrap();
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(&p)
        .unwrap()
        .write_all(b"d")
        .unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"abcd");
    // Missing parent, parent that is a file, a directory of that name.
    assert_eq!(err(File::create(m.path("nodir/f"))), libc::ENOENT);
    assert_eq!(err(File::create(m.path("new/f"))), libc::ENOTDIR);
    fs::create_dir(m.path("d")).unwrap();
    assert_eq!(err(File::create(m.path("d"))), libc::EISDIR);
    // Created with set-gid and odd modes.
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o2711)
        .open(m.path("odd"))
        .unwrap();
    drop(f);
    assert_eq!(
        fs::metadata(m.backing_path("odd")).unwrap().mode() & 0o7777,
        0o2711
    );
    // The handle from create reads and writes.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(m.path("rw"))
        .unwrap();
    f.write_all(b"hello").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello");
}

/// FUSE_CREATE without O_EXCL for a name that exists: the kernel sends it when
/// another process creates the name between the kernel's lookup and its
/// create. Called on the volume directly, since the race is hard to hit
/// through the mount. The caller must not become the owner of someone else's
/// file, nor open it past its permission bits.
#[test]
fn create_of_existing_name_keeps_owner_and_permissions() {
    use replicafs::volume::Caller;
    use replicafs::volume::inode::ROOT_INO;
    use std::ffi::OsStr;
    let m = TestMount::new();
    let nobody = Caller {
        uid: 65534,
        gid: 65534,
    };
    fs::write(m.path("shared"), b"root's data").unwrap();
    fs::set_permissions(m.path("shared"), fs::Permissions::from_mode(0o666)).unwrap();
    fs::write(m.path("private"), b"secret").unwrap();
    fs::set_permissions(m.path("private"), fs::Permissions::from_mode(0o600)).unwrap();
    let v = m.volume();

    let (entry, opened) = v
        .create(
            ROOT_INO,
            OsStr::new("shared"),
            0o644,
            libc::O_WRONLY,
            nobody,
        )
        .expect("open an existing writable file through create");
    v.write(opened.fh, 0, b"ROOT", false).unwrap();
    v.release(opened.fh);
    v.forget(entry.attr.ino, 1);
    let md = fs::metadata(m.backing_path("shared")).unwrap();
    assert_eq!((md.uid(), md.gid()), (0, 0), "create took over root's file");
    assert_eq!(md.mode() & 0o7777, 0o666);
    assert_eq!(fs::read(m.backing_path("shared")).unwrap(), b"ROOT's data");

    for flags in [libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR | libc::O_TRUNC] {
        let r = v.create(ROOT_INO, OsStr::new("private"), 0o644, flags, nobody);
        assert_eq!(
            r.map(|_| ()).map_err(|e| e.errno()),
            Err(libc::EACCES),
            "flags {flags:#o}"
        );
    }
    let md = fs::metadata(m.backing_path("private")).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o7777), (0, 0o600));
    assert_eq!(fs::read(m.backing_path("private")).unwrap(), b"secret");
    // With O_EXCL it is EEXIST, for anyone.
    let r = v.create(
        ROOT_INO,
        OsStr::new("shared"),
        0o644,
        libc::O_WRONLY | libc::O_EXCL,
        Caller::ROOT,
    );
    assert_eq!(r.map(|_| ()).map_err(|e| e.errno()), Err(libc::EEXIST));
}

#[test]
fn create_in_setgid_directory_inherits_group() {
    let m = TestMount::new();
    fs::create_dir(m.path("g")).unwrap();
    std::os::unix::fs::chown(m.path("g"), None, Some(4321)).unwrap();
    fs::set_permissions(m.path("g"), fs::Permissions::from_mode(0o2775)).unwrap();
    fs::write(m.path("g/f"), b"x").unwrap();
    fs::create_dir(m.path("g/sub")).unwrap();
    assert_eq!(fs::metadata(m.backing_path("g/f")).unwrap().gid(), 4321);
    let sub = fs::metadata(m.backing_path("g/sub")).unwrap();
    assert_eq!(sub.gid(), 4321);
    assert_ne!(
        sub.mode() & libc::S_ISGID,
        0,
        "set-gid dir: subdir keeps S_ISGID"
    );
}

#[test]
fn mknod_fifo_socket_and_devices() {
    let m = TestMount::new();
    // FIFO.
    let fifo = m.path("fifo");
    // SAFETY: valid C string.
    check(unsafe { libc::mkfifo(cpath(&fifo).as_ptr(), 0o640) } as i64).unwrap();
    let md = fs::symlink_metadata(&fifo).unwrap();
    assert!(md.file_type().is_fifo());
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert!(
        fs::symlink_metadata(m.backing_path("fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    // The pipe works (served by the kernel, not by us).
    let reader = open(&fifo, libc::O_RDONLY | libc::O_NONBLOCK, 0).unwrap();
    let mut writer = OpenOptions::new().write(true).open(&fifo).unwrap();
    writer.write_all(b"through the fifo").unwrap();
    let mut r = File::from(reader);
    let mut buf = [0u8; 64];
    let n = r.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"through the fifo");
    drop((r, writer));

    // Unix socket by mknod and by bind.
    mknod(&m.path("sock"), libc::S_IFSOCK | 0o600, 0).unwrap();
    assert!(
        fs::symlink_metadata(m.path("sock"))
            .unwrap()
            .file_type()
            .is_socket()
    );
    assert!(
        fs::symlink_metadata(m.backing_path("sock"))
            .unwrap()
            .file_type()
            .is_socket()
    );
    let listener = std::os::unix::net::UnixListener::bind(m.path("bound")).unwrap();
    assert!(
        fs::symlink_metadata(m.backing_path("bound"))
            .unwrap()
            .file_type()
            .is_socket()
    );
    let mut client = std::os::unix::net::UnixStream::connect(m.path("bound")).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    drop((client, server, listener));

    // Character and block devices (as root), small and large numbers.
    for (name, kind, major, minor) in [
        ("null", libc::S_IFCHR, 1, 3),
        ("big", libc::S_IFCHR, 300, 70_000),
        ("blk", libc::S_IFBLK, 7, 0),
    ] {
        let dev = libc::makedev(major, minor);
        mknod(&m.path(name), kind | 0o600, dev).unwrap();
        for p in [m.path(name), m.backing_path(name)] {
            let md = fs::symlink_metadata(&p).unwrap();
            assert_eq!(md.mode() & libc::S_IFMT, kind, "{}", p.display());
            assert_eq!(md.rdev(), dev, "{} rdev", p.display());
        }
    }
    // The mount is nodev: device nodes in it do not open.
    assert_eq!(err(File::open(m.path("null"))), libc::EACCES);
    // Errors.
    assert_eq!(
        lerr(mknod(&m.path("fifo"), libc::S_IFIFO | 0o600, 0)),
        libc::EEXIST
    );
    assert_eq!(
        lerr(mknod(&m.path("nodir/x"), libc::S_IFIFO | 0o600, 0)),
        libc::ENOENT
    );
}

#[test]
fn mkdir_and_errors() {
    let m = TestMount::new();
    fs::DirBuilder::new()
        .mode(0o750)
        .create(m.path("d"))
        .unwrap();
    assert!(m.path("d").is_dir());
    assert_eq!(fs::metadata(m.path("d")).unwrap().mode() & 0o7777, 0o750);
    assert_eq!(
        fs::metadata(m.backing_path("d")).unwrap().mode() & 0o7777,
        0o750
    );
    let root_links = fs::metadata(&m.mnt).unwrap().nlink();
    fs::create_dir(m.path("d/e")).unwrap();
    fs::create_dir_all(m.path("d/e/f/g/h")).unwrap();
    assert!(m.backing_path("d/e/f/g/h").is_dir());
    assert_eq!(fs::metadata(m.path("d")).unwrap().nlink(), 3);
    fs::create_dir(m.path("x")).unwrap();
    assert_eq!(fs::metadata(&m.mnt).unwrap().nlink(), root_links + 1);
    assert_eq!(err(fs::create_dir(m.path("d"))), libc::EEXIST);
    fs::write(m.path("file"), b"").unwrap();
    assert_eq!(err(fs::create_dir(m.path("file"))), libc::EEXIST);
    assert_eq!(err(fs::create_dir(m.path("file/sub"))), libc::ENOTDIR);
    assert_eq!(err(fs::create_dir(m.path("no/sub"))), libc::ENOENT);
}

// ----- symlink / readlink / link -------------------------------------------------

#[test]
fn symlink_and_readlink() {
    let m = TestMount::new();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/target"), b"pointed at").unwrap();
    symlink("d/target", m.path("rel")).unwrap();
    symlink("/nonexistent/abs", m.path("abs")).unwrap();
    symlink("dangling", m.path("dang")).unwrap();
    let long: String = "x/".repeat(1000) + "end";
    symlink(&long, m.path("long")).unwrap();

    assert_eq!(fs::read_link(m.path("rel")).unwrap(), Path::new("d/target"));
    assert_eq!(
        fs::read_link(m.path("abs")).unwrap(),
        Path::new("/nonexistent/abs")
    );
    assert_eq!(fs::read_link(m.path("long")).unwrap(), Path::new(&long));
    assert_eq!(
        fs::read_link(m.backing_path("long")).unwrap(),
        Path::new(&long)
    );
    let md = fs::symlink_metadata(m.path("rel")).unwrap();
    assert!(md.file_type().is_symlink());
    assert_eq!(md.len(), "d/target".len() as u64);
    // Following works, dangling links do not resolve.
    assert_eq!(fs::read(m.path("rel")).unwrap(), b"pointed at");
    assert_eq!(err(fs::read(m.path("dang"))), libc::ENOENT);
    // A link to a directory is walked through.
    symlink("d", m.path("dl")).unwrap();
    assert_eq!(fs::read(m.path("dl/target")).unwrap(), b"pointed at");
    // Errors.
    assert_eq!(err(fs::read_link(m.path("d/target"))), libc::EINVAL);
    assert_eq!(err(fs::read_link(m.path("d"))), libc::EINVAL);
    assert_eq!(err(fs::read_link(m.path("nope"))), libc::ENOENT);
    assert_eq!(err(symlink("x", m.path("rel"))), libc::EEXIST);
    // Loops.
    symlink("loop2", m.path("loop1")).unwrap();
    symlink("loop1", m.path("loop2")).unwrap();
    assert_eq!(err(fs::read(m.path("loop1"))), libc::ELOOP);
}

#[test]
fn hard_links_share_inode() {
    let m = TestMount::new();
    fs::write(m.path("a"), b"shared").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::hard_link(m.path("a"), m.path("d/b")).unwrap();
    // Keep the inode known to the kernel while comparing numbers.
    let pin = File::open(m.path("a")).unwrap();
    let a = fs::metadata(m.path("a")).unwrap();
    let b = fs::metadata(m.path("d/b")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard links have one inode number");
    drop(pin);
    assert_eq!(a.nlink(), 2);
    assert_eq!(b.nlink(), 2);
    let (ba, bb) = (
        fs::metadata(m.backing_path("a")).unwrap(),
        fs::metadata(m.backing_path("d/b")).unwrap(),
    );
    assert_eq!(ba.ino(), bb.ino(), "backing: one inode");
    // Writing through one name shows through the other.
    OpenOptions::new()
        .append(true)
        .open(m.path("d/b"))
        .unwrap()
        .write_all(b"!")
        .unwrap();
    assert_eq!(fs::read(m.path("a")).unwrap(), b"shared!");
    fs::hard_link(m.path("a"), m.path("c")).unwrap();
    assert_eq!(fs::metadata(m.path("d/b")).unwrap().nlink(), 3);
    fs::remove_file(m.path("a")).unwrap();
    assert_eq!(fs::metadata(m.path("c")).unwrap().nlink(), 2);
    assert_eq!(fs::read(m.path("d/b")).unwrap(), b"shared!");
    // Errors.
    assert_eq!(err(fs::hard_link(m.path("d"), m.path("dl"))), libc::EPERM);
    assert_eq!(err(fs::hard_link(m.path("c"), m.path("d/b"))), libc::EEXIST);
    assert_eq!(
        err(fs::hard_link(m.path("nope"), m.path("x"))),
        libc::ENOENT
    );
    assert_eq!(
        err(fs::hard_link(m.path("c"), m.path("no/x"))),
        libc::ENOENT
    );
    // A link to a symlink links the symlink itself (linkat without FOLLOW).
    symlink("c", m.path("s")).unwrap();
    // SAFETY: valid C strings.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            cpath(&m.path("s")).as_ptr(),
            libc::AT_FDCWD,
            cpath(&m.path("s2")).as_ptr(),
            0,
        )
    } as i64)
    .unwrap();
    assert!(
        fs::symlink_metadata(m.path("s2"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::symlink_metadata(m.path("s")).unwrap().nlink(), 2);
}

// ----- unlink / rmdir ------------------------------------------------------------

#[test]
fn unlink_and_rmdir() {
    let m = TestMount::new();
    fs::write(m.path("f"), b"x").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/inner"), b"y").unwrap();
    fs::remove_file(m.path("f")).unwrap();
    assert!(!m.backing_path("f").exists());
    assert_eq!(err(fs::metadata(m.path("f"))), libc::ENOENT);
    assert_eq!(err(fs::remove_file(m.path("f"))), libc::ENOENT);
    assert_eq!(err(fs::remove_file(m.path("d"))), libc::EISDIR);
    assert_eq!(err(fs::remove_dir(m.path("d"))), libc::ENOTEMPTY);
    assert_eq!(err(fs::remove_dir(m.path("d/inner"))), libc::ENOTDIR);
    assert_eq!(err(fs::remove_dir(m.path("nope"))), libc::ENOENT);
    fs::remove_file(m.path("d/inner")).unwrap();
    fs::remove_dir(m.path("d")).unwrap();
    assert!(!m.backing_path("d").exists());
    // An unlinked file stays usable through an open handle.
    fs::write(m.path("open"), b"before").unwrap();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("open"))
        .unwrap();
    fs::remove_file(m.path("open")).unwrap();
    assert!(!m.backing_path("open").exists());
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(b"+after").unwrap();
    f.sync_all().unwrap();
    assert_eq!(read_at(&f, 0, 100), b"before+after");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    // The name can be reused while the old file is open.
    fs::write(m.path("open"), b"new").unwrap();
    assert_eq!(fs::read(m.path("open")).unwrap(), b"new");
    assert_eq!(read_at(&f, 0, 6), b"before");
    // rmdir of the mount root and of "." are refused by the kernel.
    assert!(fs::remove_dir(&m.mnt).is_err());
}

// ----- rename --------------------------------------------------------------------

#[test]
fn rename_plain_and_overwrite() {
    let m = TestMount::new();
    fs::write(m.path("a"), b"A").unwrap();
    fs::write(m.path("b"), b"B").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::create_dir(m.path("e")).unwrap();
    fs::write(m.path("d/x"), b"X").unwrap();
    fs::rename(m.path("a"), m.path("c")).unwrap();
    assert_eq!(fs::read(m.path("c")).unwrap(), b"A");
    assert!(!m.path("a").exists());
    assert_eq!(fs::read(m.backing_path("c")).unwrap(), b"A");
    // Over an existing file.
    fs::rename(m.path("c"), m.path("b")).unwrap();
    assert_eq!(fs::read(m.path("b")).unwrap(), b"A");
    // Across directories, and a directory with contents.
    fs::rename(m.path("b"), m.path("d/b")).unwrap();
    fs::rename(m.path("d"), m.path("e/d")).unwrap();
    assert_eq!(fs::read(m.path("e/d/x")).unwrap(), b"X");
    assert_eq!(fs::read(m.backing_path("e/d/b")).unwrap(), b"A");
    // Over an empty directory.
    fs::create_dir(m.path("empty")).unwrap();
    fs::rename(m.path("e/d"), m.path("empty")).unwrap();
    assert_eq!(fs::read(m.path("empty/x")).unwrap(), b"X");
    // Errors.
    fs::create_dir(m.path("full")).unwrap();
    fs::write(m.path("full/f"), b"").unwrap();
    fs::write(m.path("file"), b"").unwrap();
    assert_eq!(
        err(fs::rename(m.path("empty"), m.path("full"))),
        libc::ENOTEMPTY
    );
    assert_eq!(
        err(fs::rename(m.path("file"), m.path("full"))),
        libc::EISDIR
    );
    assert_eq!(
        err(fs::rename(m.path("full"), m.path("file"))),
        libc::ENOTDIR
    );
    assert_eq!(
        err(fs::rename(m.path("full"), m.path("full/sub"))),
        libc::EINVAL
    );
    assert_eq!(err(fs::rename(m.path("nope"), m.path("x"))), libc::ENOENT);
    assert_eq!(
        err(fs::rename(m.path("file"), m.path("no/x"))),
        libc::ENOENT
    );
    // Renaming onto itself (or a hard link of itself) succeeds and changes nothing.
    fs::rename(m.path("file"), m.path("file")).unwrap();
    fs::hard_link(m.path("file"), m.path("file2")).unwrap();
    fs::rename(m.path("file"), m.path("file2")).unwrap();
    assert!(m.path("file").exists() && m.path("file2").exists());
}

#[test]
fn rename_keeps_open_handles_and_inode() {
    let m = TestMount::new();
    fs::write(m.path("a"), b"").unwrap();
    let mut f = OpenOptions::new().write(true).open(m.path("a")).unwrap();
    let ino = fs::metadata(m.path("a")).unwrap().ino();
    fs::create_dir(m.path("d")).unwrap();
    fs::rename(m.path("a"), m.path("d/moved")).unwrap();
    f.write_all(b"written after rename").unwrap();
    f.sync_all().unwrap();
    // Still open, so the kernel still knows the inode by its number.
    assert_eq!(fs::metadata(m.path("d/moved")).unwrap().ino(), ino);
    drop(f);
    assert_eq!(
        fs::read(m.backing_path("d/moved")).unwrap(),
        b"written after rename"
    );
}

#[test]
fn rename_noreplace_and_exchange() {
    let m = TestMount::new();
    fs::write(m.path("a"), b"A").unwrap();
    fs::write(m.path("b"), b"B").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/inside"), b"I").unwrap();
    assert_eq!(
        lerr(rename2(&m.path("a"), &m.path("b"), libc::RENAME_NOREPLACE)),
        libc::EEXIST
    );
    assert_eq!(fs::read(m.path("b")).unwrap(), b"B");
    rename2(&m.path("a"), &m.path("c"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(fs::read(m.path("c")).unwrap(), b"A");
    assert!(!m.path("a").exists());
    // Exchange two files.
    rename2(&m.path("b"), &m.path("c"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.path("b")).unwrap(), b"A");
    assert_eq!(fs::read(m.path("c")).unwrap(), b"B");
    assert_eq!(fs::read(m.backing_path("b")).unwrap(), b"A");
    assert_eq!(fs::read(m.backing_path("c")).unwrap(), b"B");
    // Exchange a file and a directory.
    rename2(&m.path("b"), &m.path("d"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.path("d")).unwrap(), b"A");
    assert_eq!(fs::read(m.path("b/inside")).unwrap(), b"I");
    assert!(m.backing_path("b").is_dir());
    // Exchange needs both names.
    assert_eq!(
        lerr(rename2(
            &m.path("b"),
            &m.path("nope"),
            libc::RENAME_EXCHANGE
        )),
        libc::ENOENT
    );
    // Both flags at once are invalid.
    assert_eq!(
        lerr(rename2(
            &m.path("b"),
            &m.path("c"),
            libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE
        )),
        libc::EINVAL
    );
}

// ----- open flags, read, write ---------------------------------------------------

#[test]
fn open_direct_aligned() {
    let m = TestMount::new();
    let p = m.path("direct");
    let data = random_bytes(1, 256 * 1024);
    let mut buf = AlignedBuf::new(data.len(), 4096);
    buf.copy_from_slice(&data);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    f.write_all_at(&buf, 1 << 20).unwrap();
    let mut back = AlignedBuf::new(data.len(), 4096);
    let mut got = 0;
    while got < back.len() {
        let n = f.read_at(&mut back[got..], (1 << 20) + got as u64).unwrap();
        assert!(n > 0, "short O_DIRECT read");
        got += n;
    }
    assert_eq!(&back[..], &data[..], "O_DIRECT read back");
    // An O_DIRECT write reaches the backing file before close.
    let on_disk = File::open(m.backing_path("direct")).unwrap();
    assert_eq!(read_at(&on_disk, 1 << 20, data.len()), data);
    assert_eq!(
        on_disk.metadata().unwrap().len(),
        (1 << 20) + data.len() as u64
    );
    drop(f);
    // A buffered reader sees the same bytes.
    let plain = File::open(&p).unwrap();
    assert_eq!(read_at(&plain, 1 << 20, data.len()), data);
    assert!(read_at(&plain, 0, 4096).iter().all(|&b| b == 0));
}

#[test]
fn open_sync_reaches_backing_before_close() {
    let m = TestMount::new();
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_SYNC)
        .open(m.path("s"))
        .unwrap();
    let data = random_bytes(2, 100_000);
    f.write_all(&data).unwrap();
    // Still open: an O_SYNC write has been handed to the backing file.
    assert_eq!(fs::read(m.backing_path("s")).unwrap(), data);
    let more = random_bytes(3, 5000);
    f.write_all_at(&more, 50_000).unwrap();
    let on_disk = fs::read(m.backing_path("s")).unwrap();
    assert_eq!(&on_disk[50_000..55_000], &more[..]);
}

#[test]
fn fsync_and_fdatasync_reach_backing() {
    let m = TestMount::new();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(m.path("f"))
        .unwrap();
    let data = random_bytes(4, 300_000);
    f.write_all_at(&data, 4096).unwrap();
    f.sync_all().unwrap();
    assert_eq!(
        read_at(&File::open(m.backing_path("f")).unwrap(), 4096, data.len()),
        data
    );
    let more = random_bytes(5, 10_000);
    f.write_all_at(&more, 1_000_000).unwrap();
    f.sync_data().unwrap();
    let on_disk = File::open(m.backing_path("f")).unwrap();
    assert_eq!(read_at(&on_disk, 1_000_000, more.len()), more);
    assert_eq!(on_disk.metadata().unwrap().len(), 1_010_000);
    // fsync of a read-only handle is allowed too.
    File::open(m.path("f")).unwrap().sync_all().unwrap();
}

#[test]
fn fsyncdir() {
    let m = TestMount::new();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/f"), b"x").unwrap();
    File::open(m.path("d")).unwrap().sync_all().unwrap();
    File::open(&m.mnt).unwrap().sync_data().unwrap();
    let fd = open(&m.path("d"), libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap();
    // SAFETY: fd is open.
    check(unsafe { libc::fsync(fd.as_raw_fd()) } as i64).unwrap();
    check(unsafe { libc::fdatasync(fd.as_raw_fd()) } as i64).unwrap();
}

#[test]
fn open_append() {
    let m = TestMount::new();
    let p = m.path("log");
    fs::write(&p, b"start;").unwrap();
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    let mut b = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(b"a1;").unwrap();
    b.write_all(b"b1;").unwrap();
    a.write_all(b"a2;").unwrap();
    // Linux appends even with an explicit offset on an O_APPEND handle.
    b.write_all_at(b"b2;", 0).unwrap();
    drop((a, b));
    assert_eq!(fs::read_to_string(&p).unwrap(), "start;a1;b1;a2;b2;");
    assert_eq!(
        fs::read_to_string(m.backing_path("log")).unwrap(),
        "start;a1;b1;a2;b2;"
    );
    // O_APPEND | O_RDWR: reads anywhere, writes at the end.
    let mut c = OpenOptions::new().read(true).append(true).open(&p).unwrap();
    assert_eq!(read_at(&c, 0, 6), b"start;");
    c.write_all(b"c;").unwrap();
    assert_eq!(fs::read_to_string(&p).unwrap(), "start;a1;b1;a2;b2;c;");
}

#[test]
fn open_trunc_and_errors() {
    let m = TestMount::new();
    let p = m.path("t");
    fs::write(&p, vec![7u8; 50_000]).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 0);
    drop(f);
    assert_eq!(fs::metadata(m.backing_path("t")).unwrap().len(), 0);
    fs::write(&p, b"short").unwrap();
    assert_eq!(fs::read(m.backing_path("t")).unwrap(), b"short");
    fs::create_dir(m.path("d")).unwrap();
    assert_eq!(
        err(OpenOptions::new().write(true).open(m.path("d"))),
        libc::EISDIR
    );
    assert_eq!(err(File::open(m.path("missing"))), libc::ENOENT);
    assert_eq!(
        lerr(open(&p, libc::O_RDONLY | libc::O_DIRECTORY, 0)),
        libc::ENOTDIR
    );
    symlink("t", m.path("link")).unwrap();
    assert_eq!(
        lerr(open(&m.path("link"), libc::O_RDONLY | libc::O_NOFOLLOW, 0)),
        libc::ELOOP
    );
    // Writing through a read-only handle is refused.
    let mut ro = File::open(&p).unwrap();
    assert_eq!(err(ro.write(b"x")), libc::EBADF);
}

/// A writer opening a file that a reader holds open, on a mount without the
/// writeback cache (where the kernel would allow FUSE passthrough).
#[test]
fn writer_after_reader_without_writeback_cache() {
    let m = TestMount::with_options(|o| o.fuse.writeback_cache = false);
    fs::write(m.path("img"), vec![1u8; 8192]).unwrap();
    let reader = File::open(m.path("img")).unwrap();
    assert_eq!(read_at(&reader, 0, 10), vec![1u8; 10]);
    let writer = OpenOptions::new().write(true).open(m.path("img")).unwrap();
    writer.write_all_at(b"new", 0).unwrap();
    assert_eq!(read_at(&reader, 0, 4), b"new\x01");
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("img"))
        .unwrap();
    assert_eq!(read_at(&rw, 0, 3), b"new");
    drop((reader, writer, rw));
    assert_eq!(&fs::read(m.backing_path("img")).unwrap()[..4], b"new\x01");
}

/// With passthrough asked for (opt-in), read-only opens are served by the
/// kernel from the backing file and see what writers wrote before.
#[test]
fn passthrough_readers_see_written_data() {
    let m = TestMount::with_options(|o| {
        o.fuse.writeback_cache = false;
        o.fuse.passthrough = true;
    });
    let data = random_bytes(12, 300_000);
    fs::write(m.path("f"), &data).unwrap();
    let a = File::open(m.path("f")).unwrap();
    let b = File::open(m.path("f")).unwrap();
    assert_eq!(read_at(&a, 0, data.len()), data);
    assert_eq!(read_at(&b, 1000, 10), &data[1000..1010]);
    drop((a, b));
    // Once the readers are gone, writing works again.
    let w = OpenOptions::new().write(true).open(m.path("f")).unwrap();
    w.write_all_at(b"again", 0).unwrap();
    drop(w);
    assert_eq!(&fs::read(m.path("f")).unwrap()[..5], b"again");
}

#[test]
fn read_write_offsets_and_holes() {
    let m = TestMount::new();
    let p = m.path("f");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    // A write far past EOF leaves a hole that reads as zeros.
    let three_gib = 3u64 << 30;
    f.write_all_at(b"far away", three_gib).unwrap();
    assert_eq!(f.metadata().unwrap().len(), three_gib + 8);
    assert_eq!(read_at(&f, three_gib, 8), b"far away");
    assert!(
        read_at(&f, three_gib - 65_536, 65_536)
            .iter()
            .all(|&b| b == 0)
    );
    assert!(read_at(&f, 12_345, 100).iter().all(|&b| b == 0));
    // Reads at and past EOF return nothing.
    assert!(read_at(&f, three_gib + 8, 10).is_empty());
    assert!(read_at(&f, three_gib + 1_000_000, 10).is_empty());
    // A large unaligned write spanning several requests.
    let big = random_bytes(6, 3 * 1024 * 1024 + 17);
    f.write_all_at(&big, 4097).unwrap();
    assert_eq!(read_at(&f, 4097, big.len()), big);
    // Overwrite in the middle.
    f.write_all_at(b"MIDDLE", 1_000_000).unwrap();
    let mut expect = big.clone();
    expect[1_000_000 - 4097..1_000_000 - 4097 + 6].copy_from_slice(b"MIDDLE");
    assert_eq!(read_at(&f, 4097, big.len()), expect);
    f.sync_all().unwrap();
    drop(f);
    let on_disk = File::open(m.backing_path("f")).unwrap();
    assert_eq!(read_at(&on_disk, 4097, expect.len()), expect);
    assert_eq!(read_at(&on_disk, three_gib, 8), b"far away");
    // The hole stays a hole in the backing file.
    assert!(
        on_disk.metadata().unwrap().blocks() < 64 * 1024,
        "3 GiB file with ~3 MiB of data is not sparse: {} blocks",
        on_disk.metadata().unwrap().blocks()
    );
    // Sequential read of the whole data region through std.
    let mut r = File::open(&p).unwrap();
    r.seek(SeekFrom::Start(4097)).unwrap();
    let mut buf = vec![0u8; expect.len()];
    r.read_exact(&mut buf).unwrap();
    assert_eq!(buf, expect);
}

#[test]
fn write_beyond_4_gib() {
    let m = TestMount::new();
    let off = (5u64 << 30) + 123;
    let data = random_bytes(7, 10_000);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(m.path("big"))
        .unwrap();
    f.write_all_at(&data, off).unwrap();
    f.write_all_at(b"low", 10).unwrap();
    assert_eq!(f.metadata().unwrap().len(), off + data.len() as u64);
    assert_eq!(read_at(&f, off, data.len()), data);
    drop(f);
    let on_disk = File::open(m.backing_path("big")).unwrap();
    let md = on_disk.metadata().unwrap();
    assert_eq!(md.len(), off + data.len() as u64);
    assert_eq!(read_at(&on_disk, off, data.len()), data);
    assert_eq!(read_at(&on_disk, 10, 3), b"low");
    assert!(md.blocks() < 1024, "not sparse: {} blocks", md.blocks());
}

#[test]
fn sparse_truncate_stays_sparse() {
    let m = TestMount::new();
    let p = m.path("sparse");
    File::create(&p).unwrap().set_len(1 << 30).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.len(), 1 << 30);
    assert!(
        md.blocks() < 16,
        "1 GiB truncate allocated {} blocks",
        md.blocks()
    );
    let bd = fs::metadata(m.backing_path("sparse")).unwrap();
    assert_eq!(bd.len(), 1 << 30);
    assert!(bd.blocks() < 16, "backing: {} blocks", bd.blocks());
    let f = File::open(&p).unwrap();
    assert!(read_at(&f, 512 << 20, 65_536).iter().all(|&b| b == 0));
    assert!(read_at(&f, (1 << 30) - 10, 100).len() == 10);
    // Reading it does not allocate.
    assert!(fs::metadata(m.backing_path("sparse")).unwrap().blocks() < 16);
}

// ----- fallocate, lseek, copy_file_range -----------------------------------------

#[test]
fn fallocate_preallocate() {
    let m = TestMount::new();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(m.path("f"))
        .unwrap();
    fallocate(&f, 0, 0, 1 << 20).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), 1 << 20);
    assert!(md.blocks() >= 2048, "blocks {}", md.blocks());
    assert!(read_at(&f, 0, 1 << 20).iter().all(|&b| b == 0));
    // KEEP_SIZE allocates past EOF without growing the file.
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), 1 << 20);
    assert!(md.blocks() >= 4096, "blocks {}", md.blocks());
    assert_eq!(fs::metadata(m.backing_path("f")).unwrap().len(), 1 << 20);
    // Errors: a read-only handle, a bad range.
    let ro = File::open(m.path("f")).unwrap();
    assert_eq!(lerr(fallocate(&ro, 0, 0, 4096)), libc::EBADF);
    assert_eq!(lerr(fallocate(&f, 0, 0, 0)), libc::EINVAL);
}

#[test]
fn fallocate_punch_hole() {
    let m = TestMount::new();
    let p = m.path("f");
    let data = random_bytes(8, 1 << 20);
    fs::write(&p, &data).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.sync_all().unwrap();
    let before = f.metadata().unwrap().blocks();
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        256 * 1024,
        512 * 1024,
    )
    .unwrap();
    let after = f.metadata().unwrap();
    assert_eq!(after.len(), 1 << 20, "punch hole changed the size");
    assert!(
        after.blocks() < before,
        "st_blocks did not shrink: {before} -> {}",
        after.blocks()
    );
    assert!(before - after.blocks() >= 1024 - 64);
    let got = read_at(&f, 0, 1 << 20);
    assert_eq!(&got[..256 * 1024], &data[..256 * 1024]);
    assert!(
        got[256 * 1024..768 * 1024].iter().all(|&b| b == 0),
        "hole not zero"
    );
    assert_eq!(&got[768 * 1024..], &data[768 * 1024..]);
    drop(f);
    let on_disk = fs::read(m.backing_path("f")).unwrap();
    assert_eq!(on_disk, got);
    // Unaligned punch zeroes exactly the range.
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        100,
        50,
    )
    .unwrap();
    let got2 = read_at(&f, 0, 300);
    assert_eq!(&got2[..100], &data[..100]);
    assert!(got2[100..150].iter().all(|&b| b == 0));
    assert_eq!(&got2[150..300], &data[150..300]);
    // PUNCH_HOLE without KEEP_SIZE is invalid.
    assert_eq!(
        lerr(fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096)),
        libc::EOPNOTSUPP
    );
}

#[test]
fn fallocate_zero_range() {
    let m = TestMount::new();
    let p = m.path("f");
    let data = random_bytes(9, 200_000);
    fs::write(&p, &data).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 10_000, 50_000).unwrap();
    let got = read_at(&f, 0, 300_000);
    assert_eq!(got.len(), 200_000);
    assert_eq!(&got[..10_000], &data[..10_000]);
    assert!(got[10_000..60_000].iter().all(|&b| b == 0));
    assert_eq!(&got[60_000..], &data[60_000..]);
    // Past EOF it grows the file, unless KEEP_SIZE.
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 190_000, 20_000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 210_000);
    fallocate(
        &f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        200_000,
        100_000,
    )
    .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 210_000);
    let got = read_at(&f, 0, 300_000);
    assert_eq!(got.len(), 210_000);
    assert!(got[190_000..].iter().all(|&b| b == 0));
    drop(f);
    assert_eq!(fs::read(m.backing_path("f")).unwrap(), got);
}

const MIB: i64 = 1 << 20;

fn seek(f: &File, off: i64, whence: i32) -> Result<i64, i32> {
    // SAFETY: f is open.
    check(unsafe { libc::lseek(f.as_raw_fd(), off, whence) })
}

/// A 10 MiB file with 4 KiB of data at 1 MiB and at 5 MiB, still unflushed.
fn sparse_file_with_two_extents(m: &TestMount) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(m.path("sparse"))
        .unwrap();
    f.set_len(10 * MIB as u64).unwrap();
    f.write_all_at(&[1u8; 4096], MIB as u64).unwrap();
    f.write_all_at(&[2u8; 4096], 5 * MIB as u64).unwrap();
    f
}

/// What any correct SEEK_DATA/SEEK_HOLE must satisfy: never skip data, never
/// put a hole inside written data, ENXIO at and past EOF.
fn assert_seek_never_loses_data(f: &File, size: i64, data: &[(i64, i64)]) {
    let in_data = |x: i64| data.iter().any(|&(s, e)| s <= x && x < e);
    let probes = [
        0,
        1,
        MIB - 1,
        MIB,
        MIB + 100,
        MIB + 4096,
        3 * MIB,
        5 * MIB,
        5 * MIB + 4095,
    ];
    for x in probes {
        let d = seek(f, x, libc::SEEK_DATA).unwrap();
        assert!(d >= x && d < size, "SEEK_DATA({x}) = {d}");
        for &(s, e) in data {
            // [x, d) must not overlap [s, e).
            assert!(
                x.max(s) >= d.min(e),
                "SEEK_DATA({x}) = {d} skips data at {s}..{e}"
            );
        }
        let h = seek(f, x, libc::SEEK_HOLE).unwrap();
        assert!(h >= x && h <= size, "SEEK_HOLE({x}) = {h}");
        assert!(!in_data(h), "SEEK_HOLE({x}) = {h} lands in data");
        if let Some(&(_, e)) = data.iter().find(|&&(s, e)| s <= x && x < e) {
            assert!(h >= e, "SEEK_HOLE({x}) = {h} inside data ending at {e}");
        }
    }
    assert_eq!(seek(f, size, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek(f, size + 1, libc::SEEK_HOLE), Err(libc::ENXIO));
}

#[test]
fn lseek_data_and_hole_with_writeback_cache() {
    let m = TestMount::new();
    let f = sparse_file_with_two_extents(&m);
    let data = [(MIB, MIB + 4096), (5 * MIB, 5 * MIB + 4096)];
    // The written pages may still be only in the kernel's cache here.
    assert_seek_never_loses_data(&f, 10 * MIB, &data);
    f.sync_all().unwrap();
    assert_seek_never_loses_data(&f, 10 * MIB, &data);
    // The plain whences still work.
    assert_eq!(seek(&f, 0, libc::SEEK_END), Ok(10 * MIB));
    assert_eq!(seek(&f, 100, libc::SEEK_SET), Ok(100));
    assert_eq!(seek(&f, 5, libc::SEEK_CUR), Ok(105));
    assert_eq!(seek(&f, -1, libc::SEEK_SET), Err(libc::EINVAL));
    // Growing the file in the cache moves EOF for SEEK_DATA too.
    f.write_all_at(b"tail", 12 * MIB as u64).unwrap();
    assert_eq!(seek(&f, 12 * MIB, libc::SEEK_DATA), Ok(12 * MIB));
}

#[test]
fn lseek_data_and_hole_exact_without_writeback_cache() {
    let m = TestMount::with_options(|o| o.fuse.writeback_cache = false);
    let f = sparse_file_with_two_extents(&m);
    let data = [(MIB, MIB + 4096), (5 * MIB, 5 * MIB + 4096)];
    assert_seek_never_loses_data(&f, 10 * MIB, &data);
    // Every write reached the backing file, so the answers are exact.
    assert_eq!(seek(&f, 0, libc::SEEK_DATA), Ok(MIB));
    assert_eq!(seek(&f, MIB, libc::SEEK_HOLE), Ok(MIB + 4096));
    assert_eq!(seek(&f, MIB + 4096, libc::SEEK_DATA), Ok(5 * MIB));
    assert_eq!(seek(&f, 0, libc::SEEK_HOLE), Ok(0));
    assert_eq!(seek(&f, 5 * MIB, libc::SEEK_HOLE), Ok(5 * MIB + 4096));
    assert_eq!(seek(&f, 5 * MIB + 4096, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek(&f, 10 * MIB, libc::SEEK_DATA), Err(libc::ENXIO));
}

#[test]
fn copy_file_range_within_mount() {
    let m = TestMount::new();
    let data = random_bytes(10, 1 << 20);
    fs::write(m.path("src"), &data).unwrap();
    let src = File::open(m.path("src")).unwrap();
    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(m.path("dst"))
        .unwrap();
    let mut off_in: i64 = 1000;
    let mut off_out: i64 = 5000;
    let mut left = 300_000usize;
    while left > 0 {
        // SAFETY: both descriptors are open, offsets are valid pointers.
        let n = check(unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        } as i64)
        .unwrap();
        assert!(n > 0, "copy_file_range made no progress");
        left -= n as usize;
    }
    assert_eq!(off_in, 301_000);
    assert_eq!(off_out, 305_000);
    let got = read_at(&dst, 0, 400_000);
    assert_eq!(got.len(), 305_000);
    assert!(got[..5000].iter().all(|&b| b == 0));
    assert_eq!(&got[5000..], &data[1000..301_000]);
    // Past the source's end: a short copy, then 0.
    let mut off_in: i64 = (1 << 20) - 10;
    let mut off_out: i64 = 0;
    // SAFETY: as above.
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            100,
            0,
        )
    };
    assert_eq!(n, 10);
    // SAFETY: as above.
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            100,
            0,
        )
    };
    assert_eq!(n, 0);
    drop(dst);
    let on_disk = fs::read(m.backing_path("dst")).unwrap();
    assert_eq!(&on_disk[..10], &data[data.len() - 10..]);
    assert_eq!(&on_disk[5000..305_000], &data[1000..301_000]);
    // Into a read-only handle: EBADF.
    let ro = File::open(m.path("dst")).unwrap();
    let (mut a, mut b) = (0i64, 0i64);
    // SAFETY: as above.
    let r = check(unsafe {
        libc::copy_file_range(src.as_raw_fd(), &mut a, ro.as_raw_fd(), &mut b, 10, 0)
    } as i64);
    assert_eq!(r, Err(libc::EBADF));
}

// ----- readdir and the hidden state dir ------------------------------------------

/// All entries of a directory through libc readdir: (name, d_ino, d_type).
fn list_raw(dir: &Path) -> Vec<(String, u64, u8)> {
    let c = cpath(dir);
    // SAFETY: valid C string; the DIR stream is closed below.
    let d = unsafe { libc::opendir(c.as_ptr()) };
    assert!(!d.is_null(), "opendir {}", dir.display());
    let mut out = Vec::new();
    loop {
        // SAFETY: d is an open DIR stream.
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid dirent.
        let e = unsafe { &*e };
        let name = unsafe { std::ffi::CStr::from_ptr(e.d_name.as_ptr()) };
        out.push((name.to_string_lossy().into_owned(), e.d_ino, e.d_type));
    }
    // SAFETY: d is open.
    unsafe { libc::closedir(d) };
    out
}

#[test]
fn readdir_many_entries() {
    let m = TestMount::new();
    fs::create_dir(m.path("big")).unwrap();
    let mut want = std::collections::BTreeSet::new();
    for i in 0..700 {
        let name = format!("entry-with-a-longish-name-{i:04}");
        match i % 7 {
            0 => fs::create_dir(m.path("big").join(&name)).unwrap(),
            1 => symlink("target", m.path("big").join(&name)).unwrap(),
            _ => fs::write(m.path("big").join(&name), b"").unwrap(),
        }
        want.insert(name);
    }
    // std (getdents through many FUSE readdir requests).
    let got: Vec<String> = fs::read_dir(m.path("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(got.len(), want.len(), "duplicates or missing entries");
    assert_eq!(
        got.iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        want
    );
    // libc: ".", "..", types and inode numbers that agree with stat. Inode
    // numbers hold only while the kernel remembers the inode (a parallel test
    // may drop caches), so pin every entry with an O_PATH descriptor first.
    let mut pins = Vec::new();
    let mut st_ino = std::collections::HashMap::new();
    for name in &want {
        let fd = open(
            &m.path("big").join(name),
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
        )
        .unwrap();
        st_ino.insert(name.clone(), common::fstat(&fd).unwrap().st_ino);
        pins.push(fd);
    }
    let raw = list_raw(&m.path("big"));
    assert_eq!(raw.len(), want.len() + 2);
    assert!(raw.iter().any(|(n, _, t)| n == "." && *t == libc::DT_DIR));
    assert!(raw.iter().any(|(n, _, t)| n == ".." && *t == libc::DT_DIR));
    for (name, ino, ty) in &raw {
        if name == "." || name == ".." {
            continue;
        }
        let i: usize = name.rsplit('-').next().unwrap().parse().unwrap();
        let expect = match i % 7 {
            0 => libc::DT_DIR,
            1 => libc::DT_LNK,
            _ => libc::DT_REG,
        };
        assert_eq!(*ty, expect, "d_type of {name}");
        // The kernel knows every entry (pinned), so d_ino is its inode number.
        assert_eq!(*ino, st_ino[name], "d_ino of {name} differs from st_ino");
    }
    drop(pins);
    // telldir/seekdir: continuing from a remembered position gives the same tail.
    let c = cpath(&m.path("big"));
    // SAFETY: valid C string; closed below.
    let d = unsafe { libc::opendir(c.as_ptr()) };
    assert!(!d.is_null());
    let mut first = Vec::new();
    let mut pos = 0;
    for i in 0..400 {
        if i == 300 {
            // SAFETY: d is open.
            pos = unsafe { libc::telldir(d) };
        }
        // SAFETY: d is open.
        let e = unsafe { libc::readdir(d) };
        assert!(!e.is_null());
        if i >= 300 {
            first.push(unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) }.to_owned());
        }
    }
    // SAFETY: d is open, pos came from telldir on it.
    unsafe { libc::seekdir(d, pos) };
    for name in &first {
        // SAFETY: d is open.
        let e = unsafe { libc::readdir(d) };
        assert!(!e.is_null());
        let again = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        assert_eq!(again, name.as_c_str());
    }
    // rewinddir rereads, and sees a new entry.
    fs::write(m.path("big/late"), b"").unwrap();
    // SAFETY: d is open.
    unsafe { libc::rewinddir(d) };
    let mut n = 0;
    let mut saw_late = false;
    // SAFETY: d is open.
    while let Some(e) = unsafe { libc::readdir(d).as_ref() } {
        n += 1;
        saw_late |= unsafe { std::ffi::CStr::from_ptr(e.d_name.as_ptr()) } == c"late";
    }
    // SAFETY: d is open.
    unsafe { libc::closedir(d) };
    assert_eq!(n, want.len() + 3);
    assert!(saw_late, "rewinddir did not reread the directory");
    // Empty directory: only . and ..
    fs::create_dir(m.path("empty")).unwrap();
    assert_eq!(list_raw(&m.path("empty")).len(), 2);
    assert_eq!(
        err(fs::read_dir(m.path("big/entry-with-a-longish-name-0002"))),
        libc::ENOTDIR
    );
}

#[test]
fn state_dir_is_hidden_and_unreachable() {
    let m = TestMount::new();
    let state = m.backing_path(replicafs::mount::STATE_DIR_NAME);
    assert!(state.is_dir(), "state dir was not created");
    fs::write(state.join("journal-marker"), b"private").unwrap();
    fs::write(m.path("visible"), b"").unwrap();
    let names: Vec<String> = list_raw(&m.mnt).into_iter().map(|(n, _, _)| n).collect();
    assert!(names.contains(&"visible".to_string()));
    assert!(
        !names.iter().any(|n| n == ".replicafs"),
        "listed: {names:?}"
    );
    let hidden = m.path(".replicafs");
    assert_eq!(err(fs::metadata(&hidden)), libc::ENOENT);
    assert_eq!(err(fs::read(hidden.join("journal-marker"))), libc::ENOENT);
    assert_eq!(err(File::open(&hidden)), libc::ENOENT);
    // Nothing can take the name.
    let e = err(fs::create_dir(&hidden));
    assert!(e == libc::EPERM || e == libc::EACCES, "mkdir: errno {e}");
    assert!(File::create(&hidden).is_err(), "create succeeded");
    assert!(symlink("visible", &hidden).is_err(), "symlink succeeded");
    assert!(
        fs::hard_link(m.path("visible"), &hidden).is_err(),
        "link succeeded"
    );
    assert!(
        fs::rename(m.path("visible"), &hidden).is_err(),
        "rename succeeded"
    );
    assert!(
        mknod(&hidden, libc::S_IFIFO | 0o600, 0).is_err(),
        "mknod succeeded"
    );
    assert!(fs::remove_dir(&hidden).is_err(), "rmdir succeeded");
    assert!(fs::remove_file(&hidden).is_err(), "unlink succeeded");
    assert!(
        rename2(&m.path("visible"), &hidden, libc::RENAME_EXCHANGE).is_err(),
        "exchange succeeded"
    );
    // Neither reachable through another name of the root.
    fs::create_dir(m.path("sub")).unwrap();
    assert_eq!(err(fs::metadata(m.path("sub/../.replicafs"))), libc::ENOENT);
    // The state dir is untouched.
    assert_eq!(fs::read(state.join("journal-marker")).unwrap(), b"private");
    assert!(m.backing_path("visible").exists());
    // Only the top-level name is reserved.
    fs::create_dir(m.path("sub/.replicafs")).unwrap();
    fs::write(m.path("sub/.replicafs/f"), b"ok").unwrap();
    assert_eq!(fs::read(m.backing_path("sub/.replicafs/f")).unwrap(), b"ok");
}

// ----- statfs, access, xattr -----------------------------------------------------

fn statvfs(p: &Path) -> libc::statvfs {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: valid pointers.
    check(unsafe { libc::statvfs(cpath(p).as_ptr(), st.as_mut_ptr()) } as i64).unwrap();
    // SAFETY: filled by statvfs.
    unsafe { st.assume_init() }
}

#[test]
fn statfs_reports_backing_fs() {
    let m = TestMount::new();
    fs::create_dir(m.path("d")).unwrap();
    let a = statvfs(&m.path("d"));
    let b = statvfs(&m.backing);
    assert_eq!(a.f_blocks, b.f_blocks);
    assert_eq!(a.f_frsize, b.f_frsize);
    assert_eq!(a.f_files, b.f_files);
    assert_eq!(a.f_namemax, 255);
    assert!(a.f_bavail <= a.f_bfree && a.f_bfree <= a.f_blocks);
    assert_eq!(a.f_flag & libc::ST_RDONLY, 0);
}

#[test]
fn access_checks() {
    let m = TestMount::new();
    fs::write(m.path("f"), b"").unwrap();
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o644)).unwrap();
    let access = |p: &Path, mode: i32| -> Result<i64, i32> {
        // SAFETY: valid C string.
        check(unsafe { libc::access(cpath(p).as_ptr(), mode) } as i64)
    };
    access(&m.path("f"), libc::F_OK).unwrap();
    access(&m.path("f"), libc::R_OK | libc::W_OK).unwrap();
    // Root needs at least one execute bit.
    assert_eq!(access(&m.path("f"), libc::X_OK), Err(libc::EACCES));
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o744)).unwrap();
    access(&m.path("f"), libc::X_OK).unwrap();
    // Root reads and writes whatever the mode.
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o000)).unwrap();
    access(&m.path("f"), libc::R_OK | libc::W_OK).unwrap();
    assert_eq!(access(&m.path("nope"), libc::F_OK), Err(libc::ENOENT));
    fs::create_dir(m.path("d")).unwrap();
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o000)).unwrap();
    access(&m.path("d"), libc::X_OK).unwrap();
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> Result<i64, i32> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    check(unsafe {
        libc::setxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    } as i64)
}

fn getxattr(p: &Path, name: &str, size: usize) -> Result<Vec<u8>, i32> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    // SAFETY: valid C strings and buffer (null for size 0).
    let r = check(unsafe {
        libc::getxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            if size == 0 {
                std::ptr::null_mut()
            } else {
                buf.as_mut_ptr().cast()
            },
            size,
        )
    } as i64)?;
    if size == 0 {
        return Ok(vec![0u8; r as usize]);
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn listxattr(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C string and buffer.
    let n = check(
        unsafe { libc::listxattr(cpath(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) } as i64,
    )
    .unwrap();
    buf.truncate(n as usize);
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn removexattr(p: &Path, name: &str) -> Result<i64, i32> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings.
    check(unsafe { libc::removexattr(cpath(p).as_ptr(), n.as_ptr()) } as i64)
}

#[test]
fn xattrs() {
    let m = TestMount::new();
    let p = m.path("f");
    fs::write(&p, b"x").unwrap();
    assert!(listxattr(&p).iter().all(|n| !n.starts_with("user.")));
    assert_eq!(getxattr(&p, "user.missing", 100), Err(libc::ENODATA));
    setxattr(&p, "user.one", b"value one", 0).unwrap();
    setxattr(&p, "user.two", &[0u8, 1, 2, 255], 0).unwrap();
    assert_eq!(getxattr(&p, "user.one", 100).unwrap(), b"value one");
    assert_eq!(getxattr(&p, "user.two", 100).unwrap(), &[0u8, 1, 2, 255]);
    // Size query, and a buffer too small.
    assert_eq!(getxattr(&p, "user.one", 0).unwrap().len(), 9);
    assert_eq!(getxattr(&p, "user.one", 3), Err(libc::ERANGE));
    let names = listxattr(&p);
    assert!(names.contains(&"user.one".to_string()), "{names:?}");
    assert!(names.contains(&"user.two".to_string()), "{names:?}");
    // Flags.
    assert_eq!(
        setxattr(&p, "user.one", b"again", libc::XATTR_CREATE),
        Err(libc::EEXIST)
    );
    assert_eq!(
        setxattr(&p, "user.new", b"v", libc::XATTR_REPLACE),
        Err(libc::ENODATA)
    );
    setxattr(&p, "user.one", b"replaced", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&p, "user.one", 100).unwrap(), b"replaced");
    // Empty values and a large one.
    setxattr(&p, "user.empty", b"", 0).unwrap();
    assert_eq!(getxattr(&p, "user.empty", 10).unwrap(), b"");
    let large = random_bytes(11, 3000);
    setxattr(&p, "user.large", &large, 0).unwrap();
    assert_eq!(getxattr(&p, "user.large", 4000).unwrap(), large);
    // They are on the backing file.
    assert_eq!(
        getxattr(&m.backing_path("f"), "user.one", 100).unwrap(),
        b"replaced"
    );
    // Remove.
    removexattr(&p, "user.one").unwrap();
    assert_eq!(getxattr(&p, "user.one", 100), Err(libc::ENODATA));
    assert_eq!(removexattr(&p, "user.one"), Err(libc::ENODATA));
    assert!(!listxattr(&p).contains(&"user.one".to_string()));
    assert_eq!(
        getxattr(&m.backing_path("f"), "user.one", 100),
        Err(libc::ENODATA)
    );
    // Directories carry them too.
    fs::create_dir(m.path("d")).unwrap();
    setxattr(&m.path("d"), "user.dir", b"yes", 0).unwrap();
    assert_eq!(getxattr(&m.path("d"), "user.dir", 10).unwrap(), b"yes");
    // Missing file.
    assert_eq!(getxattr(&m.path("nope"), "user.x", 10), Err(libc::ENOENT));
    // Through an open handle.
    let f = File::open(&p).unwrap();
    let mut buf = [0u8; 16];
    // SAFETY: f is open, buffers valid.
    let n = unsafe {
        libc::fgetxattr(
            f.as_raw_fd(),
            c"user.two".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..n as usize], &[0u8, 1, 2, 255]);
}

// ----- permissions for other users ------------------------------------------------

/// Runs `sh -c script` as nobody (65534:65534); returns (success, stderr).
fn as_nobody(script: &str, cwd: &Path) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .uid(65534)
        .gid(65534)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run sh as nobody");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn permissions_for_other_users() {
    let m = TestMount::with_options(|o| o.allow_other = true);
    fs::write(m.path("secret"), b"root only").unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.path("public"), b"everyone").unwrap();
    fs::set_permissions(m.path("public"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(m.path("open")).unwrap();
    fs::set_permissions(m.path("open"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::create_dir(m.path("closed")).unwrap();
    fs::set_permissions(m.path("closed"), fs::Permissions::from_mode(0o755)).unwrap();

    let (ok, stderr) = as_nobody("cat secret", &m.mnt);
    assert!(!ok, "nobody read a 0600 root file");
    assert!(stderr.contains("Permission denied"), "stderr: {stderr}");
    let (ok, stderr) = as_nobody("cat public > /dev/null", &m.mnt);
    assert!(ok, "nobody cannot read a 0644 file: {stderr}");
    let (ok, stderr) = as_nobody("echo x >> public", &m.mnt);
    assert!(
        !ok && stderr.contains("Permission denied"),
        "append: {stderr}"
    );
    assert_eq!(fs::read(m.path("public")).unwrap(), b"everyone");
    let (ok, stderr) = as_nobody("echo x > closed/f", &m.mnt);
    assert!(
        !ok && stderr.contains("Permission denied"),
        "create: {stderr}"
    );
    let (ok, stderr) = as_nobody("rm -f public", &m.mnt);
    assert!(
        !ok && stderr.contains("Permission denied"),
        "unlink: {stderr}"
    );
    assert!(m.path("public").exists());
    // What nobody creates belongs to nobody, in the mount and in the backing dir.
    let (ok, stderr) = as_nobody(
        "echo mine > open/f && mkdir open/d && ln -s f open/l && mkfifo open/p",
        &m.mnt,
    );
    assert!(ok, "nobody cannot create in a 0777 dir: {stderr}");
    for name in ["open/f", "open/d", "open/l", "open/p"] {
        for p in [m.path(name), m.backing_path(name)] {
            let md = fs::symlink_metadata(&p).unwrap();
            assert_eq!((md.uid(), md.gid()), (65534, 65534), "{}", p.display());
        }
    }
    assert_eq!(fs::read(m.path("open/f")).unwrap(), b"mine\n");
    // nobody may chmod its own file but not chown it.
    let (ok, stderr) = as_nobody("chmod 600 open/f", &m.mnt);
    assert!(ok, "chmod own file: {stderr}");
    assert_eq!(
        fs::metadata(m.backing_path("open/f")).unwrap().mode() & 0o7777,
        0o600
    );
    let (ok, _) = as_nobody("chown 0 open/f", &m.mnt);
    assert!(!ok, "nobody gave a file to root");
    let (ok, _) = as_nobody("chmod 777 public", &m.mnt);
    assert!(!ok, "nobody changed root's file mode");
}

#[test]
fn other_users_are_kept_out_without_allow_other() {
    let m = TestMount::new();
    fs::write(m.path("public"), b"everyone").unwrap();
    fs::set_permissions(m.path("public"), fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, stderr) = as_nobody(&format!("cat {}", m.path("public").display()), &m.root);
    assert!(!ok, "nobody read through a mount without allow_other");
    assert!(stderr.contains("Permission denied"), "stderr: {stderr}");
}

// ----- read-only mount -----------------------------------------------------------

#[test]
fn read_only_mount_refuses_writes() {
    let m = TestMount::with_options(|o| o.read_only = true);
    fs::write(m.backing_path("f"), b"content").unwrap();
    fs::create_dir(m.backing_path("d")).unwrap();
    fs::write(m.backing_path("d/g"), b"").unwrap();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"content");
    assert!(statvfs(&m.mnt).f_flag & libc::ST_RDONLY != 0);
    let p = m.path("f");
    assert_eq!(err(OpenOptions::new().write(true).open(&p)), libc::EROFS);
    assert_eq!(
        err(OpenOptions::new().read(true).write(true).open(&p)),
        libc::EROFS
    );
    assert_eq!(err(File::create(m.path("new"))), libc::EROFS);
    assert_eq!(err(fs::create_dir(m.path("nd"))), libc::EROFS);
    assert_eq!(err(fs::remove_file(&p)), libc::EROFS);
    assert_eq!(err(fs::remove_file(m.path("d/g"))), libc::EROFS);
    assert_eq!(err(fs::rename(&p, m.path("moved"))), libc::EROFS);
    assert_eq!(err(symlink("f", m.path("s"))), libc::EROFS);
    assert_eq!(err(fs::hard_link(&p, m.path("h"))), libc::EROFS);
    assert_eq!(
        err(fs::set_permissions(&p, fs::Permissions::from_mode(0o600))),
        libc::EROFS
    );
    assert_eq!(
        err(std::os::unix::fs::chown(&p, Some(1), Some(1))),
        libc::EROFS
    );
    assert_eq!(
        lerr(check(
            unsafe { libc::truncate(cpath(&p).as_ptr(), 0) } as i64
        )),
        libc::EROFS
    );
    assert_eq!(lerr(utimens(&p, [ts(1, 0), ts(1, 0)], 0)), libc::EROFS);
    assert_eq!(lerr(setxattr(&p, "user.x", b"v", 0)), libc::EROFS);
    assert_eq!(
        lerr(mknod(&m.path("fifo"), libc::S_IFIFO | 0o600, 0)),
        libc::EROFS
    );
    assert_eq!(err(fs::remove_dir(m.path("d"))), libc::EROFS);
    // Nothing changed underneath.
    assert_eq!(fs::read(m.backing_path("f")).unwrap(), b"content");
    assert!(m.backing_path("d/g").exists());
    let names: Vec<_> = fs::read_dir(&m.backing)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

// ----- forget --------------------------------------------------------------------

/// Waits (bounded) until `cond` holds, dropping caches between tries.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        common::drop_caches();
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn forget_releases_inodes() {
    let m = TestMount::new();
    fs::create_dir(m.path("d")).unwrap();
    let base = m.volume().inode_count();
    for i in 0..500 {
        fs::write(m.path(format!("d/f{i}")), b"x").unwrap();
    }
    // Pinned by O_PATH descriptors, the kernel must hold all of them.
    let pins: Vec<_> = (0..500)
        .map(|i| open(&m.path(format!("d/f{i}")), libc::O_PATH, 0).unwrap())
        .collect();
    assert!(
        m.volume().inode_count() >= base + 500,
        "the kernel should hold the new files: {} (base {base})",
        m.volume().inode_count()
    );
    drop(pins);
    // Unused but existing files are forgotten once the kernel evicts them.
    eventually("forgetting 500 cached inodes", || {
        m.volume().inode_count() <= base + 10
    });
    // Deleted files are forgotten too.
    for i in 0..500 {
        fs::metadata(m.path(format!("d/f{i}"))).unwrap();
    }
    for i in 0..500 {
        fs::remove_file(m.path(format!("d/f{i}"))).unwrap();
    }
    eventually("forgetting 500 deleted inodes", || {
        m.volume().inode_count() <= base + 10
    });
    // The directory is still served correctly afterwards.
    assert_eq!(fs::read_dir(m.path("d")).unwrap().count(), 0);
    fs::write(m.path("d/again"), b"y").unwrap();
    assert_eq!(fs::read(m.path("d/again")).unwrap(), b"y");
    // Releases are sent asynchronously by the kernel.
    eventually("releasing all handles", || m.volume().handle_count() == 0);
}

// ----- the command line ----------------------------------------------------------

fn run_cli(args: &[&Path]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_replicafs"))
        .arg("mount")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run replicafs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
fn assert_refused(args: &[&Path], needles: &[&str]) {
    let (code, stderr) = run_cli(args);
    assert_ne!(code, 0, "replicafs {args:?} succeeded");
    for n in needles {
        assert!(stderr.contains(n), "message lacks {n:?}: {stderr}");
    }
}

#[test]
fn cli_refuses_bad_paths() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let backing = root.join("backing");
    let mnt = root.join("mnt");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();

    // Missing backing dir and missing mountpoint.
    assert_refused(&[&root.join("nope"), &mnt], &["does not exist", "mkdir -p"]);
    assert_refused(
        &[&backing, &root.join("nope")],
        &["does not exist", "mkdir -p"],
    );
    // A file where a directory belongs.
    fs::write(root.join("file"), b"").unwrap();
    assert_refused(&[&root.join("file"), &mnt], &["not a directory"]);
    // Non-empty mountpoint.
    let full = root.join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("x"), b"").unwrap();
    assert_refused(&[&backing, &full], &["not empty", "empty directory"]);
    // Mountpoint inside the backing dir.
    let inner = backing.join("mnt");
    fs::create_dir(&inner).unwrap();
    assert_refused(&[&backing, &inner], &["inside the backing dir", "outside"]);
    fs::remove_dir(&inner).unwrap();
    // Backing dir inside the mountpoint.
    let outer = root.join("outer");
    fs::create_dir_all(outer.join("backing")).unwrap();
    assert_refused(
        &[&outer.join("backing"), &outer],
        &["inside the mountpoint", "apart"],
    );
    // The same directory for both.
    assert_refused(&[&backing, &backing], &["inside"]);
    // Zero request threads.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_replicafs"))
        .args(["mount", "--threads", "0"])
        .arg(&backing)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--threads must be at least 1"));
    // A mountpoint that is already a mount.
    let m = TestMount::new();
    assert_refused(&[&backing, &m.mnt], &["already a mount point", "umount"]);
    // None of the refusals left a mount behind.
    common::assert_no_mount_under(root);
}

fn sigterm_handler_installed(pid: u32) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
}

/// Kills the daemon and detaches its mount if a test fails half way.
struct Daemon {
    child: std::process::Child,
    mnt: std::path::PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if common::is_listed_mount(&self.mnt) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .status();
        }
    }
}

fn start_daemon(backing: &Path, mnt: &Path) -> Daemon {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_replicafs"))
        .arg("mount")
        .arg(backing)
        .arg(mnt)
        .env("REPLICAFS_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start replicafs");
    let pid = child.id();
    let mut d = Daemon {
        child,
        mnt: mnt.to_owned(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(common::is_listed_mount(mnt) && sigterm_handler_installed(pid)) {
        if let Some(status) = d.child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = d.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("replicafs exited early ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "replicafs did not mount");
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

#[test]
fn cli_serves_and_exits_cleanly_on_sigterm() {
    let t = tempfile::tempdir().unwrap();
    let backing = t.path().join("backing");
    let mnt = t.path().join("mnt");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let mut d = start_daemon(&backing, &mnt);
    fs::write(mnt.join("hello"), b"served").unwrap();
    assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"served");
    assert_eq!(fs::read(backing.join("hello")).unwrap(), b"served");
    // SAFETY: kill has no memory preconditions; the pid is our child.
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) }, 0);
    let status = d.child.wait().unwrap();
    assert!(status.success(), "replicafs exited with {status}");
    assert!(!common::is_listed_mount(&mnt), "mount left behind");
    assert_eq!(fs::read(backing.join("hello")).unwrap(), b"served");
}

#[test]
fn cli_exits_when_unmounted_externally() {
    let t = tempfile::tempdir().unwrap();
    let backing = t.path().join("backing");
    let mnt = t.path().join("mnt");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let mut d = start_daemon(&backing, &mnt);
    fs::write(mnt.join("x"), b"1").unwrap();
    let st = std::process::Command::new("umount")
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success());
    let status = d.child.wait().unwrap();
    assert!(status.success(), "replicafs exited with {status}");
    assert!(!common::is_listed_mount(&mnt));
}

#[test]
fn lstat_helper_agrees_with_std() {
    let m = TestMount::new();
    fs::write(m.path("f"), b"abc").unwrap();
    let _pin = File::open(m.path("f")).unwrap();
    let st = lstat(&m.path("f")).unwrap();
    assert_eq!(st.st_size, 3);
    assert_eq!(st.st_ino, fs::metadata(m.path("f")).unwrap().ino());
}

// ----- locks, mmap, odd opens ------------------------------------------------------

#[test]
fn flock_and_ofd_locks_exclude_each_other() {
    // qemu's image locking relies on OFD locks; the kernel keeps them locally.
    let m = TestMount::new();
    fs::write(m.path("img"), vec![0u8; 4096]).unwrap();
    let a = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("img"))
        .unwrap();
    let b = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("img"))
        .unwrap();
    // SAFETY: descriptors are open.
    check(unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_EX) } as i64).unwrap();
    assert_eq!(
        check(unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } as i64),
        Err(libc::EWOULDBLOCK)
    );
    check(unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_UN) } as i64).unwrap();
    check(unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } as i64).unwrap();
    check(unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_UN) } as i64).unwrap();

    let lock = |f: &File, ty: i32, start: i64| -> Result<i64, i32> {
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = ty as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = start;
        fl.l_len = 100;
        // SAFETY: f is open, fl is a valid flock.
        check(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) } as i64)
    };
    lock(&a, libc::F_WRLCK, 0).unwrap();
    assert_eq!(lock(&b, libc::F_WRLCK, 50), Err(libc::EAGAIN));
    assert_eq!(lock(&b, libc::F_RDLCK, 0), Err(libc::EAGAIN));
    lock(&b, libc::F_WRLCK, 100).unwrap();
    lock(&a, libc::F_UNLCK, 0).unwrap();
    lock(&b, libc::F_WRLCK, 0).unwrap();
}

#[test]
fn shared_mmap_writes_reach_backing() {
    let m = TestMount::new();
    let len = 1 << 20;
    File::create(m.path("mapped"))
        .unwrap()
        .set_len(len as u64)
        .unwrap();
    // The mapping lives in a child process. The daemon runs in this one, and
    // a munmap here would hold this process's mmap lock while it waits for
    // writeback that a daemon thread can only serve after taking that lock
    // itself (a page fault, or malloc growing its heap): a deadlock that only
    // an in-process server has.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "shared_mmap_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("OPS_MMAP_CHILD", m.path("mapped"))
        .env("OPS_MMAP_BACKING", m.backing_path("mapped"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mmap child failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("mmap child done"),
        "the mmap child did not run: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let on_disk = fs::read(m.backing_path("mapped")).unwrap();
    assert_eq!(&on_disk[4096..4101], b"hello");
    assert_eq!(&on_disk[len - 3..], b"end");
    assert_eq!(&on_disk[8192..8197], b"WORLD");
}

/// The mapping half of `shared_mmap_writes_reach_backing`, run in a child
/// process; a no-op when run directly.
#[test]
fn shared_mmap_child() {
    let (Some(path), Some(backing)) = (
        std::env::var_os("OPS_MMAP_CHILD"),
        std::env::var_os("OPS_MMAP_BACKING"),
    ) else {
        return;
    };
    let len = 1 << 20;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // SAFETY: mapping a file we hold open, of the length it has; unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: p maps len bytes.
    let map = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) };
    map[4096..4101].copy_from_slice(b"hello");
    map[len - 3..].copy_from_slice(b"end");
    // SAFETY: p/len as mapped.
    check(unsafe { libc::msync(p, len, libc::MS_SYNC) } as i64).unwrap();
    let on_disk = fs::read(&backing).unwrap();
    assert_eq!(&on_disk[4096..4101], b"hello");
    assert_eq!(&on_disk[len - 3..], b"end");
    // Reads through the file see the mapping's writes and the reverse.
    assert_eq!(read_at(&f, 4096, 5), b"hello");
    f.write_all_at(b"WORLD", 8192).unwrap();
    assert_eq!(&map[8192..8197], b"WORLD");
    // SAFETY: p/len as mapped; map is not used after this.
    check(unsafe { libc::munmap(p, len) } as i64).unwrap();
    drop(f);
    println!("mmap child done");
}

#[test]
fn odd_opens_and_regular_mknod() {
    let m = TestMount::new();
    // mknod of a regular file.
    mknod(&m.path("plain"), libc::S_IFREG | 0o640, 0).unwrap();
    let md = fs::metadata(m.backing_path("plain")).unwrap();
    assert!(md.is_file());
    assert_eq!((md.len(), md.mode() & 0o7777), (0, 0o640));
    // O_TMPFILE is not supported by the mount (it is by the backing fs).
    assert_eq!(
        lerr(open(&m.mnt, libc::O_TMPFILE | libc::O_RDWR, 0o600)),
        libc::EOPNOTSUPP
    );
    // O_NOATIME and O_NONBLOCK are harmless on regular files.
    let fd = open(
        &m.path("plain"),
        libc::O_RDONLY | libc::O_NOATIME | libc::O_NONBLOCK,
        0,
    )
    .unwrap();
    drop(fd);
    // O_PATH opens never reach the filesystem's open and still stat.
    let fd = open(&m.path("plain"), libc::O_PATH, 0).unwrap();
    assert_eq!(common::fstat(&fd).unwrap().st_size, 0);
}

#[test]
fn custom_state_dir_inside_backing_is_hidden() {
    let m = TestMount::with_options(|o| o.state_dir = Some(o.backing.join("meta/state")));
    assert!(m.backing_path("meta/state").is_dir());
    fs::write(m.backing_path("meta/state/private-file"), b"private").unwrap();
    fs::write(m.backing_path("meta/visible"), b"public").unwrap();
    assert_eq!(fs::read(m.path("meta/visible")).unwrap(), b"public");
    assert_eq!(err(fs::metadata(m.path("meta/state"))), libc::ENOENT);
    let names: Vec<_> = fs::read_dir(m.path("meta"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("visible")]);
    assert!(fs::create_dir(m.path("meta/state")).is_err());
    // Its parent cannot be renamed away through the mount (the journal and
    // the keys would move under the daemon); it stays hidden.
    assert_eq!(
        err(fs::rename(m.path("meta"), m.path("meta2"))),
        libc::EBUSY
    );
    assert_eq!(err(fs::metadata(m.path("meta/state"))), libc::ENOENT);
    assert!(m.backing_path("meta/state/journal").exists());
    // At the top, ".replicafs" is then an ordinary name.
    fs::create_dir(m.path(".replicafs")).unwrap();
    assert!(m.backing_path(".replicafs").is_dir());
}

#[test]
fn state_dir_outside_backing() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_owned();
    let m = TestMount::with_options(|o| o.state_dir = Some(dir.join("st")));
    assert!(dir.join("st").is_dir());
    fs::create_dir(m.path(".replicafs")).unwrap();
    assert!(m.backing_path(".replicafs").is_dir());
}

#[test]
fn other_user_in_setgid_directory() {
    let m = TestMount::with_options(|o| o.allow_other = true);
    fs::create_dir(m.path("g")).unwrap();
    std::os::unix::fs::chown(m.path("g"), None, Some(4321)).unwrap();
    fs::set_permissions(m.path("g"), fs::Permissions::from_mode(0o2777)).unwrap();
    let (ok, stderr) = as_nobody(
        "echo x > g/f && mkdir g/sub && ln -s f g/l && chmod 4755 g/f",
        &m.mnt,
    );
    assert!(ok, "{stderr}");
    for (name, want_mode) in [("g/f", Some(0o4755)), ("g/sub", None), ("g/l", None)] {
        let md = fs::symlink_metadata(m.backing_path(name)).unwrap();
        assert_eq!((md.uid(), md.gid()), (65534, 4321), "{name}");
        if let Some(mode) = want_mode {
            assert_eq!(md.mode() & 0o7777, mode, "{name}");
        }
    }
    let sub = fs::metadata(m.backing_path("g/sub")).unwrap();
    assert_ne!(sub.mode() & libc::S_ISGID, 0, "subdir lost set-gid");
    // Through the mount the same.
    let md = fs::metadata(m.path("g/f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 4321));
}

#[test]
fn readdir_long_names_span_many_replies() {
    let m = TestMount::new();
    fs::create_dir(m.path("long")).unwrap();
    let mut want = std::collections::BTreeSet::new();
    for i in 0..300 {
        let mut name = format!("{i:03}-");
        name.push_str(&"x".repeat(255 - name.len()));
        fs::write(m.path("long").join(&name), b"").unwrap();
        want.insert(name);
    }
    let got: std::collections::BTreeSet<String> = fs::read_dir(m.path("long"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(got, want);
    // Removing entries while listing: every remaining entry is seen once.
    let mut seen = std::collections::BTreeMap::new();
    let mut it = fs::read_dir(m.path("long")).unwrap();
    for _ in 0..100 {
        let n = it.next().unwrap().unwrap().file_name();
        *seen.entry(n).or_insert(0) += 1;
    }
    for i in (0..300).step_by(2) {
        let mut name = format!("{i:03}-");
        name.push_str(&"x".repeat(255 - name.len()));
        let _ = fs::remove_file(m.path("long").join(name));
    }
    for e in it {
        *seen.entry(e.unwrap().file_name()).or_insert(0) += 1;
    }
    assert!(seen.values().all(|&n| n == 1), "an entry was listed twice");
    for i in (1..300).step_by(2) {
        let mut name = format!("{i:03}-");
        name.push_str(&"x".repeat(255 - name.len()));
        assert!(
            seen.contains_key(std::ffi::OsStr::new(&name)),
            "{i} missing from the listing"
        );
    }
}

#[test]
fn odd_names_and_the_mount_root() {
    use std::os::unix::ffi::OsStrExt;
    let m = TestMount::new();
    let names: [&[u8]; 5] = [
        b"\xff\xfe not utf-8",
        b"new\nline",
        b" leading and trailing ",
        b"-dash",
        b"\xe2\x9c\x93 unicode",
    ];
    for n in names {
        let name = std::ffi::OsStr::from_bytes(n);
        fs::write(m.path(name), n).unwrap();
        assert_eq!(fs::read(m.backing_path(name)).unwrap(), n);
    }
    let listed: std::collections::BTreeSet<Vec<u8>> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    for n in names {
        assert!(
            listed.contains(n),
            "{:?} not listed",
            String::from_utf8_lossy(n)
        );
    }
    // The root itself: its attributes are the backing dir's, and settable.
    let a = fs::metadata(&m.mnt).unwrap();
    let b = fs::metadata(&m.backing).unwrap();
    assert_eq!((a.mode(), a.uid(), a.gid()), (b.mode(), b.uid(), b.gid()));
    assert_eq!(a.ino(), 1, "the root is FUSE inode 1");
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o711)).unwrap();
    assert_eq!(fs::metadata(&m.backing).unwrap().mode() & 0o7777, 0o711);
    setxattr(&m.mnt, "user.root", b"r", 0).unwrap();
    assert_eq!(getxattr(&m.backing, "user.root", 10).unwrap(), b"r");
    // listxattr's size query.
    // SAFETY: valid C string; a null buffer of size 0 asks for the size.
    let n = unsafe { libc::listxattr(cpath(&m.mnt).as_ptr(), std::ptr::null_mut(), 0) };
    assert!(n >= "user.root\0".len() as isize, "size query gave {n}");
    let mut small = [0u8; 3];
    // SAFETY: valid C string and buffer.
    let r = check(unsafe {
        libc::listxattr(
            cpath(&m.mnt).as_ptr(),
            small.as_mut_ptr().cast(),
            small.len(),
        )
    } as i64);
    assert_eq!(r, Err(libc::ERANGE));
}

#[test]
fn unprivileged_write_and_truncate_clear_set_id_bits() {
    let m = TestMount::with_options(|o| o.allow_other = true);
    for (name, script) in [("w", "echo x >> w"), ("t", "truncate -s 0 t")] {
        fs::write(m.path(name), b"data").unwrap();
        fs::set_permissions(m.path(name), fs::Permissions::from_mode(0o6777)).unwrap();
        let (ok, stderr) = as_nobody(script, &m.mnt);
        assert!(ok, "{script}: {stderr}");
        let mode = fs::metadata(m.path(name)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o0777, "{script} left set-id bits");
        let backing = fs::metadata(m.backing_path(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(backing, 0o0777);
    }
    // Root (CAP_FSETID) keeps them, as on a local filesystem.
    fs::write(m.path("r"), b"data").unwrap();
    fs::set_permissions(m.path("r"), fs::Permissions::from_mode(0o6755)).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(m.path("r"))
        .unwrap()
        .write_all(b"more")
        .unwrap();
    let mode = fs::metadata(m.path("r")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o6755);
}
