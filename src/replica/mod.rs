//! The replica: receive log, ordered applier, mirror directory.
//!
//! The network side ([`crate::transport::server`]) stores batches with
//! [`Replica::store`] (durable before it returns) and reads progress from
//! [`Replica::progress`]. One applier thread, woken by each store, applies
//! stored records to the mirror in seq order, in runs of several batches; a
//! persister thread, woken at the end of each run, makes the mirror durable
//! (syncfs) and then persists the applied seq (see [`apply`]).
//!
//! Two "applied" seqs exist. [`Replica::mirror_applied`] is how far the applier
//! has brought the mirror, possibly still in the page cache.
//! [`Replica::applied`] is how far the mirror is durable *and* `replica.state`
//! says so: it is the only one acknowledged to the primary (which trims its
//! journal on it), shown as `applied` by `replicafs status`, and never exceeds
//! what a power cut leaves in the mirror. The receive log keeps every record
//! above it.
//!
//! Refused records: a record the applier will not apply (see
//! [`crate::path::Refused`]: a bad path, a device node, data for something
//! that is not a regular file, a path through a symlink) is applied as a
//! no-op. It is logged with its seq and reason, appended to
//! `STATE/refused.log` and counted in status, and the applier goes on: its
//! seq counts as applied (and, once the mirror is synced, durable) like any
//! other, so a refused record never wedges replication.

pub mod apply;
pub mod snapshot;
pub mod store;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::protocol::{ApplyError, ApplyErrorKind};
use tracing::{error, info, warn};

/// Makes the mirror's contents durable. The replica persists or acknowledges
/// an applied seq only after a successful call made after that seq was applied.
pub trait MirrorSync: Send + Sync {
    fn sync(&self, mirror: &Path) -> std::io::Result<()>;
}

/// `syncfs(2)` of the mirror's filesystem.
pub struct SyncFs;

impl MirrorSync for SyncFs {
    fn sync(&self, mirror: &Path) -> std::io::Result<()> {
        syncfs(mirror)
    }
}

/// Counts the syncs of the mirror, whoever asks for them.
struct Counted {
    sync: Arc<dyn MirrorSync>,
    count: Arc<AtomicU64>,
}

impl MirrorSync for Counted {
    fn sync(&self, mirror: &Path) -> std::io::Result<()> {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sync.sync(mirror)
    }
}

use crate::journal::apply::OpenFiles;
use crate::journal::record::Record;
use apply::{MirrorApplier, group_len};
use store::{ApplyState, ReceiveLog, StateFile};

/// `STATE/refused.log` moves to `refused.log.1` past this size (the one
/// before is replaced): the two together stay under twice this.
pub const REFUSED_LOG_MAX: u64 = 1 << 20;

/// Records and snapshot entries the replica refused: logged, counted since
/// the start, and appended to a bounded file in the state dir.
pub struct RefusalLog {
    path: PathBuf,
    count: AtomicU64,
    last: Mutex<Option<String>>,
}

impl RefusalLog {
    pub fn new(state_dir: &Path) -> RefusalLog {
        RefusalLog {
            path: state_dir.join("refused.log"),
            count: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }

    /// Records one refusal (`seq` None: a snapshot entry).
    pub fn refuse(&self, seq: Option<u64>, what: &str, path: &[u8], reason: &str) {
        let shown = String::from_utf8_lossy(&path[..path.len().min(200)]);
        let reason: String = reason.chars().take(400).collect();
        let seq_s = seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
        warn!(seq = %seq_s, op = what, path = %shown, %reason, "record refused; applied as a no-op");
        let line = format!("seq {seq_s} {what} {shown:?}: {reason}");
        self.count.fetch_add(1, Ordering::AcqRel);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = self.append(&line) {
            warn!(error = %e, file = %self.path.display(), "cannot write the refusal log");
        }
        *last = Some(line);
    }

    fn append(&self, line: &str) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() >= REFUSED_LOG_MAX) {
            std::fs::rename(&self.path, self.path.with_extension("log.1"))?;
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)?;
        f.write_all(format!("{secs} {line}\n").as_bytes())
    }

    /// Refusals since the replica started.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// The latest refusal, as written to the log.
    pub fn last(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the network side reports to the primary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub received: u64,
    /// Durably applied (mirror synced, then persisted): what the primary may trim.
    pub applied: u64,
    pub error: Option<ApplyError>,
}

struct Inner {
    mirror: PathBuf,
    log: Mutex<ReceiveLog>,
    state: Mutex<StateFile>,
    /// The mirror's owner (0: none yet), as in `replica.state`.
    volume_id: AtomicU64,
    received: AtomicU64,
    /// How far the applier brought the mirror (maybe not durable yet).
    applied: AtomicU64,
    /// How far the mirror is durable and `replica.state` says so; updated
    /// only under the `state` lock.
    durable: AtomicU64,
    /// Bumped (under the `state` lock) when a snapshot resets the replica, so
    /// a persist pass that started before cannot store a stale seq after it.
    resets: AtomicU64,
    /// Persist passes run (for tests that wait for one).
    persist_passes: AtomicU64,
    sync: Arc<dyn MirrorSync>,
    error: Mutex<Option<ApplyError>>,
    /// The last persist pass could not sync the mirror.
    sync_error: Mutex<Option<ApplyError>>,
    wake: (Mutex<()>, Condvar),
    /// Set (and notified) when the applier went further: the persister runs.
    persist_due: (Mutex<bool>, Condvar),
    /// Apply runs finished, and mirror syncs made (for measurements).
    apply_runs: AtomicU64,
    mirror_syncs: Arc<AtomicU64>,
    progress: tokio::sync::watch::Sender<Progress>,
    stop: AtomicBool,
    payload_applied: AtomicU64,
    /// Held by the applier while it applies; true while a snapshot replaces
    /// the mirror.
    gate: Mutex<bool>,
    refusals: Arc<RefusalLog>,
    /// The highest seq refused: a batch retried after a later record failed
    /// does not report its refusals again.
    refused_through: AtomicU64,
}

pub struct Replica {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
    persister: Mutex<Option<JoinHandle<()>>>,
}

fn err_msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Replica {
    /// Opens the replica state in `state_dir` for `mirror` and starts the applier.
    pub fn open(state_dir: &Path, mirror: &Path) -> Result<Replica, String> {
        Replica::open_with_sync(state_dir, mirror, Arc::new(SyncFs))
    }

    /// Like [`Replica::open`], with `sync` making the mirror durable.
    pub fn open_with_sync(
        state_dir: &Path,
        mirror: &Path,
        sync: Arc<dyn MirrorSync>,
    ) -> Result<Replica, String> {
        if !mirror.is_dir() {
            return Err(format!(
                "mirror dir {} does not exist: create it first (mkdir -p {})",
                mirror.display(),
                mirror.display()
            ));
        }
        let mirror = mirror.canonicalize().map_err(err_msg)?;
        std::fs::create_dir_all(state_dir)
            .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
        let state_dir = state_dir.canonicalize().map_err(err_msg)?;
        if state_dir.starts_with(&mirror) || mirror.starts_with(&state_dir) {
            return Err(format!(
                "the state dir {} and the mirror {} must not contain each other",
                state_dir.display(),
                mirror.display()
            ));
        }
        let log = ReceiveLog::open(&state_dir.join("receive"))
            .map_err(|e| format!("cannot open the receive log: {e}"))?;
        let state = StateFile::open(&state_dir.join("replica.state"))
            .map_err(|e| format!("cannot open replica.state: {e}"))?;
        let applied = state.state.applied;
        let volume_id = state.state.volume_id;
        let received = log.last().unwrap_or(0).max(applied);
        info!(
            mirror = %mirror.display(),
            received,
            applied,
            pending_intent = state.state.intent_seq,
            "replica state opened"
        );
        let mirror_syncs = Arc::new(AtomicU64::new(0));
        let sync: Arc<dyn MirrorSync> = Arc::new(Counted {
            sync,
            count: mirror_syncs.clone(),
        });
        let (progress, _) = tokio::sync::watch::channel(Progress {
            received,
            applied,
            error: None,
        });
        let inner = Arc::new(Inner {
            mirror,
            log: Mutex::new(log),
            state: Mutex::new(state),
            volume_id: AtomicU64::new(volume_id),
            received: AtomicU64::new(received),
            applied: AtomicU64::new(applied),
            durable: AtomicU64::new(applied),
            resets: AtomicU64::new(0),
            persist_passes: AtomicU64::new(0),
            sync: sync.clone(),
            error: Mutex::new(None),
            sync_error: Mutex::new(None),
            wake: (Mutex::new(()), Condvar::new()),
            persist_due: (Mutex::new(false), Condvar::new()),
            apply_runs: AtomicU64::new(0),
            mirror_syncs,
            progress,
            stop: AtomicBool::new(false),
            payload_applied: AtomicU64::new(0),
            gate: Mutex::new(false),
            refusals: Arc::new(RefusalLog::new(&state_dir)),
            refused_through: AtomicU64::new(0),
        });
        let applier = MirrorApplier::with_sync(&inner.mirror, sync)
            .map_err(|e| format!("cannot open the mirror: {e}"))?;
        let i2 = inner.clone();
        let thread = std::thread::Builder::new()
            .name("replica-apply".into())
            .spawn(move || apply_loop(i2, applier))
            .map_err(err_msg)?;
        let i3 = inner.clone();
        let persister = std::thread::Builder::new()
            .name("replica-persist".into())
            .spawn(move || persist_loop(i3))
            .map_err(err_msg)?;
        Ok(Replica {
            inner,
            thread: Mutex::new(Some(thread)),
            persister: Mutex::new(Some(persister)),
        })
    }

    pub fn mirror(&self) -> &Path {
        &self.inner.mirror
    }

    /// Refused records and snapshot entries.
    pub fn refusals(&self) -> &Arc<RefusalLog> {
        &self.inner.refusals
    }

    /// A snapshot applier for this mirror that reports refused entries here.
    pub fn snapshot_applier(&self) -> std::io::Result<snapshot::SnapshotApplier> {
        snapshot::SnapshotApplier::with_log(&self.inner.mirror, Some(self.inner.refusals.clone()))
    }

    pub fn volume_id(&self) -> Option<u64> {
        // Not under the state lock: the applier holds it through a mirror sync.
        let v = self.inner.volume_id.load(Ordering::Acquire);
        (v != 0).then_some(v)
    }

    /// Records the primary that owns this mirror.
    pub fn adopt(&self, volume_id: u64) -> Result<(), String> {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = st.state;
        st.store(ApplyState { volume_id, ..s }).map_err(err_msg)?;
        self.inner.volume_id.store(volume_id, Ordering::Release);
        Ok(())
    }

    pub fn received(&self) -> u64 {
        self.inner.received.load(Ordering::Acquire)
    }

    /// The applied seq that is durable (mirror synced, `replica.state`
    /// written): the one acknowledged to the primary.
    pub fn applied(&self) -> u64 {
        self.inner.durable.load(Ordering::Acquire)
    }

    /// How far the mirror has been brought, possibly not yet durable.
    pub fn mirror_applied(&self) -> u64 {
        self.inner.applied.load(Ordering::Acquire)
    }

    /// Apply runs finished so far.
    pub fn apply_runs(&self) -> u64 {
        self.inner.apply_runs.load(Ordering::Relaxed)
    }

    /// Syncs of the mirror made so far (per namespace record and per persist pass).
    pub fn mirror_syncs(&self) -> u64 {
        self.inner.mirror_syncs.load(Ordering::Relaxed)
    }

    /// Persist passes run so far.
    pub fn persist_passes(&self) -> u64 {
        self.inner.persist_passes.load(Ordering::Acquire)
    }

    pub fn error(&self) -> Option<String> {
        current_error(&self.inner).map(|e| e.message)
    }

    pub fn payload_applied(&self) -> u64 {
        self.inner.payload_applied.load(Ordering::Relaxed)
    }

    pub fn progress(&self) -> tokio::sync::watch::Receiver<Progress> {
        self.inner.progress.subscribe()
    }

    /// Stores a batch durably (blocking). Batches arrive in order.
    pub fn store(&self, first: u64, last: u64, frames: &[u8]) -> Result<(), String> {
        let received = self.received();
        if first != received + 1 {
            return Err(format!(
                "batch {first}..={last} does not follow the received seq {received}"
            ));
        }
        let mut log = self.inner.log.lock().unwrap_or_else(|e| e.into_inner());
        log.append(first, last, frames)
            .map_err(|e| format!("cannot store batch {first}..={last} in the receive log: {e}"))?;
        drop(log);
        self.inner.received.store(last, Ordering::Release);
        self.publish();
        let _g = self.inner.wake.0.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.wake.1.notify_all();
        Ok(())
    }

    fn publish(&self) {
        publish(&self.inner);
    }

    /// A snapshot replaces the mirror: the applier stops, the receive log is
    /// dropped (the snapshot supersedes it) and the replica becomes fresh,
    /// durably, so an interrupted snapshot starts over.
    pub fn begin_snapshot(&self) -> Result<(), String> {
        let mut gate = self.inner.gate.lock().unwrap_or_else(|e| e.into_inner());
        *gate = true;
        if self.received() == 0 && self.mirror_applied() == 0 && self.applied() == 0 {
            return Ok(());
        }
        self.inner
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear()
            .map_err(|e| format!("cannot clear the receive log: {e}"))?;
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = st.state;
        st.store(ApplyState {
            volume_id: s.volume_id,
            ..Default::default()
        })
        .map_err(err_msg)?;
        self.inner.resets.fetch_add(1, Ordering::AcqRel);
        self.inner.durable.store(0, Ordering::Release);
        self.inner.refused_through.store(0, Ordering::Release);
        drop(st);
        self.inner.received.store(0, Ordering::Release);
        self.inner.applied.store(0, Ordering::Release);
        set_error(&self.inner, None);
        publish(&self.inner);
        info!("replica reset for a snapshot");
        Ok(())
    }

    /// The snapshot is complete: the mirror stands for seq `at`; records
    /// through `lenient_through` are applied tolerantly. The applier resumes.
    pub fn finish_snapshot(&self, at: u64, lenient_through: u64) -> Result<(), String> {
        let mut gate = self.inner.gate.lock().unwrap_or_else(|e| e.into_inner());
        if self.received() != 0 || self.mirror_applied() != 0 || self.applied() != 0 {
            return Err("a snapshot can only finish on a reset replica".into());
        }
        self.inner
            .sync
            .sync(&self.inner.mirror)
            .map_err(|e| format!("syncing the mirror: {e}"))?;
        {
            let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
            let s = st.state;
            st.store(ApplyState {
                applied: at,
                intent_seq: 0,
                intent_dev: 0,
                intent_ino: 0,
                lenient_through,
                ..s
            })
            .map_err(err_msg)?;
            self.inner.resets.fetch_add(1, Ordering::AcqRel);
            self.inner.durable.store(at, Ordering::Release);
        }
        self.inner.received.store(at, Ordering::Release);
        self.inner.applied.store(at, Ordering::Release);
        *gate = false;
        drop(gate);
        {
            let _g = self.inner.wake.0.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.wake.1.notify_all();
        }
        publish(&self.inner);
        Ok(())
    }

    /// Stops the applier thread.
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::Release);
        {
            let _g = self.inner.wake.0.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.wake.1.notify_all();
        }
        wake_persister(&self.inner);
        let mut joined = false;
        for slot in [&self.thread, &self.persister] {
            if let Some(t) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = t.join();
                joined = true;
            }
        }
        // Both threads are gone: one last pass persists the applier's final seq.
        if joined {
            persist(&self.inner);
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The apply error, else the mirror sync error.
fn current_error(inner: &Inner) -> Option<ApplyError> {
    let e = inner
        .error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    e.or_else(|| {
        inner
            .sync_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    })
}

fn publish(inner: &Inner) {
    let p = Progress {
        received: inner.received.load(Ordering::Acquire),
        applied: inner.durable.load(Ordering::Acquire),
        error: current_error(inner),
    };
    inner.progress.send_if_modified(|old| {
        if *old != p {
            *old = p;
            true
        } else {
            false
        }
    });
}

/// An error that is no record's fault (the receive log …).
fn set_error(inner: &Inner, e: Option<String>) {
    set_apply_error(inner, e.map(|m| ApplyError::new(ApplyErrorKind::Other, m)));
}

fn set_apply_error(inner: &Inner, e: Option<ApplyError>) {
    let mut g = inner.error.lock().unwrap_or_else(|e| e.into_inner());
    if *g != e {
        if let Some(m) = &e {
            error!(error = %m, "replica cannot apply; retrying");
        } else if g.is_some() {
            info!("replica applies again");
        }
        *g = e;
    }
}

fn syncfs(dir: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(dir)?;
    // SAFETY: syncfs on an fd we own.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Woken by the applier after each run (and by stop): syncs the mirror, then
/// persists the applied seq, then trims the receive log below it (off the
/// applier's path; one sync covers every run applied before it). The only
/// deadline is the retry after a failed sync.
fn persist_loop(inner: Arc<Inner>) {
    let mut retry: Option<Duration> = None;
    loop {
        {
            let mut due = inner
                .persist_due
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            while !*due && !inner.stop.load(Ordering::Acquire) {
                match retry {
                    None => {
                        due = inner
                            .persist_due
                            .1
                            .wait(due)
                            .unwrap_or_else(|e| e.into_inner());
                    }
                    Some(d) => {
                        let (g, t) = inner
                            .persist_due
                            .1
                            .wait_timeout(due, d)
                            .unwrap_or_else(|e| e.into_inner());
                        due = g;
                        if t.timed_out() {
                            break;
                        }
                    }
                }
            }
            *due = false;
        }
        if inner.stop.load(Ordering::Acquire) {
            break;
        }
        let ok = inner.applied.load(Ordering::Acquire) <= inner.durable.load(Ordering::Acquire)
            || persist(&inner);
        retry = if ok {
            None
        } else {
            // The sync or the store failed: try again, backing off.
            Some(retry.map_or(Duration::from_millis(200), |d| {
                (d * 2).min(Duration::from_secs(2))
            }))
        };
        inner.persist_passes.fetch_add(1, Ordering::AcqRel);
    }
}

/// Tells the persister that the applier went further.
fn wake_persister(inner: &Inner) {
    let mut due = inner
        .persist_due
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    *due = true;
    inner.persist_due.1.notify_all();
}

fn apply_loop(inner: Arc<Inner>, applier: MirrorApplier) {
    let mut failures = 0u32;
    // A stale intent (not for the next record) means nothing: clear it.
    {
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = st.state;
        if s.intent_seq != 0 && s.intent_seq != s.applied + 1 {
            warn!(
                intent = s.intent_seq,
                applied = s.applied,
                "clearing a stale apply intent"
            );
            let _ = st.store(ApplyState { intent_seq: 0, ..s });
        }
    }
    while !inner.stop.load(Ordering::Acquire) {
        let gate = inner.gate.lock().unwrap_or_else(|e| e.into_inner());
        if *gate {
            // Suspended for a snapshot, which reset the replica: nothing is
            // left to apply until a batch is stored (store notifies; so does
            // finish_snapshot, and stop).
            drop(gate);
            let g = inner.wake.0.lock().unwrap_or_else(|e| e.into_inner());
            if !inner.stop.load(Ordering::Acquire) {
                drop(inner.wake.1.wait(g));
            }
            continue;
        }
        let applied = inner.applied.load(Ordering::Acquire);
        let received = inner.received.load(Ordering::Acquire);
        if applied >= received {
            drop(gate);
            // Sleeps until a batch is stored (store raises `received`, then
            // notifies under this lock) or the replica stops.
            let g = inner.wake.0.lock().unwrap_or_else(|e| e.into_inner());
            if inner.received.load(Ordering::Acquire) <= applied
                && !inner.stop.load(Ordering::Acquire)
            {
                drop(inner.wake.1.wait(g));
            }
            continue;
        }
        let pause = apply_next(&inner, &applier, applied + 1, &mut failures);
        drop(gate);
        if let Some(d) = pause {
            std::thread::sleep(d);
        }
    }
}

/// A run gathers stored batches until it holds this much payload.
const RUN_BYTES: u64 = 32 << 20;

/// Reads the stored batches from `next` on (at least one, up to
/// [`RUN_BYTES`] of payload): the records of one apply run, and its last seq.
fn gather_run(inner: &Inner, next: u64) -> Result<(u64, Vec<Record>), String> {
    let mut records: Vec<Record> = Vec::new();
    let mut last = next - 1;
    let mut bytes = 0u64;
    loop {
        // Locked per batch: the receiver stores batches meanwhile.
        let batch = inner
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .batch_with(last + 1);
        match batch {
            Ok(Some((_first, l, recs))) => {
                let from = last;
                bytes += recs.iter().map(|r| r.data.len() as u64).sum::<u64>();
                records.extend(recs.into_iter().filter(|r| r.seq > from));
                last = l;
                if bytes >= RUN_BYTES {
                    break;
                }
            }
            Ok(None) if records.is_empty() && last < next => {
                return Err(format!("record {next} is missing from the receive log"));
            }
            Err(e) if records.is_empty() => {
                return Err(format!("cannot read the receive log: {e}"));
            }
            // The run ends where the stored batches end (or at a read error,
            // which the next run meets first).
            _ => break,
        }
    }
    Ok((last, records))
}

/// A refused record is applied as a no-op (logged once); anything else
/// stays an error.
fn settle(inner: &Inner, r: &Record, res: std::io::Result<()>) -> std::io::Result<()> {
    match res {
        Err(e) => match crate::path::refusal(&e) {
            Some(reason) => {
                if inner.refused_through.fetch_max(r.seq, Ordering::AcqRel) < r.seq {
                    inner
                        .refusals
                        .refuse(Some(r.seq), r.op.name(), r.op.path(), reason);
                }
                Ok(())
            }
            None => Err(e),
        },
        ok => ok,
    }
}

/// Applies one run from `next` (see [`apply`]); returns how long to pause
/// after a failure.
fn apply_next(
    inner: &Inner,
    applier: &MirrorApplier,
    next: u64,
    failures: &mut u32,
) -> Option<Duration> {
    let (last, records) = match gather_run(inner, next) {
        Ok(run) => run,
        Err(m) => {
            set_error(inner, Some(m));
            publish(inner);
            return Some(Duration::from_secs(1));
        }
    };
    // Changes only when a snapshot finishes, never during a run (the gate).
    let lenient_through = inner
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .state
        .lenient_through;
    let mut files = OpenFiles::default();
    let mut payload = 0u64;
    let mut i = 0;
    while i < records.len() {
        let r = &records[i];
        let (n, res) = if r.op.is_namespace() {
            // A rename or unlink changes what a path names.
            files.clear();
            let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            let res = if st.state.intent_seq == r.seq {
                applier.resolve_intent(&mut st, r)
            } else {
                applier.apply(&mut st, r)
            };
            // A namespace record syncs the mirror and persists the seq before it.
            inner.durable.fetch_max(st.state.applied, Ordering::AcqRel);
            (1, settle(inner, r, res).map_err(|e| (r, e)))
        } else {
            let n = group_len(&records[i..]);
            let group = &records[i..i + n];
            let mut res = Ok(());
            if applier.apply_group(&mut files, group).is_err() {
                // Again record by record: which one, refused or failed.
                files.clear();
                for r in group {
                    let lenient = r.seq <= lenient_through;
                    if let Err(e) = settle(inner, r, applier.apply_data_record(lenient, r)) {
                        res = Err((r, e));
                        break;
                    }
                }
            }
            (n, res)
        };
        if let Err((r, e)) = res {
            *failures += 1;
            // Typed from the OS error: the primary decides on the kind.
            set_apply_error(
                inner,
                Some(ApplyError::new(
                    ApplyError::kind_of(&e),
                    format!(
                        "applying record {} ({} {:?}): {e}",
                        r.seq,
                        r.op.name(),
                        String::from_utf8_lossy(r.op.path())
                    ),
                )),
            );
            publish(inner);
            return Some(Duration::from_millis((100 * *failures as u64).min(2000)));
        }
        for r in &records[i..i + n] {
            payload += r.data.len() as u64;
        }
        if r.op.is_namespace() {
            // Its intent is persisted: a retry after a later failure in this
            // run must not apply it again.
            inner.applied.store(r.seq, Ordering::Release);
        }
        i += n;
    }
    drop(files);
    *failures = 0;
    inner.apply_runs.fetch_add(1, Ordering::Relaxed);
    inner.payload_applied.fetch_add(payload, Ordering::Relaxed);
    inner.applied.store(last, Ordering::Release);
    set_error(inner, None);
    // Only the durable seq is acknowledged: the persister syncs, then advances it.
    wake_persister(inner);
    publish(inner);
    None
}

/// Makes the mirror durable, then the applied seq; then trims the receive
/// log and tells the primary.
fn persist(inner: &Inner) -> bool {
    // Read before the sync: the sync covers everything applied through it.
    let resets = inner.resets.load(Ordering::Acquire);
    let applied = inner.applied.load(Ordering::Acquire);
    let synced = inner.sync.sync(&inner.mirror);
    {
        let mut g = inner.sync_error.lock().unwrap_or_else(|e| e.into_inner());
        let now = synced.as_ref().err().map(|e| {
            let kind = match ApplyError::kind_of(e) {
                ApplyErrorKind::DiskFull => ApplyErrorKind::DiskFull,
                _ => ApplyErrorKind::Io,
            };
            ApplyError::new(kind, format!("cannot sync the mirror: {e}"))
        });
        if *g != now {
            match &now {
                Some(m) => error!(error = %m, "the applied seq stays where it is; retrying"),
                None => info!("the mirror syncs again"),
            }
            *g = now;
        }
    }
    if synced.is_err() {
        publish(inner);
        return false;
    }
    let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    if inner.resets.load(Ordering::Acquire) != resets {
        // A snapshot reset the replica meanwhile: `applied` is stale.
        return true;
    }
    let s = st.state;
    if s.applied < applied {
        // A pending namespace intent is at s.applied + 1 <= applied: its
        // record is applied and now synced, so the intent is done.
        if let Err(e) = st.store(ApplyState {
            applied,
            intent_seq: 0,
            intent_dev: 0,
            intent_ino: 0,
            ..s
        }) {
            warn!(error = %e, "cannot persist the applied seq");
            return false;
        }
    }
    let persisted = st.state.applied;
    inner.durable.fetch_max(persisted, Ordering::AcqRel);
    drop(st);
    if let Err(e) = inner
        .log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .trim(persisted)
    {
        warn!(error = %e, "cannot trim the receive log");
    }
    publish(inner);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::{Op, Record};
    use crate::protocol::message::encode_records;
    use std::time::Instant;

    /// The refusal log counts every refusal, keeps the latest, and stays
    /// under twice its rotation size however many refusals come.
    #[test]
    fn refusal_log_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let log = RefusalLog::new(d.path());
        let long = vec![b'x'; 5000];
        let n = 3 * REFUSED_LOG_MAX / 400;
        for seq in 1..=n {
            log.refuse(Some(seq), "write", &long, &"why ".repeat(200));
        }
        assert_eq!(log.count(), n);
        assert!(log.last().unwrap().contains(&format!("seq {n} write")));
        let size = |name: &str| std::fs::metadata(d.path().join(name)).map(|m| m.len());
        let (a, b) = (size("refused.log").unwrap(), size("refused.log.1").unwrap());
        assert!(
            a <= REFUSED_LOG_MAX + 1024 && b <= REFUSED_LOG_MAX + 1024,
            "{a} {b}"
        );
        let text = std::fs::read_to_string(d.path().join("refused.log")).unwrap();
        assert!(text.ends_with(&format!("{}\n", log.last().unwrap())));
    }

    /// Record `seq` writes its own number at `8 * (seq - 1)` of `f`, or (for
    /// the seqs in `dirs`) creates the directory `d<seq>`.
    fn rec(seq: u64, dirs: &[u64]) -> Record {
        if dirs.contains(&seq) {
            Record {
                seq,
                op: Op::Mkdir {
                    path: format!("d{seq}").into_bytes(),
                    mode: 0o40755,
                    uid: 0,
                    gid: 0,
                },
                data: vec![],
            }
        } else {
            Record {
                seq,
                op: Op::Write {
                    path: b"f".to_vec(),
                    offset: 8 * (seq - 1),
                },
                data: seq.to_le_bytes().to_vec(),
            }
        }
    }

    /// The highest seq through which the mirror shows every record's effect.
    fn visible_through(mirror: &Path, dirs: &[u64]) -> u64 {
        let f = std::fs::read(mirror.join("f")).unwrap_or_default();
        let mut seq = 0u64;
        loop {
            let n = seq + 1;
            let there = if dirs.contains(&n) {
                mirror.join(format!("d{n}")).is_dir()
            } else {
                let at = 8 * (n as usize - 1);
                f.get(at..at + 8) == Some(&n.to_le_bytes()[..])
            };
            if !there {
                return seq;
            }
            seq = n;
        }
    }

    /// A sync the test controls: it can refuse, and it records how far the
    /// mirror visibly was when a sync succeeded (what a power cut keeps).
    struct Probe {
        mirror: PathBuf,
        dirs: Vec<u64>,
        refuse: AtomicBool,
        durable_through: AtomicU64,
        calls: AtomicU64,
    }

    impl MirrorSync for Probe {
        fn sync(&self, mirror: &Path) -> std::io::Result<()> {
            assert_eq!(mirror, self.mirror);
            self.calls.fetch_add(1, Ordering::AcqRel);
            if self.refuse.load(Ordering::Acquire) {
                return Err(std::io::Error::other("sync refused by the test"));
            }
            // Read before syncing: a record applied after the read may or
            // may not be covered, so it does not count.
            let v = visible_through(mirror, &self.dirs);
            syncfs(mirror)?;
            self.durable_through.fetch_max(v, Ordering::AcqRel);
            Ok(())
        }
    }

    struct Rig {
        _dir: tempfile::TempDir,
        state: PathBuf,
        mirror: PathBuf,
        probe: Arc<Probe>,
    }

    impl Rig {
        fn new(dirs: &[u64]) -> Rig {
            let d = tempfile::tempdir().unwrap();
            let mirror = d.path().join("mirror");
            std::fs::create_dir(&mirror).unwrap();
            std::fs::write(mirror.join("f"), b"").unwrap();
            let mirror = mirror.canonicalize().unwrap();
            let probe = Arc::new(Probe {
                mirror: mirror.clone(),
                dirs: dirs.to_vec(),
                refuse: AtomicBool::new(false),
                durable_through: AtomicU64::new(0),
                calls: AtomicU64::new(0),
            });
            Rig {
                state: d.path().join("state"),
                mirror,
                probe,
                _dir: d,
            }
        }

        fn open(&self) -> Replica {
            Replica::open_with_sync(&self.state, &self.mirror, self.probe.clone()).unwrap()
        }

        fn store(&self, r: &Replica, first: u64, last: u64) {
            let recs: Vec<Record> = (first..=last).map(|s| rec(s, &self.probe.dirs)).collect();
            r.store(first, last, &encode_records(&recs)).unwrap();
        }

        /// The applied seq in `replica.state`, read as a restart would.
        fn persisted(&self) -> u64 {
            StateFile::open(&self.state.join("replica.state"))
                .unwrap()
                .state
                .applied
        }

        /// Neither the acknowledged nor the persisted applied seq runs ahead
        /// of what a sync made durable, nor of what is applied.
        fn check(&self, r: &Replica) {
            // Read what the replica claims first: durability only grows.
            let acked = r.progress().borrow().applied;
            let reported = r.applied();
            let persisted = self.persisted();
            let durable = self.probe.durable_through.load(Ordering::Acquire);
            let applied = r.mirror_applied();
            for (what, v) in [
                ("acknowledged", acked),
                ("reported", reported),
                ("persisted", persisted),
            ] {
                assert!(
                    v <= durable,
                    "{what} applied {v} > durable {durable} (mirror applied {applied})"
                );
                assert!(v <= r.mirror_applied().max(persisted), "{what} {v}");
            }
        }

        /// Waits for `cond`, checking the invariant all along.
        fn wait(&self, r: &Replica, what: &str, cond: impl Fn(&Replica) -> bool) {
            let start = Instant::now();
            while !cond(r) {
                self.check(r);
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "timed out waiting for {what}; error {:?}",
                    r.error()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            self.check(r);
        }

        /// Waits until the persister has run `n` more passes.
        fn passes(&self, r: &Replica, n: u64) {
            let p0 = r.persist_passes();
            self.wait(r, "persist passes", |r| r.persist_passes() >= p0 + n);
        }
    }

    /// The acknowledged and the persisted applied seq never exceed what is
    /// applied and durable in the mirror: not while syncs fail, not for data
    /// records, not for namespace records, not at a stop.
    #[test]
    fn acked_and_persisted_applied_never_exceed_the_durable_mirror() {
        let dirs = [5, 9, 13];
        let rig = Rig::new(&dirs);
        let r = rig.open();
        rig.probe.refuse.store(true, Ordering::Release);
        rig.store(&r, 1, 4);
        rig.wait(&r, "data records applied", |r| r.mirror_applied() == 4);
        assert_eq!(visible_through(&rig.mirror, &dirs), 4);
        // The persister tried (and could not sync): nothing is claimed.
        rig.passes(&r, 2);
        assert_eq!(r.progress().borrow().applied, 0);
        assert_eq!(rig.persisted(), 0);
        // And says why, to the primary too.
        let shown = r.progress().borrow().error.clone().map(|e| e.message);
        let shown = shown.unwrap_or_default();
        assert!(shown.contains("cannot sync the mirror"), "{shown:?}");
        // A namespace record cannot go ahead without a sync of what precedes it.
        rig.store(&r, 5, 6);
        rig.wait(&r, "the namespace record to fail", |r| {
            r.error().is_some_and(|e| e.contains("applying record 5"))
        });
        assert!(!rig.mirror.join("d5").exists());
        assert_eq!(r.mirror_applied(), 4);
        assert_eq!(rig.persisted(), 0);
        // Syncs work again: everything becomes durable, then acknowledged.
        rig.probe.refuse.store(false, Ordering::Release);
        rig.wait(&r, "seq 6 acknowledged", |r| {
            r.progress().borrow().applied == 6
        });
        // More, mixed in batches, while the invariant is watched.
        rig.store(&r, 7, 8);
        rig.store(&r, 9, 12);
        rig.store(&r, 13, 15);
        rig.wait(&r, "seq 15 acknowledged", |r| {
            r.progress().borrow().applied == 15
        });
        assert_eq!(rig.persisted(), 15);
        assert_eq!(r.applied(), 15);
        assert_eq!(r.error(), None);
        // Quiet now: exact values, not just bounds.
        rig.check(&r);
        assert_eq!(r.progress().borrow().applied, 15);
        assert_eq!(rig.persisted(), 15);
        r.stop();
        assert_eq!(rig.persisted(), 15);
        assert_eq!(visible_through(&rig.mirror, &dirs), 15);
    }

    /// A failed sync is retried by the persister on its own: with no more
    /// batches coming, what was applied still becomes durable and acknowledged.
    #[test]
    fn a_failed_sync_is_retried_without_new_batches() {
        let rig = Rig::new(&[]);
        let r = rig.open();
        rig.probe.refuse.store(true, Ordering::Release);
        rig.store(&r, 1, 4);
        rig.wait(&r, "a sync to fail", |r| {
            r.error()
                .is_some_and(|e| e.contains("cannot sync the mirror"))
        });
        assert_eq!(r.progress().borrow().applied, 0);
        rig.probe.refuse.store(false, Ordering::Release);
        rig.wait(&r, "seq 4 acknowledged", |r| {
            r.progress().borrow().applied == 4
        });
        assert_eq!(r.error(), None);
        r.stop();
        assert_eq!(rig.persisted(), 4);
    }

    /// Batches stored before the applier starts are applied as one run, a
    /// contiguous stretch of writes as one coalesced write; the mirror is
    /// synced once for the run and once before its namespace record, and
    /// nothing is acknowledged before the run's sync.
    #[test]
    fn stored_batches_apply_as_one_run_synced_once() {
        let dirs = [25];
        let rig = Rig::new(&dirs);
        let r = rig.open();
        rig.probe.refuse.store(true, Ordering::Release);
        for b in 0..10 {
            rig.store(&r, 10 * b + 1, 10 * b + 10);
        }
        rig.wait(&r, "the namespace record to fail", |r| {
            r.error().is_some_and(|e| e.contains("applying record 25"))
        });
        r.stop();
        drop(r);
        assert_eq!(rig.persisted(), 0);
        rig.probe.refuse.store(false, Ordering::Release);
        let r = rig.open();
        rig.wait(&r, "seq 100 acknowledged", |r| {
            r.progress().borrow().applied == 100
        });
        assert_eq!(r.apply_runs(), 1);
        assert_eq!(r.mirror_syncs(), 2, "one before the mkdir, one for the run");
        assert_eq!(visible_through(&rig.mirror, &dirs), 100);
        r.stop();
        assert_eq!(rig.persisted(), 100);
    }

    /// Within one run, a write after a rename onto its path goes to the file
    /// the path names then, not to one opened earlier in the run.
    #[test]
    fn a_run_reopens_files_after_a_namespace_record() {
        let d = tempfile::tempdir().unwrap();
        let mirror = d.path().join("m");
        std::fs::create_dir(&mirror).unwrap();
        std::fs::write(mirror.join("a"), b"....").unwrap();
        std::fs::write(mirror.join("b"), b"....").unwrap();
        let w = |seq, path: &[u8], data: &[u8]| Record {
            seq,
            op: Op::Write {
                path: path.to_vec(),
                offset: 0,
            },
            data: data.to_vec(),
        };
        let recs = vec![
            w(1, b"a", b"A"),
            Record {
                seq: 2,
                op: Op::Rename {
                    from: b"b".to_vec(),
                    to: b"a".to_vec(),
                    flags: 0,
                },
                data: vec![],
            },
            w(3, b"a", b"B"),
        ];
        let r = Replica::open(&d.path().join("s"), &mirror).unwrap();
        r.store(1, 3, &encode_records(&recs)).unwrap();
        let start = Instant::now();
        while r.progress().borrow().applied < 3 {
            assert!(start.elapsed() < Duration::from_secs(60), "{:?}", r.error());
            std::thread::sleep(Duration::from_millis(5));
        }
        r.stop();
        assert_eq!(std::fs::read(mirror.join("a")).unwrap(), b"B...");
        assert!(!mirror.join("b").exists());
    }

    /// A replica stopped while its mirror is not durable restarts from what
    /// was persisted, with every record above it still in the receive log.
    #[test]
    fn receive_log_keeps_what_is_not_durable_across_a_restart() {
        let dirs = [3];
        let rig = Rig::new(&dirs);
        let r = rig.open();
        rig.store(&r, 1, 2);
        rig.wait(&r, "seq 2 acknowledged", |r| {
            r.progress().borrow().applied == 2
        });
        rig.probe.refuse.store(true, Ordering::Release);
        rig.store(&r, 3, 3);
        rig.store(&r, 4, 6);
        rig.wait(&r, "the namespace record to fail", |r| {
            r.error().is_some_and(|e| e.contains("applying record 3"))
        });
        r.stop();
        drop(r);
        assert_eq!(rig.persisted(), 2);
        rig.probe.refuse.store(false, Ordering::Release);
        let r = rig.open();
        assert_eq!((r.received(), r.applied()), (6, 2));
        rig.wait(&r, "seq 6 acknowledged", |r| {
            r.progress().borrow().applied == 6
        });
        rig.store(&r, 7, 7);
        rig.wait(&r, "seq 7 acknowledged", |r| {
            r.progress().borrow().applied == 7
        });
        r.stop();
        assert_eq!(rig.persisted(), 7);
        assert_eq!(visible_through(&rig.mirror, &dirs), 7);
    }
}
