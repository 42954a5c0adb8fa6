//! `replicafs journal verify`: checks a journal against its backing dir.
//!
//! With `journal.payload = "backing"` a write record keeps only the range and
//! crc32 of its bytes, so the journal alone no longer replays the mount. This
//! check is what stands in for the replay: every write record's bytes must be
//! found, either in its own payload, in a `Preimage` record (copied before an
//! overwrite), or still in the backing file at the record's path. A record
//! whose bytes are in none of them must be explained by a later record of the
//! same path (it changed or moved the file since); one that is not is
//! reported, with its seq.

use std::collections::HashMap;
use std::io;
use std::path::Path;

use serde::Serialize;

use super::record::{Op, Record, payload_crc};

/// What the check found.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    pub records: u64,
    /// Writes that carry their bytes in the journal.
    pub writes_with_payload: u64,
    /// Writes kept in the backing file whose bytes a preimage holds.
    pub preserved: u64,
    /// Writes kept in the backing file whose bytes are still there.
    pub in_place: u64,
    /// Writes kept in the backing file whose range a later record changed.
    pub superseded: u64,
    /// Preimages whose bytes do not match the write they name.
    pub bad_preimages: Vec<u64>,
    /// Writes whose bytes are nowhere and that no later record explains.
    pub unexplained: Vec<u64>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.bad_preimages.is_empty() && self.unexplained.is_empty()
    }
}

/// The paths whose bytes a record may change, with the byte range (a
/// namespace change of a path changes what it names: all of it). Attribute
/// and xattr records change no bytes.
fn touched(r: &Record) -> Vec<(&[u8], u64, u64)> {
    const ALL: (u64, u64) = (0, u64::MAX);
    let range = |o: u64, l: u64| (o, o.saturating_add(l));
    let (lo, hi) = match &r.op {
        Op::Write { offset, .. } => range(*offset, r.data.len() as u64),
        Op::WriteBacked { offset, len, .. } => range(*offset, *len as u64),
        Op::Truncate { size, .. } => (*size, u64::MAX),
        Op::Fallocate {
            mode, offset, len, ..
        } => {
            if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
                (*offset, u64::MAX)
            } else {
                range(*offset, *len)
            }
        }
        Op::SetAttr { .. } | Op::SetXattr { .. } | Op::RemoveXattr { .. } | Op::Preimage { .. } => {
            return vec![];
        }
        _ => ALL,
    };
    match &r.op {
        Op::Rename { from, to, .. } => vec![(from, lo, hi), (to, lo, hi)],
        Op::Link { existing, path } => vec![(existing, lo, hi), (path, lo, hi)],
        other => vec![(other.path(), lo, hi)],
    }
}

/// Checks the records `records()` yields (called twice) against `backing`.
pub fn verify<I>(records: impl Fn() -> I, backing: &Path) -> io::Result<Report>
where
    I: Iterator<Item = io::Result<Record>>,
{
    // Pass 1: the crc of each write kept in the backing file, the preimages,
    // and the last record that touched each path (a prefix of a path counts:
    // a directory rename moves what is beneath it).
    let mut crcs: HashMap<u64, u32> = HashMap::new();
    let mut preimages: HashMap<u64, u32> = HashMap::new();
    let mut changes: HashMap<Vec<u8>, Vec<(u64, u64, u64)>> = HashMap::new();
    for r in records() {
        let r = r?;
        match &r.op {
            Op::WriteBacked { crc, .. } => {
                crcs.insert(r.seq, *crc);
            }
            Op::Preimage { of } => {
                preimages.insert(*of, payload_crc(&r.data));
            }
            _ => {}
        }
        for (p, lo, hi) in touched(&r) {
            changes.entry(p.to_vec()).or_default().push((r.seq, lo, hi));
        }
    }
    // Did a record after `seq` change bytes `lo..hi` of `path`, or move it
    // or a directory above it?
    let changed_after = |path: &[u8], seq: u64, lo: u64, hi: u64| {
        changes.iter().any(|(p, list)| {
            let same = p.as_slice() == path;
            let above = path.starts_with(p) && path.get(p.len()) == Some(&b'/');
            (same || above)
                && list
                    .iter()
                    .any(|&(s, a, b)| s > seq && (above || (a < hi && lo < b)))
        })
    };
    // Pass 2: where each write's bytes are.
    let mut rep = Report::default();
    for r in records() {
        let r = r?;
        rep.records += 1;
        match &r.op {
            Op::Write { .. } => rep.writes_with_payload += 1,
            Op::Preimage { of } if crcs.get(of) != Some(&payload_crc(&r.data)) => {
                rep.bad_preimages.push(r.seq);
            }
            Op::WriteBacked {
                path,
                offset,
                len,
                crc,
            } => {
                if preimages.get(&r.seq) == Some(crc) {
                    rep.preserved += 1;
                } else if in_backing(backing, path, *offset, *len) == Some(*crc) {
                    rep.in_place += 1;
                } else if changed_after(path, r.seq, *offset, *offset + *len as u64) {
                    rep.superseded += 1;
                } else {
                    rep.unexplained.push(r.seq);
                }
            }
            _ => {}
        }
    }
    Ok(rep)
}

/// crc32 of `len` bytes at `offset` of the regular file `path` beneath
/// `backing` (never through a symlink), if it has them.
fn in_backing(backing: &Path, path: &[u8], offset: u64, len: u32) -> Option<u32> {
    use std::os::unix::fs::FileExt;
    let rel = crate::path::RelPath::parse(path).ok()?;
    let f = crate::path::open_regular_beneath(backing, &rel).ok()??;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).ok()?;
    Some(payload_crc(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, op: Op, data: &[u8]) -> Record {
        Record {
            seq,
            op,
            data: data.to_vec(),
        }
    }

    fn backed(path: &str, offset: u64, data: &[u8]) -> Op {
        Op::WriteBacked {
            path: path.as_bytes().to_vec(),
            offset,
            len: data.len() as u32,
            crc: payload_crc(data),
        }
    }

    #[test]
    fn every_write_is_found_or_explained() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"NEWbbb").unwrap();
        let records = vec![
            rec(1, backed("a", 0, b"aaa"), b""),
            rec(2, backed("a", 3, b"bbb"), b""),
            rec(3, Op::Preimage { of: 1 }, b"aaa"),
            rec(4, backed("a", 0, b"NEW"), b""),
            rec(5, backed("gone", 0, b"x"), b""),
            rec(
                6,
                Op::Unlink {
                    path: b"gone".to_vec(),
                },
                b"",
            ),
            rec(
                7,
                Op::Write {
                    path: b"a".to_vec(),
                    offset: 0,
                },
                b"NEW",
            ),
        ];
        let rep = verify(|| records.clone().into_iter().map(Ok), dir.path()).unwrap();
        assert!(rep.ok(), "{rep:?}");
        assert_eq!(rep.preserved, 1);
        assert_eq!(rep.in_place, 2);
        assert_eq!(rep.superseded, 1);
        assert_eq!(rep.writes_with_payload, 1);

        // A write whose bytes are gone with no later record: reported, even
        // after later attribute changes and writes elsewhere in the file.
        std::fs::write(dir.path().join("a"), b"XXXbbb").unwrap();
        let mut later = records[..4].to_vec();
        later.push(rec(
            8,
            Op::SetAttr {
                path: b"a".to_vec(),
                mode: Some(0o600),
                uid: None,
                gid: None,
                atime: None,
                mtime: None,
            },
            b"",
        ));
        later.push(rec(9, backed("a", 3, b"bbb"), b""));
        let rep = verify(|| later.clone().into_iter().map(Ok), dir.path()).unwrap();
        assert_eq!(rep.unexplained, vec![4]);
        // A preimage that does not match its write: reported.
        let mut bad = records.clone();
        bad[2].data = b"zzz".to_vec();
        let rep = verify(|| bad.clone().into_iter().map(Ok), dir.path()).unwrap();
        assert_eq!(rep.bad_preimages, vec![3]);
    }
}
