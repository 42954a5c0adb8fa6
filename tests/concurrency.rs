//! Several threads at once: disjoint writes to one file must equal the same
//! writes done one by one on a plain directory; overlapping whole-block writes
//! must leave every block entirely one writer's; many files in parallel must
//! give the same tree as on a plain directory.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Barrier};

use common::{AlignedBuf, Rng, TestMount, assert_trees_equal};

const THREADS: usize = 4;

fn block_content(block: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(1000 + block as u64).fill(&mut v);
    v
}

fn read_all(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Writes `len` bytes at `offset` with a buffer aligned for O_DIRECT when asked.
fn write_block(f: &File, data: &[u8], offset: u64, direct: bool) {
    if direct {
        let mut buf = AlignedBuf::new(data.len(), 4096);
        buf.copy_from_slice(data);
        f.write_all_at(&buf, offset).unwrap();
    } else {
        f.write_all_at(data, offset).unwrap();
    }
}

fn open_rw(p: &Path, direct: bool) -> File {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(p).unwrap()
}

/// THREADS threads; thread t owns blocks i with i % THREADS == t and writes
/// them in a shuffled order, each through its own descriptor. Then the file
/// must equal the same blocks written one by one in a plain file.
fn disjoint_writes(m: &TestMount, block: usize, blocks: usize, direct_threads: &[usize]) {
    let path = m.path("shared");
    File::create(&path).unwrap();
    let barrier = Arc::new(Barrier::new(THREADS));
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let path = path.clone();
            let barrier = barrier.clone();
            let direct = direct_threads.contains(&t);
            s.spawn(move || {
                let f = open_rw(&path, direct);
                let mut mine: Vec<usize> = (0..blocks).filter(|i| i % THREADS == t).collect();
                let mut rng = Rng::new(t as u64);
                for i in (1..mine.len()).rev() {
                    mine.swap(i, rng.below(i as u64 + 1) as usize);
                }
                barrier.wait();
                for i in mine {
                    write_block(&f, &block_content(i, block), (i * block) as u64, direct);
                }
                f.sync_data().unwrap();
            });
        }
    });
    let plain = tempfile::tempdir().unwrap();
    let reference = plain.path().join("shared");
    let f = File::create(&reference).unwrap();
    for i in 0..blocks {
        f.write_all_at(&block_content(i, block), (i * block) as u64)
            .unwrap();
    }
    drop(f);
    let want = read_all(&reference);
    let got = read_all(&path);
    assert_eq!(got.len(), want.len(), "size");
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "mount differs from plain file at byte {at} (block {})",
            at / block
        );
    }
    assert!(
        read_all(&m.backing_path("shared")) == want,
        "backing file differs"
    );
}

#[test]
fn disjoint_unaligned_regions_buffered() {
    let m = TestMount::new();
    // 7777-byte regions: neighbours share pages.
    disjoint_writes(&m, 7777, 400, &[]);
}

#[test]
fn disjoint_regions_mixed_direct_and_buffered() {
    let m = TestMount::new();
    disjoint_writes(&m, 64 * 1024, 96, &[0, 2]);
}

#[test]
fn disjoint_unaligned_regions_without_writeback_cache() {
    let m = TestMount::with_options(|o| o.fuse.writeback_cache = false);
    disjoint_writes(&m, 7777, 400, &[]);
}

/// Every thread writes every block, whole, filled with its own byte, in its
/// own order, several times. Afterwards each block is one thread's byte
/// throughout, in the mount and in the backing file.
fn overlapping_writes(m: &TestMount, block: usize, blocks: usize, rounds: usize, direct: bool) {
    let path = m.path("contended");
    File::create(&path)
        .unwrap()
        .set_len((block * blocks) as u64)
        .unwrap();
    let barrier = Arc::new(Barrier::new(THREADS));
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let path = path.clone();
            let barrier = barrier.clone();
            s.spawn(move || {
                let f = open_rw(&path, direct);
                let data = vec![b'A' + t as u8; block];
                let mut rng = Rng::new(77 + t as u64);
                barrier.wait();
                for _ in 0..rounds {
                    let mut order: Vec<usize> = (0..blocks).collect();
                    for i in (1..order.len()).rev() {
                        order.swap(i, rng.below(i as u64 + 1) as usize);
                    }
                    for i in order {
                        write_block(&f, &data, (i * block) as u64, direct);
                    }
                }
            });
        }
    });
    let check = |what: &str, content: Vec<u8>| {
        assert_eq!(content.len(), block * blocks, "{what}: size");
        for (i, b) in content.chunks(block).enumerate() {
            let first = b[0];
            assert!(
                (b'A'..b'A' + THREADS as u8).contains(&first),
                "{what}: block {i} starts with {first:#x}"
            );
            if let Some(at) = b.iter().position(|&x| x != first) {
                panic!(
                    "{what}: block {i} is torn: {:?} from byte 0, {:?} at byte {at}",
                    first as char, b[at] as char
                );
            }
        }
    };
    check("mount", read_all(&path));
    // Force out what the kernel still caches, then look underneath.
    File::open(&path).unwrap().sync_all().unwrap();
    check("backing", read_all(&m.backing_path("contended")));
    assert!(read_all(&path) == read_all(&m.backing_path("contended")));
}

#[test]
fn overlapping_blocks_buffered() {
    let m = TestMount::new();
    overlapping_writes(&m, 64 * 1024, 32, 6, false);
}

#[test]
fn overlapping_blocks_direct() {
    let m = TestMount::new();
    overlapping_writes(&m, 64 * 1024, 32, 6, true);
}

#[test]
fn overlapping_large_blocks_direct() {
    let m = TestMount::new();
    // One max_write (1 MiB) per block.
    overlapping_writes(&m, 1 << 20, 6, 4, true);
}

#[test]
fn overlapping_blocks_without_writeback_cache() {
    let m = TestMount::with_options(|o| o.fuse.writeback_cache = false);
    overlapping_writes(&m, 64 * 1024, 32, 6, false);
}

/// What thread `t` does: its own directory with files of varied sizes, some
/// renamed, some removed, hard links and a few names in a shared directory.
fn file_workload(root: &Path, t: usize) {
    let dir = root.join(format!("t{t}"));
    fs::create_dir(&dir).unwrap();
    fs::create_dir(dir.join("sub")).unwrap();
    let mut rng = Rng::new(500 + t as u64);
    for i in 0..60 {
        let len = match i % 4 {
            0 => 0,
            1 => rng.below(5000) as usize,
            2 => rng.below(300_000) as usize,
            _ => 4096,
        };
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        let name = if i % 3 == 0 {
            dir.join("sub").join(format!("f{i}"))
        } else {
            dir.join(format!("f{i}"))
        };
        fs::write(&name, &data).unwrap();
        if i % 5 == 0 {
            fs::rename(&name, dir.join(format!("renamed{i}"))).unwrap();
        } else if i % 7 == 0 {
            fs::remove_file(&name).unwrap();
        } else if i % 11 == 0 {
            fs::hard_link(&name, root.join("shared").join(format!("t{t}-link{i}"))).unwrap();
        }
    }
    // A sparse file and a symlink per thread.
    let f = File::create(dir.join("sparse")).unwrap();
    f.write_all_at(b"end", 10_000_000 + t as u64).unwrap();
    std::os::unix::fs::symlink(format!("f{}", 1), dir.join("link")).unwrap();
}

#[test]
fn many_files_in_parallel() {
    let m = TestMount::new();
    fs::create_dir(m.path("shared")).unwrap();
    std::thread::scope(|s| {
        for t in 0..THREADS * 2 {
            let root = m.mnt.clone();
            s.spawn(move || file_workload(&root, t));
        }
    });
    let plain = tempfile::tempdir().unwrap();
    fs::create_dir(plain.path().join("shared")).unwrap();
    for t in 0..THREADS * 2 {
        file_workload(plain.path(), t);
    }
    assert_trees_equal(&m.mnt, plain.path());
    assert_trees_equal(&m.backing, plain.path());
}

/// Threads create, write, rename, link and remove names from one small pool
/// in one directory at once. The outcome is a race, but the mount must agree
/// with its backing dir afterwards and fail only with the errnos such races give.
#[test]
fn racing_namespace_operations_stay_consistent() {
    let m = TestMount::new();
    fs::create_dir(m.path("race")).unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("n{i}")).collect();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let dir = m.path("race");
            let names = names.clone();
            s.spawn(move || {
                let mut rng = Rng::new(900 + t as u64);
                for _ in 0..400 {
                    let a = dir.join(&names[rng.below(names.len() as u64) as usize]);
                    let b = dir.join(&names[rng.below(names.len() as u64) as usize]);
                    let r = match rng.below(6) {
                        0 => fs::write(&a, [t as u8; 100]),
                        1 => fs::rename(&a, &b),
                        2 => fs::remove_file(&a),
                        3 => fs::hard_link(&a, &b),
                        4 => fs::read(&a).map(drop),
                        _ => OpenOptions::new()
                            .append(true)
                            .open(&a)
                            .and_then(|f| f.write_all_at(b"x", 0)),
                    };
                    if let Err(e) = r {
                        let errno = e.raw_os_error().unwrap_or(0);
                        assert!(
                            [libc::ENOENT, libc::EEXIST].contains(&errno),
                            "unexpected error: {e}"
                        );
                    }
                }
            });
        }
    });
    assert_trees_equal(&m.mnt, &m.backing);
    // Link counts seen through the mount are the backing files' own.
    for e in fs::read_dir(m.path("race")).unwrap() {
        let e = e.unwrap();
        let a = fs::symlink_metadata(e.path()).unwrap();
        let b = fs::symlink_metadata(m.backing_path("race").join(e.file_name())).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(a.nlink(), b.nlink(), "{:?}", e.file_name());
        assert_eq!(a.len(), b.len(), "{:?}", e.file_name());
    }
}

/// Lookups, opens and reads of the same files while the kernel keeps
/// forgetting inodes (caches dropped in a loop): every read must succeed with
/// the right bytes, and afterwards the inode table shrinks back.
#[test]
fn lookups_race_with_forgets() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let m = TestMount::new();
    fs::create_dir(m.path("many")).unwrap();
    for i in 0..200 {
        fs::write(m.path(format!("many/f{i}")), format!("content {i}")).unwrap();
    }
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                common::drop_caches();
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        let readers: Vec<_> = (0..3)
            .map(|t| {
                let root = m.path("many");
                s.spawn(move || {
                    for pass in 0..15 {
                        for i in 0..200 {
                            let i = (i * 7 + t * 13 + pass) % 200;
                            let got = fs::read_to_string(root.join(format!("f{i}")))
                                .unwrap_or_else(|e| panic!("read f{i}: {e}"));
                            assert_eq!(got, format!("content {i}"));
                        }
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while m.volume().inode_count() > 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "inodes not forgotten: {}",
            m.volume().inode_count()
        );
        common::drop_caches();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
