//! The messages primary and replica exchange.

use serde::{Deserialize, Serialize};

use crate::journal::record::{self, Record};

/// One message. Primary → replica: `Hello`, `Batch`, snapshot messages.
/// Replica → primary: `Welcome`, `Ack`, `Keepalive`. Either way: `Goodbye` (with the reason the sender closes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message of a connection, from the primary.
    Hello {
        /// Identifies the primary's history (its state directory).
        volume_id: u64,
        /// The primary's newest seq, for the replica's lag display.
        last_seq: u64,
    },
    /// The replica's answer: where to resume.
    Welcome {
        volume_id: u64,
        /// Every record up to this seq is in the replica's receive log.
        received: u64,
        /// Every record up to this seq is applied to the mirror.
        applied: u64,
    },
    /// Records covering `first..=last`, as concatenated journal frames. Some
    /// seqs of the range may be absent (overwritten within the batch): the batch
    /// is applied as a unit.
    Batch {
        first: u64,
        last: u64,
        /// The primary's newest seq when the batch was made.
        primary_last: u64,
        #[serde(with = "bytes")]
        frames: Vec<u8>,
    },
    /// Progress, from the replica.
    Ack {
        received: u64,
        applied: u64,
        /// Why applying is stuck (disk full …), if it is.
        error: Option<ApplyError>,
    },
    Goodbye {
        reason: String,
    },
    /// Primary → fresh replica: a full copy of the tree follows, taken while
    /// the primary runs (fuzzy), starting after journal seq `at`.
    SnapshotBegin {
        at: u64,
    },
    /// One directory, regular file or symlink of the snapshot (parents first).
    SnapshotEntry {
        path: Vec<u8>,
        kind: EntryKind,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        /// A symlink's target.
        #[serde(with = "bytes")]
        target: Vec<u8>,
        /// Extended attributes (name, value) of a file or directory.
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Bytes of a snapshot file.
    SnapshotData {
        path: Vec<u8>,
        offset: u64,
        #[serde(with = "bytes")]
        data: Vec<u8>,
    },
    /// The snapshot is complete: the mirror holds every file at some instant
    /// between seq `at` and `lenient_through`; records up to `lenient_through`
    /// are applied tolerantly (their effects may already be in the copy).
    SnapshotEnd {
        at: u64,
        lenient_through: u64,
    },
    /// Replica → primary while it works on a snapshot and has no progress
    /// to acknowledge: it is alive and applying, so the primary's ack timeout
    /// starts over.
    Keepalive,
}

/// Why the replica cannot apply, as a code the primary decides on (the
/// message is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyErrorKind {
    /// The mirror does not hold what a record expects (a name missing or in
    /// the way): it diverged from the primary; a snapshot repairs it.
    Divergence,
    /// The mirror's file system is full: waited out.
    DiskFull,
    /// Another I/O error: waited out.
    Io,
    /// Anything else (a missing receive log record …): waited out.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyError {
    pub kind: ApplyErrorKind,
    pub message: String,
}

impl ApplyError {
    pub fn new(kind: ApplyErrorKind, message: impl Into<String>) -> ApplyError {
        ApplyError {
            kind,
            message: message.into(),
        }
    }

    /// The kind an OS error stands for when applying a record.
    pub fn kind_of(e: &std::io::Error) -> ApplyErrorKind {
        match e.raw_os_error() {
            Some(libc::ENOENT | libc::EEXIST | libc::ENOTDIR | libc::EISDIR | libc::ENOTEMPTY) => {
                ApplyErrorKind::Divergence
            }
            Some(libc::ENOSPC | libc::EDQUOT) => ApplyErrorKind::DiskFull,
            Some(_) => ApplyErrorKind::Io,
            None => ApplyErrorKind::Other,
        }
    }
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    /// Another name of a file sent earlier (`target` is its first path).
    Link,
}

impl Message {
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 1,
            Message::Welcome { .. } => 2,
            Message::Batch { .. } => 3,
            Message::Ack { .. } => 4,
            Message::Goodbye { .. } => 5,
            Message::SnapshotBegin { .. } => 6,
            Message::SnapshotEntry { .. } => 7,
            Message::SnapshotData { .. } => 8,
            Message::SnapshotEnd { .. } => 9,
            Message::Keepalive => 10,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::Batch { .. } => "batch",
            Message::Ack { .. } => "ack",
            Message::Goodbye { .. } => "goodbye",
            Message::SnapshotBegin { .. } => "snapshot-begin",
            Message::SnapshotEntry { .. } => "snapshot-entry",
            Message::SnapshotData { .. } => "snapshot-data",
            Message::SnapshotEnd { .. } => "snapshot-end",
            Message::Keepalive => "keepalive",
        }
    }
}

/// Concatenates the journal frames of `records`.
pub fn encode_records(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.iter().map(|r| r.data.len() + 64).sum());
    for r in records {
        record::encode_frame(r.seq, &record::encode_op(&r.op), &r.data, &mut out);
    }
    out
}

/// Splits concatenated journal frames, checking each one's checksum.
pub fn decode_records(mut buf: &[u8]) -> Result<Vec<Record>, record::FrameError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let h = record::FrameHeader::parse(buf)?;
        let len = h.frame_len();
        if buf.len() < len {
            return Err(record::FrameError::Truncated(len - buf.len()));
        }
        out.push(record::decode_frame(&buf[..len])?);
        buf = &buf[len..];
    }
    Ok(out)
}

/// `Vec<u8>` as one byte string (postcard: length + raw bytes), not a
/// sequence of separately encoded elements.
mod bytes {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    struct V;

    impl<'de> Visitor<'de> for V {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_borrowed_bytes<E: Error>(self, v: &'de [u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(V)
    }
}
