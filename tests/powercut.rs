//! Power-cut harness: the primary and a replica run inside a QEMU guest (TCG)
//! whose disks are raw images with cache=unsafe, and the power is cut for
//! real: what the guest had not written out of its page cache is gone, which
//! `kill -9` on the host can never show. After each cut the images are read
//! as the next boot would see them, the promises are checked, the guest boots
//! again to recover and converge, and the result is checked once more.
//!
//! Promises checked after a cut:
//! - every write whose fsync returned (an "ACK" line on the serial console,
//!   printed only after the fsync) is in the backing dir and in the journal;
//! - after a clean unmount (CLEAN present), every write made before it is;
//! - the replica's persisted applied seq never runs ahead of its mirror:
//!   every journaled write up to it is in the mirror;
//!   and after recovery the mirror equals the backing dir.
//!
//! The guest is a Debian cloud kernel with a busybox initramfs (see
//! tests/powercut/). Knobs: POWERCUT_ROUNDS (default 3), POWERCUT_SEED,
//! POWERCUT_KEEP=1 (keep the work dir), POWERCUT_MODE=work|clean (only that
//! kind of round), POWERCUT_CACHE (kernel cache dir).

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Rng;
use common::tree::compare_trees;
use replicafs::journal::record::{self, Op, Record};
use replicafs::journal::segment;

const BLOCK: u64 = 4096;
/// Generous limits against a wedged guest only: nothing is asserted on time.
const BOOT_LIMIT: Duration = Duration::from_secs(900);

fn helper_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/powercut")
}

fn cache_dir() -> PathBuf {
    std::env::var_os("POWERCUT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/replicafs-powercut"))
}

fn kernel() -> Option<PathBuf> {
    let boot = cache_dir().join("kernel/boot");
    std::fs::read_dir(boot)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

fn sh(script: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new("bash")
        .arg(helper_dir().join(script))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{script} {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The bytes the guest writes for `tag`: `yes TAG | head -c 4096`.
fn block_of(tag: &str) -> Vec<u8> {
    let line = format!("{tag}\n");
    line.bytes().cycle().take(BLOCK as usize).collect()
}

/// A write the guest reported: file, 4 KiB slot, content tag.
#[derive(Debug, Clone)]
struct Promise {
    file: String,
    slot: u64,
    tag: String,
}

fn parse_log(log: &str, kind: &str) -> Vec<Promise> {
    let prefix = format!("PC {kind} ");
    // Whole lines only: a power cut can fall in the middle of one.
    log.split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .filter_map(|l| l.find(&prefix).map(|i| &l[i + prefix.len()..]))
        .filter_map(|rest| {
            let mut it = rest.split_whitespace();
            let file = it.next()?.to_string();
            let slot = it.next()?.parse().ok()?;
            let tag = it.next()?.to_string();
            // The guest's own tag shape (s<seed>w<n> or s<seed>c<n>), nothing
            // mixed in from another console writer.
            let shape = tag.len() > 1
                && tag.starts_with('s')
                && tag[1..]
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == 'w' || c == 'c');
            (shape && it.next().is_none()).then_some(Promise { file, slot, tag })
        })
        .collect()
}

/// The guest saw the replica report a durable applied seq above 0.
fn replica_reported(log: &str) -> bool {
    log.lines().any(|l| {
        l.split_once("PC RAPPLIED ")
            .and_then(|(_, n)| n.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    })
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    /// fsync'ed writes; the host cuts the power after a seeded number of acks.
    Work,
    /// Buffered writes, unmount, and a cut a seeded delay after CLEAN appears.
    Clean,
}

struct Guest {
    child: Child,
    log: PathBuf,
}

fn boot(dir: &Path, name: &str, append: &str, initrd: &Path) -> Guest {
    let log = dir.join(format!("{name}.log"));
    let kernel = kernel().expect("kernel");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", "512", "-smp", "1", "-nodefaults"])
        .args(["-display", "none", "-no-reboot", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet loglevel=3 panic=-1 {append}"));
    for img in ["primary.img", "replica.img"] {
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            dir.join(img).display()
        ));
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join(format!("{name}.qemu.err"))).expect("qemu stderr"),
        ))
        .spawn()
        .expect("cannot start qemu-system-x86_64");
    Guest { child, log }
}

impl Guest {
    fn log_text(&self) -> String {
        let mut s = Vec::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    }

    /// Waits until `done(log)` or the guest exits; false on the time limit.
    fn wait_for(&mut self, mut done: impl FnMut(&str) -> bool) -> Result<bool, String> {
        let start = Instant::now();
        loop {
            if done(&self.log_text()) {
                return Ok(true);
            }
            if self.child.try_wait().map_err(|e| e.to_string())?.is_some() {
                // Read once more: the last lines may have come with the exit.
                return Ok(done(&self.log_text()));
            }
            if start.elapsed() > BOOT_LIMIT {
                return Err(format!("the guest is stuck (see {})", self.log.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The power cut: SIGKILL, so QEMU writes nothing more.
    fn cut(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Every journal frame still in the segment files, trimmed or not (a trim
/// only moves the floor; whole segments go only when far behind).
fn journal_frames(state_dir: &Path) -> Result<Vec<Record>, String> {
    let dir = replicafs::journal::journal_dir(state_dir);
    let segs = segment::list_segments(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for (i, (_, path)) in segs.iter().enumerate() {
        let scan = segment::scan(path, i + 1 == segs.len())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for f in &scan.frames {
            let rec = record::decode_frame(&bytes[f.offset as usize..])
                .map_err(|e| format!("{} frame {}: {e:?}", path.display(), f.seq))?;
            out.push(rec);
        }
    }
    Ok(out)
}

fn rel(path: &[u8]) -> String {
    String::from_utf8_lossy(path)
        .trim_start_matches('/')
        .to_string()
}

/// Some journaled write covers the promise's block with its bytes: in its
/// payload, or (a write whose bytes stay in the backing file) by the crc of
/// the range it wrote, read from `backing` after the cut (the workload never
/// writes a block twice, so the range still holds what was written).
fn journaled(frames: &[Record], backing: &Path, p: &Promise) -> bool {
    let want = block_of(&p.tag);
    let (lo, hi) = (p.slot * BLOCK, (p.slot + 1) * BLOCK);
    frames.iter().any(|r| match &r.op {
        Op::Write { path, offset } => {
            let end = offset + r.data.len() as u64;
            rel(path) == p.file
                && *offset <= lo
                && end >= hi
                && r.data[(lo - offset) as usize..(hi - offset) as usize] == want[..]
        }
        Op::WriteBacked {
            path,
            offset,
            len,
            crc,
        } => {
            let end = offset + *len as u64;
            rel(path) == p.file
                && *offset <= lo
                && end >= hi
                && read_at(&backing.join(&p.file), *offset, *len as usize)
                    .is_some_and(|b| record::payload_crc(&b) == *crc)
        }
        _ => false,
    })
}

fn read_at(file: &Path, offset: u64, len: usize) -> Option<Vec<u8>> {
    let f = std::fs::File::open(file).ok()?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).ok()?;
    Some(buf)
}

/// The applied seq in `replica.state`: of two 128-byte slots (at 0 and
/// 4096), the valid one with the higher generation.
fn replica_applied(state_dir: &Path) -> Result<u64, String> {
    let path = state_dir.join("replica.state");
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(0);
    };
    let mut best: Option<(u64, u64)> = None;
    for off in [0usize, 4096] {
        let Some(b) = bytes.get(off..off + 128) else {
            continue;
        };
        if &b[0..4] != b"RFRS" || b[4] != 1 {
            continue;
        }
        if crc32fast::hash(&b[..120]).to_le_bytes() != b[120..124] {
            continue;
        }
        let u = |i: usize| u64::from_le_bytes(b[8 + i * 8..16 + i * 8].try_into().unwrap());
        let (generation, applied) = (u(0), u(2));
        if best.is_none_or(|(g, _)| generation > g) {
            best = Some((generation, applied));
        }
    }
    match best {
        Some((_, a)) => Ok(a),
        None if bytes.is_empty() => Ok(0),
        None => Err(format!("{} has no valid slot", path.display())),
    }
}

/// The promises hold in a tree after a cut (or after recovery).
fn check_promises(backing: &Path, frames: Option<&[Record]>, promises: &[Promise]) -> Vec<String> {
    let mut errs = Vec::new();
    for p in promises {
        let want = block_of(&p.tag);
        match read_at(&backing.join(&p.file), p.slot * BLOCK, BLOCK as usize) {
            Some(got) if got == want => {}
            Some(_) => errs.push(format!("{p:?}: other bytes in the backing file")),
            None => errs.push(format!("{p:?}: the backing file is too short or missing")),
        }
        if let Some(frames) = frames
            && !journaled(frames, backing, p)
        {
            errs.push(format!("{p:?}: no journal record holds it"));
        }
    }
    errs
}

/// The replica's persisted applied seq is durable: every write the primary
/// journaled up to it is in the mirror (the workload never overwrites a
/// block with other bytes, so no later record can explain a difference).
fn check_replica(frames: &[Record], replica_state: &Path, mirror: &Path) -> Vec<String> {
    let applied = match replica_applied(replica_state) {
        Ok(a) => a,
        Err(e) => return vec![e],
    };
    let newest = frames.iter().map(|r| r.seq).max().unwrap_or(0);
    let mut errs = Vec::new();
    if applied > newest {
        errs.push(format!(
            "the replica persisted applied = {applied} but the primary's journal ends at {newest}"
        ));
    }
    for r in frames.iter().filter(|r| r.seq <= applied) {
        // Compared by crc32: a write's own bytes, or the crc a write kept
        // in the backing file was journaled with.
        let (path, offset, len, crc) = match &r.op {
            Op::Write { path, offset } => {
                (path, *offset, r.data.len(), record::payload_crc(&r.data))
            }
            Op::WriteBacked {
                path,
                offset,
                len,
                crc,
            } => (path, *offset, *len as usize, *crc),
            _ => continue,
        };
        let file = rel(path);
        match read_at(&mirror.join(&file), offset, len) {
            Some(got) if record::payload_crc(&got) == crc => {}
            _ => errs.push(format!(
                "replica applied = {applied}, but record {} (write {file} at {offset}, {len} bytes) is not in its mirror",
                r.seq,
            )),
        }
    }
    errs
}

struct Run {
    dir: PathBuf,
    initrd: PathBuf,
    bin: String,
}

impl Run {
    /// One round: fresh disks, a cut, checks, a recovery boot, checks.
    fn round(&self, round: usize, mode: Mode, rng: &mut Rng, seed: u64) -> Result<(), String> {
        let dir = self.dir.join(format!("round{round}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        sh("prepare.sh", &["disks", dir.to_str().unwrap(), &self.bin])?;
        let gseed = seed.wrapping_add(round as u64) % 1_000_000_007;

        // Boot, work, cut.
        let promises = match mode {
            Mode::Work => {
                let acks = 5 + rng.below(80) as usize;
                eprintln!("round {round}: fsync'ed writes, power cut after {acks} acks");
                let mut g = boot(
                    &dir,
                    "work",
                    &format!("pc.mode=work pc.seed={gseed}"),
                    &self.initrd,
                );
                // Once the replica persisted an applied seq too (or, should it
                // never do so, a while later), so that its promise is tested.
                let reached = g.wait_for(|l| {
                    let n = l.matches("PC ACK ").count();
                    n >= acks && (replica_reported(l) || n >= acks + 400) || l.contains("PC FAIL")
                })?;
                g.cut();
                let log = g.log_text();
                if !reached || log.contains("PC FAIL") {
                    return Err(format!("the work boot failed (see {})", g.log.display()));
                }
                parse_log(&log, "ACK")
            }
            Mode::Clean => {
                let delay = [0u64, 2_000, 10_000, 50_000, 200_000][rng.below(5) as usize];
                eprintln!(
                    "round {round}: buffered writes, unmount, power cut {delay} µs after CLEAN"
                );
                let mut g = boot(
                    &dir,
                    "clean",
                    &format!("pc.mode=clean pc.seed={gseed} pc.delay={delay}"),
                    &self.initrd,
                );
                // The guest cuts its own power (no reboot: QEMU exits).
                let _ = g.wait_for(|_| false)?;
                let log = g.log_text();
                if !log.contains("PC CUT") {
                    return Err(format!("the clean boot failed (see {})", g.log.display()));
                }
                parse_log(&log, "PENDING")
            }
        };

        // What the next boot sees.
        let cut_p = dir.join("cut-primary");
        let cut_r = dir.join("cut-replica");
        sh(
            "extract.sh",
            &[
                dir.join("primary.img").to_str().unwrap(),
                cut_p.to_str().unwrap(),
            ],
        )?;
        sh(
            "extract.sh",
            &[
                dir.join("replica.img").to_str().unwrap(),
                cut_r.to_str().unwrap(),
            ],
        )?;
        let frames = journal_frames(&cut_p.join("state"))?;
        let promised: &[Promise] = match mode {
            Mode::Work => &promises,
            // Only a clean stop promises the buffered writes.
            Mode::Clean if cut_p.join("state/journal/CLEAN").exists() => &promises,
            Mode::Clean => &[],
        };
        eprintln!(
            "round {round}: {} promised writes, {} journal frames, replica applied {}",
            promised.len(),
            frames.len(),
            replica_applied(&cut_r.join("state")).unwrap_or(0)
        );
        let mut errs = check_promises(&cut_p.join("backing"), Some(&frames), promised);
        errs.extend(check_replica(
            &frames,
            &cut_r.join("state"),
            &cut_r.join("mirror"),
        ));
        if !errs.is_empty() {
            return Err(format!(
                "after the power cut (round {round}, {mode:?}, images extracted to {} and {}):\n  {}",
                cut_p.display(),
                cut_r.display(),
                errs.join("\n  ")
            ));
        }

        // Recover, converge, stop cleanly.
        let mut g = boot(&dir, "check", "pc.mode=check pc.log=info", &self.initrd);
        let done = g.wait_for(|l| l.contains("PC DONE") || l.contains("PC FAIL"))?;
        let _ = g.child.wait();
        let log = g.log_text();
        if !done || !log.contains("PC DONE") {
            return Err(format!("recovery boot failed (see {})", g.log.display()));
        }
        let fin_p = dir.join("final-primary");
        let fin_r = dir.join("final-replica");
        sh(
            "extract.sh",
            &[
                dir.join("primary.img").to_str().unwrap(),
                fin_p.to_str().unwrap(),
            ],
        )?;
        sh(
            "extract.sh",
            &[
                dir.join("replica.img").to_str().unwrap(),
                fin_r.to_str().unwrap(),
            ],
        )?;
        let mut errs = check_promises(&fin_p.join("backing"), None, promised);
        errs.extend(compare_trees(&fin_p.join("backing"), &fin_r.join("mirror")));
        if !errs.is_empty() {
            return Err(format!(
                "after recovery (round {round}, {mode:?}; backing {} vs mirror {}):\n  {}",
                fin_p.display(),
                fin_r.display(),
                errs.join("\n  ")
            ));
        }
        if std::env::var_os("POWERCUT_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(())
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn power_cuts_keep_every_promise() {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED power_cuts_keep_every_promise: needs root and /dev/fuse");
        return;
    }
    // Installs only what is missing (QEMU, static busybox, e2fsprogs, kernel).
    sh("setup.sh", &[]).expect("tests/powercut/setup.sh");
    let seed: u64 = std::env::var("POWERCUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 % 1_000_000)
                .unwrap_or(1)
        });
    let rounds: usize = std::env::var("POWERCUT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir =
        std::env::temp_dir().join(format!("replicafs-powercut-{}-{seed}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("work dir");
    eprintln!(
        "power-cut harness: seed {seed} (POWERCUT_SEED={seed} repeats it), {rounds} rounds, work dir {}",
        dir.display()
    );
    let bin = env!("CARGO_BIN_EXE_replicafs").to_string();
    let kdir = cache_dir().join("kernel");
    sh(
        "prepare.sh",
        &[
            "initrd",
            dir.to_str().unwrap(),
            &bin,
            kdir.to_str().unwrap(),
        ],
    )
    .expect("initramfs");
    let run = Run {
        initrd: dir.join("initrd.cpio"),
        dir: dir.clone(),
        bin,
    };
    // POWERCUT_MODE=work|clean: every round of that kind (default: alternate).
    let only = std::env::var("POWERCUT_MODE").ok();
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    for round in 0..rounds {
        let mode = match only.as_deref() {
            Some("work") => Mode::Work,
            Some("clean") => Mode::Clean,
            _ if round % 2 == 1 => Mode::Clean,
            _ => Mode::Work,
        };
        if let Err(e) = run.round(round, mode, &mut rng, seed) {
            failures.push(e);
            break;
        }
    }
    if failures.is_empty() && std::env::var_os("POWERCUT_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    assert!(
        failures.is_empty(),
        "power-cut harness failed (seed {seed}; POWERCUT_SEED={seed} repeats it; work dir and guest logs kept in {}):\n{}",
        dir.display(),
        failures.join("\n")
    );
}
