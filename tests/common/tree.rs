//! Comparing two directory trees: names, file types, permission bits, owners,
//! link counts, sizes, contents, symlink targets and device numbers. The
//! replicafs state dir (`.replicafs` at the top) is ignored.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use replicafs::mount::STATE_DIR_NAME;

/// Every difference between the trees under `a` and `b`, one line each.
pub fn compare_trees(a: &Path, b: &Path) -> Vec<String> {
    let mut diffs = Vec::new();
    compare_dir(a, b, Path::new(""), true, &mut diffs);
    diffs
}

/// Panics with the list of differences if the trees differ.
#[track_caller]
pub fn assert_trees_equal(a: &Path, b: &Path) {
    let diffs = compare_trees(a, b);
    assert!(
        diffs.is_empty(),
        "trees {} and {} differ:\n  {}",
        a.display(),
        b.display(),
        diffs.join("\n  ")
    );
}

fn names(dir: &Path, top: bool) -> std::io::Result<BTreeSet<OsString>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        if top && name == STATE_DIR_NAME {
            continue;
        }
        out.insert(name);
    }
    Ok(out)
}

fn kind(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "chardev"
    } else if ft.is_block_device() {
        "blockdev"
    } else {
        "unknown"
    }
}

fn compare_dir(a: &Path, b: &Path, rel: &Path, top: bool, diffs: &mut Vec<String>) {
    let (na, nb) = match (names(a, top), names(b, top)) {
        (Ok(x), Ok(y)) => (x, y),
        (x, y) => {
            diffs.push(format!(
                "{}: cannot list: {:?} / {:?}",
                rel.display(),
                x.err(),
                y.err()
            ));
            return;
        }
    };
    for only in na.difference(&nb) {
        diffs.push(format!(
            "{}: only in {}",
            rel.join(only).display(),
            a.display()
        ));
    }
    for only in nb.difference(&na) {
        diffs.push(format!(
            "{}: only in {}",
            rel.join(only).display(),
            b.display()
        ));
    }
    for name in na.intersection(&nb) {
        compare_entry(&a.join(name), &b.join(name), &rel.join(name), diffs);
    }
}

fn compare_entry(a: &Path, b: &Path, rel: &Path, diffs: &mut Vec<String>) {
    let (ma, mb) = match (a.symlink_metadata(), b.symlink_metadata()) {
        (Ok(x), Ok(y)) => (x, y),
        (x, y) => {
            diffs.push(format!(
                "{}: cannot stat: {:?} / {:?}",
                rel.display(),
                x.err(),
                y.err()
            ));
            return;
        }
    };
    let (ka, kb) = (kind(&ma.file_type()), kind(&mb.file_type()));
    if ka != kb {
        diffs.push(format!("{}: type {ka} vs {kb}", rel.display()));
        return;
    }
    let mut field = |what: &str, x: u64, y: u64| {
        if x != y {
            diffs.push(format!("{}: {what} {x:#o} vs {y:#o}", rel.display()));
        }
    };
    // Permission bits; symlinks always have 0777.
    field(
        "mode",
        (ma.mode() & 0o7777).into(),
        (mb.mode() & 0o7777).into(),
    );
    field("uid", ma.uid().into(), mb.uid().into());
    field("gid", ma.gid().into(), mb.gid().into());
    field("nlink", ma.nlink(), mb.nlink());
    match ka {
        "dir" => compare_dir(a, b, rel, false, diffs),
        "file" => {
            field("size", ma.size(), mb.size());
            if ma.size() == mb.size()
                && let Some(at) = first_difference(a, b)
            {
                diffs.push(format!("{}: content differs at byte {at}", rel.display()));
            }
        }
        "symlink" => match (std::fs::read_link(a), std::fs::read_link(b)) {
            (Ok(x), Ok(y)) if x == y => {}
            (x, y) => diffs.push(format!("{}: symlink {x:?} vs {y:?}", rel.display())),
        },
        "chardev" | "blockdev" => field("rdev", ma.rdev(), mb.rdev()),
        _ => {}
    }
}

/// Offset of the first byte where two files of equal size differ, if any.
/// Only the data extents of either file are read: holes read as zeros, so a
/// sparse file of a terabyte compares in the time its data takes.
fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    use std::io::{Seek, SeekFrom};
    let (mut fa, mut fb) = match (File::open(a), File::open(b)) {
        (Ok(x), Ok(y)) => (x, y),
        _ => return Some(0),
    };
    let size = fa.metadata().map(|m| m.len()).unwrap_or(0);
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let (holes_a, holes_b) = (has_holes(&fa, size), has_holes(&fb, size));
    let mut pos = 0u64;
    while pos < size {
        // The next byte that is data in either file. A file that reports no
        // hole at all (a FUSE mount without lseek support answers so) says
        // nothing: the other file's map is used when it has holes.
        let start = match (
            next_data(&fa, pos).filter(|_| holes_a),
            next_data(&fb, pos).filter(|_| holes_b),
        ) {
            _ if !holes_a && !holes_b => pos,
            (None, None) => return None,
            (x, y) => x.unwrap_or(u64::MAX).min(y.unwrap_or(u64::MAX)),
        };
        let end = (start + (1 << 20)).min(size);
        let len = (end - start) as usize;
        for (f, buf) in [(&mut fa, &mut ba), (&mut fb, &mut bb)] {
            if f.seek(SeekFrom::Start(start)).is_err() {
                return Some(start);
            }
            let n = read_full(f, &mut buf[..len]);
            buf[n..len].fill(0);
        }
        if let Some(i) = ba[..len].iter().zip(&bb[..len]).position(|(x, y)| x != y) {
            return Some(start + i as u64);
        }
        pos = end;
    }
    None
}

/// Whether `f` reports a hole anywhere below `size`.
fn has_holes(f: &File, size: u64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor has no memory effects.
    let first = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    first >= 0 && (first as u64) < size || next_data(f, 0).is_none_or(|d| d > 0)
}

/// The first offset at or after `pos` that is data (not a hole) in `f`.
fn next_data(f: &File, pos: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor has no memory effects.
    let r = unsafe { libc::lseek(f.as_raw_fd(), pos as i64, libc::SEEK_DATA) };
    (r >= 0).then_some(r as u64)
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    done
}
