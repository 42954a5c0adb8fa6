//! Write payloads held in the backing file (`journal.payload = "backing"`).
//!
//! A guest write is journaled as a [`super::Op::WriteBacked`] record: its
//! metadata and the crc32 of its bytes, not the bytes. Until every peer has
//! applied it, the record is *held*: this table keeps a readable descriptor of
//! the file (which also keeps an unlinked file's data alive) and the range, so
//! that the shipper can read the bytes back from the backing file. Before any
//! change overwrites a held range (a write, truncate, hole punch, …), the
//! volume asks the journal to preserve it: the old bytes are copied into a
//! [`super::Op::Preimage`] record first (copy-before-write), so every record
//! can still be served exactly as it was written.
//!
//! The table is bounded (records and files): a write that finds it full is
//! journaled with its payload, as in `journal.payload = "journal"`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{error, warn};

use super::dirty::DirtyRegion;
use super::record::{Op, Record, payload_crc};
use super::{HeldSource, Journal, PayloadMode, seq_key};

/// Longest write that is held; a longer one carries its bytes in the journal.
pub const MAX_HELD_LEN: u32 = 4 << 20;

/// Identity of a backing file: (st_dev, st_ino).
pub type FileKey = (u64, u64);

/// A held write: where its bytes are and their crc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldWrite {
    pub key: FileKey,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
    /// Written through O_DIRECT: reading it back must not leave it cached.
    pub direct: bool,
}

/// Where a held write's bytes can be read now.
#[derive(Clone)]
pub enum Source {
    /// In memory (the ring): exactly the bytes written.
    Ring(Arc<[u8]>),
    /// In the backing file, to be read and checked against the crc.
    File(HeldWrite, Arc<File>),
}

struct HeldFile {
    file: Arc<File>,
    /// Held writes whose bytes are in the file, by (offset, seq).
    ranges: BTreeSet<(u64, u64)>,
    /// The longest write held in the file: an overlap query looks at the
    /// writes starting less than this before its range only.
    max_len: u32,
    /// Slots reserved for records whose seq is being assigned.
    reserved: usize,
}

#[derive(Default)]
struct Inner {
    /// Every held write, with whether its bytes are still in the file.
    by_seq: BTreeMap<u64, (HeldWrite, bool)>,
    files: HashMap<FileKey, HeldFile>,
    reserved: usize,
    /// Bytes of recent held writes (DRBD protocol A sends from its buffer
    /// too): the shipper reads them without a pread, and an overwrite of a
    /// write that is here only detaches it from the file, with no copy.
    ring: HashMap<u64, Arc<[u8]>>,
    /// Ring entries oldest first, for eviction.
    ring_order: std::collections::VecDeque<u64>,
    ring_bytes: usize,
    /// Every record up to this seq was applied by every peer.
    released: u64,
}

/// The table of held writes.
pub struct Held {
    inner: Mutex<Inner>,
    max_records: usize,
    max_files: usize,
    ring_cap: usize,
}

impl Held {
    pub fn new(max_records: usize, max_files: usize, ring_cap: usize) -> Held {
        Held {
            inner: Mutex::new(Inner::default()),
            max_records,
            max_files,
            ring_cap,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the ring would take `len` more bytes (it evicts to make room).
    pub fn ring_takes(&self, len: usize) -> bool {
        len <= self.ring_cap
    }

    /// Reserves room for one more held record of `key`, opening the file with
    /// `open` if it holds none yet. False when the table is full or the file
    /// cannot be opened: the write then carries its payload.
    pub fn reserve(&self, key: FileKey, open: &dyn Fn() -> io::Result<File>) -> bool {
        let mut g = self.lock();
        if g.by_seq.len() + g.reserved >= self.max_records {
            return false;
        }
        if !g.files.contains_key(&key) {
            if g.files.len() >= self.max_files {
                return false;
            }
            // Opening under the table lock keeps the check and the insert one
            // step; it is one open per file that starts being held.
            let Ok(file) = open() else {
                return false;
            };
            g.files.insert(
                key,
                HeldFile {
                    file: Arc::new(file),
                    ranges: BTreeSet::new(),
                    max_len: 0,
                    reserved: 0,
                },
            );
        }
        g.reserved += 1;
        if let Some(f) = g.files.get_mut(&key) {
            f.reserved += 1;
        }
        true
    }

    /// Turns a reservation into the held record `seq` (called before the
    /// record can be read by anyone), with its bytes in the ring if given.
    /// Returns the writes the ring evicted whose bytes are nowhere else: the
    /// caller preserves them, then [`Held::remove`]s them.
    pub fn insert(
        &self,
        seq: u64,
        w: HeldWrite,
        bytes: Option<Arc<[u8]>>,
    ) -> Vec<(u64, Arc<[u8]>)> {
        let mut g = self.lock();
        g.reserved = g.reserved.saturating_sub(1);
        let released = seq <= g.released;
        if let Some(f) = g.files.get_mut(&w.key) {
            f.reserved = f.reserved.saturating_sub(1);
            if !released {
                f.ranges.insert((w.offset, seq));
                f.max_len = f.max_len.max(w.len);
            }
        }
        if released {
            Self::drop_idle(&mut g, w.key);
            return Vec::new();
        }
        g.by_seq.insert(seq, (w, true));
        let mut spill = Vec::new();
        if let Some(b) = bytes {
            g.ring_bytes += b.len();
            g.ring.insert(seq, b);
            g.ring_order.push_back(seq);
            // Bytes being spilled count as gone: they leave once preserved.
            let mut spilling = 0usize;
            while g.ring_bytes.saturating_sub(spilling) > self.ring_cap
                && let Some(old) = g.ring_order.pop_front()
            {
                let in_file = g.by_seq.get(&old).map(|e| e.1);
                match in_file {
                    // The file has them: the ring copy can go.
                    Some(true) | None => {
                        if let Some(b) = g.ring.remove(&old) {
                            g.ring_bytes -= b.len();
                        }
                    }
                    // Only here: the caller preserves them first.
                    Some(false) => {
                        if let Some(b) = g.ring.get(&old) {
                            spilling += b.len();
                            spill.push((old, b.clone()));
                        }
                    }
                }
            }
        }
        spill
    }

    fn drop_idle(g: &mut Inner, key: FileKey) {
        if g.files
            .get(&key)
            .is_some_and(|f| f.ranges.is_empty() && f.reserved == 0)
        {
            g.files.remove(&key);
        }
    }

    fn source(g: &Inner, seq: u64) -> Option<Source> {
        if let Some(b) = g.ring.get(&seq) {
            return Some(Source::Ring(b.clone()));
        }
        let (w, in_file) = *g.by_seq.get(&seq)?;
        if !in_file {
            return None;
        }
        Some(Source::File(w, g.files.get(&w.key)?.file.clone()))
    }

    /// Where the held record `seq`'s bytes are.
    pub fn get(&self, seq: u64) -> Option<Source> {
        Self::source(&self.lock(), seq)
    }

    /// [`Held::get`] of each seq that is held.
    pub fn get_many(&self, seqs: &[u64]) -> Vec<(u64, Source)> {
        let g = self.lock();
        seqs.iter()
            .filter_map(|s| Some((*s, Self::source(&g, *s)?)))
            .collect()
    }

    /// The seqs of `seqs` whose bytes are still in their file (no change
    /// to their range has begun).
    pub fn in_file_many(&self, seqs: impl Iterator<Item = u64>) -> std::collections::HashSet<u64> {
        let g = self.lock();
        seqs.filter(|s| g.by_seq.get(s).is_some_and(|e| e.1))
            .collect()
    }

    /// Held writes of `key` whose bytes in the file overlap `start..end`,
    /// oldest first, for a change about to overwrite them. Those the ring
    /// has are detached from the file here (they need nothing more); the
    /// others are returned for the caller to preserve.
    pub fn overlapping(
        &self,
        key: FileKey,
        start: u64,
        end: u64,
    ) -> Vec<(u64, HeldWrite, Arc<File>)> {
        let mut g = self.lock();
        let g = &mut *g;
        let Some(f) = g.files.get_mut(&key) else {
            return Vec::new();
        };
        if start >= end {
            return Vec::new();
        }
        let hits: Vec<(u64, u64)> = f
            .ranges
            .range((start.saturating_sub(f.max_len as u64), 0)..(end, 0))
            .copied()
            .collect();
        let mut out = Vec::new();
        for (offset, seq) in hits {
            let Some(entry) = g.by_seq.get_mut(&seq) else {
                continue;
            };
            let w = entry.0;
            if !(w.offset < end && start < w.offset + w.len as u64) {
                continue;
            }
            if g.ring.contains_key(&seq) {
                entry.1 = false;
                f.ranges.remove(&(offset, seq));
            } else {
                out.push((seq, w, f.file.clone()));
            }
        }
        out.sort_by_key(|h| h.0);
        let key_idle = f.ranges.is_empty() && f.reserved == 0;
        if key_idle {
            g.files.remove(&key);
        }
        out
    }

    /// Every held record, oldest first, with its file (while its bytes are
    /// in it) and its bytes in the ring (if there).
    #[allow(clippy::type_complexity)]
    pub fn all(&self) -> Vec<(u64, HeldWrite, Option<Arc<File>>, Option<Arc<[u8]>>)> {
        let g = self.lock();
        g.by_seq
            .iter()
            .map(|(s, (w, in_file))| {
                let file = in_file
                    .then(|| g.files.get(&w.key).map(|f| f.file.clone()))
                    .flatten();
                (*s, *w, file, g.ring.get(s).cloned())
            })
            .collect()
    }

    fn remove_locked(g: &mut Inner, seq: u64) {
        if let Some((w, in_file)) = g.by_seq.remove(&seq) {
            if in_file && let Some(f) = g.files.get_mut(&w.key) {
                f.ranges.remove(&(w.offset, seq));
            }
            Self::drop_idle(g, w.key);
        }
        if let Some(b) = g.ring.remove(&seq) {
            g.ring_bytes -= b.len();
        }
    }

    /// Stops holding `seq` (its bytes were preserved, or are not needed).
    pub fn remove(&self, seq: u64) {
        Self::remove_locked(&mut self.lock(), seq);
    }

    /// Every peer applied the records up to `seq`: they need not be held.
    pub fn release_through(&self, seq: u64) {
        let mut g = self.lock();
        g.released = g.released.max(seq);
        // From the front: the cost is what is released, not what stays held.
        while let Some((&s, _)) = g.by_seq.first_key_value() {
            if s > seq {
                break;
            }
            Self::remove_locked(&mut g, s);
        }
        while g.ring_order.front().is_some_and(|&s| s <= seq) {
            g.ring_order.pop_front();
        }
    }

    /// Held records, files with held records, and bytes in the ring.
    pub fn len(&self) -> (usize, usize, usize) {
        let g = self.lock();
        (g.by_seq.len(), g.files.len(), g.ring_bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().by_seq.is_empty()
    }
}

/// Reads a held write's bytes from `file` and checks them against its crc:
/// None when they are not (any more) what was written.
pub fn read_checked(file: &File, w: &HeldWrite) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; w.len as usize];
    file.read_exact_at(&mut buf, w.offset).ok()?;
    (super::record::payload_crc(&buf) == w.crc).then_some(buf)
}

/// Value of a `held` tree entry (written at a clean close, read at the next open).
#[derive(serde::Serialize, serde::Deserialize)]
struct PutAway {
    path: Vec<u8>,
    offset: u64,
    len: u32,
    crc: u32,
    direct: bool,
}

impl Journal {
    /// Journals a guest write of `data` at `offset` of `path`; the bytes are
    /// in the backing file already. With `journal.payload = "backing"` the
    /// record keeps only their range and crc, and while peers need them the
    /// write is held in `src` (if the table has room); otherwise (payload
    /// mode "journal", a full table) the record carries the bytes.
    pub fn append_write(
        &self,
        path: &[u8],
        offset: u64,
        data: &[u8],
        src: Option<HeldSource<'_>>,
    ) -> u64 {
        if self.options.payload == PayloadMode::Backing
            && !data.is_empty()
            && let Ok(len) = u32::try_from(data.len())
            && len <= MAX_HELD_LEN
        {
            let crc = payload_crc(data);
            let op = Op::WriteBacked {
                path: path.to_vec(),
                offset,
                len,
                crc,
            };
            if !self.options.hold_for_peers {
                return self.append(&op, &[]);
            }
            if let Some(src) = src
                && self.held.reserve(src.key, src.open)
            {
                let w = HeldWrite {
                    key: src.key,
                    offset,
                    len,
                    crc,
                    direct: src.direct,
                };
                // The one user-space copy of a held write: into the ring.
                let bytes = self.held.ring_takes(data.len()).then(|| Arc::from(data));
                let mut spill = Vec::new();
                let seq = self.append_then(&op, &[], |seq| spill = self.held.insert(seq, w, bytes));
                for (s, b) in spill {
                    self.spill(s, &b);
                }
                return seq;
            }
        }
        self.append(
            &Op::Write {
                path: path.to_vec(),
                offset,
            },
            data,
        )
    }

    /// Before a change to bytes `start..end` of file `key` (now named `path`)
    /// reaches the backing file: held writes overlapping it get their bytes
    /// copied into the journal first (copy-before-write). The caller holds the
    /// file's mutation lock, so nothing changes the range meanwhile.
    pub fn preserve(&self, key: FileKey, path: &[u8], start: u64, end: u64) {
        if !self.options.hold_for_peers {
            return;
        }
        for (seq, w, file) in self.held.overlapping(key, start, end) {
            self.preserve_one(seq, &w, &file, Some(path));
        }
    }

    /// A write the ring evicts while its range in the file was overwritten:
    /// its bytes go into a `Preimage` record before the ring lets them go.
    fn spill(&self, seq: u64, bytes: &[u8]) {
        let p = self.append(&Op::Preimage { of: seq }, bytes);
        if let Err(e) = self.preimages.insert(seq_key(seq), &seq_key(p)) {
            error!(seq, error = %e, "cannot index a preimage");
        }
        self.held.remove(seq);
    }

    /// Copies a held write's bytes into a `Preimage` record, then stops
    /// holding it. Bytes that no longer match their crc (the backing file was
    /// changed behind the mount) cannot be preserved: the region is dirty.
    fn preserve_one(&self, seq: u64, w: &HeldWrite, file: &File, path: Option<&[u8]>) {
        match read_checked(file, w) {
            Some(bytes) => {
                let p = self.append(&Op::Preimage { of: seq }, &bytes);
                if let Err(e) = self.preimages.insert(seq_key(seq), &seq_key(p)) {
                    error!(seq, error = %e, "cannot index a preimage");
                }
            }
            None => {
                error!(
                    seq,
                    "a held write no longer matches the backing file; its region is marked dirty"
                );
                if let Some(path) = path {
                    self.mark_dirty(&DirtyRegion {
                        path: path.to_vec(),
                        offset: w.offset,
                        len: w.len as u64,
                    });
                }
            }
        }
        self.held.remove(seq);
    }

    /// The bytes of the `WriteBacked` record `seq`: from the backing file while
    /// it is held, else from its preimage; None when neither has them.
    fn backed_bytes(&self, seq: u64, crc: u32) -> Option<Vec<u8>> {
        match self.held.get(seq) {
            Some(Source::Ring(b)) => return Some(b.to_vec()),
            Some(Source::File(w, file)) => {
                let bytes = read_checked(&file, &w);
                if w.direct {
                    drop_cached(&file, &w);
                }
                // Still in the file after the read: no change began before
                // it ended (a change detaches or preserves first).
                if bytes.is_some() && self.held.in_file_many(std::iter::once(seq)).contains(&seq) {
                    return bytes;
                }
                // Changed meanwhile: the ring or a preimage has them now.
                if let Some(Source::Ring(b)) = self.held.get(seq) {
                    return Some(b.to_vec());
                }
            }
            None => {}
        }
        let p = self.preimages.get(seq_key(seq)).ok().flatten()?;
        let p = u64::from_be_bytes(p.as_ref().try_into().ok()?);
        self.wait_written(p);
        let r = self.read(p).ok().flatten()?;
        (r.op == Op::Preimage { of: seq } && payload_crc(&r.data) == crc).then_some(r.data)
    }

    /// A record as a replica receives it: a `WriteBacked` becomes the `Write`
    /// of its bytes, a `Preimage` travels without its bytes (a no-op). A write
    /// whose bytes can no longer be served (not held: the journal was reopened
    /// after a crash, or the backing file was changed behind the mount)
    /// travels as a no-op too, and its region is marked dirty so that
    /// catch-up sends the region as it is now.
    pub fn resolve(&self, r: Record) -> Record {
        match r.op {
            Op::WriteBacked {
                path,
                offset,
                len,
                crc,
            } => match self.backed_bytes(r.seq, crc) {
                Some(data) => Record {
                    seq: r.seq,
                    op: Op::Write { path, offset },
                    data,
                },
                None => {
                    warn!(
                        seq = r.seq,
                        "the bytes of a write are not held any more; its region is marked dirty"
                    );
                    self.mark_dirty(&DirtyRegion {
                        path,
                        offset,
                        len: len as u64,
                    });
                    Record {
                        seq: r.seq,
                        op: Op::Preimage { of: r.seq },
                        data: Vec::new(),
                    }
                }
            },
            Op::Preimage { of } => Record {
                seq: r.seq,
                op: Op::Preimage { of },
                data: Vec::new(),
            },
            _ => r,
        }
    }

    /// [`Journal::resolve`] for a batch of records in seq order, taking the
    /// held table's lock twice for the batch rather than twice per record.
    pub fn resolve_all(&self, records: Vec<Record>) -> Vec<Record> {
        let wanted: Vec<u64> = records
            .iter()
            .filter(|r| matches!(r.op, Op::WriteBacked { .. }))
            .map(|r| r.seq)
            .collect();
        let found = self.held.get_many(&wanted);
        let mut bytes: HashMap<u64, Vec<u8>> = HashMap::with_capacity(found.len());
        let mut from_file = Vec::new();
        for (seq, src) in &found {
            match src {
                Source::Ring(b) => {
                    bytes.insert(*seq, b.to_vec());
                }
                Source::File(w, file) => {
                    if let Some(b) = read_checked(file, w) {
                        if w.direct {
                            drop_cached(file, w);
                        }
                        bytes.insert(*seq, b);
                        from_file.push(*seq);
                    }
                }
            }
        }
        // Still in the file after the reads ended: no change began before
        // they did. The others are served one by one below.
        let still = self.held.in_file_many(from_file.iter().copied());
        for s in from_file {
            if !still.contains(&s) {
                bytes.remove(&s);
            }
        }
        records
            .into_iter()
            .map(|r| match (&r.op, bytes.remove(&r.seq)) {
                (Op::WriteBacked { path, offset, .. }, Some(data)) => Record {
                    seq: r.seq,
                    op: Op::Write {
                        path: path.clone(),
                        offset: *offset,
                    },
                    data,
                },
                _ => self.resolve(r),
            })
            .collect()
    }

    /// Every peer applied the records up to `seq`: their bytes need not be
    /// held, and their preimages are not needed.
    pub(super) fn release_held_through(&self, seq: u64) {
        self.held.release_through(seq);
        let old: Vec<_> = self
            .preimages
            .range(..=seq_key(seq))
            .keys()
            .filter_map(|k| k.ok())
            .collect();
        for k in old {
            let _ = self.preimages.remove(k);
        }
    }

    /// Held writes, files with held writes and bytes in the ring, now.
    pub fn held_counts(&self) -> (usize, usize, usize) {
        self.held.len()
    }

    /// At a clean close, before the writer stops: each held write is put
    /// away under its file's current name (read back at the next open), or,
    /// for a file with no name left, preserved in the journal.
    pub(super) fn put_held_away(&self) {
        let backing = self
            .backing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let root = backing.and_then(|b| std::fs::canonicalize(b).ok());
        for (seq, w, file, ring) in self.held.all() {
            let rel = match (&root, &file) {
                (Some(root), Some(file)) => name_beneath(file, root),
                _ => None,
            };
            match (rel, file, ring) {
                (Some(rel), _, _) => {
                    let v = PutAway {
                        path: rel,
                        offset: w.offset,
                        len: w.len,
                        crc: w.crc,
                        direct: w.direct,
                    };
                    let v = postcard::to_stdvec(&v).expect("serialises");
                    if let Err(e) = self.held_at_close.insert(seq_key(seq), v) {
                        error!(seq, error = %e, "cannot put a held write away");
                    }
                    self.held.remove(seq);
                }
                (None, _, Some(bytes)) => self.spill(seq, &bytes),
                (None, Some(file), None) => self.preserve_one(seq, &w, &file, None),
                (None, None, None) => self.held.remove(seq),
            }
        }
    }

    /// At open after a clean close, once the backing dir is known: the held
    /// writes put away are held again. One whose file is gone or changed is
    /// dirty instead.
    pub(super) fn take_held_back(&self, backing: &Path) {
        let entries: Vec<_> = self.held_at_close.iter().filter_map(|kv| kv.ok()).collect();
        for (k, v) in entries {
            let Some(seq) = k.as_ref().try_into().ok().map(u64::from_be_bytes) else {
                continue;
            };
            let Ok(p) = postcard::from_bytes::<PutAway>(&v) else {
                continue;
            };
            if self.options.hold_for_peers && self.hold_again(backing, seq, &p) {
                continue;
            }
            if self.options.hold_for_peers {
                warn!(
                    seq,
                    "a held write's file changed while unmounted; its region is marked dirty"
                );
            }
            self.mark_dirty(&DirtyRegion {
                path: p.path,
                offset: p.offset,
                len: p.len as u64,
            });
        }
        if let Err(e) = self.held_at_close.clear() {
            error!(error = %e, "cannot clear the held writes put away");
        }
    }

    fn hold_again(&self, backing: &Path, seq: u64, p: &PutAway) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(rel) = crate::path::RelPath::parse(&p.path) else {
            return false;
        };
        let Ok(Some(file)) = crate::path::open_regular_beneath(backing, &rel) else {
            return false;
        };
        let Ok(m) = file.metadata() else {
            return false;
        };
        let w = HeldWrite {
            key: (m.dev(), m.ino()),
            offset: p.offset,
            len: p.len,
            crc: p.crc,
            direct: p.direct,
        };
        if read_checked(&file, &w).is_none() || !self.held.reserve(w.key, &|| file.try_clone()) {
            return false;
        }
        // In the file only: nothing else is held yet, so nothing spills.
        self.held.insert(seq, w, None);
        true
    }
}

/// Drops a range read back from the page cache (the writer bypassed it).
fn drop_cached(file: &File, w: &HeldWrite) {
    use std::os::fd::AsRawFd;
    // SAFETY: fadvise on a valid open fd; advice only.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            w.offset as i64,
            w.len as i64,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// The name of `file` relative to `root`, if it still has one there.
fn name_beneath(file: &File, root: &Path) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().ok()?;
    if m.nlink() == 0 {
        return None;
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    let rel = link.strip_prefix(root).ok()?;
    let rel = rel.as_os_str().as_bytes().to_vec();
    // The kernel's name for the descriptor may be stale (a hard link whose
    // name it was opened by is gone): it must name this very file.
    let parsed = crate::path::RelPath::parse(&rel).ok()?;
    let named = crate::path::open_regular_beneath(root, &parsed).ok()??;
    let n = named.metadata().ok()?;
    ((n.dev(), n.ino()) == (m.dev(), m.ino())).then_some(rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, FileKey) {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let m = f.as_file().metadata().unwrap();
        (f, (m.dev(), m.ino()))
    }

    #[test]
    fn held_records_are_found_by_range_and_released_by_seq() {
        let (f, key) = file_with(&[1u8; 8192]);
        let h = Held::new(10, 10, 0);
        let open = || File::open(f.path());
        for (seq, off) in [(5u64, 0u64), (6, 4096)] {
            assert!(h.reserve(key, &open));
            let crc = crate::journal::record::payload_crc(&[1u8; 4096]);
            h.insert(
                seq,
                HeldWrite {
                    key,
                    offset: off,
                    len: 4096,
                    crc,
                    direct: false,
                },
                None,
            );
        }
        let hit: Vec<u64> = h.overlapping(key, 4000, 4100).iter().map(|x| x.0).collect();
        assert_eq!(hit, vec![5, 6]);
        let hit: Vec<u64> = h.overlapping(key, 4096, 4097).iter().map(|x| x.0).collect();
        assert_eq!(hit, vec![6]);
        assert!(h.overlapping(key, 8192, 9000).is_empty());
        let Some(Source::File(w, file)) = h.get(6) else {
            panic!("held in the file");
        };
        assert_eq!(read_checked(&file, &w).unwrap(), vec![1u8; 4096]);
        h.release_through(5);
        assert_eq!(h.len(), (1, 1, 0));
        h.remove(6);
        assert_eq!(h.len(), (0, 0, 0), "a file with nothing held is closed");
        // A record released before it was inserted is not held.
        assert!(h.reserve(key, &open));
        h.insert(
            4,
            HeldWrite {
                key,
                offset: 0,
                len: 1,
                crc: 0,
                direct: false,
            },
            None,
        );
        assert_eq!(h.len(), (0, 0, 0));
    }

    #[test]
    fn a_full_table_refuses_and_a_changed_range_fails_its_check() {
        let (f, key) = file_with(&[2u8; 4096]);
        let h = Held::new(1, 10, 0);
        let open = || File::open(f.path());
        assert!(h.reserve(key, &open));
        assert!(!h.reserve(key, &open), "room for one record only");
        let w = HeldWrite {
            key,
            offset: 0,
            len: 4096,
            crc: crate::journal::record::payload_crc(&[2u8; 4096]),
            direct: false,
        };
        h.insert(1, w, None);
        assert!(!h.reserve(key, &open));
        let file = File::options().write(true).open(f.path()).unwrap();
        file.write_all_at(&[3u8], 100).unwrap();
        assert!(
            read_checked(&file, &w).is_none(),
            "crc must catch the change"
        );
        let h2 = Held::new(10, 0, 0);
        assert!(!h2.reserve(key, &open), "room for no file");
    }

    fn rd(j: &Journal, seq: u64) -> io::Result<Option<Record>> {
        j.wait_written(seq);
        j.read(seq)
    }

    /// A journal holding writes for peers, with `ring` bytes of ring.
    fn journal_with_ring(dir: &Path, ring: u64) -> Journal {
        let opts = crate::journal::JournalOptions {
            cap_bytes: 8 << 20,
            segment_bytes: 1 << 20,
            hold_for_peers: true,
            ring_bytes: ring,
            ..Default::default()
        };
        Journal::open(dir, opts).unwrap().0
    }

    fn journal(dir: &Path) -> Journal {
        journal_with_ring(dir, 0)
    }

    /// With a ring, an overwrite of a write still there costs nothing: no
    /// preimage, the bytes are served from memory. When the ring evicts it,
    /// its bytes go into a preimage first.
    #[test]
    fn the_ring_serves_overwritten_writes_and_spills_them_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal_with_ring(dir.path(), 8192);
        let (f, key) = file_with(&[0u8; 16384]);
        let open = || File::open(f.path());
        let write = |data: &[u8], off: u64| {
            j.preserve(key, b"f", off, off + data.len() as u64);
            f.as_file().write_all_at(data, off).unwrap();
            let src = HeldSource {
                key,
                open: &open,
                direct: false,
            };
            j.append_write(b"f", off, data, Some(src))
        };
        let served = |seq| j.resolve(rd(&j, seq).unwrap().unwrap()).data;
        let a = write(&[1u8; 4096], 0);
        let b = write(&[2u8; 4096], 0);
        assert_eq!(j.held_counts().2, 8192, "both in the ring");
        assert_eq!(served(a), vec![1u8; 4096], "a from the ring, not the file");
        assert_eq!(served(b), vec![2u8; 4096]);
        j.wait_written(j.last_seq());
        assert!(
            j.records(1, u64::MAX)
                .all(|r| !matches!(r.unwrap().op, Op::Preimage { .. })),
            "no copy-before-write while the ring has the bytes"
        );
        // A third write evicts a, which exists nowhere else: a preimage.
        let c = write(&[3u8; 4096], 8192);
        assert_eq!(served(a), vec![1u8; 4096], "a from its preimage");
        assert_eq!(served(b), vec![2u8; 4096]);
        assert_eq!(served(c), vec![3u8; 4096]);
        j.wait_written(j.last_seq());
        let pre: Vec<_> = j
            .records(1, u64::MAX)
            .map(|r| r.unwrap())
            .filter(|r| matches!(r.op, Op::Preimage { .. }))
            .collect();
        assert_eq!(pre.len(), 1, "{pre:?}");
        assert_eq!(pre[0].op, Op::Preimage { of: a });
        assert_eq!(pre[0].data, vec![1u8; 4096]);
    }

    /// A held write is served from the file until an overwrite preserves
    /// it; after that from its preimage, even once the file changed; after
    /// the release nothing is served and its range is dirty.
    #[test]
    fn held_writes_are_served_as_written_through_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(dir.path());
        let (f, key) = file_with(&[0u8; 8192]);
        let open = || File::open(f.path());
        let src = || HeldSource {
            key,
            open: &open,
            direct: false,
        };
        let write = |data: &[u8], off: u64| {
            f.as_file().write_all_at(data, off).unwrap();
            j.append_write(b"f", off, data, Some(src()))
        };
        let a = write(&[1u8; 4096], 0);
        let b = write(&[2u8; 4096], 4096);
        assert!(matches!(
            rd(&j, a).unwrap().unwrap().op,
            Op::WriteBacked { len: 4096, .. }
        ));
        assert!(
            rd(&j, a).unwrap().unwrap().data.is_empty(),
            "no payload in the journal"
        );
        // Overwrite the first half of `a`: it is preserved first.
        j.preserve(key, b"f", 0, 2048);
        let c = write(&[3u8; 2048], 0);
        let served = |seq| j.resolve(rd(&j, seq).unwrap().unwrap());
        assert_eq!(served(a).data, vec![1u8; 4096], "a as written");
        assert_eq!(
            served(a).op,
            Op::Write {
                path: b"f".to_vec(),
                offset: 0
            }
        );
        assert_eq!(served(b).data, vec![2u8; 4096]);
        assert_eq!(served(c).data, vec![3u8; 2048]);
        // The preimage travels without its bytes.
        let p = {
            j.wait_written(j.last_seq());
            j.records(c + 1, u64::MAX).count()
        };
        assert_eq!(p, 0, "the preimage came before the overwrite");
        let pre = {
            j.wait_written(j.last_seq());
            j.records(b + 1, c - 1).next().unwrap().unwrap()
        };
        assert_eq!(pre.op, Op::Preimage { of: a });
        assert_eq!(pre.data, vec![1u8; 4096]);
        assert!(j.resolve(pre).data.is_empty());
        // Released: b is not held any more; a changed file cannot serve it.
        j.trim_through(b);
        f.as_file().write_all_at(&[9u8], 5000).unwrap();
        let r = served(b);
        assert_eq!(r.op, Op::Preimage { of: b }, "unservable becomes a no-op");
        let dirty = j.dirty().regions().unwrap();
        assert!(
            dirty
                .iter()
                .any(|d| d.path == b"f" && d.offset == 4096 && d.len == 4096),
            "{dirty:?}"
        );
        // c is still held and served.
        assert_eq!(served(c).data, vec![3u8; 2048]);
    }

    /// Without peers nothing is held; with payload mode "journal" writes carry
    /// their bytes; a full table makes a write carry them too.
    #[test]
    fn writes_carry_their_bytes_when_they_cannot_be_held() {
        let dir = tempfile::tempdir().unwrap();
        let (f, key) = file_with(&[0u8; 4096]);
        let open = || File::open(f.path());
        let src = || HeldSource {
            key,
            open: &open,
            direct: false,
        };
        let opts = |hold, payload, held_records| crate::journal::JournalOptions {
            hold_for_peers: hold,
            payload,
            held_records,
            ..Default::default()
        };
        let (j, _) = Journal::open(dir.path(), opts(false, PayloadMode::Backing, 10)).unwrap();
        let s = j.append_write(b"f", 0, b"abc", Some(src()));
        assert!(matches!(
            rd(&j, s).unwrap().unwrap().op,
            Op::WriteBacked { .. }
        ));
        assert_eq!(j.held_counts(), (0, 0, 0));
        drop(j);
        let d2 = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(d2.path(), opts(true, PayloadMode::Journal, 10)).unwrap();
        let s = j.append_write(b"f", 0, b"abc", Some(src()));
        assert_eq!(rd(&j, s).unwrap().unwrap().data, b"abc");
        drop(j);
        let d3 = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(d3.path(), opts(true, PayloadMode::Backing, 1)).unwrap();
        let s1 = j.append_write(b"f", 0, b"abc", Some(src()));
        let s2 = j.append_write(b"f", 8, b"def", Some(src()));
        assert!(rd(&j, s1).unwrap().unwrap().data.is_empty());
        assert_eq!(rd(&j, s2).unwrap().unwrap().data, b"def", "table full");
    }

    /// A dropped segment's backed writes dirty their ranges and its
    /// preimages nothing (not the whole tree).
    #[test]
    fn a_dropped_segment_dirties_only_the_ranges_written() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(dir.path());
        for i in 0..200u64 {
            let op = Op::WriteBacked {
                path: b"a".to_vec(),
                offset: i << 20,
                len: 4096,
                crc: 0,
            };
            let s = j.append(&op, &[]);
            j.append(&Op::Preimage { of: s }, &[7u8; 65536]);
        }
        j.sync_through(j.last_seq()).unwrap();
        // The writer enforces the cap after the batch it synced.
        let start = std::time::Instant::now();
        let mut dirty = j.dirty().regions().unwrap();
        while dirty.is_empty() && start.elapsed() < std::time::Duration::from_secs(30) {
            std::thread::sleep(std::time::Duration::from_millis(10));
            dirty = j.dirty().regions().unwrap();
        }
        assert!(!dirty.is_empty(), "the cap dropped something");
        for d in &dirty {
            assert_eq!(d.path, b"a", "{dirty:?}");
            assert!(!d.is_whole() && d.len == 4096, "{dirty:?}");
        }
    }
}
