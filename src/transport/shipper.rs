//! The primary's sender: one thread with its own tokio runtime, one task per
//! peer. Each task connects (pinned mutual TLS), learns where the peer stands,
//! and streams batches read from the journal: coalesced, zstd-compressed when
//! that pays, throttled to the bandwidth limit. Peers progress independently;
//! the mount never waits for them (the journal holds what they have not
//! applied, up to its cap). Once every peer has applied a seq, the journal is
//! trimmed through it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::catchup::CatchUp;
use super::io::{close_with, read_message, write_bytes, write_message};
use super::status::{PeerStatus, Status};
use super::tls::{self, Fingerprint, Identity};
use crate::journal::Journal;
use crate::journal::record::Record;
use crate::protocol::frame;
use crate::protocol::message::EntryKind;
use crate::protocol::{Decoder, Message, Sender, SenderConfig, SenderEvent};

/// How long a replica may fail on a diverged mirror before it gets a snapshot.
pub const DIVERGENCE_GRACE: Duration = Duration::from_secs(3);

/// Apply errors that mean the mirror is not the state the record expects.
fn is_divergence(e: &str) -> bool {
    e.contains("applying record")
        && [
            "(os error 2)",
            "(os error 17)",
            "(os error 20)",
            "(os error 21)",
            "(os error 39)",
        ]
        .iter()
        .any(|c| e.contains(c))
}

/// How long records may stay unacknowledged before the connection is given up.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// host:port
    pub address: String,
    pub fingerprint: Fingerprint,
}

impl Peer {
    /// Parses `ADDR=FINGERPRINT`.
    pub fn parse(s: &str) -> Result<Peer, String> {
        let (a, f) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("peer {s:?} is not ADDRESS=FINGERPRINT"))?;
        Ok(Peer {
            address: a.to_string(),
            fingerprint: Fingerprint::parse(f)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ShipperOptions {
    pub peers: Vec<Peer>,
    /// zstd level; 0 sends everything raw.
    pub compression_level: i32,
    /// Wire bytes per second per peer; 0 is unlimited.
    pub bandwidth_limit: u64,
    pub sender: SenderConfig,
    /// The journal did not close cleanly last time: what it lost (names
    /// included) is unknown, so every peer gets a snapshot on its first
    /// connection.
    pub snapshot_first: bool,
}

impl Default for ShipperOptions {
    fn default() -> Self {
        ShipperOptions {
            peers: Vec::new(),
            compression_level: 3,
            bandwidth_limit: 0,
            sender: SenderConfig::default(),
            snapshot_first: false,
        }
    }
}

#[derive(Default)]
struct PeerState {
    connected: bool,
    state: &'static str,
    error: Option<String>,
    sent: u64,
    received: u64,
    /// None until the peer told us since this process started.
    applied: Option<u64>,
    wire_bytes: u64,
    payload_bytes: u64,
    /// (last seq, payload bytes) of batches sent and not yet applied.
    unapplied: VecDeque<(u64, u64)>,
    applied_payload: u64,
    rate: Option<(Instant, u64, f64)>,
}

struct Shared {
    journal: Arc<Journal>,
    peers: Vec<(Peer, Mutex<PeerState>)>,
    /// (seq, first seen): when the shipper first saw the journal reach seq.
    seen: Mutex<VecDeque<(u64, Instant)>>,
    stop: AtomicBool,
    catch_up: Option<Arc<CatchUp>>,
    /// The state dir's path inside the backing dir, if it is there (never sent).
    hidden: Option<Vec<u8>>,
    /// A catch-up pass met a dropped namespace change.
    namespace_loss: AtomicBool,
}

impl Shared {
    fn peer(&self, i: usize) -> std::sync::MutexGuard<'_, PeerState> {
        self.peers[i].1.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note_seen(&self, last: u64) {
        let mut s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if s.back().is_none_or(|&(l, _)| l < last) {
            s.push_back((last, Instant::now()));
            if s.len() > 100_000 {
                s.pop_front();
            }
        }
    }

    /// How long ago the journal first showed the oldest record above `applied`.
    fn lag_seconds(&self, applied: u64) -> f64 {
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        s.iter()
            .find(|(l, _)| *l > applied)
            .map(|(_, t)| t.elapsed().as_secs_f64())
            .unwrap_or(0.0)
    }
}

/// A running shipper; stops when dropped.
pub struct Shipper {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The primary's volume id: random, kept in the state dir, so a replica can
/// tell this primary's history from another's.
pub fn volume_id(state_dir: &Path) -> Result<u64, String> {
    let p = state_dir.join("volume-id");
    if let Ok(s) = std::fs::read_to_string(&p) {
        return u64::from_str_radix(s.trim(), 16)
            .map_err(|e| format!("{} is corrupt: {e}", p.display()));
    }
    let mut b = [0u8; 8];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| e.to_string())?;
    let id = u64::from_le_bytes(b) | 1;
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, format!("{id:016x}\n"))
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, &p))
        .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    Ok(id)
}

impl Shipper {
    pub fn start(
        journal: Arc<Journal>,
        state_dir: &Path,
        options: ShipperOptions,
        catch_up: Option<CatchUp>,
    ) -> Result<Shipper, String> {
        let id = Identity::load_or_generate(state_dir)?;
        let vid = volume_id(state_dir)?;
        let hidden = catch_up.as_ref().and_then(|c| {
            use std::os::unix::ffi::OsStrExt;
            let sd = state_dir.canonicalize().ok()?;
            let b = c.backing.canonicalize().ok()?;
            sd.strip_prefix(&b)
                .ok()
                .map(|r| r.as_os_str().as_bytes().to_vec())
        });
        let shared = Arc::new(Shared {
            journal,
            peers: options
                .peers
                .iter()
                .map(|p| {
                    (
                        p.clone(),
                        Mutex::new(PeerState {
                            state: "connecting",
                            ..Default::default()
                        }),
                    )
                })
                .collect(),
            seen: Mutex::new(VecDeque::new()),
            stop: AtomicBool::new(false),
            catch_up: catch_up.map(Arc::new),
            hidden,
            namespace_loss: AtomicBool::new(false),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("replicafs-ship")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the sender runtime: {e}"))?;
        let sh = shared.clone();
        let npeers = options.peers.len();
        let thread = std::thread::Builder::new()
            .name("shipper".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut tasks = Vec::new();
                    for i in 0..sh.peers.len() {
                        tasks.push(tokio::spawn(peer_loop(
                            sh.clone(),
                            i,
                            id.clone(),
                            vid,
                            options.clone(),
                        )));
                    }
                    housekeeping(sh.clone()).await;
                    for t in tasks {
                        t.abort();
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| e.to_string())?;
        info!(
            peers = npeers,
            volume_id = format!("{vid:#018x}"),
            "replication sender started"
        );
        Ok(Shipper {
            shared,
            thread: Some(thread),
        })
    }

    pub fn status(&self) -> Status {
        status(&self.shared)
    }

    /// A cheap handle for the status socket.
    pub fn status_fn(&self) -> impl Fn() -> Status + Send + 'static {
        let sh = self.shared.clone();
        move || status(&sh)
    }

    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.stop();
    }
}

fn status(sh: &Shared) -> Status {
    let last = sh.journal.last_seq();
    let now = Instant::now();
    let peers = sh
        .peers
        .iter()
        .map(|(p, st)| {
            let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
            let applied = s.applied.unwrap_or(0);
            let throughput = match s.rate {
                Some((t, _, r)) if now.duration_since(t) < Duration::from_millis(500) => r,
                Some((t, b, _)) => {
                    let r = (s.applied_payload - b) as f64 / now.duration_since(t).as_secs_f64();
                    s.rate = Some((now, s.applied_payload, r));
                    r
                }
                None => {
                    s.rate = Some((now, s.applied_payload, 0.0));
                    0.0
                }
            };
            let state = if s.error.is_some() {
                "error"
            } else if !s.connected {
                s.state
            } else if applied < last || !sh.journal.dirty().is_empty() {
                "catching up"
            } else {
                "replicating"
            };
            PeerStatus {
                address: p.address.clone(),
                fingerprint: p.fingerprint.to_string(),
                connected: s.connected,
                state: state.to_string(),
                error: s.error.clone(),
                last_sent: s.sent,
                received: s.received,
                applied,
                lag_records: last.saturating_sub(applied),
                lag_bytes: s.unapplied.iter().map(|(_, b)| b).sum(),
                lag_seconds: if applied >= last {
                    0.0
                } else {
                    sh.lag_seconds(applied)
                },
                throughput_bytes_per_sec: throughput,
                wire_bytes: s.wire_bytes,
                payload_bytes: s.payload_bytes,
            }
        })
        .collect();
    Status {
        role: "primary".into(),
        last_seq: last,
        peers,
    }
}

/// Trims the journal, keeps the lag marks, runs catch-up passes.
async fn housekeeping(sh: Arc<Shared>) {
    let mut trimmed = 0u64;
    let mut last_pass = Instant::now();
    while !sh.stop.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A pass journals a quarter of the cap at most, and only while the
        // journal is less than half full: catch-up records must not push
        // unread records (their own included) over the cap.
        let cap = sh.journal.options().cap_bytes;
        if let Some(cu) = &sh.catch_up
            && last_pass.elapsed() > Duration::from_millis(500)
            && !sh.journal.dirty().is_empty()
            && sh.journal.stats().segment_bytes < cap / 2
        {
            last_pass = Instant::now();
            let cu = cu.clone();
            match tokio::task::spawn_blocking(move || cu.pass(cap / 4)).await {
                Ok(Ok(r)) => {
                    if r.lost > 0 {
                        sh.namespace_loss.store(true, Ordering::Release);
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "catch-up pass failed"),
                Err(e) => warn!(error = %e, "catch-up pass panicked"),
            }
        }
        sh.note_seen(sh.journal.last_seq());
        let min = sh
            .peers
            .iter()
            .map(|(_, s)| s.lock().unwrap_or_else(|e| e.into_inner()).applied)
            .try_fold(u64::MAX, |m, a| a.map(|a| m.min(a)));
        if let Some(min) = min
            && min != u64::MAX
            && min > trimmed
        {
            sh.journal.trim_through(min);
            trimmed = min;
        }
        // Forget "seen" marks every peer has applied.
        if let Some(min) = min {
            let mut s = sh.seen.lock().unwrap_or_else(|e| e.into_inner());
            while s.front().is_some_and(|&(l, _)| l <= min) {
                s.pop_front();
            }
        }
    }
}

async fn peer_loop(sh: Arc<Shared>, i: usize, id: Identity, vid: u64, opts: ShipperOptions) {
    let peer = sh.peers[i].0.clone();
    let mut backoff = Duration::from_millis(200);
    let mut snapshot_first = opts.snapshot_first;
    while !sh.stop.load(Ordering::Acquire) {
        let started = Instant::now();
        let r = connection(&sh, i, &id, vid, &opts, &mut snapshot_first).await;
        {
            let mut s = sh.peer(i);
            s.connected = false;
            s.state = "connecting";
            s.unapplied.clear();
            if let Err(e) = &r {
                s.error = Some(e.clone());
            }
        }
        if let Err(e) = r {
            warn!(peer = %peer.address, error = %e, "replication connection ended");
        }
        if started.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(200);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(3));
    }
}

/// Token bucket for the bandwidth limit.
struct Throttle {
    rate: u64,
    tokens: f64,
    at: Instant,
}

impl Throttle {
    async fn take(&mut self, n: usize) {
        if self.rate == 0 {
            return;
        }
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate as f64)
            .min(self.rate as f64);
        self.at = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            let wait = -self.tokens / self.rate as f64;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

enum Read {
    Records(Vec<Record>, u64),
    /// Records `.0..=.1` are not in the journal.
    Gap(u64, u64),
}

fn read_batch(
    j: &Journal,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<Read, String> {
    let last = j.last_seq();
    let target = last.min(from + max_records as u64 - 1);
    j.wait_written(target);
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut through = from - 1;
    for r in j.records(from, target) {
        let r = r.map_err(|e| format!("cannot read the journal: {e}"))?;
        if r.seq != through + 1 {
            if out.is_empty() {
                return Ok(Read::Gap(from, r.seq - 1));
            }
            break;
        }
        through = r.seq;
        bytes += r.data.len() + 64;
        out.push(r);
        if bytes >= max_bytes {
            break;
        }
    }
    if out.is_empty() && target >= from {
        return Ok(Read::Gap(from, target));
    }
    Ok(Read::Records(out, through))
}

async fn connection(
    sh: &Arc<Shared>,
    i: usize,
    id: &Identity,
    vid: u64,
    opts: &ShipperOptions,
    snapshot_first: &mut bool,
) -> Result<(), String> {
    let peer = &sh.peers[i].0;
    let addr: SocketAddr = tokio::net::lookup_host(&peer.address)
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", peer.address))?
        .next()
        .ok_or_else(|| format!("{} resolves to nothing", peer.address))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("cannot bind: {e}"))?;
    let cfg = tls::client_config(id, peer.fingerprint)?;
    let conn = endpoint
        .connect_with(cfg, addr, tls::SERVER_NAME)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("cannot open a stream: {e}"))?;
    let r = stream(sh, i, &conn, &mut send, recv, vid, opts, snapshot_first).await;
    if let Err(e) = &r {
        close_with(&conn, Some(&mut send), e).await;
    } else {
        conn.close(quinn::VarInt::from_u32(0), b"bye");
    }
    endpoint.wait_idle().await;
    r
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    sh: &Arc<Shared>,
    i: usize,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    vid: u64,
    opts: &ShipperOptions,
    snapshot_first: &mut bool,
) -> Result<(), String> {
    let journal = sh.journal.clone();
    let mut sender = Sender::new(vid, opts.sender.clone());
    write_message(send, &sender.hello(journal.last_seq())).await?;

    // Incoming messages are read by their own task, so acks flow while we write.
    let (tx, mut rx) = mpsc::channel::<Result<Message, String>>(64);
    let conn2 = conn.clone();
    let reader = tokio::spawn(async move {
        let mut dec = Decoder::new();
        loop {
            let m = read_message(&mut recv, &mut dec).await;
            let end = !matches!(m, Ok(Some(_)));
            let item = match m {
                Ok(Some((m, _))) => Ok(m),
                Ok(None) => Err("replica closed the stream".to_string()),
                Err(e) => Err(match conn2.close_reason() {
                    Some(r) => format!("connection closed: {r}"),
                    None => e,
                }),
            };
            if tx.send(item).await.is_err() || end {
                break;
            }
        }
    });
    let _abort = AbortOnDrop(reader);

    let welcome = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .map_err(|_| "no welcome within 10 s".to_string())?
        .ok_or("replica went away")??;
    let SenderEvent::Resume { from } = sender.handle(welcome).map_err(|e| e.to_string())? else {
        return Err("handshake did not resume".into());
    };
    if sender.received() > journal.last_seq() {
        return Err(format!(
            "the replica has received through seq {} but this primary's journal ends at {}: the primary lost its journal tail; the replica needs a full resync",
            sender.received(),
            journal.last_seq()
        ));
    }
    {
        let mut s = sh.peer(i);
        s.connected = true;
        s.error = None;
        s.state = "replicating";
        s.sent = from - 1;
        s.received = sender.received();
        s.applied = Some(sender.applied());
    }
    info!(peer = %sh.peers[i].0.address, from, applied = sender.applied(), remote = %conn.remote_address(), "replicating");

    let mut throttle = Throttle {
        rate: opts.bandwidth_limit,
        tokens: 0.0,
        at: Instant::now(),
    };
    if sender.needs_snapshot() || (*snapshot_first && sh.catch_up.is_some()) {
        if *snapshot_first {
            info!(peer = %sh.peers[i].0.address, "the journal was not closed cleanly: this peer gets a full snapshot");
        }
        let Some(cu) = sh.catch_up.clone() else {
            return Err("the replica is fresh and needs a snapshot, but this sender has no backing dir to read".into());
        };
        sh.peer(i).state = "catching up";
        let at = send_snapshot(sh, i, send, &cu, opts.compression_level, &mut throttle).await?;
        sender.snapshot_sent(at);
        sh.peer(i).sent = at;
        *snapshot_first = false;
    }
    let mut last_progress = Instant::now();
    let mut last_received = sender.received();
    let mut inconsistent_since: Option<Instant> = None;
    let mut idle = tokio::time::interval(Duration::from_millis(2));
    idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        // Take every message that is waiting.
        while let Ok(m) = rx.try_recv() {
            on_message(sh, i, &mut sender, m?)?;
        }
        // A replica that keeps failing on a record because its mirror does not
        // hold what the record expects (a name missing or in the way) has
        // diverged (a namespace change the primary lost in a crash): it gets a
        // new snapshot. Other errors (disk full …) are waited out.
        if sender.remote_error().is_some_and(is_divergence) {
            let since = *inconsistent_since.get_or_insert_with(Instant::now);
            if since.elapsed() > DIVERGENCE_GRACE
                && let Some(cu) = sh.catch_up.clone()
            {
                warn!(peer = %sh.peers[i].0.address, error = ?sender.remote_error(),
                    "the replica's mirror has diverged: sending a full snapshot");
                sh.peer(i).state = "catching up";
                let at =
                    send_snapshot(sh, i, send, &cu, opts.compression_level, &mut throttle).await?;
                sender.snapshot_sent(at);
                sh.peer(i).sent = at;
                last_progress = Instant::now();
                inconsistent_since = None;
                continue;
            }
        } else {
            inconsistent_since = None;
        }
        if sender.received() != last_received || sender.sent_through() == sender.received() {
            last_received = sender.received();
            last_progress = Instant::now();
        } else if last_progress.elapsed() > ACK_TIMEOUT {
            return Err(format!(
                "peer acknowledged nothing for {} s with records {}..={} outstanding",
                ACK_TIMEOUT.as_secs(),
                sender.received() + 1,
                sender.sent_through()
            ));
        }
        let want = sender.wants();
        let ready = want.is_some_and(|from| journal.last_seq() >= from);
        if !ready {
            tokio::select! {
                m = rx.recv() => {
                    let m = m.ok_or("replica went away")?;
                    on_message(sh, i, &mut sender, m?)?;
                }
                _ = idle.tick() => {}
            }
            continue;
        }
        let from = want.unwrap_or(1);
        let j = journal.clone();
        let (max_r, max_b) = (opts.sender.batch_records, opts.sender.batch_bytes);
        let read = tokio::task::spawn_blocking(move || read_batch(&j, from, max_r, max_b))
            .await
            .map_err(|e| e.to_string())??;
        let (records, through) = match read {
            Read::Records(r, t) => (r, t),
            Read::Gap(from, to) => {
                let stats = journal.stats();
                let Some(cu) = sh.catch_up.clone() else {
                    return Err(format!(
                        "the journal no longer holds records {from}..={to} and there is no catch-up source"
                    ));
                };
                let trimmed = to > stats.dropped_through && to <= stats.trimmed_through;
                let cu2 = cu.clone();
                let lost = sh.namespace_loss.load(Ordering::Acquire)
                    || tokio::task::spawn_blocking(move || cu2.namespace_lost())
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| format!("cannot read the dirty list: {e}"))?;
                if trimmed || lost {
                    warn!(peer = %sh.peers[i].0.address, from, to, trimmed, lost_namespace_changes = lost,
                        "the journal cannot bring this peer forward: sending a full snapshot");
                    sh.peer(i).state = "catching up";
                    let at = send_snapshot(sh, i, send, &cu, opts.compression_level, &mut throttle)
                        .await?;
                    sender.snapshot_sent(at);
                    sh.peer(i).sent = at;
                    last_progress = Instant::now();
                    continue;
                }
                // Dropped (cap) or lost records: their regions were marked
                // dirty before they left the index, and catch-up passes journal
                // those regions again, necessarily after the gap. So the gap can
                // be skipped now; the mirror is consistent again once the dirty
                // list is worked off.
                info!(peer = %sh.peers[i].0.address, from, to, "skipping records the journal dropped; catch-up records follow");
                (Vec::new(), to)
            }
        };
        let payload: u64 = records.iter().map(|r| r.data.len() as u64).sum();
        let msg = sender.batch(records, through, journal.last_seq());
        let level = opts.compression_level;
        let enc = tokio::task::spawn_blocking(move || frame::encode(&msg, level))
            .await
            .map_err(|e| e.to_string())?;
        throttle.take(enc.bytes.len()).await;
        // Keep acks flowing while a large write waits for the window.
        write_bytes(send, &enc.bytes).await?;
        sender.sent(through, enc.bytes.len() as u64);
        let mut s = sh.peer(i);
        s.sent = through;
        s.wire_bytes += enc.bytes.len() as u64;
        s.payload_bytes += payload;
        s.unapplied.push_back((through, payload));
    }
}

/// (path, kind, metadata, symlink target)
/// (path, kind, metadata, symlink target or hard-link source, open file)
type SnapshotItem = (
    Vec<u8>,
    EntryKind,
    std::fs::Metadata,
    Vec<u8>,
    Option<std::fs::File>,
);

/// Entries of the backing dir for a snapshot, parents first, and the journal
/// seq they stand for. The names are listed and every regular file opened
/// under the volume's exclusive namespace lock, so the listing is exactly the
/// namespace at that seq; contents are read later through the open files (by
/// inode, whatever renames follow), which the tolerant replay makes right.
fn snapshot_entries(
    cu: &CatchUp,
    hidden: Option<&[u8]>,
) -> std::io::Result<(u64, Vec<SnapshotItem>)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let rec = cu.volume.recorder();
    let state_key = cu.volume.state_dir_key();
    let _ns = rec.map(|r| r.namespace_lock());
    let at = rec.map(|r| r.journal().last_seq()).unwrap_or(0);
    let mut links: std::collections::HashMap<(u64, u64), Vec<u8>> = Default::default();
    let mut out = Vec::new();
    let mut stack = vec![Vec::<u8>::new()];
    while let Some(dir) = stack.pop() {
        let abs = cu.backing.join(std::ffi::OsStr::from_bytes(&dir));
        let mut names: Vec<_> = std::fs::read_dir(&abs)?.filter_map(|e| e.ok()).collect();
        names.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in names {
            let mut rel = dir.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(e.file_name().as_bytes());
            if Some(rel.as_slice()) == hidden
                || rec.is_some_and(|r| r.exclusions().is_excluded(&rel))
            {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            let ft = m.file_type();
            // The state dir (keys, journal) by identity, wherever it is now.
            if ft.is_dir() && Some((m.dev(), m.ino())) == state_key {
                continue;
            }
            if ft.is_dir() {
                subdirs.push(rel.clone());
                out.push((rel, EntryKind::Dir, m, Vec::new(), None));
            } else if ft.is_file() {
                if m.nlink() > 1 {
                    if let Some(first) = links.get(&(m.dev(), m.ino())) {
                        out.push((rel, EntryKind::Link, m, first.clone(), None));
                        continue;
                    }
                    links.insert((m.dev(), m.ino()), rel.clone());
                }
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(e.path())?;
                out.push((rel, EntryKind::File, m, Vec::new(), Some(f)));
            } else if ft.is_symlink() {
                let t = std::fs::read_link(e.path())?;
                out.push((
                    rel,
                    EntryKind::Symlink,
                    m,
                    t.as_os_str().as_bytes().to_vec(),
                    None,
                ));
            }
        }
        // Depth-first, parents already listed.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok((at, out))
}

/// Lets a snapshot hold one open file per regular file of the tree.
fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Sends a fuzzy snapshot of the backing dir; returns the seq it starts after.
async fn send_snapshot(
    sh: &Arc<Shared>,
    i: usize,
    send: &mut quinn::SendStream,
    cu: &Arc<CatchUp>,
    level: i32,
    throttle: &mut Throttle,
) -> Result<u64, String> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    raise_fd_limit();
    let (cu2, hidden) = (cu.clone(), sh.hidden.clone());
    let (at, entries) =
        tokio::task::spawn_blocking(move || snapshot_entries(&cu2, hidden.as_deref()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("snapshot: cannot list the backing dir: {e}"))?;
    info!(peer = %sh.peers[i].0.address, at, entries = entries.len(), "sending a full snapshot");
    write_message(send, &Message::SnapshotBegin { at }).await?;
    let (mut files, mut bytes) = (0u64, 0u64);
    for (path, kind, m, target, file) in entries {
        let entry = Message::SnapshotEntry {
            path: path.clone(),
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: m.len(),
            xattrs: if matches!(kind, EntryKind::Symlink | EntryKind::Link) {
                Vec::new()
            } else {
                use std::os::unix::ffi::OsStrExt;
                crate::replica::snapshot::list_xattrs(
                    &cu.backing.join(std::ffi::OsStr::from_bytes(&path)),
                )
            },
            target,
        };
        let n = write_message(send, &entry).await?;
        sh.peer(i).wire_bytes += n as u64;
        if kind != EntryKind::File {
            continue;
        }
        files += 1;
        let Some(f) = file else {
            continue;
        };
        let f = Arc::new(f);
        let mut offset = 0u64;
        loop {
            let (f2, p2) = (f.clone(), path.clone());
            let enc = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; super::catchup::CHUNK as usize];
                let mut got = 0;
                while got < buf.len() {
                    match f2.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.to_string()),
                    }
                }
                buf.truncate(got);
                if got == 0 {
                    return Ok(None);
                }
                let msg = Message::SnapshotData {
                    path: p2,
                    offset,
                    data: buf,
                };
                Ok(Some((frame::encode(&msg, level), got)))
            })
            .await
            .map_err(|e| e.to_string())??;
            let Some((enc, got)) = enc else { break };
            throttle.take(enc.bytes.len()).await;
            write_bytes(send, &enc.bytes).await?;
            offset += got as u64;
            bytes += got as u64;
            let mut s = sh.peer(i);
            s.wire_bytes += enc.bytes.len() as u64;
            s.payload_bytes += got as u64;
        }
    }
    let lenient_through = sh.journal.last_seq().max(at);
    write_message(
        send,
        &Message::SnapshotEnd {
            at,
            lenient_through,
        },
    )
    .await?;
    info!(peer = %sh.peers[i].0.address, at, lenient_through, files, bytes, "snapshot sent");
    Ok(at)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn on_message(sh: &Shared, i: usize, sender: &mut Sender, m: Message) -> Result<(), String> {
    sender.handle(m).map_err(|e| e.to_string())?;
    let mut s = sh.peer(i);
    s.received = sender.received();
    let applied = sender.applied();
    s.applied = Some(applied);
    while s.unapplied.front().is_some_and(|&(l, _)| l <= applied) {
        if let Some((_, b)) = s.unapplied.pop_front() {
            s.applied_payload += b;
        }
    }
    s.error = sender.remote_error().map(|e| format!("replica: {e}"));
    Ok(())
}
