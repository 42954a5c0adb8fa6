//! Journal records: what one mutation of the mount was, and how it is laid out
//! on disk. The frame describes itself (magic, version, length, checksum) so a
//! torn or foreign tail is recognised, never replayed.
//!
//! Frame layout, little-endian:
//!
//! ```text
//! magic   u32  "RFJ1"
//! version u8   FORMAT_VERSION
//! _pad    [u8; 3]
//! seq     u64
//! op_len  u32  length of the encoded Op
//! data_len u32 length of the payload (write bytes)
//! crc     u32  crc32 of everything above (crc field zeroed), the op and the payload
//! op      [u8; op_len]     postcard-encoded Op
//! data    [u8; data_len]
//! ```

use serde::{Deserialize, Serialize};

pub const MAGIC: u32 = u32::from_le_bytes(*b"RFJ1");
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 28;
/// Largest op (paths, xattr values) a frame may carry.
pub const MAX_OP_LEN: u32 = 1 << 20;
/// Largest payload a frame may carry (one FUSE write is at most 1 MiB; copies are split).
pub const MAX_DATA_LEN: u32 = 16 << 20;

/// A time as (seconds, nanoseconds) since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// One mutation. Paths are relative to the mount root, as raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Bytes written at `offset`; the bytes are the record's payload.
    Write {
        path: Vec<u8>,
        offset: u64,
    },
    Truncate {
        path: Vec<u8>,
        size: u64,
    },
    /// fallocate(2) with its mode bits (PUNCH_HOLE, ZERO_RANGE, KEEP_SIZE …).
    Fallocate {
        path: Vec<u8>,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// A regular file, fifo, socket or device node (mode carries the type).
    Mknod {
        path: Vec<u8>,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    },
    Mkdir {
        path: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        path: Vec<u8>,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    Link {
        existing: Vec<u8>,
        path: Vec<u8>,
    },
    Unlink {
        path: Vec<u8>,
    },
    Rmdir {
        path: Vec<u8>,
    },
    /// A directory tree that left replication (renamed onto an excluded name).
    RemoveTree {
        path: Vec<u8>,
    },
    Rename {
        from: Vec<u8>,
        to: Vec<u8>,
        flags: u32,
    },
    /// Attribute changes; `None` leaves a field alone. Times are the values the
    /// primary ended up with (UTIME_NOW already resolved).
    SetAttr {
        path: Vec<u8>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<Timestamp>,
        mtime: Option<Timestamp>,
    },
    SetXattr {
        path: Vec<u8>,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        path: Vec<u8>,
        name: Vec<u8>,
    },
    /// A write whose bytes were not copied into the journal: they are in the
    /// backing file (journal.payload = "backing"), and, if a later change
    /// overwrote them before every peer applied this record, in the payload
    /// of a [`Op::Preimage`] record. `crc` is the crc32 of the bytes written;
    /// whoever serves them checks it. Never sent to a replica: the shipper
    /// turns it into a [`Op::Write`] with its bytes.
    WriteBacked {
        path: Vec<u8>,
        offset: u64,
        len: u32,
        crc: u32,
    },
    /// The bytes of the `WriteBacked` record `of`, copied from the backing
    /// file just before a change overwrote them (copy-before-write). It
    /// changes nothing: a replica applies it, without its payload, as a no-op.
    Preimage {
        of: u64,
    },
}

impl Op {
    /// The path this op changes (the source for renames and links).
    pub fn path(&self) -> &[u8] {
        match self {
            Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Fallocate { path, .. }
            | Op::Mknod { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Link { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::RemoveTree { path }
            | Op::SetAttr { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. }
            | Op::WriteBacked { path, .. } => path,
            Op::Rename { from, .. } => from,
            Op::Preimage { .. } => b"",
        }
    }

    /// Data ops change one file's content or attributes and can be re-applied;
    /// namespace ops change names and must be applied exactly once.
    pub fn is_namespace(&self) -> bool {
        matches!(
            self,
            Op::Mknod { .. }
                | Op::Mkdir { .. }
                | Op::Symlink { .. }
                | Op::Link { .. }
                | Op::Unlink { .. }
                | Op::Rmdir { .. }
                | Op::RemoveTree { .. }
                | Op::Rename { .. }
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Truncate { .. } => "truncate",
            Op::Fallocate { .. } => "fallocate",
            Op::Mknod { .. } => "mknod",
            Op::Mkdir { .. } => "mkdir",
            Op::Symlink { .. } => "symlink",
            Op::Link { .. } => "link",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::RemoveTree { .. } => "remove-tree",
            Op::Rename { .. } => "rename",
            Op::SetAttr { .. } => "setattr",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::WriteBacked { .. } => "write-backed",
            Op::Preimage { .. } => "preimage",
        }
    }
}

/// A record: its sequence number, the op, and the payload bytes of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub op: Op,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame is shorter than its header says ({0} bytes missing)")]
    Truncated(usize),
    #[error("bad magic {0:#x}: not a journal frame")]
    BadMagic(u32),
    #[error("unsupported journal format version {0} (this build reads {FORMAT_VERSION})")]
    Version(u8),
    #[error("frame lengths out of range (op {0}, data {1})")]
    Oversized(u32, u32),
    #[error("checksum mismatch")]
    Checksum,
    #[error("op does not decode: {0}")]
    Decode(String),
}

/// The fixed-size part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub seq: u64,
    pub op_len: u32,
    pub data_len: u32,
    pub crc: u32,
}

impl FrameHeader {
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.op_len as usize + self.data_len as usize
    }

    pub fn parse(buf: &[u8]) -> Result<FrameHeader, FrameError> {
        if buf.len() < HEADER_LEN {
            return Err(FrameError::Truncated(HEADER_LEN - buf.len()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if buf[4] != FORMAT_VERSION {
            return Err(FrameError::Version(buf[4]));
        }
        if buf[5..8] != [0, 0, 0] {
            // Reserved bytes are zero in every frame we write.
            return Err(FrameError::Checksum);
        }
        let seq = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        let op_len = u32_at(16);
        let data_len = u32_at(20);
        if op_len > MAX_OP_LEN || data_len > MAX_DATA_LEN {
            return Err(FrameError::Oversized(op_len, data_len));
        }
        Ok(FrameHeader {
            seq,
            op_len,
            data_len,
            crc: u32_at(24),
        })
    }
}

fn header_bytes(seq: u64, op_len: u32, data_len: u32, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = FORMAT_VERSION;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&op_len.to_le_bytes());
    h[20..24].copy_from_slice(&data_len.to_le_bytes());
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

fn checksum(header_without_crc: &[u8; HEADER_LEN], op: &[u8], data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header_without_crc);
    h.update(op);
    h.update(data);
    h.finalize()
}

/// crc32 of a write's bytes, as a [`Op::WriteBacked`] record carries it.
pub fn payload_crc(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

pub fn encode_op(op: &Op) -> Vec<u8> {
    postcard::to_stdvec(op).expect("an Op always serialises")
}

/// Appends the frame of one record to `out`.
pub fn encode_frame(seq: u64, op_bytes: &[u8], data: &[u8], out: &mut Vec<u8>) {
    let op_len = op_bytes.len() as u32;
    let data_len = data.len() as u32;
    let crc = checksum(&header_bytes(seq, op_len, data_len, 0), op_bytes, data);
    out.extend_from_slice(&header_bytes(seq, op_len, data_len, crc));
    out.extend_from_slice(op_bytes);
    out.extend_from_slice(data);
}

/// Decodes one whole frame (header, op and data in `buf`).
pub fn decode_frame(buf: &[u8]) -> Result<Record, FrameError> {
    let h = FrameHeader::parse(buf)?;
    if buf.len() < h.frame_len() {
        return Err(FrameError::Truncated(h.frame_len() - buf.len()));
    }
    let op_end = HEADER_LEN + h.op_len as usize;
    let op_bytes = &buf[HEADER_LEN..op_end];
    let data = &buf[op_end..h.frame_len()];
    if checksum(
        &header_bytes(h.seq, h.op_len, h.data_len, 0),
        op_bytes,
        data,
    ) != h.crc
    {
        return Err(FrameError::Checksum);
    }
    let op: Op = postcard::from_bytes(op_bytes).map_err(|e| FrameError::Decode(e.to_string()))?;
    Ok(Record {
        seq: h.seq,
        op,
        data: data.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Op, Vec<u8>) {
        (
            Op::Write {
                path: b"vm/disk.img".to_vec(),
                offset: 4096,
            },
            vec![7u8; 100],
        )
    }

    #[test]
    fn round_trip() {
        let (op, data) = sample();
        let mut buf = Vec::new();
        encode_frame(42, &encode_op(&op), &data, &mut buf);
        let r = decode_frame(&buf).unwrap();
        assert_eq!(r.seq, 42);
        assert_eq!(r.op, op);
        assert_eq!(r.data, data);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let (op, data) = sample();
        let mut buf = Vec::new();
        encode_frame(7, &encode_op(&op), &data, &mut buf);
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(decode_frame(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn truncation_is_reported() {
        let (op, data) = sample();
        let mut buf = Vec::new();
        encode_frame(7, &encode_op(&op), &data, &mut buf);
        for cut in 0..buf.len() {
            assert!(matches!(
                decode_frame(&buf[..cut]),
                Err(FrameError::Truncated(_))
            ));
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 1u64;
        for len in 0..300 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 33) as u8
                })
                .collect();
            let _ = decode_frame(&buf);
        }
    }
}
