//! The replica's durable state: the receive log and the applied-seq file.
//!
//! Receive log: `receive/rlog-<first seq>.log`, append-only files of protocol
//! frames, one `Batch` per frame (checksummed, uncompressed). A batch is
//! appended and fdatasync'ed before it is acknowledged as received. On start the
//! files are scanned (they are small next to the mirror: they only hold what is
//! not applied yet) and a torn tail is cut. Segments whose batches are all
//! applied and persisted are deleted.
//!
//! Applied state: `replica.state`, two 128-byte slots (at 0 and 4096) written
//! alternately, each write fdatasync'ed; the valid slot with the highest
//! generation wins. A slot, little-endian: magic `RFRS` (4 bytes), format 1 (1
//! byte), 3 zero bytes, then u64s at 8: generation, volume id (the mirror's
//! owner), applied seq (durable: the mirror was synced before it was stored),
//! intent seq (0: none; see `apply.rs`), intent dev, intent ino,
//! lenient_through; a crc32 of bytes 0..120 at 120.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::journal::record::Record;
use crate::protocol::frame::{self, HEADER_LEN};
use crate::protocol::message::{Message, decode_records};

const SEGMENT_BYTES: u64 = 64 << 20;

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Where one stored batch is.
#[derive(Debug, Clone, Copy)]
struct Entry {
    first: u64,
    last: u64,
    segment: u64,
    offset: u64,
    len: u64,
}

pub struct ReceiveLog {
    dir: PathBuf,
    entries: VecDeque<Entry>,
    active: Option<(u64, File, u64)>,
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("rlog-{first:020}.log"))
}

fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("rlog-"))
            .and_then(|n| n.strip_suffix(".log"))
            && let Ok(first) = n.parse()
        {
            out.push((first, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

impl ReceiveLog {
    pub fn open(dir: &Path) -> io::Result<ReceiveLog> {
        std::fs::create_dir_all(dir)?;
        let segs = list(dir)?;
        let mut entries = VecDeque::new();
        let mut active = None;
        for (i, (first, path)) in segs.iter().enumerate() {
            let bytes = std::fs::read(path)?;
            let mut at = 0usize;
            let mut stop = None;
            while at < bytes.len() {
                match parse_entry(&bytes[at..]) {
                    Ok((f, l, len)) => {
                        entries.push_back(Entry {
                            first: f,
                            last: l,
                            segment: *first,
                            offset: at as u64,
                            len: len as u64,
                        });
                        at += len;
                    }
                    Err(e) => {
                        stop = Some(e);
                        break;
                    }
                }
            }
            let is_last = i + 1 == segs.len();
            if let Some(e) = stop {
                if !is_last {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("receive log {} is corrupt at {at}: {e}", path.display()),
                    ));
                }
                warn!(segment = %path.display(), at, error = %e, "cutting a torn receive-log tail");
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(at as u64)?;
                f.sync_all()?;
            }
            if is_last {
                let f = OpenOptions::new().write(true).open(path)?;
                active = Some((*first, f, at as u64));
            }
        }
        // The batches must follow each other.
        for w in entries.iter().collect::<Vec<_>>().windows(2) {
            if w[1].first != w[0].last + 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "receive log has a gap between seq {} and {}",
                        w[0].last, w[1].first
                    ),
                ));
            }
        }
        Ok(ReceiveLog {
            dir: dir.to_path_buf(),
            entries,
            active,
        })
    }

    /// The newest seq stored (None when the log is empty).
    pub fn last(&self) -> Option<u64> {
        self.entries.back().map(|e| e.last)
    }

    /// Appends one batch and makes it durable.
    /// `frames`: the batch's journal frames, already checked by the receiver.
    pub fn append(&mut self, first: u64, last: u64, frames: &[u8]) -> io::Result<()> {
        let msg = Message::Batch {
            first,
            last,
            primary_last: last,
            frames: frames.to_vec(),
        };
        let bytes = frame::encode(&msg, 0).bytes;
        let roll = match &self.active {
            None => true,
            Some((_, _, len)) => *len > 0 && len + bytes.len() as u64 > SEGMENT_BYTES,
        };
        if roll {
            let path = seg_path(&self.dir, first);
            let f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)?;
            sync_dir(&self.dir)?;
            self.active = Some((first, f, 0));
        }
        let Some((seg, f, len)) = self.active.as_mut() else {
            return Err(io::Error::other("no active receive-log segment"));
        };
        let offset = *len;
        if let Err(e) = f.write_all_at(&bytes, offset).and_then(|_| f.sync_data()) {
            // Leave no partial frame behind: the next append starts clean.
            let _ = f.set_len(offset);
            return Err(e);
        }
        *len += bytes.len() as u64;
        self.entries.push_back(Entry {
            first,
            last,
            segment: *seg,
            offset,
            len: bytes.len() as u64,
        });
        Ok(())
    }

    /// The stored batch holding `seq` (first, last, records), if any.
    pub fn batch_with(&self, seq: u64) -> io::Result<Option<(u64, u64, Vec<Record>)>> {
        let Some(e) = self
            .entries
            .iter()
            .find(|e| e.first <= seq && seq <= e.last)
        else {
            return Ok(None);
        };
        let f = File::open(seg_path(&self.dir, e.segment))?;
        let mut buf = vec![0u8; e.len as usize];
        f.read_exact_at(&mut buf, e.offset)?;
        let (first, last, records) =
            decode_entry(&buf).map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m))?;
        Ok(Some((first, last, records)))
    }

    /// Deletes everything (a snapshot supersedes it).
    pub fn clear(&mut self) -> io::Result<()> {
        self.active = None;
        self.entries.clear();
        for (_, p) in list(&self.dir)? {
            std::fs::remove_file(p)?;
        }
        sync_dir(&self.dir)
    }

    /// Deletes the segments whose batches all end at or below `applied`
    /// (never the active one).
    pub fn trim(&mut self, applied: u64) -> io::Result<()> {
        // Everything applied: the active segment goes too (the next batch
        // starts a new one), so a small disk is not held by applied data.
        if self.entries.back().is_some_and(|e| e.last <= applied)
            && self.active.as_ref().is_some_and(|a| a.2 > 0)
        {
            self.active = None;
            for (_, p) in list(&self.dir)? {
                std::fs::remove_file(p)?;
            }
            self.entries.clear();
            sync_dir(&self.dir)?;
            return Ok(());
        }
        let active = self.active.as_ref().map(|a| a.0);
        let mut removed = false;
        while let Some(seg) = self.entries.front().map(|e| e.segment) {
            if Some(seg) == active {
                break;
            }
            if self
                .entries
                .iter()
                .filter(|e| e.segment == seg)
                .any(|e| e.last > applied)
            {
                break;
            }
            self.entries.retain(|e| e.segment != seg);
            std::fs::remove_file(seg_path(&self.dir, seg))?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

fn parse_entry(buf: &[u8]) -> Result<(u64, u64, usize), String> {
    if buf.len() < HEADER_LEN {
        return Err("truncated header".into());
    }
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&buf[..HEADER_LEN]);
    let h = frame::parse_header(&hb).map_err(|e| e.to_string())?;
    let total = HEADER_LEN + h.len as usize;
    if buf.len() < total {
        return Err("truncated body".into());
    }
    match frame::decode_body(&h, &buf[HEADER_LEN..total]).map_err(|e| e.to_string())? {
        Message::Batch { first, last, .. } => Ok((first, last, total)),
        m => Err(format!("unexpected {} in the receive log", m.name())),
    }
}

fn decode_entry(buf: &[u8]) -> Result<(u64, u64, Vec<Record>), String> {
    // Decoded in place (an entry is one whole frame): no copy into a decoder.
    let hb: &[u8; HEADER_LEN] = buf
        .get(..HEADER_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or("receive-log entry shorter than a frame header")?;
    let h = frame::parse_header(hb).map_err(|e| e.to_string())?;
    let body = buf
        .get(HEADER_LEN..HEADER_LEN + h.len as usize)
        .ok_or("receive-log entry shorter than its frame")?;
    match frame::decode_body(&h, body).map_err(|e| e.to_string())? {
        Message::Batch {
            first,
            last,
            frames,
            ..
        } => Ok((
            first,
            last,
            decode_records(&frames).map_err(|e| e.to_string())?,
        )),
        _ => Err("receive-log entry is not a batch".into()),
    }
}

/// What `replica.state` holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyState {
    /// The mirror's owner; 0 until a primary connected.
    pub volume_id: u64,
    pub applied: u64,
    /// A namespace record being applied (0: none), and the (dev, ino) of its
    /// source before it was (renames only).
    pub intent_seq: u64,
    pub intent_dev: u64,
    pub intent_ino: u64,
    /// Records up to this seq follow a fuzzy snapshot and are applied
    /// tolerantly (0: none).
    pub lenient_through: u64,
}

const STATE_MAGIC: u32 = u32::from_le_bytes(*b"RFRS");
const SLOT: usize = 128;
const CRC_AT: usize = 120;
const SLOT_OFFSETS: [u64; 2] = [0, 4096];

pub struct StateFile {
    file: File,
    generation: u64,
    pub state: ApplyState,
}

fn encode_slot(generation: u64, s: &ApplyState) -> [u8; SLOT] {
    let mut b = [0u8; SLOT];
    b[0..4].copy_from_slice(&STATE_MAGIC.to_le_bytes());
    b[4] = 1;
    let fields = [
        generation,
        s.volume_id,
        s.applied,
        s.intent_seq,
        s.intent_dev,
        s.intent_ino,
        s.lenient_through,
    ];
    for (i, v) in fields.iter().enumerate() {
        b[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    let crc = crc32fast::hash(&b[..CRC_AT]);
    b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_slot(b: &[u8; SLOT]) -> Option<(u64, ApplyState)> {
    if b[0..4] != STATE_MAGIC.to_le_bytes() || b[4] != 1 {
        return None;
    }
    if crc32fast::hash(&b[..CRC_AT]).to_le_bytes() != b[CRC_AT..CRC_AT + 4] {
        return None;
    }
    let f = |i: usize| u64::from_le_bytes(b[8 + i * 8..16 + i * 8].try_into().unwrap_or([0; 8]));
    Some((
        f(0),
        ApplyState {
            volume_id: f(1),
            applied: f(2),
            intent_seq: f(3),
            intent_dev: f(4),
            intent_ino: f(5),
            lenient_through: f(6),
        },
    ))
}

impl StateFile {
    pub fn open(path: &Path) -> io::Result<StateFile> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut best: Option<(u64, ApplyState)> = None;
        for off in SLOT_OFFSETS {
            let mut b = [0u8; SLOT];
            if file.read_exact_at(&mut b, off).is_ok()
                && let Some((g, s)) = decode_slot(&b)
                && best.is_none_or(|(bg, _)| g > bg)
            {
                best = Some((g, s));
            }
        }
        if existed && best.is_none() && file.metadata()?.len() > 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is corrupt (no valid slot)", path.display()),
            ));
        }
        let (generation, state) = best.unwrap_or_default();
        if !existed && let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(StateFile {
            file,
            generation,
            state,
        })
    }

    /// Writes `s` durably.
    pub fn store(&mut self, s: ApplyState) -> io::Result<()> {
        let g = self.generation + 1;
        let slot = encode_slot(g, &s);
        self.file
            .write_all_at(&slot, SLOT_OFFSETS[(g % 2) as usize])?;
        self.file.sync_data()?;
        self.generation = g;
        self.state = s;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::Op;
    use crate::protocol::message::encode_records;
    use std::io::Write;

    fn w(seq: u64) -> Record {
        Record {
            seq,
            op: Op::Write {
                path: b"f".to_vec(),
                offset: seq,
            },
            data: vec![seq as u8; 10],
        }
    }

    #[test]
    fn log_survives_reopen_and_cuts_a_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let mut log = ReceiveLog::open(d.path()).unwrap();
        log.append(1, 3, &encode_records(&[w(1), w(3)])).unwrap();
        log.append(4, 4, &encode_records(&[w(4)])).unwrap();
        drop(log);
        // A torn third batch.
        let seg = list(d.path()).unwrap()[0].1.clone();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"RFP1garbage").unwrap();
        drop(f);
        let log = ReceiveLog::open(d.path()).unwrap();
        assert_eq!(log.last(), Some(4));
        let (first, last, recs) = log.batch_with(2).unwrap().unwrap();
        assert_eq!((first, last), (1, 3));
        assert_eq!(recs, vec![w(1), w(3)]);
        assert!(log.batch_with(5).unwrap().is_none());
    }

    #[test]
    fn state_file_keeps_the_newest_valid_slot() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("replica.state");
        let mut s = StateFile::open(&p).unwrap();
        assert_eq!(s.state, ApplyState::default());
        for applied in 1..=5 {
            s.store(ApplyState {
                volume_id: 9,
                applied,
                ..Default::default()
            })
            .unwrap();
        }
        drop(s);
        // Tear the newest slot (generation 5 is in slot 1).
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"xx", 4096 + 20).unwrap();
        let s = StateFile::open(&p).unwrap();
        assert_eq!(s.state.applied, 4);
        assert_eq!(s.state.volume_id, 9);
    }
}
