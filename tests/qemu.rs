//! Real clients: qemu-img and qemu-io on raw and qcow2 images in the mount,
//! buffered and with cache=none (O_DIRECT), checked against the same work done
//! in a plain directory.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{Rng, TestMount};

const GIB: u64 = 1 << 30;
/// Size of the images that are written and read whole. qemu-img reads every
/// byte of them through the mount (SEEK_DATA reports no holes under the
/// writeback cache), so they are kept smaller than the 1 GiB ones.
const WORK_SIZE: u64 = 256 << 20;

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
#[track_caller]
fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// One qemu-io write: offset, length, pattern byte.
#[derive(Debug, Clone, Copy)]
struct Write {
    offset: u64,
    len: u64,
    pattern: u8,
}

/// Writes in distinct 1 MiB slots of a WORK_SIZE image (so every one can be
/// read back with its own pattern), 4 KiB aligned for cache=none.
fn random_writes(seed: u64, n: usize) -> Vec<Write> {
    let mut rng = Rng::new(seed);
    let mut slots = std::collections::BTreeSet::new();
    while slots.len() < n {
        slots.insert(rng.below(WORK_SIZE >> 20));
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(i, slot)| {
            let len = (1 + rng.below(64)) * 4096; // up to 256 KiB
            let within = rng.below(((1 << 20) - len) / 4096 + 1) * 4096;
            Write {
                offset: (slot << 20) + within,
                len,
                pattern: 0x10 + i as u8,
            }
        })
        .collect()
}

/// qemu-io with `commands` on `image`; fails the test on any error or
/// pattern mismatch.
#[track_caller]
fn qemu_io(image: &Path, format: &str, cache_none: bool, commands: &[String]) -> String {
    let mut args: Vec<&str> = vec!["-f", format];
    if cache_none {
        args.extend(["-t", "none"]);
    }
    for c in commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push(s(image));
    let out = ok("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io reported a problem:\n{out}"
    );
    out
}

fn write_commands(writes: &[Write]) -> Vec<String> {
    writes
        .iter()
        .map(|w| format!("write -P {:#x} {} {}", w.pattern, w.offset, w.len))
        .collect()
}

fn read_commands(writes: &[Write]) -> Vec<String> {
    let mut cmds: Vec<String> = writes
        .iter()
        .map(|w| format!("read -P {:#x} {} {}", w.pattern, w.offset, w.len))
        .collect();
    // The bytes just around each write are still zero.
    for w in writes {
        if w.offset >= 512 {
            cmds.push(format!("read -P 0 {} 512", w.offset - 512));
        }
        cmds.push(format!("read -P 0 {} 512", w.offset + w.len));
    }
    cmds
}

#[track_caller]
fn compare(a: &Path, fa: &str, b: &Path, fb: &str) {
    let out = ok("qemu-img", &["compare", "-f", fa, "-F", fb, s(a), s(b)]);
    assert!(out.contains("identical"), "{out}");
}

#[track_caller]
fn check_qcow2(p: &Path) {
    let out = ok("qemu-img", &["check", "-f", "qcow2", s(p)]);
    assert!(out.contains("No errors were found"), "{out}");
}

fn virtual_size(p: &Path) -> u64 {
    // "virtual size: 1 GiB (1073741824 bytes)"
    let out = ok("qemu-img", &["info", s(p)]);
    let line = out
        .lines()
        .find(|l| l.starts_with("virtual size:"))
        .unwrap_or_else(|| panic!("no virtual size in {out}"));
    let inner = line.rsplit('(').next().unwrap();
    inner.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn create_raw_and_qcow2() {
    let m = TestMount::new();
    let raw = m.path("disk.raw");
    let qcow = m.path("disk.qcow2");
    ok("qemu-img", &["create", "-f", "raw", s(&raw), "1G"]);
    ok("qemu-img", &["create", "-f", "qcow2", s(&qcow), "1G"]);
    assert_eq!(virtual_size(&raw), GIB);
    assert_eq!(virtual_size(&qcow), GIB);
    let md = std::fs::metadata(m.backing_path("disk.raw")).unwrap();
    assert_eq!(md.len(), GIB);
    assert!(
        md.blocks() < 64,
        "new raw image not sparse: {} blocks",
        md.blocks()
    );
    check_qcow2(&qcow);
    // Preallocated variants (fallocate, and written zeros).
    let falloc = m.path("falloc.raw");
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=falloc",
            s(&falloc),
            "64M",
        ],
    );
    assert!(
        std::fs::metadata(m.backing_path("falloc.raw"))
            .unwrap()
            .blocks()
            >= 64 * 2048
    );
    let full = m.path("full.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=full",
            s(&full),
            "32M",
        ],
    );
    check_qcow2(&full);
    // An overlay on a backing image in the mount.
    let overlay = m.path("overlay.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "disk.qcow2",
            "-F",
            "qcow2",
            s(&overlay),
        ],
    );
    assert_eq!(virtual_size(&overlay), GIB);
    check_qcow2(&overlay);
}

/// Random pattern writes, read back in a fresh process; the same writes on a
/// plain directory give an identical image.
fn pattern_writes(format: &str, cache_none: bool, seed: u64) {
    let m = TestMount::new();
    let plain = tempfile::tempdir().unwrap();
    let name = format!("disk.{format}");
    let img = m.path(&name);
    let reference = plain.path().join(&name);
    for p in [&img, &reference] {
        ok("qemu-img", &["create", "-f", format, s(p), "256M"]);
    }
    let writes = random_writes(seed, 40);
    // In two batches, the second in a new process on the reopened image.
    let (first, second) = writes.split_at(25);
    qemu_io(&img, format, cache_none, &write_commands(first));
    qemu_io(&img, format, cache_none, &write_commands(second));
    // Zero writes and discards go through fallocate.
    let zero = format!("write -z {} 8192", writes[3].offset);
    let discard = format!("discard {} 4096", writes[5].offset);
    qemu_io(&img, format, cache_none, &[zero.clone(), discard.clone()]);
    qemu_io(
        &reference,
        format,
        false,
        &[write_commands(&writes), vec![zero, discard]].concat(),
    );
    // Read back through the mount, with and without cache=none.
    let mut expect = writes.clone();
    expect.retain(|w| w.offset != writes[3].offset && w.offset != writes[5].offset);
    qemu_io(&img, format, cache_none, &read_commands(&expect));
    qemu_io(&img, format, !cache_none, &read_commands(&expect));
    qemu_io(
        &img,
        format,
        cache_none,
        &[format!("read -P 0 {} 8192", writes[3].offset)],
    );
    if format == "qcow2" {
        check_qcow2(&img);
    }
    compare(&img, format, &reference, format);
    // And the backing file itself is the same image.
    compare(&m.backing_path(&name), format, &reference, format);
}

#[test]
fn qemu_io_raw_buffered() {
    pattern_writes("raw", false, 1);
}

#[test]
fn qemu_io_raw_cache_none() {
    pattern_writes("raw", true, 2);
}

#[test]
fn qemu_io_qcow2_buffered() {
    pattern_writes("qcow2", false, 3);
}

#[test]
fn qemu_io_qcow2_cache_none() {
    pattern_writes("qcow2", true, 4);
}

#[test]
fn convert_between_formats() {
    let m = TestMount::new();
    let plain = tempfile::tempdir().unwrap();
    let raw = m.path("src.raw");
    ok("qemu-img", &["create", "-f", "raw", s(&raw), "256M"]);
    let writes = random_writes(5, 30);
    qemu_io(&raw, "raw", false, &write_commands(&writes));

    // raw -> qcow2 -> raw, all in the mount.
    let qcow = m.path("conv.qcow2");
    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow)],
    );
    check_qcow2(&qcow);
    compare(&raw, "raw", &qcow, "qcow2");
    let back = m.path("back.raw");
    ok(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(&qcow), s(&back)],
    );
    compare(&raw, "raw", &back, "raw");
    qemu_io(&back, "raw", false, &read_commands(&writes));
    // The converted raw image is sparse where the source had holes.
    let md = std::fs::metadata(m.backing_path("back.raw")).unwrap();
    assert_eq!(md.len(), WORK_SIZE);
    assert!(
        md.blocks() < 64 * 2048,
        "converted image not sparse: {} blocks",
        md.blocks()
    );

    // Out of the mount and back in, with cache=none on the mount side.
    let out = plain.path().join("out.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-T",
            "none",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&out),
        ],
    );
    compare(&raw, "raw", &out, "qcow2");
    let again = m.path("again.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-t",
            "none",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            s(&out),
            s(&again),
        ],
    );
    check_qcow2(&again);
    compare(&again, "qcow2", &raw, "raw");
}

#[test]
fn convert_right_after_unflushed_writes() {
    // A writer that has not closed or flushed its file yet, and qemu-img
    // reading the image meanwhile: nothing may be lost to stale holes.
    use std::os::unix::fs::FileExt;
    let m = TestMount::new();
    let raw = m.path("live.raw");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&raw)
        .unwrap();
    f.set_len(WORK_SIZE).unwrap();
    let writes = random_writes(6, 20);
    for w in &writes {
        f.write_all_at(&vec![w.pattern; w.len as usize], w.offset)
            .unwrap();
    }
    let out = m.path("copy.qcow2");
    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&out)],
    );
    qemu_io(&out, "qcow2", false, &read_commands(&writes));
    // `cp` uses SEEK_DATA/SEEK_HOLE (or copy_file_range) as well.
    let cp = m.path("cp.raw");
    ok("cp", &["--sparse=always", s(&raw), s(&cp)]);
    qemu_io(&cp, "raw", false, &read_commands(&writes));
    drop(f);
}
