//! Offsets past 2^40 reach a replica: the write record carries the full
//! 64-bit offset, and the mirror's file has the bytes there.

mod repl_common;

use std::os::unix::fs::FileExt;

use repl_common::*;

#[test]
fn a_write_past_2_pow_40_reaches_the_mirror() {
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    let m = c.primary.mnt.clone();
    let far = (1u64 << 40) + 12_345;
    let mid = (5u64 << 30) + 7;
    {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(m.join("vm.img"))
            .unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"past four gib", mid).unwrap();
        f.write_all_at(b"past two to the forty", far).unwrap();
        f.sync_all().unwrap();
    }
    c.wait_converged();
    let r = &c.replicas[0];
    let f = std::fs::File::open(r.mirror.join("vm.img")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), far + 21);
    let read = |off: u64, n: usize| {
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, off).unwrap();
        b
    };
    assert_eq!(read(0, 5), b"start");
    assert_eq!(read(mid, 13), b"past four gib");
    assert_eq!(read(far, 21), b"past two to the forty");
    // Nothing landed where a 32-bit offset would put it.
    assert_eq!(read(far & 0xffff_ffff, 21), vec![0u8; 21]);
    assert_eq!(read(mid & 0xffff_ffff, 13), vec![0u8; 13]);
}
