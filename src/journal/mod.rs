//! The journal: every mutation of the mount, in order, under the state directory.
//!
//! Layout (see docs/ARCHITECTURE.md for the reasoning):
//! - `journal/seg-<first seq>.log`: append-only segment files of self-describing
//!   frames (header, op, payload, crc). They are the source of truth.
//! - `journal/index.sled`: sled trees — `index` (seq big-endian → segment, offset,
//!   length), `dirty` (regions to resync), `meta`.
//! - `journal/activity.log`: hot extents (see [`dirty::ActivityLog`]).
//! - `journal/CLEAN`: present only after a clean shutdown; holds the next seq.
//!
//! Request threads encode a frame and queue it (group commit); one writer thread
//! appends frames to the active segment in sequence order, indexes them, and
//! fdatasyncs when someone waits in [`Journal::sync_through`].

pub mod apply;
pub mod dirty;
pub mod exclude;
pub mod held;
pub mod record;
pub mod segment;
pub mod verify;

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use dirty::{ActivityLog, DirtyList, DirtyRegion, Extent};
pub use record::{Op, Record, Timestamp};
use segment::ActiveSegment;

/// Journal settings; every field has a documented default (see README).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct JournalOptions {
    /// Most bytes of untrimmed records kept on disk; beyond it the oldest
    /// segments are dropped and their regions marked dirty. Default 8 GiB.
    pub cap_bytes: u64,
    /// Size at which a new segment file is started. Default 64 MiB.
    pub segment_bytes: u64,
    /// Extent size of the activity log. Default 16 MiB.
    pub extent_bytes: u64,
    /// Hot extents kept before the coldest are retired. Default 1024.
    pub activity_slots: usize,
    /// fdatasync the activity log when an extent becomes hot, so that a power
    /// loss cannot hide a write. Default true.
    pub sync_activity_log: bool,
    /// Memory for sled's page cache of the index. Default 32 MiB.
    pub index_cache_bytes: u64,
    /// Most frame bytes queued for the writer; past it writers wait, so
    /// memory stays bounded when the disk is slower than the guest. Default 64 MiB.
    pub queue_bytes: u64,
    /// Where the bytes of a guest write are kept: `"backing"` (default): only
    /// in the backing file, the record holds their metadata and crc, and a
    /// range is copied into the journal only when a change overwrites it
    /// before every peer applied it; `"journal"`: every write's bytes are
    /// also copied into the journal (the journal alone can replay the mount).
    pub payload: PayloadMode,
    /// Most writes held in the backing file for peers at once; a write beyond
    /// it carries its payload in the journal. Default 262144 (about 25 MiB).
    pub held_records: usize,
    /// Most files with held writes at once (one open descriptor each). Default 1024.
    pub held_files: usize,
    /// Memory for the bytes of the newest held writes: the shipper sends
    /// them from there, and overwriting them costs no copy-before-write.
    /// Default 32 MiB.
    pub ring_bytes: u64,
    /// Whether writes are held for peers; set by the daemon when it ships to
    /// peers (with none, nobody reads the bytes back). Not a config key.
    #[serde(skip)]
    pub hold_for_peers: bool,
}

/// See [`JournalOptions::payload`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PayloadMode {
    #[default]
    Backing,
    Journal,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            cap_bytes: 8 << 30,
            segment_bytes: 64 << 20,
            extent_bytes: 16 << 20,
            activity_slots: 1024,
            sync_activity_log: true,
            index_cache_bytes: 32 << 20,
            queue_bytes: 64 << 20,
            payload: PayloadMode::Backing,
            held_records: 262_144,
            held_files: 1024,
            ring_bytes: 32 << 20,
            hold_for_peers: false,
        }
    }
}

impl JournalOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.segment_bytes < (1 << 20) {
            return Err("journal.segment_bytes must be at least 1 MiB".into());
        }
        if self.cap_bytes < 4 * self.segment_bytes {
            return Err(format!(
                "journal.cap_bytes ({}) must be at least 4 x journal.segment_bytes ({})",
                self.cap_bytes, self.segment_bytes
            ));
        }
        if !self.extent_bytes.is_power_of_two() || self.extent_bytes < 4096 {
            return Err("journal.extent_bytes must be a power of two >= 4096".into());
        }
        if self.activity_slots < 16 {
            return Err("journal.activity_slots must be at least 16".into());
        }
        if self.index_cache_bytes < (1 << 20) {
            return Err("journal.index_cache_bytes must be at least 1 MiB".into());
        }
        if self.queue_bytes < (1 << 20) {
            return Err("journal.queue_bytes must be at least 1 MiB".into());
        }
        if self.held_records > 16 << 20 {
            return Err("journal.held_records must be at most 16777216".into());
        }
        if self.held_files > 65_536 {
            return Err("journal.held_files must be at most 65536".into());
        }
        if self.ring_bytes > 16 << 30 {
            return Err("journal.ring_bytes must be at most 16 GiB".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal I/O: {0}")]
    Io(#[from] io::Error),
    #[error("journal index (sled): {0}")]
    Sled(#[from] sled::Error),
    #[error("invalid journal options: {0}")]
    Options(String),
}

/// What opening the journal found.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    pub clean: bool,
    /// Records found in segments.
    pub records: u64,
    /// Bytes cut from a torn tail.
    pub torn_bytes: u64,
    /// Extents of the activity log that were hot and are now in the dirty list.
    pub hot_extents: usize,
}

/// Index entry: where the frame of a seq starts. The index is sparse (one entry
/// per written batch, or per few MiB after a rebuild): frames are
/// self-describing and consecutive, so a read starts at the nearest entry at or
/// below the wanted seq and scans forward, across segment files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
}

/// Distance between index entries written by a rebuild.
const INDEX_STRIDE: u64 = 4 << 20;

/// Least distance between index entries the writer makes.
const INDEX_GAP: u64 = 256 << 10;

impl Location {
    fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.segment.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Location> {
        if b.len() != 16 {
            return None;
        }
        Some(Location {
            segment: u64::from_le_bytes(b[0..8].try_into().ok()?),
            offset: u64::from_le_bytes(b[8..16].try_into().ok()?),
        })
    }
}

/// Counters and sizes for `replicafs journal stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub records: u64,
    pub oldest_seq: Option<u64>,
    pub newest_seq: Option<u64>,
    pub next_seq: u64,
    pub segments: usize,
    pub segment_bytes: u64,
    pub sled_bytes: u64,
    pub trimmed_through: u64,
    /// Records dropped unreplicated because of the cap (their regions are dirty).
    pub dropped_through: u64,
    pub dirty_regions: usize,
    pub payload_bytes_appended: u64,
    pub frame_bytes_appended: u64,
}

enum Msg {
    Frame {
        seq: u64,
        bytes: Vec<u8>,
        data_len: u32,
    },
    Sync(u64),
    Trim(u64),
}

#[derive(Default)]
struct SyncState {
    /// Every seq up to this one was handled by the writer: appended to a
    /// segment file (not necessarily on disk), or failed (see `failed`).
    written: u64,
    /// Every seq up to this one went through a sync: it is on disk unless it
    /// is in `failed`.
    settled: u64,
    /// Seq ranges (inclusive) whose write or sync failed: never durable, and
    /// their regions are in the dirty list. Adjacent ranges are merged.
    failed: Vec<(u64, u64)>,
    /// The writer has stopped: nothing more will be settled.
    closed: bool,
}

impl SyncState {
    fn add_failed(&mut self, from: u64, to: u64) {
        if from > to {
            return;
        }
        match self.failed.last_mut() {
            Some(last) if last.1 + 1 >= from => last.1 = last.1.max(to),
            _ => self.failed.push((from, to)),
        }
    }

    fn is_failed(&self, seq: u64) -> bool {
        self.failed.iter().any(|&(a, b)| a <= seq && seq <= b)
    }
}

/// Faults a test can inject into the writer's I/O (the I/O path itself, not a
/// mock): the next segment writes or syncs fail with EIO while set.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Faults {
    pub fail_write: std::sync::atomic::AtomicBool,
    pub fail_sync: std::sync::atomic::AtomicBool,
    /// Starting a new segment file fails.
    pub fail_roll: std::sync::atomic::AtomicBool,
    /// The writer waits before each segment write while set (a slow disk).
    pub stall_write: std::sync::atomic::AtomicBool,
}

struct Shared {
    state: Mutex<SyncState>,
    cond: Condvar,
    /// Bumped whenever `written` or `settled` moves (or the writer stops):
    /// wakes the replication sender instead of a polling tick.
    moved: tokio::sync::watch::Sender<()>,
    /// Frame bytes sent to the writer and not yet handled by it.
    queued: Mutex<u64>,
    /// Signalled when the writer handled queued bytes.
    room: Condvar,
    /// The writer thread has ended: nobody waits for room any more.
    stopped: std::sync::atomic::AtomicBool,
    payload_bytes: AtomicU64,
    frame_bytes: AtomicU64,
    #[cfg(test)]
    faults: Faults,
    /// What close did, in order, for the test that checks the order.
    #[cfg(test)]
    trace: Mutex<Vec<&'static str>>,
}

impl Shared {
    #[cfg(test)]
    fn trace(&self, step: &'static str) {
        self.trace
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(step);
    }

    #[cfg(not(test))]
    fn trace(&self, _step: &'static str) {}

    #[cfg(test)]
    fn fault(&self, flag: &std::sync::atomic::AtomicBool) -> io::Result<()> {
        if flag.load(Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

pub struct Journal {
    dir: PathBuf,
    db: sled::Db,
    index: sled::Tree,
    meta: sled::Tree,
    dirty: DirtyList,
    next_seq: AtomicU64,
    tx: Mutex<Option<Sender<Msg>>>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    activity: Mutex<ActivityLog>,
    activity_epoch: Arc<AtomicU64>,
    options: JournalOptions,
    /// The backing dir, synced (syncfs) before the clean marker is written.
    backing: Mutex<Option<PathBuf>>,
    /// Writes whose bytes are held in the backing file (see [`held`]).
    held: held::Held,
    /// seq of a held write -> seq of the `Preimage` record with its bytes.
    preimages: sled::Tree,
    /// Held writes at the last clean close: seq -> path, range and crc.
    held_at_close: sled::Tree,
}

/// A file a write may be held in: its identity and how to open it for reading.
pub struct HeldSource<'a> {
    pub key: held::FileKey,
    pub open: &'a dyn Fn() -> io::Result<std::fs::File>,
    /// The write came through O_DIRECT (see [`held::HeldWrite::direct`]).
    pub direct: bool,
}

const CLEAN_MARKER: &str = "CLEAN";

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn meta_u64(meta: &sled::Tree, key: &str) -> u64 {
    meta.get(key)
        .ok()
        .flatten()
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0)
}

/// Opens the sled index. sled releases its file lock only when its background
/// flusher has stopped, a moment after the previous owner dropped it (a quick
/// remount, a test reopening the journal), so a held lock is retried briefly.
fn open_index(path: &Path, cache_bytes: u64) -> Result<sled::Db, JournalError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The journal directory inside a state directory.
pub fn journal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("journal")
}

impl Journal {
    /// Opens (creating if needed) the journal under `state_dir`, recovering after
    /// an unclean stop, and starts its writer thread.
    pub fn open(
        state_dir: &Path,
        options: JournalOptions,
    ) -> Result<(Journal, Recovery), JournalError> {
        options.validate().map_err(JournalError::Options)?;
        let dir = journal_dir(state_dir);
        crate::mount::create_private_dir(state_dir)?;
        crate::mount::create_private_dir(&dir)?;
        let db = open_index(&dir.join("index.sled"), options.index_cache_bytes)?;
        let index = db.open_tree("index")?;
        let meta = db.open_tree("meta")?;
        let dirty = DirtyList::new(db.open_tree("dirty")?);
        let preimages = db.open_tree("preimages")?;
        let held_at_close = db.open_tree("held")?;

        let marker = dir.join(CLEAN_MARKER);
        let clean_next: Option<u64> = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let fresh = segment::list_segments(&dir)?.is_empty() && index.is_empty();
        let mut recovery = Recovery {
            clean: clean_next.is_some() || fresh,
            ..Default::default()
        };
        if marker.exists() {
            std::fs::remove_file(&marker)?;
            segment::sync_dir(&dir)?;
        }

        let segments = segment::list_segments(&dir)?;
        // Every segment but the last (the active one), oldest first.
        let mut sealed = VecDeque::new();
        for (first, path) in segments.iter().take(segments.len().saturating_sub(1)) {
            let len = std::fs::metadata(path)?.len();
            sealed.push_back(Sealed {
                first: *first,
                path: path.clone(),
                len,
            });
        }
        let floor = meta_u64(&meta, "trimmed_through").max(meta_u64(&meta, "dropped_through")) + 1;
        let mut next_seq = floor.max(clean_next.unwrap_or(0)).max(1);
        let active = if let Some((last_first, last_path)) = segments.last().cloned() {
            // After a clean close the index and the marker agree; otherwise the
            // segments are scanned (the index only says where scans start).
            let trusted = clean_next.is_some();
            if trusted {
                let len = std::fs::metadata(&last_path)?.len();
                next_seq = next_seq.max(last_first);
                recovery.records = next_seq.saturating_sub(floor);
                ActiveSegment::reopen(last_path, last_first, len)?
            } else {
                // Rebuild the index from the segments: they are the truth.
                index.clear()?;
                let mut last_valid_len = 0;
                let mut last_frames_end = last_first;
                for (i, (first, path)) in segments.iter().enumerate() {
                    let is_last = i + 1 == segments.len();
                    let scan = segment::scan(path, is_last)?;
                    let mut batch = sled::Batch::default();
                    let mut last_entry: Option<u64> = None;
                    for f in &scan.frames {
                        if f.seq < floor {
                            continue;
                        }
                        recovery.records += 1;
                        if last_entry.is_some_and(|o| f.offset - o < INDEX_STRIDE) {
                            continue;
                        }
                        last_entry = Some(f.offset);
                        let loc = Location {
                            segment: *first,
                            offset: f.offset,
                        };
                        batch.insert(&seq_key(f.seq), &loc.encode());
                    }
                    index.apply_batch(batch)?;
                    let file_len = std::fs::metadata(path)?.len();
                    if let Some(e) = &scan.stopped {
                        recovery.torn_bytes += file_len - scan.valid_len;
                        if !is_last {
                            // A bad frame before the tail: what follows cannot be
                            // trusted to be in order, so everything is suspect.
                            error!(segment = %path.display(), error = %e, "corrupt journal segment; marking the whole tree dirty");
                            dirty.add_whole(b"")?;
                        } else {
                            warn!(segment = %path.display(), error = %e, bytes = file_len - scan.valid_len, "cutting torn journal tail");
                        }
                    }
                    if let Some(f) = scan.frames.last() {
                        next_seq = next_seq.max(f.seq + 1);
                    }
                    next_seq = next_seq.max(*first);
                    if is_last {
                        last_valid_len = scan.valid_len;
                        last_frames_end = *first;
                    }
                }
                ActiveSegment::reopen(last_path, last_frames_end, last_valid_len)?
            }
        } else {
            ActiveSegment::create(&dir, next_seq)?
        };
        segment::sync_dir(&dir)?;

        let (activity, hot) =
            ActivityLog::open(&dir.join("activity.log"), options.sync_activity_log)?;
        recovery.hot_extents = hot.len();
        for (path, idx) in &hot {
            dirty.add_range(path, idx * options.extent_bytes, options.extent_bytes)?;
        }
        if !recovery.clean {
            // Nothing held before an unclean stop is served (every peer is
            // owed a snapshot), and a seq may be handed out again.
            preimages.clear()?;
            held_at_close.clear()?;
        }
        db.flush()?;

        let shared = Arc::new(Shared {
            state: Mutex::new(SyncState {
                written: next_seq - 1,
                settled: next_seq - 1,
                failed: Vec::new(),
                closed: false,
            }),
            cond: Condvar::new(),
            moved: tokio::sync::watch::channel(()).0,
            queued: Mutex::new(0),
            room: Condvar::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            payload_bytes: AtomicU64::new(0),
            frame_bytes: AtomicU64::new(0),
            #[cfg(test)]
            faults: Faults::default(),
            #[cfg(test)]
            trace: Mutex::new(Vec::new()),
        });
        let (tx, rx) = bounded(1024);
        let writer = Writer {
            dir: dir.clone(),
            index: index.clone(),
            meta: meta.clone(),
            dirty: dirty.clone(),
            segment: active,
            next_write: next_seq,
            pending: BTreeMap::new(),
            sync_target: 0,
            shared: shared.clone(),
            options: options.clone(),
            dir_dirty: false,
            unsynced: Vec::new(),
            needs_roll: false,
            sealed,
            writeback_error: None,
            indexed: None,
        };
        let handle = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run(rx))?;
        info!(
            clean = recovery.clean,
            records = recovery.records,
            next_seq,
            hot_extents = recovery.hot_extents,
            "journal opened"
        );
        Ok((
            Journal {
                dir,
                db,
                index,
                meta,
                dirty,
                next_seq: AtomicU64::new(next_seq),
                tx: Mutex::new(Some(tx)),
                shared,
                writer: Mutex::new(Some(handle)),
                activity_epoch: activity.epoch_handle(),
                activity: Mutex::new(activity),
                held: held::Held::new(
                    options.held_records,
                    options.held_files,
                    options.ring_bytes as usize,
                ),
                options,
                backing: Mutex::new(None),
                preimages,
                held_at_close,
            },
            recovery,
        ))
    }

    pub fn options(&self) -> &JournalOptions {
        &self.options
    }

    fn send(&self, msg: Msg) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(tx) = tx
            && tx.send(msg).is_ok()
        {
            return;
        }
        error!("journal writer is gone; a record was not journaled");
    }

    /// Assigns the next seq to `op` and queues it; returns the seq. The caller
    /// holds the file's mutation lock, so per-file order is seq order.
    pub fn append(&self, op: &Op, data: &[u8]) -> u64 {
        self.append_then(op, data, |_| ())
    }

    /// [`Journal::append`], calling `before_send` with the seq before the
    /// frame goes to the writer (so nobody can read the record before it).
    fn append_then(&self, op: &Op, data: &[u8], before_send: impl FnOnce(u64)) -> u64 {
        let op_bytes = record::encode_op(op);
        let frame_len = (record::HEADER_LEN + op_bytes.len() + data.len()) as u64;
        // Room first, the seq after: a seq handed out is never held up behind
        // a full queue (the writer writes in seq order).
        self.wait_for_room(frame_len);
        let seq = self.next_seq.fetch_add(1, Ordering::AcqRel);
        let mut bytes = Vec::with_capacity(frame_len as usize);
        record::encode_frame(seq, &op_bytes, data, &mut bytes);
        before_send(seq);
        self.shared
            .payload_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.shared
            .frame_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.send(Msg::Frame {
            seq,
            bytes,
            data_len: data.len() as u32,
        });
        seq
    }

    /// Waits until `len` more bytes fit in the writer's queue (an empty queue
    /// takes any frame), then counts them in.
    fn wait_for_room(&self, len: u64) {
        let limit = self.options.queue_bytes;
        let mut q = self.shared.queued.lock().unwrap_or_else(|e| e.into_inner());
        while *q > 0 && *q + len > limit && !self.shared.stopped.load(Ordering::Acquire) {
            q = self
                .shared
                .room
                .wait_timeout(q, std::time::Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *q += len;
    }

    /// Frame bytes queued for the writer now.
    pub fn queued_bytes(&self) -> u64 {
        *self.shared.queued.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest seq handed out (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Acquire) - 1
    }

    /// Every seq up to this one is on disk (a failed write or sync holds it
    /// below the failed records for the rest of the run).
    pub fn durable_seq(&self) -> u64 {
        let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        match st.failed.first() {
            Some(&(first, _)) => st.settled.min(first - 1),
            None => st.settled,
        }
    }

    /// Changes whenever records are written or settled: what a sender
    /// waits on instead of polling [`Journal::settled_seq`].
    pub fn watch(&self) -> tokio::sync::watch::Receiver<()> {
        self.shared.moved.subscribe()
    }

    /// Every seq up to this one went through a sync: it is durable, or its
    /// write or sync failed and its regions are in the dirty list (the resync
    /// repairs them). What a replication sender may ship: nothing beyond it
    /// can vanish in a power cut and have its seq reused, and failed records
    /// never hold the stream up (a failed write left no frame, so it reads as
    /// a gap, which the dirty list covers).
    pub fn settled_seq(&self) -> u64 {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .settled
    }

    /// Asks the writer to make every record up to `seq` durable without
    /// waiting; false if the request could not be queued (try again later).
    pub fn request_sync(&self, seq: u64) -> bool {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.settled_seq() >= seq || tx.is_some_and(|tx| tx.try_send(Msg::Sync(seq)).is_ok())
    }

    /// Blocks until the record `seq` (and every one before it) went through a
    /// sync. Err (EIO) when the record could not be made durable: its write or
    /// its sync failed (its regions are dirty then), or the writer is gone.
    pub fn sync_through(&self, seq: u64) -> io::Result<()> {
        let verdict = |st: &SyncState| {
            if st.is_failed(seq) {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        };
        {
            let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.settled >= seq {
                return verdict(&st);
            }
        }
        self.send(Msg::Sync(seq));
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.settled < seq {
            if st.closed {
                // The writer stopped short of it: not known durable.
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, std::time::Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        verdict(&st)
    }

    /// The backing dir whose data the journal describes: [`Journal::close`]
    /// syncs its filesystem before it declares the journal clean.
    pub fn set_backing_dir(&self, backing: &Path) {
        *self.backing.lock().unwrap_or_else(|e| e.into_inner()) = Some(backing.to_owned());
        self.take_held_back(backing);
    }

    #[cfg(test)]
    pub(crate) fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Forgets records up to `seq` (every replica applied them); whole segments
    /// at or below it are deleted.
    pub fn trim_through(&self, seq: u64) {
        self.release_held_through(seq);
        self.send(Msg::Trim(seq));
    }

    /// Makes sure extents `first..=last` of `path` are hot in the activity log
    /// before a write reaches the backing file. Returns true when the log is
    /// overfull and [`Journal::retire_cold_extents`] should run.
    pub fn activate(&self, path: &[u8], first: u64, last: u64) -> io::Result<bool> {
        let extents: Vec<Extent> = (first..=last).map(|i| (path.to_vec(), i)).collect();
        let mut al = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        al.activate(&extents, self.options.activity_slots)
    }

    /// Extent indexes `first..=last` covering a byte range.
    pub fn extent_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let shift = self.options.extent_bytes.trailing_zeros();
        (
            offset >> shift,
            offset.saturating_add(len.max(1) - 1) >> shift,
        )
    }

    /// Changes whenever extents retire; a cached "hot" answer is valid only under it.
    pub fn activity_epoch(&self) -> u64 {
        self.activity_epoch.load(Ordering::Acquire)
    }

    /// Retires the coldest extents. The caller must guarantee no write is between
    /// its backing write and its append (the volume holds its namespace lock
    /// exclusively); the journal is synced first so every retired write is durable.
    pub fn retire_cold_extents(&self) -> io::Result<usize> {
        self.sync_through(self.last_seq())?;
        let mut al = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        let cold = al.coldest(self.options.activity_slots / 2);
        al.retire(&cold)?;
        Ok(cold.len())
    }

    pub fn dirty(&self) -> &DirtyList {
        &self.dirty
    }

    /// Marks a region dirty directly (for changes that cannot be journaled as records).
    pub fn mark_dirty(&self, region: &DirtyRegion) {
        if let Err(e) = self.dirty.add(region) {
            error!(error = %e, "cannot record a dirty region");
        }
    }

    /// Reads one record (it must have been written by the writer thread already).
    pub fn read(&self, seq: u64) -> io::Result<Option<Record>> {
        self.records(seq, seq).next().transpose()
    }

    /// Waits until the writer has put every record up to `seq` into its segment.
    pub fn wait_written(&self, seq: u64) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.written < seq {
            if self.tx.lock().map(|t| t.is_none()).unwrap_or(true) {
                return;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, std::time::Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Records with seq in `from..=to` that the journal holds, in order (records
    /// trimmed or dropped are skipped; the caller sees the gap in the seqs).
    /// Only records the writer has written are read.
    pub fn records(&self, from: u64, to: u64) -> Records<'_> {
        let written = self.shared.state.lock().map(|s| s.written).unwrap_or(0);
        let to = to.min(written);
        let start = self
            .index
            .range(..=seq_key(from.max(1)))
            .next_back()
            .or_else(|| self.index.range(seq_key(from.max(1))..).next())
            .and_then(|kv| kv.ok())
            .and_then(|(_, v)| Location::decode(&v));
        Records {
            journal: self,
            from,
            to,
            next: start,
            reader: None,
            done: from > to,
        }
    }

    pub fn stats(&self) -> Stats {
        let first = self
            .index
            .first()
            .ok()
            .flatten()
            .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes));
        let written = self.shared.state.lock().map(|s| s.written).unwrap_or(0);
        let first = first.map(|f| {
            f.max(
                meta_u64(&self.meta, "trimmed_through")
                    .max(meta_u64(&self.meta, "dropped_through"))
                    + 1,
            )
        });
        let last = first.filter(|f| *f <= written).map(|_| written);
        let segs = segment::list_segments(&self.dir).unwrap_or_default();
        let segment_bytes = segs
            .iter()
            .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        Stats {
            records: match (first, last) {
                (Some(f), Some(l)) => l + 1 - f,
                _ => 0,
            },
            oldest_seq: first.filter(|_| last.is_some()),
            newest_seq: last,
            next_seq: self.next_seq.load(Ordering::Acquire),
            segments: segs.len(),
            segment_bytes,
            sled_bytes: self.db.size_on_disk().unwrap_or(0),
            trimmed_through: meta_u64(&self.meta, "trimmed_through"),
            dropped_through: meta_u64(&self.meta, "dropped_through"),
            dirty_regions: self.dirty.regions().map(|r| r.len()).unwrap_or(0),
            payload_bytes_appended: self.shared.payload_bytes.load(Ordering::Relaxed),
            frame_bytes_appended: self.shared.frame_bytes.load(Ordering::Relaxed),
        }
    }

    /// Flushes everything, stops the writer and leaves the clean marker. The
    /// marker promises that the backing dir, the journal and the activity log
    /// agree on disk, so the order is: journal synced (by the writer as it
    /// stops), backing filesystem synced, hot extents retired, index flushed,
    /// then CLEAN written and its directory synced. If the journal could not
    /// be made durable, no marker is written and the next open recovers.
    pub fn close(&self) -> Result<(), JournalError> {
        if self.tx.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return Ok(());
        }
        // While the writer runs: a held write of a file with no name left
        // is preserved in the journal.
        self.put_held_away();
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(tx) = tx else {
            return Ok(());
        };
        drop(tx);
        if let Some(h) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
        {
            let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if !st.failed.is_empty() || st.settled < st.written {
                // The dirty marks of the failed records must outlive us.
                if let Err(e) = self.db.flush() {
                    error!(error = %e, "cannot flush the dirty list");
                }
                return Err(JournalError::Io(io::Error::other(format!(
                    "records {:?} could not be made durable (their regions are dirty): leaving the journal to recovery",
                    st.failed
                ))));
            }
        }
        let backing = self
            .backing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(backing) = backing {
            sync_filesystem(&backing)?;
            self.shared.trace("backing synced");
        }
        self.activity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retire_all()?;
        self.shared.trace("activity retired");
        self.db.flush()?;
        let next = self.next_seq.load(Ordering::Acquire);
        let marker = self.dir.join(CLEAN_MARKER);
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&marker)?;
            f.write_all(format!("{next}\n").as_bytes())?;
            f.sync_all()?;
        }
        segment::sync_dir(&self.dir)?;
        self.shared.trace("clean written");
        info!(next_seq = next, "journal closed cleanly");
        Ok(())
    }
}

/// syncfs(2) of the filesystem holding `dir`: every file written there,
/// not only the ones we know of, is on disk afterwards.
fn sync_filesystem(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir)?;
    // SAFETY: syncfs on a valid open fd.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            error!(error = %e, "journal did not close cleanly");
        }
    }
}

/// A read-only look at the journal of a state dir, for `replicafs journal
/// stats/dump/replay`: nothing under the state dir is written, so a crashed
/// state dir keeps everything the next mount's recovery needs (no CLEAN
/// change, no torn tail cut, no index or activity log rewritten). The
/// segments are read directly; the sled index and the activity log, which
/// cannot be opened without writing, are read from a private temporary copy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Inspection {
    /// The clean marker is present: the last run stopped cleanly.
    pub clean: bool,
    #[serde(flatten)]
    pub stats: Stats,
    pub dirty: Vec<DirtyRegion>,
    /// Extents hot in the activity log: after an unclean stop the next mount
    /// adds them to the dirty list.
    pub hot_extents: Vec<(String, u64)>,
    /// Bytes after the last whole frame of the newest segment (a torn tail the
    /// next mount cuts).
    pub torn_bytes: u64,
    #[serde(skip)]
    segments: Vec<PathBuf>,
    #[serde(skip)]
    floor: u64,
}

/// A private temporary directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> io::Result<ScratchDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // A fresh name, never one that exists (another user's, in /tmp).
        loop {
            let path = std::env::temp_dir().join(format!(
                "replicafs-inspect-{}-{nanos}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(ScratchDir(path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the regular files of a directory tree (sled's files).
fn copy_tree(from: &Path, to: &Path) -> io::Result<u64> {
    std::fs::DirBuilder::new().mode(0o700).create(to)?;
    let mut bytes = 0;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            bytes += copy_tree(&e.path(), &to.join(e.file_name()))?;
        } else if ft.is_file() {
            bytes += std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(bytes)
}

impl Inspection {
    /// Reads the journal under `state_dir` without changing anything there.
    pub fn open(state_dir: &Path) -> Result<Inspection, JournalError> {
        let dir = journal_dir(state_dir);
        if !dir.is_dir() {
            return Err(JournalError::Io(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} holds no journal", state_dir.display()),
            )));
        }
        let clean_next: Option<u64> = std::fs::read_to_string(dir.join(CLEAN_MARKER))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let mut out = Inspection {
            clean: clean_next.is_some(),
            ..Default::default()
        };

        let scratch = ScratchDir::new()?;
        let index_copy = scratch.0.join("index.sled");
        let index_dir = dir.join("index.sled");
        if index_dir.is_dir() {
            out.stats.sled_bytes = copy_tree(&index_dir, &index_copy)?;
            let db = sled::Config::new().path(&index_copy).open()?;
            let meta = db.open_tree("meta")?;
            out.stats.trimmed_through = meta_u64(&meta, "trimmed_through");
            out.stats.dropped_through = meta_u64(&meta, "dropped_through");
            out.dirty = DirtyList::new(db.open_tree("dirty")?).regions()?;
        }
        let activity = dir.join("activity.log");
        if activity.is_file() && !out.clean {
            let copy = scratch.0.join("activity.log");
            std::fs::copy(&activity, &copy)?;
            let (_, hot) = ActivityLog::open(&copy, false)?;
            out.hot_extents = hot
                .into_iter()
                .map(|(p, i)| (String::from_utf8_lossy(&p).into_owned(), i))
                .collect();
        }
        drop(scratch);

        out.floor = out.stats.trimmed_through.max(out.stats.dropped_through) + 1;
        let segs = segment::list_segments(&dir)?;
        let mut next_seq = out.floor.max(clean_next.unwrap_or(0)).max(1);
        for (i, (first, path)) in segs.iter().enumerate() {
            let is_last = i + 1 == segs.len();
            let scan = segment::scan(path, is_last)?;
            let file_len = std::fs::metadata(path)?.len();
            out.stats.segment_bytes += file_len;
            if is_last {
                out.torn_bytes = file_len - scan.valid_len;
            }
            for f in scan.frames.iter().filter(|f| f.seq >= out.floor) {
                out.stats.records += 1;
                out.stats.oldest_seq.get_or_insert(f.seq);
                out.stats.newest_seq = Some(f.seq);
                next_seq = next_seq.max(f.seq + 1);
            }
            next_seq = next_seq.max(*first);
        }
        out.stats.segments = segs.len();
        out.stats.next_seq = next_seq;
        out.stats.dirty_regions = out.dirty.len();
        out.segments = segs.into_iter().map(|(_, p)| p).collect();
        Ok(out)
    }

    /// The records with seq in `from..=to`, read from the segments in order;
    /// each segment is read up to its last whole frame.
    pub fn records(&self, from: u64, to: u64) -> impl Iterator<Item = io::Result<Record>> + '_ {
        let from = from.max(self.floor);
        let mut segs = self.segments.iter();
        let mut reader: Option<std::io::BufReader<std::fs::File>> = None;
        let mut done = from > to;
        std::iter::from_fn(move || {
            use std::io::Read;
            while !done {
                let r = match reader.as_mut() {
                    Some(r) => r,
                    None => {
                        let Some(path) = segs.next() else {
                            done = true;
                            return None;
                        };
                        match std::fs::File::open(path) {
                            Ok(f) => reader.insert(std::io::BufReader::with_capacity(1 << 20, f)),
                            Err(e) => {
                                done = true;
                                return Some(Err(e));
                            }
                        }
                    }
                };
                let mut header = [0u8; record::HEADER_LEN];
                let h = match r.read_exact(&mut header) {
                    Ok(()) => record::FrameHeader::parse(&header).ok(),
                    Err(_) => None,
                };
                let Some(h) = h else {
                    // End of the segment, or its torn tail.
                    reader = None;
                    continue;
                };
                let mut frame = vec![0u8; h.frame_len()];
                frame[..record::HEADER_LEN].copy_from_slice(&header);
                if r.read_exact(&mut frame[record::HEADER_LEN..]).is_err() {
                    reader = None;
                    continue;
                }
                if h.seq > to {
                    done = true;
                    return None;
                }
                if h.seq < from {
                    continue;
                }
                match record::decode_frame(&frame) {
                    Ok(rec) => return Some(Ok(rec)),
                    Err(_) => reader = None,
                }
            }
            None
        })
    }
}

/// Iterator over journal records (see [`Journal::records`]).
pub struct Records<'a> {
    journal: &'a Journal,
    from: u64,
    to: u64,
    next: Option<Location>,
    reader: Option<(u64, std::io::BufReader<std::fs::File>)>,
    done: bool,
}

impl Records<'_> {
    /// Opens the segment at `loc` (or the next one after `segment` at its start).
    fn open(&mut self, loc: Location) -> io::Result<bool> {
        use std::io::{Seek, SeekFrom};
        let path = segment::segment_path(&self.journal.dir, loc.segment);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            // Trimmed or dropped under us: continue with what follows.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.next_segment(loc.segment),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(loc.offset))?;
        self.reader = Some((
            loc.segment,
            std::io::BufReader::with_capacity(1 << 20, file),
        ));
        Ok(true)
    }

    fn next_segment(&mut self, after: u64) -> io::Result<bool> {
        let next = segment::list_segments(&self.journal.dir)?
            .into_iter()
            .find(|(first, _)| *first > after);
        match next {
            Some((first, _)) => self.open(Location {
                segment: first,
                offset: 0,
            }),
            None => Ok(false),
        }
    }

    fn next_record(&mut self) -> io::Result<Option<Record>> {
        use std::io::Read;
        loop {
            if self.reader.is_none() {
                let Some(loc) = self.next.take() else {
                    return Ok(None);
                };
                if !self.open(loc)? {
                    return Ok(None);
                }
            }
            let (seg, reader) = self.reader.as_mut().expect("opened above");
            let seg = *seg;
            let mut header = [0u8; record::HEADER_LEN];
            match reader.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.reader = None;
                    if !self.next_segment(seg)? {
                        return Ok(None);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            let h = record::FrameHeader::parse(&header)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if h.seq > self.to {
                return Ok(None);
            }
            let mut frame = vec![0u8; h.frame_len()];
            frame[..record::HEADER_LEN].copy_from_slice(&header);
            reader.read_exact(&mut frame[record::HEADER_LEN..])?;
            if h.seq < self.from {
                continue;
            }
            return record::decode_frame(&frame)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
}

impl Iterator for Records<'_> {
    type Item = io::Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_record() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    index: sled::Tree,
    meta: sled::Tree,
    dirty: DirtyList,
    segment: ActiveSegment,
    next_write: u64,
    pending: BTreeMap<u64, (Vec<u8>, u32)>,
    sync_target: u64,
    shared: Arc<Shared>,
    options: JournalOptions,
    /// A segment file was created or removed since the last directory fsync.
    dir_dirty: bool,
    /// Sealed segments written since the last sync.
    unsynced: Vec<std::fs::File>,
    /// A failed write could not be followed by a new segment: nothing may be
    /// appended to the current one (its seqs would not be consecutive).
    needs_roll: bool,
    /// Sealed segments, oldest first (kept here, not listed per batch).
    sealed: VecDeque<Sealed>,
    /// Writeback failed while dropping segment pages from the page cache:
    /// the next sync fails with it (fdatasync may not report it again).
    writeback_error: Option<io::Error>,
    /// The newest index entry this writer made: (segment, offset).
    indexed: Option<(u64, u64)>,
}

/// A sealed segment file.
struct Sealed {
    first: u64,
    path: PathBuf,
    len: u64,
}

/// Marks the writer stopped when its thread ends, even by a panic, so that no
/// sync waiter waits for it forever.
struct StopGuard(Arc<Shared>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        st.closed = true;
        self.0.cond.notify_all();
        self.0.moved.send_replace(());
        self.0.stopped.store(true, Ordering::Release);
        self.0.room.notify_all();
    }
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let _stop = StopGuard(self.shared.clone());
        let mut buf: Vec<Vec<u8>> = Vec::with_capacity(1024);
        while let Ok(first) = rx.recv() {
            let mut trim = None;
            let mut batch_bytes = 0usize;
            let mut msg = Some(first);
            while let Some(m) = msg.take() {
                match m {
                    Msg::Frame {
                        seq,
                        bytes,
                        data_len,
                    } => {
                        batch_bytes += bytes.len();
                        self.pending.insert(seq, (bytes, data_len));
                    }
                    Msg::Sync(s) => self.sync_target = self.sync_target.max(s),
                    Msg::Trim(s) => trim = Some(trim.unwrap_or(0).max(s)),
                }
                if batch_bytes < (8 << 20) {
                    msg = rx.try_recv().ok();
                }
            }
            // Trim first: a sync waiter released below then sees the trim done.
            if let Some(t) = trim
                && let Err(e) = self.trim(t)
            {
                error!(error = %e, "journal trim failed");
            }
            if let Err(e) = self.write_pending(&mut buf) {
                self.fail(e);
            }
            if let Err(e) = self.segment.shed_cache() {
                self.writeback_failed(e);
            }
            {
                let mut q = self.shared.queued.lock().unwrap_or_else(|e| e.into_inner());
                *q = q.saturating_sub(batch_bytes as u64);
                self.shared.room.notify_all();
            }
            if let Err(e) = self.enforce_cap() {
                error!(error = %e, "journal cap enforcement failed");
            }
        }
        // Senders are gone: write what is left and make it durable.
        if let Err(e) = self.write_pending(&mut buf) {
            self.fail(e);
        }
        self.sync_target = u64::MAX;
        if let Err(e) = self.sync() {
            error!(error = %e, "final journal sync failed");
        }
    }

    /// A segment write failed: the frames that were not written are already
    /// dirty (see [`Writer::append_frames`]). Every record of the batch counts
    /// as failed (a sync waiter gets EIO), the segment is cut back to its last
    /// whole frame and a new one started (frames in a segment are consecutive),
    /// and the rest is synced. The VM never blocks on it.
    fn fail(&mut self, e: io::Error) {
        error!(error = %e, "journal write failed; affected regions are marked dirty");
        let from = {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let from = st.written + 1;
            st.add_failed(from, self.next_write - 1);
            st.written = st.written.max(self.next_write - 1);
            from
        };
        // Frames of the batch that did reach a segment: dirty too, as every
        // failed record is (the others were marked when their write failed).
        self.mark_seqs_dirty(from, self.next_write - 1);
        if let Err(e) = self.segment.cut_to_len() {
            error!(error = %e, "cannot cut a failed journal segment write");
        }
        if let Err(e) = self.roll() {
            error!(error = %e, "cannot start a new journal segment");
            self.needs_roll = true;
        }
        self.sync_target = self.sync_target.max(self.next_write - 1);
        if let Err(e) = self.sync() {
            error!(error = %e, "journal sync failed");
        }
    }

    fn write_pending(&mut self, frames: &mut Vec<Vec<u8>>) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        frames.clear();
        let mut part_bytes = 0u64;
        if self.needs_roll
            && self.pending.contains_key(&self.next_write)
            && let Err(e) = self.roll()
        {
            self.skip_pending(None);
            return Err(e);
        }
        while let Some((bytes, _)) = self.pending.remove(&self.next_write) {
            if self.segment.len + part_bytes + bytes.len() as u64 > self.options.segment_bytes
                && self.segment.len + part_bytes > 0
            {
                let rolled = self.append_frames(frames).and_then(|()| self.roll());
                if let Err(e) = rolled {
                    self.skip_pending(Some(bytes));
                    return Err(e);
                }
                part_bytes = 0;
            }
            let at = self.segment.len + part_bytes;
            let gap_since_entry = match self.indexed {
                Some((seg, off)) if seg == self.segment.first_seq => at.saturating_sub(off),
                _ => u64::MAX,
            };
            if frames.is_empty() && gap_since_entry >= INDEX_GAP {
                // Where a batch part's first frame starts, at most every
                // INDEX_GAP bytes (and at every segment's start): reads scan
                // forward from the nearest entry, and one sled insert per
                // small batch cost more than the batch.
                let loc = Location {
                    segment: self.segment.first_seq,
                    offset: self.segment.len,
                };
                batch.insert(&seq_key(self.next_write), &loc.encode());
                self.indexed = Some((self.segment.first_seq, self.segment.len));
            }
            part_bytes += bytes.len() as u64;
            frames.push(bytes);
            self.next_write += 1;
        }
        self.append_frames(frames)?;
        // The index only says where reads start scanning (the segments are
        // the truth): a failed insert costs a longer scan, not the records.
        if let Err(e) = self.index.apply_batch(batch) {
            warn!(error = %e, "journal index insert failed; reads scan from an earlier entry");
        }
        {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.written = self.next_write - 1;
            self.shared.cond.notify_all();
            self.shared.moved.send_replace(());
        }
        if self.sync_target > self.shared.state.lock().map(|s| s.settled).unwrap_or(0) {
            self.sync()?;
        }
        Ok(())
    }

    /// The frames queued from `next_write` on (`first` is the one taken
    /// already) cannot be journaled now: mark them dirty and move past them,
    /// so that nothing waits for them.
    fn skip_pending(&mut self, first: Option<Vec<u8>>) {
        if let Some(b) = first {
            self.mark_frames_dirty(&b);
            self.next_write += 1;
        }
        while let Some((b, _)) = self.pending.remove(&self.next_write) {
            self.mark_frames_dirty(&b);
            self.next_write += 1;
        }
    }

    /// Appends frames with one writev per up to 1024 of them (no extra copy).
    fn append_frames(&mut self, frames: &mut Vec<Vec<u8>>) -> io::Result<()> {
        if frames.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        while self.shared.faults.stall_write.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        #[cfg(test)]
        let injected = self.shared.fault(&self.shared.faults.fail_write);
        #[cfg(not(test))]
        let injected = Ok(());
        if let Err(e) = injected.and_then(|()| self.segment.append_vectored(frames)) {
            for f in frames.iter() {
                self.mark_frames_dirty(f);
            }
            frames.clear();
            return Err(e);
        }
        frames.clear();
        Ok(())
    }

    fn mark_frames_dirty(&self, buf: &[u8]) {
        let mut at = 0;
        while at < buf.len() {
            let Ok(r) = record::decode_frame(&buf[at..]) else {
                break;
            };
            at += record::HEADER_LEN + record::encode_op(&r.op).len() + r.data.len();
            mark_record_dirty(&self.dirty, &r);
        }
    }

    /// fdatasync of one segment file (a test may inject a failure here).
    fn sync_file(&self, f: &std::fs::File) -> io::Result<()> {
        #[cfg(test)]
        self.shared.fault(&self.shared.faults.fail_sync)?;
        f.sync_data()
    }

    /// Makes every written record durable. Each file is synced even when an
    /// earlier one failed. On failure the records since the last good sync
    /// are never reported durable: they are recorded as failed (a waiter gets
    /// EIO) and their regions marked dirty. A failed fsync may have dropped
    /// the dirty pages, so a later successful one proves nothing about them.
    fn sync(&mut self) -> io::Result<()> {
        let mut result = match self.writeback_error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        // Sealed segments first: durability covers every seq up to `written`.
        for f in std::mem::take(&mut self.unsynced) {
            if let Err(e) = self.sync_file(&f) {
                result = result.and(Err(e));
            }
        }
        if let Err(e) = self.sync_file(self.segment.file()) {
            result = result.and(Err(e));
        }
        if self.dir_dirty {
            match segment::sync_dir(&self.dir) {
                Ok(()) => self.dir_dirty = false,
                Err(e) => result = result.and(Err(e)),
            }
        }
        // Only this thread moves `settled` and `written`.
        let (from, through) = {
            let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            (st.settled + 1, st.written)
        };
        match &result {
            Ok(()) => self.shared.trace("journal synced"),
            Err(e) => {
                // Dirty before any waiter learns of the failure.
                error!(error = %e, from, through, "journal sync failed; these records are not durable and their regions are marked dirty");
                self.mark_seqs_dirty(from, through);
            }
        }
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if result.is_err() {
            st.add_failed(from, through);
        }
        st.settled = through;
        self.shared.cond.notify_all();
        self.shared.moved.send_replace(());
        result
    }

    /// Marks dirty the regions of the records `from..=to` still in the segments.
    fn mark_seqs_dirty(&self, from: u64, to: u64) {
        if from > to {
            return;
        }
        let segs = match segment::list_segments(&self.dir) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot list journal segments; marking the whole tree dirty");
                let _ = self.dirty.add_whole(b"");
                return;
            }
        };
        let mut ops = Vec::new();
        for (i, (first, path)) in segs.iter().enumerate() {
            let last = segs.get(i + 1).map(|(n, _)| n - 1).unwrap_or(u64::MAX);
            if *first > to || last < from {
                continue;
            }
            match segment::read_ops(path) {
                Ok(found) => ops.extend(
                    found
                        .into_iter()
                        .filter(|(seq, _, _)| (from..=to).contains(seq))
                        .map(|(_, op, len)| (op, len)),
                ),
                Err(e) => {
                    error!(error = %e, segment = %path.display(), "cannot read journal segment; marking the whole tree dirty");
                    let _ = self.dirty.add_whole(b"");
                    return;
                }
            }
        }
        mark_ops_dirty(&self.dirty, ops);
        // Persistently: a restart must still resync these regions.
        if let Err(e) = self.index.flush() {
            error!(error = %e, "cannot flush the dirty list");
        }
    }

    /// Seals the active segment and starts the next one. The sealed one is
    /// synced with the next sync, not now: a guest flush pays for durability,
    /// a stream of writes does not.
    fn roll(&mut self) -> io::Result<()> {
        #[cfg(test)]
        self.shared.fault(&self.shared.faults.fail_roll)?;
        let next = ActiveSegment::create(&self.dir, self.next_write)?;
        let sealed = std::mem::replace(&mut self.segment, next);
        self.sealed.push_back(Sealed {
            first: sealed.first_seq,
            path: sealed.path.clone(),
            len: sealed.len,
        });
        let file = sealed.into_file();
        // Its pages are not needed in memory any more.
        if let Err(e) = segment::drop_cached(&file, 0, 0) {
            self.writeback_failed(e);
        }
        self.unsynced.push(file);
        self.dir_dirty = true;
        self.needs_roll = false;
        Ok(())
    }

    fn writeback_failed(&mut self, e: io::Error) {
        error!(error = %e, "journal segment writeback failed; the next sync fails");
        self.writeback_error.get_or_insert(e);
    }

    /// The last seq of the oldest sealed segment (the next one's first - 1).
    fn oldest_sealed_last(&self) -> Option<u64> {
        let next_first = match self.sealed.get(1) {
            Some(s) => s.first,
            None => self.segment.first_seq,
        };
        self.sealed.front().map(|_| next_first - 1)
    }

    fn trim(&mut self, through: u64) -> io::Result<()> {
        let through = through.min(self.next_write - 1);
        // Keep the entry where the scan for `through + 1` starts.
        let keep = self
            .index
            .range(..=seq_key(through + 1))
            .next_back()
            .and_then(|kv| kv.ok())
            .map(|(k, _)| k);
        let mut batch = sled::Batch::default();
        for kv in self.index.range(..=seq_key(through)) {
            let (k, _) = kv.map_err(io::Error::other)?;
            if Some(&k) != keep.as_ref() {
                batch.remove(k);
            }
        }
        self.index.apply_batch(batch).map_err(io::Error::other)?;
        while let Some(last) = self.oldest_sealed_last()
            && last <= through
        {
            let path = &self.sealed[0].path;
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.sealed.pop_front();
            self.dir_dirty = true;
        }
        self.meta
            .insert("trimmed_through", &through.to_be_bytes())
            .map_err(io::Error::other)?;
        Ok(())
    }

    /// Keeps the segments under the cap: the oldest are dropped unreplicated and
    /// everything they touched is marked dirty for the resync.
    fn enforce_cap(&mut self) -> io::Result<()> {
        let mut total: u64 = self.segment.len + self.sealed.iter().map(|s| s.len).sum::<u64>();
        while total > self.options.cap_bytes
            && let Some(last) = self.oldest_sealed_last()
        {
            let path = self.sealed[0].path.clone();
            let len = self.sealed[0].len;
            // Ops only (payloads skipped).
            let ops = segment::read_ops(&path)?;
            mark_ops_dirty(&self.dirty, ops.into_iter().map(|(_, op, len)| (op, len)));
            let mut batch = sled::Batch::default();
            for kv in self.index.range(..=seq_key(last)) {
                let (k, _) = kv.map_err(io::Error::other)?;
                batch.remove(k);
            }
            self.index.apply_batch(batch).map_err(io::Error::other)?;
            self.meta
                .insert("dropped_through", &last.to_be_bytes())
                .map_err(io::Error::other)?;
            std::fs::remove_file(&path)?;
            self.sealed.pop_front();
            self.dir_dirty = true;
            total -= len;
            warn!(
                through = last,
                bytes = len,
                "journal cap reached: dropped the oldest segment, its regions are dirty"
            );
        }
        Ok(())
    }
}

/// Marks the regions of many ops dirty, write ranges merged per file first.
fn mark_ops_dirty(dirty: &DirtyList, ops: impl IntoIterator<Item = (Op, u64)>) {
    let mut ranges: BTreeMap<Vec<u8>, Vec<(u64, u64)>> = BTreeMap::new();
    for (op, data_len) in ops {
        match op {
            Op::Write { path, offset } => ranges.entry(path).or_default().push((offset, data_len)),
            Op::WriteBacked {
                path, offset, len, ..
            } => ranges.entry(path).or_default().push((offset, len as u64)),
            other => mark_op_dirty(dirty, &other, data_len),
        }
    }
    for (path, rs) in ranges {
        for (offset, len) in dirty::merge_ranges(rs) {
            let op = Op::Write {
                path: path.clone(),
                offset,
            };
            mark_op_dirty(dirty, &op, len);
        }
    }
}

/// The regions a record touched, for the dirty list.
pub fn mark_record_dirty(dirty: &DirtyList, r: &Record) {
    mark_op_dirty(dirty, &r.op, r.data.len() as u64);
}

/// The regions an op with `data_len` payload bytes touched, for the dirty list.
pub fn mark_op_dirty(dirty: &DirtyList, op: &Op, data_len: u64) {
    let res = match op {
        Op::Write { path, offset } => dirty.add_range(path, *offset, data_len),
        Op::WriteBacked {
            path, offset, len, ..
        } => dirty.add_range(path, *offset, *len as u64),
        // Changes nothing (the write it preserves has its own record).
        Op::Preimage { .. } => Ok(()),
        Op::Fallocate {
            path, offset, len, ..
        } => dirty.add_range(path, *offset, *len),
        Op::Rename { from, to, .. } => dirty.add_whole(from).and(dirty.add_whole(to)),
        Op::Link { existing, path } => dirty.add_whole(existing).and(dirty.add_whole(path)),
        other => dirty.add_whole(other.path()),
    };
    if let Err(e) = res {
        error!(error = %e, "cannot record a dirty region");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> JournalOptions {
        JournalOptions {
            cap_bytes: 8 << 20,
            segment_bytes: 1 << 20,
            ..Default::default()
        }
    }

    fn write_op(path: &str, offset: u64) -> Op {
        Op::Write {
            path: path.as_bytes().to_vec(),
            offset,
        }
    }

    fn all(j: &Journal) -> Vec<Record> {
        j.records(0, u64::MAX).map(|r| r.unwrap()).collect()
    }

    #[test]
    fn records_survive_a_clean_restart_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (j, rec) = Journal::open(dir.path(), opts()).unwrap();
        assert!(rec.clean);
        for i in 0..100u64 {
            j.append(&write_op("f", i * 10), &[i as u8; 10]);
        }
        j.sync_through(j.last_seq()).unwrap();
        j.close().unwrap();
        drop(j);
        let (j, rec) = Journal::open(dir.path(), opts()).unwrap();
        assert!(rec.clean);
        let rs = all(&j);
        assert_eq!(rs.len(), 100);
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1);
            assert_eq!(r.op, write_op("f", i as u64 * 10));
        }
        assert_eq!(j.append(&write_op("g", 0), b"x"), 101);
    }

    #[test]
    fn a_torn_tail_is_cut_and_seqs_continue() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        for i in 0..10u64 {
            j.append(&write_op("f", i), &[1; 100]);
        }
        j.close().unwrap();
        drop(j);
        // Simulate a crash in the middle of the last frame.
        let jd = journal_dir(dir.path());
        std::fs::remove_file(jd.join(CLEAN_MARKER)).unwrap();
        let (_, seg) = segment::list_segments(&jd).unwrap().pop().unwrap();
        let len = std::fs::metadata(&seg).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 50).unwrap();
        let (j, rec) = Journal::open(dir.path(), opts()).unwrap();
        assert!(!rec.clean);
        assert!(rec.torn_bytes > 0);
        assert_eq!(all(&j).len(), 9);
        assert_eq!(j.append(&write_op("g", 0), b"x"), 10);
        j.sync_through(10).unwrap();
        assert_eq!(all(&j).last().unwrap().op, write_op("g", 0));
    }

    #[test]
    fn garbage_after_the_tail_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        j.append(&write_op("f", 0), b"abc");
        j.close().unwrap();
        drop(j);
        let jd = journal_dir(dir.path());
        std::fs::remove_file(jd.join(CLEAN_MARKER)).unwrap();
        let (_, seg) = segment::list_segments(&jd).unwrap().pop().unwrap();
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0xAB; 200]).unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        assert_eq!(all(&j).len(), 1);
    }

    #[test]
    fn trim_deletes_whole_segments_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        for i in 0..40u64 {
            j.append(&write_op("f", i << 16), &vec![i as u8; 64 << 10]);
        }
        j.sync_through(40).unwrap();
        let before = j.stats();
        assert!(before.segments > 1);
        j.trim_through(30);
        j.sync_through(40).unwrap();
        // The trim runs on the writer thread; a later message orders after it.
        j.append(&write_op("f", 0), b"x");
        j.sync_through(41).unwrap();
        let after = j.stats();
        assert!(after.segments < before.segments, "{before:?} {after:?}");
        let rs = all(&j);
        assert_eq!(rs.first().unwrap().seq, 31);
        assert_eq!(rs.len(), 11);
        assert!(after.segment_bytes < before.segment_bytes);
    }

    #[test]
    fn segments_found_at_open_are_trimmed_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        for i in 0..40u64 {
            j.append(&write_op("f", i << 16), &vec![i as u8; 64 << 10]);
        }
        j.close().unwrap();
        drop(j);
        let jd = journal_dir(dir.path());
        let before = segment::list_segments(&jd).unwrap();
        assert!(before.len() > 2, "{before:?}");
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        j.trim_through(40);
        j.append(&write_op("f", 0), b"x");
        j.sync_through(41).unwrap();
        // Only the segment that was active at the restart is left.
        let after = segment::list_segments(&jd).unwrap();
        assert_eq!(after, before[before.len() - 1..].to_vec());
    }

    #[test]
    fn appends_wait_while_the_writer_queue_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 1u64 << 20;
        let o = JournalOptions {
            queue_bytes: limit,
            ..opts()
        };
        let (j, _) = Journal::open(dir.path(), o).unwrap();
        let j = Arc::new(j);
        // Unstalls the writer however the test ends (closing waits for it).
        struct Unstall(Arc<Journal>);
        impl Drop for Unstall {
            fn drop(&mut self) {
                self.0.faults().stall_write.store(false, Ordering::Release);
            }
        }
        let _unstall = Unstall(j.clone());
        j.faults().stall_write.store(true, Ordering::Release);
        let frame = 256 << 10;
        let writer = {
            let j = j.clone();
            std::thread::spawn(move || {
                for i in 0..16u64 {
                    j.append(&write_op("f", i * frame), &vec![1u8; frame as usize]);
                }
            })
        };
        // Wait until the queue is as full as it may get, then give the
        // appender time to (wrongly) go past it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while j.queued_bytes() + frame + 100 <= limit {
            assert!(
                std::time::Instant::now() < deadline,
                "the queue never filled"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            j.queued_bytes() <= limit,
            "{} bytes queued",
            j.queued_bytes()
        );
        assert!(j.last_seq() < 16, "every append went through a full queue");
        j.faults().stall_write.store(false, Ordering::Release);
        writer.join().unwrap();
        j.sync_through(16).unwrap();
        assert_eq!(all(&j).len(), 16);
        assert_eq!(j.queued_bytes(), 0);
    }

    #[test]
    fn the_cap_drops_the_oldest_and_marks_their_regions_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        for i in 0..400u64 {
            j.append(&write_op("disk", i << 16), &vec![7u8; 64 << 10]);
        }
        j.sync_through(400).unwrap();
        j.append(&write_op("disk", 0), b"x");
        j.sync_through(401).unwrap();
        let s = j.stats();
        assert!(
            s.segment_bytes <= opts().cap_bytes + opts().segment_bytes,
            "{s:?}"
        );
        assert!(s.dropped_through > 0);
        let dirty = j.dirty().regions().unwrap();
        assert_eq!(dirty.len(), 1);
        assert_eq!(dirty[0].offset, 0);
        assert!(dirty[0].len >= s.dropped_through << 16);
        // Every record is either still in the journal or covered by the dirty list.
        let first_kept = all(&j).first().unwrap().seq;
        assert_eq!(first_kept, s.dropped_through + 1);
    }

    #[test]
    fn concurrent_appends_are_written_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        let j = Arc::new(j);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    for i in 0..500u64 {
                        j.append(&write_op(&format!("f{t}"), i), &[t as u8; 32]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        j.sync_through(2000).unwrap();
        let rs = all(&j);
        assert_eq!(rs.len(), 2000);
        assert!(rs.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        // Per file, offsets appear in the order each thread appended them.
        for t in 0..4 {
            let offs: Vec<u64> = rs
                .iter()
                .filter(|r| r.op.path() == format!("f{t}").as_bytes())
                .map(|r| match r.op {
                    Op::Write { offset, .. } => offset,
                    _ => unreachable!(),
                })
                .collect();
            assert_eq!(offs, (0..500).collect::<Vec<_>>());
        }
    }

    #[test]
    fn hot_extents_of_an_unclean_stop_become_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        let (a, b) = j.extent_range(20 << 20, 1);
        j.activate(b"disk", a, b).unwrap();
        j.append(&write_op("disk", 20 << 20), b"z");
        j.sync_through(1).unwrap();
        // A crash leaves the files as they are now: copy them while the journal runs.
        let crashed = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(journal_dir(dir.path()))
            .arg(crashed.path())
            .status()
            .unwrap();
        assert!(status.success());
        drop(j);
        let (j2, rec) = Journal::open(crashed.path(), opts()).unwrap();
        assert!(!rec.clean);
        assert_eq!(rec.hot_extents, 1);
        let d = j2.dirty().regions().unwrap();
        assert_eq!(d[0].path, b"disk");
        assert!(d[0].offset <= 20 << 20 && d[0].end() > 20 << 20);
    }

    fn dirty_covers(j: &Journal, path: &[u8], offset: u64, len: u64) -> bool {
        j.dirty()
            .regions()
            .unwrap()
            .iter()
            .any(|d| d.path == path && d.offset <= offset && offset + len <= d.end())
    }

    fn is_eio(r: io::Result<()>) -> bool {
        matches!(r, Err(e) if e.raw_os_error() == Some(libc::EIO))
    }

    #[test]
    fn a_failed_sync_is_not_reported_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        let a = j.append(&write_op("disk", 0), &[1; 4096]);
        j.sync_through(a).unwrap();
        j.faults().fail_sync.store(true, Ordering::Release);
        let b = j.append(&write_op("disk", 1 << 20), &[2; 4096]);
        assert!(
            is_eio(j.sync_through(b)),
            "a failed fdatasync was acknowledged"
        );
        assert!(
            j.durable_seq() < b,
            "durable_seq {} >= {b}",
            j.durable_seq()
        );
        assert!(
            dirty_covers(&j, b"disk", 1 << 20, 4096),
            "{:?}",
            j.dirty().regions()
        );
        // The disk recovers: later records are durable again, the failed one
        // never becomes so (the failed fsync may have dropped its pages).
        j.faults().fail_sync.store(false, Ordering::Release);
        let c = j.append(&write_op("disk", 2 << 20), &[3; 4096]);
        j.sync_through(c).unwrap();
        assert!(is_eio(j.sync_through(b)));
        assert!(j.durable_seq() < b);
        assert!(j.sync_through(a).is_ok());
        // No clean marker over records that may not be on disk.
        assert!(j.close().is_err());
        assert!(!journal_dir(dir.path()).join(CLEAN_MARKER).exists());
    }

    #[test]
    fn a_failed_sync_of_a_sealed_segment_fails_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        j.faults().fail_sync.store(true, Ordering::Release);
        // Enough to roll into new segments: the sealed ones are synced later.
        let mut last = 0;
        for i in 0..40u64 {
            last = j.append(&write_op("disk", i << 16), &vec![5u8; 64 << 10]);
        }
        assert!(is_eio(j.sync_through(last)));
        for i in 0..40u64 {
            assert!(
                dirty_covers(&j, b"disk", i << 16, 64 << 10),
                "offset {i}: {:?}",
                j.dirty().regions()
            );
        }
    }

    #[test]
    fn a_failed_write_fails_its_sync_and_the_journal_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        let a = j.append(&write_op("disk", 0), b"first");
        j.sync_through(a).unwrap();
        j.faults().fail_write.store(true, Ordering::Release);
        let b = j.append(&write_op("disk", 4096), b"lost");
        assert!(is_eio(j.sync_through(b)));
        assert!(dirty_covers(&j, b"disk", 4096, 4));
        j.faults().fail_write.store(false, Ordering::Release);
        let c = j.append(&write_op("disk", 8192), b"third");
        j.sync_through(c).unwrap();
        let seqs: Vec<u64> = all(&j).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![a, c]);
        assert!(j.close().is_err());
        drop(j);
        // A restart reads every record that was written, and goes on after them.
        let (j, rec) = Journal::open(dir.path(), opts()).unwrap();
        assert!(!rec.clean);
        let seqs: Vec<u64> = all(&j).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![a, c]);
        assert_eq!(j.append(&write_op("disk", 0), b"x"), c + 1);
        assert!(dirty_covers(&j, b"disk", 4096, 4));
    }

    #[test]
    fn close_syncs_the_journal_and_the_backing_dir_before_clean() {
        let dir = tempfile::tempdir().unwrap();
        let backing = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        j.set_backing_dir(backing.path());
        let (a, b) = j.extent_range(0, 4096);
        j.activate(b"disk", a, b).unwrap();
        j.append(&write_op("disk", 0), &[9; 4096]);
        j.close().unwrap();
        assert!(journal_dir(dir.path()).join(CLEAN_MARKER).exists());
        let trace = j.shared.trace.lock().unwrap().clone();
        let at = |step: &str| {
            trace
                .iter()
                .rposition(|s| *s == step)
                .unwrap_or_else(|| panic!("{step:?} missing from {trace:?}"))
        };
        // Hot extents may retire and CLEAN may promise a clean state only once
        // the journal and the backing data are on disk.
        assert!(at("journal synced") < at("backing synced"), "{trace:?}");
        assert!(at("backing synced") < at("activity retired"), "{trace:?}");
        assert!(at("activity retired") < at("clean written"), "{trace:?}");
        assert_eq!(trace.last(), Some(&"clean written"));
    }

    #[test]
    fn inspection_changes_nothing_in_a_crashed_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        let (a, b) = j.extent_range(0, 10);
        j.activate(b"disk", a, b).unwrap();
        for i in 0..10u64 {
            j.append(&write_op("disk", i), &[1; 100]);
        }
        j.sync_through(10).unwrap();
        // The state as a crash leaves it, plus a torn frame at the end.
        let crashed = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(journal_dir(dir.path()))
            .arg(crashed.path())
            .status()
            .unwrap();
        assert!(status.success());
        drop(j);
        let jd = journal_dir(crashed.path());
        let (_, seg) = segment::list_segments(&jd).unwrap().pop().unwrap();
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
            f.write_all(&[0xAB; 30]).unwrap();
        }
        let snapshot = |d: &Path| {
            let mut v = Vec::new();
            let mut stack = vec![d.to_path_buf()];
            while let Some(p) = stack.pop() {
                for e in std::fs::read_dir(&p).unwrap() {
                    let e = e.unwrap();
                    if e.file_type().unwrap().is_dir() {
                        stack.push(e.path());
                    } else {
                        v.push((e.path(), std::fs::read(e.path()).unwrap()));
                    }
                }
            }
            v.sort();
            v
        };
        let before = snapshot(&jd);
        let ins = Inspection::open(crashed.path()).unwrap();
        assert!(!ins.clean);
        assert_eq!(ins.stats.records, 10);
        assert_eq!(ins.stats.newest_seq, Some(10));
        assert_eq!(ins.torn_bytes, 30);
        assert_eq!(ins.hot_extents, vec![("disk".to_string(), 0)]);
        let recs: Vec<Record> = ins.records(3, 5).map(|r| r.unwrap()).collect();
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(ins.records(0, u64::MAX).count(), 10);
        assert!(before == snapshot(&jd), "inspection changed the state dir");
        // The next open still sees the crash and recovers.
        let (j, rec) = Journal::open(crashed.path(), opts()).unwrap();
        assert!(!rec.clean);
        assert_eq!(rec.torn_bytes, 30);
        assert_eq!(rec.hot_extents, 1);
        assert!(dirty_covers(&j, b"disk", 0, 100));
    }

    #[test]
    fn after_a_failed_write_nothing_is_appended_until_a_new_segment_starts() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        let a = j.append(&write_op("disk", 0), b"first");
        j.sync_through(a).unwrap();
        // The write fails, and so does starting a new segment (a full disk).
        j.faults().fail_write.store(true, Ordering::Release);
        j.faults().fail_roll.store(true, Ordering::Release);
        let b = j.append(&write_op("disk", 4096), b"lost");
        assert!(is_eio(j.sync_through(b)));
        j.faults().fail_write.store(false, Ordering::Release);
        // Writes could go on, but not into the old segment after a gap.
        let c = j.append(&write_op("disk", 8192), b"also lost");
        assert!(is_eio(j.sync_through(c)));
        assert!(dirty_covers(&j, b"disk", 8192, 9));
        j.faults().fail_roll.store(false, Ordering::Release);
        let d = j.append(&write_op("disk", 12288), b"kept");
        j.sync_through(d).unwrap();
        assert!(j.close().is_err());
        drop(j);
        let (j, _) = Journal::open(dir.path(), opts()).unwrap();
        let seqs: Vec<u64> = all(&j).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![a, d], "a record after the failures was lost");
        assert!(dirty_covers(&j, b"disk", 4096, 4));
        assert!(dirty_covers(&j, b"disk", 8192, 9));
    }
}
