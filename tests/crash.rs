//! Crash test: kill -9 the mount under a write load, many times; after each
//! restart, replaying the journal onto an empty directory must reproduce the
//! backing dir except inside the dirty list, and every write acknowledged by
//! fsync must be in the journal.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_replicafs");
const FILES: usize = 3;
const FILE_SIZE: u64 = 8 << 20;
const BLOCK: u64 = 4096;
const WRITERS: usize = 3;

fn is_mounted(p: &Path) -> bool {
    let want = p.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

/// A mount process; killed and lazily unmounted on drop whatever happens.
struct MountProc {
    child: Option<Child>,
    mnt: PathBuf,
    log: PathBuf,
}

impl MountProc {
    fn start(backing: &Path, mnt: &Path, config: &Path) -> MountProc {
        let child = Command::new(BIN)
            .args(["mount"])
            .arg(backing)
            .arg(mnt)
            .arg("--config")
            .arg(config)
            .env("REPLICAFS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(config.with_extension("log")).expect("log file"))
            .spawn()
            .expect("spawn replicafs mount");
        let p = MountProc {
            child: Some(child),
            mnt: mnt.to_owned(),
            log: config.with_extension("log"),
        };
        let start = Instant::now();
        while !is_mounted(mnt) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "mount did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        force_unmount(&self.mnt);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let status = c.wait().expect("wait");
            assert!(
                status.success(),
                "mount exited with {status}: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        assert!(!is_mounted(&self.mnt));
    }
}

fn force_unmount(mnt: &Path) {
    for _ in 0..100 {
        if !is_mounted(mnt) {
            return;
        }
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for MountProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The bytes of one version of one block.
fn pattern(file: usize, block: u64, version: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK as usize);
    let seed = (file as u64) << 40 ^ block << 8 ^ version as u64;
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    while v.len() < BLOCK as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// What each block's writer knows: newest version written, newest version
/// acknowledged by an fsync with no later write started.
#[derive(Default, Clone, Copy)]
struct BlockState {
    written: u32,
    synced: Option<u32>,
}

type Blocks = Arc<Mutex<HashMap<(usize, u64), BlockState>>>;

fn writer(mnt: PathBuf, t: usize, blocks: Blocks, stop: Arc<AtomicBool>, seed: u64) {
    let files: Vec<_> = (0..FILES)
        .map(|f| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(mnt.join(format!("disk{f}.img")))
        })
        .collect();
    let Ok(files) = files.into_iter().collect::<Result<Vec<_>, _>>() else {
        return;
    };
    let mut x = seed | 1;
    let mut since_sync: Vec<(usize, u64, u32)> = Vec::new();
    let nblocks = FILE_SIZE / BLOCK;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let f = (x % FILES as u64) as usize;
        // This thread owns the blocks congruent to t.
        let block = ((x >> 8) % (nblocks / WRITERS as u64)) * WRITERS as u64 + t as u64;
        let version = {
            let mut b = blocks.lock().unwrap();
            let s = b.entry((f, block)).or_default();
            s.written += 1;
            s.synced = None;
            s.written
        };
        if files[f]
            .write_all_at(&pattern(f, block, version), block * BLOCK)
            .is_err()
        {
            return;
        }
        since_sync.push((f, block, version));
        if x.is_multiple_of(16) {
            if files[f].sync_data().is_err() {
                return;
            }
            // fdatasync covers this file only.
            let mut b = blocks.lock().unwrap();
            since_sync.retain(|&(sf, sb, sv)| {
                if sf != f {
                    return true;
                }
                let s = b.get_mut(&(sf, sb)).unwrap();
                if s.written == sv {
                    s.synced = Some(sv);
                }
                false
            });
        }
    }
}

#[derive(serde::Deserialize)]
struct Dirty {
    path: Vec<u8>,
    offset: u64,
    len: u64,
}

fn dirty_regions(state: &Path) -> Vec<Dirty> {
    let out = Command::new(BIN)
        .args(["journal", "stats", "--json", "--state-dir"])
        .arg(state)
        .env("REPLICAFS_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    serde_json::from_value(v["dirty"].clone()).unwrap()
}

fn replay(state: &Path, target: &Path) {
    let _ = std::fs::remove_dir_all(target);
    std::fs::create_dir_all(target).unwrap();
    let out = Command::new(BIN)
        .args(["journal", "replay", "--state-dir"])
        .arg(state)
        .arg("--target")
        .arg(target)
        .env("REPLICAFS_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kill_9_under_load_loses_nothing_silently() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    let replayed = dir.path().join("replayed");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let state = backing.join(".replicafs");
    // Small extents and few slots: the activity log retires extents all the
    // time, so the dirty list after a crash is a small part of each file.
    let config = dir.path().join("replicafs.toml");
    std::fs::write(
        &config,
        // The journal keeps every write's bytes, so that its replay alone is
        // compared with the backing dir.
        "[journal]\nextent_bytes = 262144\nactivity_slots = 32\npayload = \"journal\"\n",
    )
    .unwrap();

    {
        let mut m = MountProc::start(&backing, &mnt, &config);
        for f in 0..FILES {
            let file = std::fs::File::create(mnt.join(format!("disk{f}.img"))).unwrap();
            file.set_len(FILE_SIZE).unwrap();
            file.sync_all().unwrap();
        }
        m.stop();
    }

    let blocks: Blocks = Arc::default();
    let rounds = 4;
    for round in 0..rounds {
        let mut m = MountProc::start(&backing, &mnt, &config);
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..WRITERS)
            .map(|t| {
                let (mnt, blocks, stop) = (mnt.clone(), blocks.clone(), stop.clone());
                let seed = 0x1234_5678_9abc_def1u64 ^ ((round * 31 + t) as u64) << 20;
                std::thread::spawn(move || writer(mnt, t, blocks, stop, seed))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300 + 137 * round as u64));
        m.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        // Recovery happens at the next mount; a clean stop then closes the journal.
        let mut m = MountProc::start(&backing, &mnt, &config);
        m.stop();
        drop(m);

        replay(&state, &replayed);
        let dirty = dirty_regions(&state);
        let b = blocks.lock().unwrap();
        let mut dirty_bytes = 0u64;
        for d in &dirty {
            dirty_bytes += d.len.min(FILE_SIZE);
        }
        // Each crash adds at most the hot set: about slots x extent (retirement
        // runs after the set overflows, so allow twice that).
        assert!(
            dirty_bytes <= (round as u64 + 1) * 2 * 32 * 262144,
            "round {round}: the dirty list ({dirty_bytes} bytes) should be bounded by the activity log"
        );
        let mut differing = 0;
        let mut synced = 0;
        for f in 0..FILES {
            let name = format!("disk{f}.img");
            let real = std::fs::read(backing.join(&name)).unwrap();
            let rep = std::fs::read(replayed.join(&name)).unwrap();
            assert_eq!(real.len(), rep.len(), "round {round}: size of {name}");
            let covered = |off: u64| {
                dirty.iter().any(|d| {
                    d.path == name.as_bytes()
                        && d.offset <= off
                        && (d.len == u64::MAX || off + BLOCK <= d.offset + d.len)
                })
            };
            for blk in 0..FILE_SIZE / BLOCK {
                let r = (blk * BLOCK) as usize..((blk + 1) * BLOCK) as usize;
                if real[r.clone()] != rep[r.clone()] {
                    differing += 1;
                    assert!(
                        covered(blk * BLOCK),
                        "round {round}: {name} block {blk} differs from the journal and is not dirty"
                    );
                }
                if let Some(v) = b.get(&(f, blk)).and_then(|s| s.synced) {
                    synced += 1;
                    assert_eq!(
                        rep[r],
                        pattern(f, blk, v)[..],
                        "round {round}: fsync-acknowledged {name} block {blk} v{v} is not in the journal"
                    );
                }
            }
        }
        eprintln!(
            "round {round}: {differing} blocks differ from the journal (all dirty), \
             {synced} fsync-acknowledged blocks checked, {dirty_bytes} dirty bytes"
        );
    }
}

/// Every file under `dir` with its bytes.
fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn journal_cmd(args: &[&str], state: &Path) -> std::process::Output {
    let out = Command::new(BIN)
        .arg("journal")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env("REPLICAFS_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "journal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn inspecting_a_crashed_state_dir_leaves_it_to_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let state = backing.join(".replicafs");
    let clean = state.join("journal/CLEAN");
    let config = dir.path().join("replicafs.toml");
    std::fs::write(&config, "").unwrap();
    {
        let mut m = MountProc::start(&backing, &mnt, &config);
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(mnt.join("disk.img"))
            .unwrap();
        f.write_all_at(&[5u8; 65536], 1 << 20).unwrap();
        f.sync_all().unwrap();
        drop(f);
        m.kill9();
    }
    assert!(!clean.exists(), "a killed mount left CLEAN");
    let before = contents(&state);

    let stats = journal_cmd(&["stats", "--json"], &state);
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(v["clean"], false, "{v}");
    assert!(v["records"].as_u64().unwrap() >= 2, "{v}");
    let hot = v["hot_extents"].as_array().unwrap();
    assert!(
        hot.iter().any(|e| e[0] == "disk.img"),
        "the written extent is hot: {v}"
    );
    let dump = journal_cmd(&["dump", "--payload"], &state);
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("\"disk.img\" offset=1048576"), "{dump}");
    let text = journal_cmd(&["stats"], &state);
    assert!(String::from_utf8_lossy(&text.stdout).contains("stopped cleanly    no"));

    assert!(!clean.exists(), "inspection wrote CLEAN");
    assert!(
        before == contents(&state),
        "inspection changed files in the state dir"
    );

    // The next mount still sees the crash and puts the hot extent in the dirty list.
    let mut m = MountProc::start(&backing, &mnt, &config);
    m.stop();
    let log = std::fs::read_to_string(&m.log).unwrap();
    assert!(
        log.contains("previous run did not stop cleanly"),
        "no recovery at the next mount; log:\n{log}"
    );
    let dirty = dirty_regions(&state);
    assert!(
        dirty
            .iter()
            .any(|d| d.path == b"disk.img" && d.offset <= 1 << 20 && d.len > 0),
        "the hot extent is not dirty"
    );
}

/// A tmpfs of its own, unmounted on drop.
struct SmallFs(PathBuf);

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A real I/O failure under the journal (its filesystem full), no failpoint:
/// the fsync that needed the failed record gets EIO, its region is dirty, the
/// journal goes on once there is room, and no CLEAN is written at the end.
#[test]
fn a_failed_journal_write_fails_the_fsync_and_marks_the_region_dirty() {
    failed_journal_write("journal");
    failed_journal_write("backing");
}

/// `payload`: the journal.payload mode. With "backing" a record is a few
/// dozen bytes, so many writes are needed to need a new page of the full
/// filesystem.
fn failed_journal_write(payload: &str) {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    let fs_dir = dir.path().join("statefs");
    for d in [&backing, &mnt, &fs_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(&fs_dir)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let _fs = SmallFs(fs_dir.clone());
    let state = fs_dir.join("state");
    let config = dir.path().join("replicafs.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[journal]\npayload = {payload:?}\n",
            state.display().to_string()
        ),
    )
    .unwrap();

    let mut m = MountProc::start(&backing, &mnt, &config);
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(mnt.join("disk.img"))
        .unwrap();
    f.write_all_at(&[1u8; 65536], 0).unwrap();
    f.sync_data().unwrap();

    // Fill the journal's filesystem.
    let filler_path = fs_dir.join("filler");
    let mut filler = std::fs::File::create(&filler_path).unwrap();
    let chunk = vec![0u8; 4096];
    while filler.write_all(&chunk).is_ok() {}
    drop(filler);

    let writes = if payload == "backing" { 256 } else { 1 };
    for i in 0..writes {
        f.write_all_at(&[2u8; 65536], i * 131072).unwrap();
    }
    let err = f
        .sync_data()
        .expect_err("fsync acknowledged a record the journal could not write");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Same answer again: the record never becomes durable.
    assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));

    // Room again: later records are journaled and durable.
    std::fs::remove_file(&filler_path).unwrap();
    f.write_all_at(&[3u8; 65536], 1 << 20).unwrap();
    f.sync_data().unwrap();
    drop(f);

    // Read-only: the failed write's region is in the dirty list already.
    let dirty = dirty_regions(&state);
    assert!(
        dirty
            .iter()
            .any(|d| d.path == b"disk.img" && d.offset < writes * 131072 && d.len >= 65536),
        "{payload}: the failed record's region is not dirty: {:?}",
        dirty.iter().map(|d| (d.offset, d.len)).collect::<Vec<_>>()
    );
    m.stop();
    assert!(
        !state.join("journal/CLEAN").exists(),
        "CLEAN written over a failed journal write"
    );
}

/// `journal verify` stands in for the replay of a journal whose writes keep
/// their bytes in the backing file: it passes after a workload with
/// overwrites, and names the record whose bytes were changed behind the mount.
#[test]
fn verify_checks_a_backing_journal_against_the_backing_dir() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let state = backing.join(".replicafs");
    let config = dir.path().join("replicafs.toml");
    std::fs::write(&config, "").unwrap();
    let mut m = MountProc::start(&backing, &mnt, &config);
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(mnt.join("disk.img"))
        .unwrap();
    f.write_all_at(&[1u8; 65536], 0).unwrap();
    f.sync_all().unwrap();
    f.write_all_at(&[2u8; 4096], 4096).unwrap();
    f.write_all_at(&[3u8; 65536], 1 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(mnt.join("disk.img"), mnt.join("moved.img")).unwrap();
    m.stop();

    let out = journal_cmd(&["verify", "--json"], &state);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["unexplained"], serde_json::json!([]), "{v}");
    assert!(
        v["superseded"].as_u64().unwrap() >= 1,
        "the rename explains them: {v}"
    );

    // Changed behind the mount: the record of the last write is named.
    let mut m = MountProc::start(&backing, &mnt, &config);
    let g = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("moved.img"))
        .unwrap();
    g.write_all_at(&[4u8; 4096], 1 << 21).unwrap();
    g.sync_all().unwrap();
    drop(g);
    m.stop();
    let f = OpenOptions::new()
        .write(true)
        .open(backing.join("moved.img"))
        .unwrap();
    f.write_all_at(&[9u8], (1 << 21) + 7).unwrap();
    drop(f);
    let out = Command::new(BIN)
        .args(["journal", "verify", "--json", "--state-dir"])
        .arg(&state)
        .env("REPLICAFS_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "verify passed a changed backing file"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["unexplained"].as_array().unwrap().len(), 1, "{v}");
}
