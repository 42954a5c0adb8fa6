//! Regions whose backing content may differ from what the journal can replay:
//! the dirty list (kept in sled, for the resync) and the activity log of
//! recently written extents that bounds it after a crash (as DRBD's does).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// `len` of a region that covers the whole file, whatever its size.
pub const WHOLE_FILE: u64 = u64::MAX;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRegion {
    pub path: Vec<u8>,
    pub offset: u64,
    /// Bytes from `offset`; [`WHOLE_FILE`] for the whole path (names and content).
    pub len: u64,
}

impl DirtyRegion {
    pub fn is_whole(&self) -> bool {
        self.len == WHOLE_FILE
    }

    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Sorts (offset, len) ranges and merges the ones that overlap or touch.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (o, l) in ranges {
        let e = o.saturating_add(l);
        match out.last_mut() {
            Some((co, cl)) if o <= co.saturating_add(*cl) => {
                *cl = (*cl).max(e - *co);
            }
            _ => out.push((o, l)),
        }
    }
    out
}

/// The persistent dirty list: key = path, 0, offset (big-endian); value = len.
#[derive(Clone)]
pub struct DirtyList {
    tree: sled::Tree,
}

fn dirty_key(path: &[u8], offset: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(path.len() + 9);
    k.extend_from_slice(path);
    k.push(0);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

impl DirtyList {
    pub fn new(tree: sled::Tree) -> DirtyList {
        DirtyList { tree }
    }

    pub fn add(&self, region: &DirtyRegion) -> sled::Result<()> {
        let key = dirty_key(&region.path, region.offset);
        self.tree.update_and_fetch(key, |old| {
            let old = old
                .and_then(|v| v.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            Some(old.max(region.len).to_be_bytes().to_vec())
        })?;
        Ok(())
    }

    pub fn add_range(&self, path: &[u8], offset: u64, len: u64) -> sled::Result<()> {
        self.add(&DirtyRegion {
            path: path.to_vec(),
            offset,
            len,
        })
    }

    pub fn add_whole(&self, path: &[u8]) -> sled::Result<()> {
        self.add_range(path, 0, WHOLE_FILE)
    }

    /// All regions, overlapping ones of a path merged, whole-file entries absorbing ranges.
    pub fn regions(&self) -> sled::Result<Vec<DirtyRegion>> {
        let mut by_path: BTreeMap<Vec<u8>, Vec<(u64, u64)>> = BTreeMap::new();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            if k.len() < 9 {
                continue;
            }
            let path = k[..k.len() - 9].to_vec();
            let offset = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
            let len = v
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(WHOLE_FILE);
            by_path.entry(path).or_default().push((offset, len));
        }
        let mut out = Vec::new();
        for (path, ranges) in by_path {
            if ranges.iter().any(|&(_, l)| l == WHOLE_FILE) {
                out.push(DirtyRegion {
                    path,
                    offset: 0,
                    len: WHOLE_FILE,
                });
                continue;
            }
            for (offset, len) in merge_ranges(ranges) {
                out.push(DirtyRegion {
                    path: path.clone(),
                    offset,
                    len,
                });
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Follows a rename: regions of `from` and of paths under it move to `to`.
    pub fn rename_prefix(&self, from: &[u8], to: &[u8]) -> sled::Result<()> {
        if self.tree.is_empty() {
            return Ok(());
        }
        let mut moves = Vec::new();
        for kv in self.tree.scan_prefix(from) {
            let (k, v) = kv?;
            if k.len() < 9 {
                continue;
            }
            let path = &k[..k.len() - 9];
            let rest = &path[from.len()..];
            if !(rest.is_empty() || rest.starts_with(b"/")) {
                continue;
            }
            let mut new_path = to.to_vec();
            new_path.extend_from_slice(rest);
            let offset = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
            moves.push((k.to_vec(), new_path, offset, v));
        }
        for (old_key, new_path, offset, v) in moves {
            self.tree.remove(old_key)?;
            let len = v
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(WHOLE_FILE);
            self.add_range(&new_path, offset, len)?;
        }
        Ok(())
    }

    /// Forgets the entries of `region.path` that lie wholly inside `region`
    /// (a catch-up sent them); entries added meanwhile outside it stay.
    pub fn remove_covered(&self, region: &DirtyRegion) -> sled::Result<()> {
        let mut prefix = region.path.clone();
        prefix.push(0);
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            if k.len() != prefix.len() + 8 {
                continue;
            }
            let offset = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
            let len = v
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(WHOLE_FILE);
            let covered = region.is_whole()
                || (len != WHOLE_FILE
                    && offset >= region.offset
                    && offset.saturating_add(len) <= region.end());
            if covered {
                // Only if unchanged meanwhile (a widened entry stays dirty).
                let _ = self
                    .tree
                    .compare_and_swap(&k, Some(v), None as Option<&[u8]>)?;
            }
        }
        Ok(())
    }

    /// Forgets every region (after a resync repaired them).
    pub fn clear(&self) -> sled::Result<()> {
        self.tree.clear()
    }
}

/// An extent of a file: (path, extent index).
pub type Extent = (Vec<u8>, u64);

/// The activity log: extents that may have been written to the backing dir
/// without their journal record being durable yet. An extent is logged (and the
/// log synced) before the first write into it reaches the backing file; it is
/// retired only after the journal is durable past every write into it. After an
/// unclean stop, the hot extents are exactly what may differ from the journal.
///
/// File format: a sequence of entries `crc32 u32 | kind u8 | index u64 | path_len u32 | path`,
/// kind 1 = activate, 2 = retire. Rewritten compactly when it grows.
pub struct ActivityLog {
    path: PathBuf,
    file: File,
    /// Preallocated size of the file; entries end at `file_len`, zeros follow.
    capacity: u64,
    file_len: u64,
    /// Hot extents with the tick of their last activation (for LRU retirement).
    hot: HashMap<Extent, u64>,
    tick: u64,
    sync: bool,
    /// Bumped whenever extents are retired: caches of "this extent is hot" built
    /// under an older epoch must ask again. Shared so readers need no lock.
    epoch: Arc<AtomicU64>,
}

const ACTIVATE: u8 = 1;
/// Initial preallocated size of the activity log file.
const AL_CAPACITY: u64 = 4 << 20;

fn preallocate(file: &File, len: u64) -> io::Result<()> {
    preallocate_from(file, 0, len)
}

fn preallocate_from(file: &File, from: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < len {
        let n = zeros.len().min((len - at) as usize);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}
const RETIRE: u8 = 2;

fn encode_entry(kind: u8, extent: &Extent, out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(13 + extent.0.len());
    body.push(kind);
    body.extend_from_slice(&extent.1.to_le_bytes());
    body.extend_from_slice(&(extent.0.len() as u32).to_le_bytes());
    body.extend_from_slice(&extent.0);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// Parses entries until the first torn or corrupt one.
fn parse_entries(buf: &[u8]) -> Vec<(u8, Extent)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while buf.len() - at >= 17 {
        let crc = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4"));
        let plen = u32::from_le_bytes(buf[at + 13..at + 17].try_into().expect("4")) as usize;
        let end = at + 17 + plen;
        if plen > 1 << 16 || end > buf.len() {
            break;
        }
        let body = &buf[at + 4..end];
        if crc32fast::hash(body) != crc {
            break;
        }
        let kind = body[0];
        let index = u64::from_le_bytes(body[1..9].try_into().expect("8"));
        out.push((kind, (body[13..].to_vec(), index)));
        at = end;
    }
    out
}

impl ActivityLog {
    /// Opens the log, returning it (empty) and the extents that were hot in it.
    pub fn open(path: &Path, sync: bool) -> io::Result<(ActivityLog, Vec<Extent>)> {
        let mut leftover = Vec::new();
        if let Ok(mut f) = File::open(path) {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            let mut hot: HashMap<Extent, ()> = HashMap::new();
            for (kind, extent) in parse_entries(&buf) {
                match kind {
                    ACTIVATE => {
                        hot.insert(extent, ());
                    }
                    RETIRE => {
                        hot.remove(&extent);
                    }
                    _ => {}
                }
            }
            leftover = hot.into_keys().collect();
            leftover.sort();
        }
        // Preallocated and zero-filled: appends then overwrite blocks the file
        // already has, so their fdatasync needs no filesystem-journal commit
        // (which on ext4 would also flush every other file's pending data).
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        preallocate(&file, AL_CAPACITY)?;
        file.sync_all()?;
        Ok((
            ActivityLog {
                path: path.to_owned(),
                file,
                capacity: AL_CAPACITY,
                file_len: 0,
                hot: HashMap::new(),
                tick: 0,
                sync,
                epoch: Arc::new(AtomicU64::new(1)),
            },
            leftover,
        ))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The epoch counter, to read without taking the log's lock.
    pub fn epoch_handle(&self) -> Arc<AtomicU64> {
        self.epoch.clone()
    }

    pub fn hot_count(&self) -> usize {
        self.hot.len()
    }

    /// Makes the extents hot (durably, if configured) before the caller writes into them.
    /// Returns true when more extents are hot than `slots`.
    pub fn activate(&mut self, extents: &[Extent], slots: usize) -> io::Result<bool> {
        let mut buf = Vec::new();
        for e in extents {
            self.tick += 1;
            match self.hot.get_mut(e) {
                Some(t) => *t = self.tick,
                None => {
                    self.hot.insert(e.clone(), self.tick);
                    encode_entry(ACTIVATE, e, &mut buf);
                }
            }
        }
        if !buf.is_empty() {
            self.append(&buf)?;
            if self.sync {
                self.file.sync_data()?;
            }
        }
        Ok(self.hot.len() > slots)
    }

    /// The least recently activated extents beyond `keep`, to retire once the
    /// journal is durable.
    pub fn coldest(&self, keep: usize) -> Vec<Extent> {
        if self.hot.len() <= keep {
            return Vec::new();
        }
        let mut all: Vec<(&Extent, &u64)> = self.hot.iter().collect();
        all.sort_by_key(|(_, t)| **t);
        all.truncate(self.hot.len() - keep);
        all.into_iter().map(|(e, _)| e.clone()).collect()
    }

    /// Retires extents; the caller guarantees the journal is durable past every
    /// write into them and that no write into them is in flight.
    pub fn retire(&mut self, extents: &[Extent]) -> io::Result<()> {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let mut buf = Vec::new();
        for e in extents {
            if self.hot.remove(e).is_some() {
                encode_entry(RETIRE, e, &mut buf);
            }
        }
        self.append(&buf)
    }

    /// Writes entries after the last one, compacting (and growing) the file
    /// when the preallocated space runs out.
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.file_len + buf.len() as u64 > self.capacity {
            self.compact()?;
        }
        if self.file_len + buf.len() as u64 > self.capacity {
            // Even the compacted log is nearly full: double it.
            self.capacity = (self.capacity * 2).max(self.file_len + buf.len() as u64);
            preallocate_from(&self.file, self.file_len, self.capacity)?;
            self.file.sync_all()?;
        }
        self.file.write_all_at(buf, self.file_len)?;
        self.file_len += buf.len() as u64;
        Ok(())
    }

    /// Retires everything (clean shutdown, after the journal was synced).
    pub fn retire_all(&mut self) -> io::Result<()> {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.hot.clear();
        self.compact()
    }

    /// Rewrites the log with only the hot extents.
    fn compact(&mut self) -> io::Result<()> {
        let mut buf = Vec::new();
        for e in self.hot.keys() {
            encode_entry(ACTIVATE, e, &mut buf);
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = File::create(&tmp)?;
        self.capacity = self.capacity.max(buf.len() as u64 * 2).max(AL_CAPACITY);
        preallocate(&f, self.capacity)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            super::segment::sync_dir(dir)?;
        }
        self.file = f;
        self.file_len = buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_extents_survive_reopen_and_retired_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("al");
        let (mut al, left) = ActivityLog::open(&p, true).unwrap();
        assert!(left.is_empty());
        al.activate(
            &[(b"a".to_vec(), 0), (b"a".to_vec(), 1), (b"b".to_vec(), 7)],
            100,
        )
        .unwrap();
        al.retire(&[(b"a".to_vec(), 0)]).unwrap();
        drop(al);
        let (_al, left) = ActivityLog::open(&p, true).unwrap();
        assert_eq!(left, vec![(b"a".to_vec(), 1), (b"b".to_vec(), 7)]);
    }

    #[test]
    fn torn_tail_is_ignored() {
        let mut buf = Vec::new();
        encode_entry(ACTIVATE, &(b"x".to_vec(), 3), &mut buf);
        encode_entry(ACTIVATE, &(b"y".to_vec(), 4), &mut buf);
        let cut = buf.len() - 2;
        assert_eq!(parse_entries(&buf[..cut]).len(), 1);
        buf[5] ^= 1;
        assert_eq!(parse_entries(&buf).len(), 0);
    }

    #[test]
    fn dirty_regions_merge() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let d = DirtyList::new(db.open_tree("dirty").unwrap());
        d.add_range(b"f", 0, 10).unwrap();
        d.add_range(b"f", 5, 10).unwrap();
        d.add_range(b"f", 100, 1).unwrap();
        d.add_range(b"g", 0, 1).unwrap();
        d.add_whole(b"g").unwrap();
        let r = d.regions().unwrap();
        assert_eq!(
            r,
            vec![
                DirtyRegion {
                    path: b"f".to_vec(),
                    offset: 0,
                    len: 15
                },
                DirtyRegion {
                    path: b"f".to_vec(),
                    offset: 100,
                    len: 1
                },
                DirtyRegion {
                    path: b"g".to_vec(),
                    offset: 0,
                    len: WHOLE_FILE
                },
            ]
        );
    }

    #[test]
    fn remove_covered_keeps_what_lies_outside() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let d = DirtyList::new(db.open_tree("dirty").unwrap());
        d.add_range(b"f", 0, 10).unwrap();
        d.add_range(b"f", 100, 10).unwrap();
        d.add_range(b"fg", 0, 10).unwrap();
        d.remove_covered(&DirtyRegion {
            path: b"f".to_vec(),
            offset: 0,
            len: 50,
        })
        .unwrap();
        let r = d.regions().unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].path.as_slice(), r[0].offset), (&b"f"[..], 100));
        assert_eq!(r[1].path, b"fg".to_vec());
        d.remove_covered(&DirtyRegion {
            path: b"f".to_vec(),
            offset: 0,
            len: WHOLE_FILE,
        })
        .unwrap();
        assert_eq!(d.regions().unwrap().len(), 1);
    }
}
