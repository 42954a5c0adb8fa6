//! The replica: receive log, ordered applier, mirror directory.
//!
//! The network side ([`crate::transport::server`]) stores batches with
//! [`Replica::store`] (durable before it returns) and reads progress from
//! [`Replica::progress`]. One applier thread applies stored records to the
//! mirror in seq order and persists the applied seq (see [`apply`]).

pub mod apply;
pub mod snapshot;
pub mod store;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use apply::MirrorApplier;
use store::{ApplyState, ReceiveLog, StateFile};

/// What the network side reports to the primary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub received: u64,
    pub applied: u64,
    pub error: Option<String>,
}

struct Inner {
    mirror: PathBuf,
    log: Mutex<ReceiveLog>,
    state: Mutex<StateFile>,
    received: AtomicU64,
    applied: AtomicU64,
    error: Mutex<Option<String>>,
    wake: (Mutex<()>, Condvar),
    progress: tokio::sync::watch::Sender<Progress>,
    stop: AtomicBool,
    payload_applied: AtomicU64,
    /// Held by the applier while it applies; true while a snapshot replaces
    /// the mirror.
    gate: Mutex<bool>,
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
        let received = log.last().unwrap_or(0).max(applied);
        info!(
            mirror = %mirror.display(),
            received,
            applied,
            pending_intent = state.state.intent_seq,
            "replica state opened"
        );
        let (progress, _) = tokio::sync::watch::channel(Progress {
            received,
            applied,
            error: None,
        });
        let inner = Arc::new(Inner {
            mirror,
            log: Mutex::new(log),
            state: Mutex::new(state),
            received: AtomicU64::new(received),
            applied: AtomicU64::new(applied),
            error: Mutex::new(None),
            wake: (Mutex::new(()), Condvar::new()),
            progress,
            stop: AtomicBool::new(false),
            payload_applied: AtomicU64::new(0),
            gate: Mutex::new(false),
        });
        let applier = MirrorApplier::new(&inner.mirror)
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

    pub fn volume_id(&self) -> Option<u64> {
        let v = self
            .inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state
            .volume_id;
        (v != 0).then_some(v)
    }

    /// Records the primary that owns this mirror.
    pub fn adopt(&self, volume_id: u64) -> Result<(), String> {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = st.state;
        st.store(ApplyState { volume_id, ..s }).map_err(err_msg)
    }

    pub fn received(&self) -> u64 {
        self.inner.received.load(Ordering::Acquire)
    }

    pub fn applied(&self) -> u64 {
        self.inner.applied.load(Ordering::Acquire)
    }

    pub fn error(&self) -> Option<String> {
        self.inner
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
        if self.received() == 0 && self.applied() == 0 {
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
        drop(st);
        self.inner.received.store(0, Ordering::Release);
        self.inner.applied.store(0, Ordering::Release);
        set_error(&self.inner, None);
        info!("replica reset for a snapshot");
        Ok(())
    }

    /// The snapshot is complete: the mirror stands for seq `at`; records
    /// through `lenient_through` are applied tolerantly. The applier resumes.
    pub fn finish_snapshot(&self, at: u64, lenient_through: u64) -> Result<(), String> {
        let mut gate = self.inner.gate.lock().unwrap_or_else(|e| e.into_inner());
        if self.received() != 0 || self.applied() != 0 {
            return Err("a snapshot can only finish on a reset replica".into());
        }
        syncfs(&self.inner.mirror).map_err(|e| format!("syncfs of the mirror: {e}"))?;
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
        }
        self.inner.received.store(at, Ordering::Release);
        self.inner.applied.store(at, Ordering::Release);
        *gate = false;
        drop(gate);
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
        for slot in [&self.thread, &self.persister] {
            // The applier first, so the persister's last pass sees its final seq.
            if let Some(t) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop();
    }
}

fn publish(inner: &Inner) {
    let p = Progress {
        received: inner.received.load(Ordering::Acquire),
        applied: inner.applied.load(Ordering::Acquire),
        error: inner
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
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

fn set_error(inner: &Inner, e: Option<String>) {
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

/// Persists the applied seq every 200 ms (after a syncfs of the mirror), off
/// the applier's path, and trims the receive log below it.
fn persist_loop(inner: Arc<Inner>) {
    let mut persisted = inner.applied.load(Ordering::Acquire);
    let mut last = Instant::now();
    loop {
        let stopping = inner.stop.load(Ordering::Acquire);
        let applied = inner.applied.load(Ordering::Acquire);
        if applied > persisted {
            persist(&inner, applied, &mut persisted, &mut last);
        }
        if stopping {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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
            // Suspended for a snapshot.
            drop(gate);
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let applied = inner.applied.load(Ordering::Acquire);
        let received = inner.received.load(Ordering::Acquire);
        if applied >= received {
            drop(gate);
            let g = inner.wake.0.lock().unwrap_or_else(|e| e.into_inner());
            if inner.received.load(Ordering::Acquire) <= applied
                && !inner.stop.load(Ordering::Acquire)
            {
                let _ = inner.wake.1.wait_timeout(g, Duration::from_millis(200));
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

/// Applies the stored batch holding `next`; returns how long to pause after
/// a failure.
fn apply_next(
    inner: &Inner,
    applier: &MirrorApplier,
    next: u64,
    failures: &mut u32,
) -> Option<Duration> {
    let batch = inner
        .log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .batch_with(next);
    let (_first, last, records) = match batch {
        Ok(Some(b)) => b,
        Ok(None) => {
            set_error(
                inner,
                Some(format!("record {next} is missing from the receive log")),
            );
            publish(inner);
            return Some(Duration::from_secs(1));
        }
        Err(e) => {
            set_error(inner, Some(format!("cannot read the receive log: {e}")));
            publish(inner);
            return Some(Duration::from_secs(1));
        }
    };
    let mut payload = 0u64;
    for r in records.iter().filter(|r| r.seq >= next) {
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let res = if st.state.intent_seq == r.seq {
            applier.resolve_intent(&mut st, r)
        } else {
            applier.apply(&mut st, r)
        };
        drop(st);
        if let Err(e) = res {
            *failures += 1;
            set_error(
                inner,
                Some(format!(
                    "applying record {} ({} {:?}): {e}",
                    r.seq,
                    r.op.name(),
                    String::from_utf8_lossy(r.op.path())
                )),
            );
            publish(inner);
            return Some(Duration::from_millis((100 * *failures as u64).min(2000)));
        }
        payload += r.data.len() as u64;
        if r.op.is_namespace() {
            // Persisted by the applier itself.
            inner.applied.store(r.seq, Ordering::Release);
        }
    }
    *failures = 0;
    inner.payload_applied.fetch_add(payload, Ordering::Relaxed);
    inner.applied.store(last, Ordering::Release);
    set_error(inner, None);
    // "Applied" may be acknowledged before it is persisted: the receive
    // log keeps every record above the persisted applied seq.
    publish(inner);
    None
}

/// Makes the mirror durable, then the applied seq; then trims the receive log.
fn persist(inner: &Inner, applied: u64, persisted: &mut u64, last: &mut Instant) {
    *last = Instant::now();
    if let Err(e) = syncfs(&inner.mirror) {
        warn!(error = %e, "syncfs of the mirror failed");
        return;
    }
    let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    let s = st.state;
    if s.applied >= applied {
        *persisted = s.applied;
    } else if let Err(e) = st.store(ApplyState { applied, ..s }) {
        warn!(error = %e, "cannot persist the applied seq");
        return;
    } else {
        *persisted = applied;
    }
    drop(st);
    if let Err(e) = inner
        .log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .trim(*persisted)
    {
        warn!(error = %e, "cannot trim the receive log");
    }
}
