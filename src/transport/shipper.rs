//! The primary's sender: one thread with its own tokio runtime, one task per
//! peer. Each task connects (pinned mutual TLS), learns where the peer stands,
//! and streams batches read from the journal: coalesced, zstd-compressed when
//! that pays, throttled to the bandwidth limit. Peers progress independently;
//! the mount never waits for them (the journal holds what they have not
//! applied, up to its cap). Once every peer has applied a seq, the journal is
//! trimmed through it.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::catchup::CatchUp;
use super::io::{close_with, read_message, write_bytes, write_message};
use super::server::sleep_until;
use super::status::{PeerStatus, Status};
use super::tls::{self, Fingerprint, Identity};
use crate::journal::Journal;
use crate::journal::record::Record;
use crate::protocol::frame;
use crate::protocol::message::EntryKind;
use crate::protocol::state::SenderState;
use crate::protocol::{
    CloseCode, Decoder, Gap, GapDecision, Message, Sender, SenderAction, SenderConfig, SenderEvent,
    SnapshotReason,
};

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
    /// included) is unknown, so every peer is owed a snapshot (persisted in
    /// the state dir until the peer has applied one, see [`Obligations`]).
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
    /// Peers owed a snapshot after an unclean stop.
    obligations: Obligations,
    /// An ack moved a peer's applied seq: trimming (and with it the release
    /// of writes held for the peers) runs now, not at the next tick.
    acked: tokio::sync::Notify,
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

/// Peers owed a full snapshot after an unclean stop of the journal (what it
/// lost is unknown). Kept in `resync-owed` in the state dir, one peer
/// fingerprint (hex) per line, replaced atomically (private temp file,
/// fsync, rename, fsync of the dir), so a clean restart before an offline
/// peer comes back keeps the obligation. A peer's line goes only once it has
/// applied a snapshot.
pub struct Obligations {
    path: PathBuf,
    owed: Mutex<BTreeSet<String>>,
}

pub const OBLIGATIONS_FILE: &str = "resync-owed";

impl Obligations {
    pub fn load(state_dir: &Path) -> Result<Obligations, String> {
        let path = state_dir.join(OBLIGATIONS_FILE);
        let mut owed = BTreeSet::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    let fp = Fingerprint::parse(line)
                        .map_err(|e| format!("{} is corrupt: {e}", path.display()))?;
                    owed.insert(fp.to_string());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        Ok(Obligations {
            path,
            owed: Mutex::new(owed),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.owed.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn owes(&self, peer: &Fingerprint) -> bool {
        self.lock().contains(&peer.to_string())
    }

    pub fn owed(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    /// Every one of `peers` is owed a snapshot, durably before this returns.
    pub fn owe(&self, peers: &[Fingerprint]) -> Result<(), String> {
        let mut owed = self.lock();
        let mut next = owed.clone();
        next.extend(peers.iter().map(|p| p.to_string()));
        if next != *owed {
            self.write(&next)?;
            *owed = next;
        }
        Ok(())
    }

    /// `peer` has applied a snapshot.
    pub fn fulfil(&self, peer: &Fingerprint) -> Result<(), String> {
        let mut owed = self.lock();
        let mut next = owed.clone();
        if next.remove(&peer.to_string()) {
            self.write(&next)?;
            *owed = next;
        }
        Ok(())
    }

    fn write(&self, owed: &BTreeSet<String>) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.path.with_extension("tmp");
        let body: String = owed.iter().map(|f| format!("{f}\n")).collect();
        let r = (|| {
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            match self.path.parent() {
                Some(d) => std::fs::File::open(d)?.sync_all(),
                None => Ok(()),
            }
        })();
        r.map_err(|e| format!("cannot write {}: {e}", self.path.display()))
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
        let obligations = Obligations::load(state_dir)?;
        if options.snapshot_first {
            // Durable before any peer is served: a restart keeps the debt.
            let fps: Vec<Fingerprint> = options.peers.iter().map(|p| p.fingerprint).collect();
            obligations.owe(&fps)?;
        }
        let owed = obligations.owed();
        if !owed.is_empty() {
            info!(peers = ?owed, "peers owed a full snapshot (resync-owed)");
        }
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
            obligations,
            acked: tokio::sync::Notify::new(),
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
                mirror_applied: None,
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
                refused: None,
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
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = sh.acked.notified() => {}
        }
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
    while !sh.stop.load(Ordering::Acquire) {
        let started = Instant::now();
        let r = connection(&sh, i, &id, vid, &opts).await;
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

/// Reads a batch from `from`, never beyond the journal's durable seq: a
/// record that is written but not durable may vanish in a power cut, and its
/// seq be reused for other content after the restart.
fn read_batch(
    j: &Journal,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<Read, String> {
    let last = j.settled_seq();
    let target = last.min(from + max_records as u64 - 1);
    if target < from {
        return Ok(Read::Records(Vec::new(), from - 1));
    }
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
        // A write kept in the backing file counts the bytes it will carry.
        let carried = match &r.op {
            crate::journal::Op::WriteBacked { len, .. } => *len as usize,
            _ => r.data.len(),
        };
        bytes += carried + 64;
        out.push(r);
        if bytes >= max_bytes {
            break;
        }
    }
    if out.is_empty() && target >= from {
        return Ok(Read::Gap(from, target));
    }
    // Writes kept in the backing file travel with their bytes.
    Ok(Read::Records(j.resolve_all(out), through))
}

async fn connection(
    sh: &Arc<Shared>,
    i: usize,
    id: &Identity,
    vid: u64,
    opts: &ShipperOptions,
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
    let r = stream(sh, i, &conn, &mut send, recv, vid, opts).await;
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
) -> Result<(), String> {
    let journal = sh.journal.clone();
    let mut config = opts.sender.clone();
    config.can_snapshot = sh.catch_up.is_some();
    let mut sender = Sender::new(vid, config);
    if sh.obligations.owes(&sh.peers[i].0.fingerprint) {
        sender.owe_snapshot();
    }
    write_message(send, &sender.hello_at(journal.last_seq(), Instant::now())).await?;

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

    let mut backoff = crate::protocol::frame::CompressionBackoff::default();
    let mut throttle = Throttle {
        rate: opts.bandwidth_limit,
        tokens: 0.0,
        at: Instant::now(),
    };
    // Woken by the journal when records are written or settled.
    let mut moved = journal.watch();
    let mut sync_requested = 0u64;
    let mut streaming = false;
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        // Take every message that is waiting.
        while let Ok(m) = rx.try_recv() {
            on_message(sh, i, &mut sender, m?, Instant::now())?;
        }
        if !streaming && sender.state() == SenderState::Streaming {
            streaming = true;
            let from = sender.sent_through() + 1;
            let mut s = sh.peer(i);
            s.connected = true;
            s.error = None;
            s.state = "replicating";
            s.sent = from - 1;
            s.received = sender.received();
            s.applied = Some(sender.applied());
            drop(s);
            info!(peer = %sh.peers[i].0.address, from, applied = sender.applied(), remote = %conn.remote_address(), "replicating");
        }
        moved.borrow_and_update();
        let mut wait_for_journal = false;
        match sender.poll(Instant::now()) {
            Some(SenderAction::Close { code, reason }) => {
                if code == CloseCode::ReplicaAhead {
                    let owed = sh.obligations.owe(&[sh.peers[i].0.fingerprint]);
                    if let Err(e) = owed {
                        return Err(format!("{reason} ({e})"));
                    }
                }
                return Err(reason);
            }
            Some(SenderAction::SendSnapshot(reason)) => {
                let Some(cu) = sh.catch_up.clone() else {
                    return Err("a snapshot is due but there is no backing dir to read".into());
                };
                match reason {
                    SnapshotReason::Owed => {
                        info!(peer = %sh.peers[i].0.address, "owed a snapshot (the journal did not close cleanly, or lost records the peer holds): this peer gets a full snapshot")
                    }
                    SnapshotReason::Diverged => {
                        warn!(peer = %sh.peers[i].0.address, error = ?sender.remote_error(), "the replica's mirror has diverged: sending a full snapshot")
                    }
                    SnapshotReason::JournalGap => {
                        warn!(peer = %sh.peers[i].0.address, "the journal cannot bring this peer forward: sending a full snapshot")
                    }
                    SnapshotReason::Fresh => {}
                }
                sh.peer(i).state = "catching up";
                let at =
                    send_snapshot(sh, i, send, &cu, opts.compression_level, &mut throttle).await?;
                sender.snapshot_sent_at(at, Instant::now());
                sh.peer(i).sent = at;
                continue;
            }
            Some(SenderAction::SendBatch { from }) if journal.settled_seq() >= from => {
                send_batch(
                    sh,
                    i,
                    send,
                    &mut sender,
                    from,
                    opts,
                    &mut throttle,
                    &mut backoff,
                )
                .await?;
                continue;
            }
            Some(SenderAction::SendBatch { from }) => {
                // Records written but not durable yet: a group commit, asked
                // for only while there is nothing durable to send.
                let last = journal.last_seq();
                if last >= from && last > sync_requested && journal.request_sync(last) {
                    sync_requested = last;
                }
                wait_for_journal = true;
            }
            None => {}
        }
        let deadline = sender.next_deadline();
        tokio::select! {
            m = rx.recv() => {
                let m = m.ok_or("replica went away")?;
                on_message(sh, i, &mut sender, m?, Instant::now())?;
            }
            r = moved.changed(), if wait_for_journal => {
                if r.is_err() {
                    return Err("the journal stopped".into());
                }
            }
            _ = sleep_until(deadline) => {}
        }
    }
}

/// Reads and sends one batch from `from` (some of it durable), or handles the
/// gap the journal has there.
#[allow(clippy::too_many_arguments)]
async fn send_batch(
    sh: &Arc<Shared>,
    i: usize,
    send: &mut quinn::SendStream,
    sender: &mut Sender,
    from: u64,
    opts: &ShipperOptions,
    throttle: &mut Throttle,
    backoff: &mut crate::protocol::frame::CompressionBackoff,
) -> Result<(), String> {
    let journal = sh.journal.clone();
    let j = journal.clone();
    let (max_r, max_b) = (opts.sender.batch_records, opts.sender.batch_bytes);
    let read = tokio::task::spawn_blocking(move || read_batch(&j, from, max_r, max_b))
        .await
        .map_err(|e| e.to_string())??;
    let (records, through) = match read {
        Read::Records(_, t) if t < from => return Ok(()),
        Read::Records(r, t) => (r, t),
        Read::Gap(from, to) => {
            let stats = journal.stats();
            let trimmed = to > stats.dropped_through && to <= stats.trimmed_through;
            let namespace_lost = match sh.catch_up.clone() {
                Some(_) if sh.namespace_loss.load(Ordering::Acquire) => true,
                Some(cu) => tokio::task::spawn_blocking(move || cu.namespace_lost())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("cannot read the dirty list: {e}"))?,
                None => false,
            };
            match sender.gap(Gap {
                from,
                to,
                trimmed,
                namespace_lost,
            }) {
                GapDecision::Close { reason, .. } => return Err(reason),
                GapDecision::Snapshot => {
                    warn!(peer = %sh.peers[i].0.address, from, to, trimmed, lost_namespace_changes = namespace_lost, "records the journal does not hold");
                    return Ok(());
                }
                GapDecision::Skip { to } => {
                    info!(peer = %sh.peers[i].0.address, from, to, "skipping records the journal dropped; catch-up records follow");
                    (Vec::new(), to)
                }
            }
        }
    };
    let payload: u64 = records.iter().map(|r| r.data.len() as u64).sum();
    let msg = sender.batch(records, through, journal.last_seq());
    let level = backoff.level(opts.compression_level);
    let enc = tokio::task::spawn_blocking(move || frame::encode(&msg, level))
        .await
        .map_err(|e| e.to_string())?;
    backoff.record(level, &enc);
    throttle.take(enc.bytes.len()).await;
    write_bytes(send, &enc.bytes).await?;
    sender.sent_at(through, enc.bytes.len() as u64, Instant::now());
    let mut s = sh.peer(i);
    s.sent = through;
    s.wire_bytes += enc.bytes.len() as u64;
    s.payload_bytes += payload;
    s.unapplied.push_back((through, payload));
    Ok(())
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
    use std::os::unix::fs::MetadataExt;
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
                // Beneath the backing dir, no symlink followed, never a fifo.
                let Some(f) = crate::path::RelPath::parse(&rel)
                    .ok()
                    .map(|p| crate::path::open_regular_beneath(&cu.backing, &p))
                    .transpose()?
                    .flatten()
                else {
                    continue;
                };
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
    // The peer will hold seq `at`: it must not be a seq a power cut could
    // hand out again.
    // One queued request is enough: the writer keeps its sync target.
    let mut requested = false;
    let mut moved = sh.journal.watch();
    loop {
        moved.borrow_and_update();
        if sh.journal.settled_seq() >= at {
            break;
        }
        if sh.stop.load(Ordering::Acquire) {
            return Err("stopping".into());
        }
        requested = requested || sh.journal.request_sync(at);
        // Woken when the journal settles more; a request that could not
        // be queued is tried again a little later.
        let retry = (!requested).then(|| Instant::now() + Duration::from_millis(10));
        tokio::select! {
            r = moved.changed() => r.map_err(|_| "the journal stopped".to_string())?,
            _ = sleep_until(retry) => {}
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

fn on_message(
    sh: &Shared,
    i: usize,
    sender: &mut Sender,
    m: Message,
    now: Instant,
) -> Result<(), String> {
    if let SenderEvent::SnapshotApplied { at } =
        sender.handle_at(m, now).map_err(|e| e.to_string())?
    {
        let peer = &sh.peers[i].0;
        if sh.obligations.owes(&peer.fingerprint) {
            // A failure leaves the debt in place: one more snapshot later.
            match sh.obligations.fulfil(&peer.fingerprint) {
                Ok(()) => {
                    info!(peer = %peer.address, at, "the snapshot owed after an unclean stop is applied")
                }
                Err(e) => {
                    warn!(peer = %peer.address, error = %e, "cannot record the applied snapshot")
                }
            }
        }
    }
    let mut s = sh.peer(i);
    s.received = sender.received();
    let applied = sender.applied();
    if s.applied != Some(applied) {
        sh.acked.notify_one();
    }
    s.applied = Some(applied);
    while s.unapplied.front().is_some_and(|&(l, _)| l <= applied) {
        if let Some((_, b)) = s.unapplied.pop_front() {
            s.applied_payload += b;
        }
    }
    s.error = sender.remote_error().map(|e| format!("replica: {e}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::JournalOptions;
    use crate::journal::record::Op;
    use std::os::unix::fs::PermissionsExt;

    fn append(j: &Journal, n: u64) -> u64 {
        let mut last = 0;
        for i in 0..n {
            last = j.append(
                &Op::Write {
                    path: b"f".to_vec(),
                    offset: i * 4096,
                },
                &[i as u8; 100],
            );
        }
        j.wait_written(last);
        last
    }

    fn through(r: Read) -> u64 {
        match r {
            Read::Records(recs, t) => {
                assert!(recs.iter().all(|r| r.seq <= t));
                t
            }
            Read::Gap(..) => panic!("unexpected gap"),
        }
    }

    /// Records written but not durable are never read for shipping; once
    /// synced they are.
    #[test]
    fn batches_never_go_beyond_the_durable_seq() {
        let d = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(d.path(), JournalOptions::default()).unwrap();
        let last = append(&j, 5);
        assert_eq!(last, 5);
        // Nothing asked for a sync: whatever the read returns is durable.
        let t = through(read_batch(&j, 1, 100, 1 << 20).unwrap());
        assert!(t <= j.durable_seq(), "read through {t} beyond durable");
        j.sync_through(3).unwrap();
        assert_eq!(j.durable_seq(), 5);
        assert_eq!(through(read_batch(&j, 1, 100, 1 << 20).unwrap()), 5);
        let last = append(&j, 3);
        assert_eq!(last, 8);
        let t = through(read_batch(&j, 6, 100, 1 << 20).unwrap());
        assert!(t <= j.durable_seq(), "read through {t} beyond durable");
        // A requested sync arrives without anyone waiting for it.
        assert!(j.request_sync(8));
        let start = Instant::now();
        while j.durable_seq() < 8 {
            assert!(start.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(through(read_batch(&j, 6, 100, 1 << 20).unwrap()), 8);
        j.close().unwrap();
    }

    /// Writes kept in the backing file fill a batch by the bytes they will
    /// carry, and are read with them.
    #[test]
    fn batches_of_backed_writes_are_bounded_by_their_bytes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let d = tempfile::tempdir().unwrap();
        let opts = JournalOptions {
            hold_for_peers: true,
            ..Default::default()
        };
        let (j, _) = Journal::open(&d.path().join("state"), opts).unwrap();
        let path = d.path().join("disk.img");
        let f = std::fs::File::create(&path).unwrap();
        let m = f.metadata().unwrap();
        let open = || std::fs::File::open(&path);
        for i in 0..8u64 {
            let data = vec![i as u8; 512 << 10];
            f.write_all_at(&data, i << 19).unwrap();
            let src = crate::journal::HeldSource {
                key: (m.dev(), m.ino()),
                open: &open,
                direct: false,
            };
            j.append_write(b"disk.img", i << 19, &data, Some(src));
        }
        j.sync_through(8).unwrap();
        let Read::Records(r, t) = read_batch(&j, 1, 4096, 1 << 20).unwrap() else {
            panic!("a gap");
        };
        assert_eq!(t, 2, "1 MiB of batch: two 512 KiB writes");
        assert_eq!(r.len(), 2);
        for (i, rec) in r.iter().enumerate() {
            assert!(matches!(rec.op, Op::Write { offset, .. } if offset == (i as u64) << 19));
            assert_eq!(rec.data, vec![i as u8; 512 << 10]);
        }
        j.close().unwrap();
    }

    /// A failed journal sync must not stall replication for the rest of the
    /// run: the failed records' regions are dirty (the resync repairs them),
    /// and shipping goes on past them once they are settled.
    #[test]
    fn a_failed_sync_does_not_stall_shipping() {
        let d = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(d.path(), JournalOptions::default()).unwrap();
        append(&j, 2);
        j.sync_through(2).unwrap();
        j.faults().fail_sync.store(true, Ordering::Release);
        let failed = append(&j, 2);
        assert!(j.sync_through(failed).is_err());
        j.faults().fail_sync.store(false, Ordering::Release);
        let last = append(&j, 2);
        j.sync_through(last).unwrap();
        assert!(j.durable_seq() < failed);
        let mut from = 1;
        while from <= last {
            let t = through(read_batch(&j, from, 100, 1 << 20).unwrap());
            assert!(t >= from, "shipping stalled at {from}");
            from = t + 1;
        }
        let _ = j.close();
    }

    /// The debt survives a reopen (a restart), is private, and goes only
    /// for the peer that was served.
    #[test]
    fn resync_obligations_persist_until_fulfilled() {
        let d = tempfile::tempdir().unwrap();
        let a = Fingerprint([1; 32]);
        let b = Fingerprint([2; 32]);
        let o = Obligations::load(d.path()).unwrap();
        assert!(!o.owes(&a));
        assert!(!d.path().join(OBLIGATIONS_FILE).exists());
        o.owe(&[a, b]).unwrap();
        let m = std::fs::metadata(d.path().join(OBLIGATIONS_FILE)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        drop(o);
        let o = Obligations::load(d.path()).unwrap();
        assert!(o.owes(&a) && o.owes(&b));
        o.fulfil(&a).unwrap();
        drop(o);
        let o = Obligations::load(d.path()).unwrap();
        assert!(!o.owes(&a));
        assert!(o.owes(&b));
        // Owing again what is owed changes nothing; no temp file is left.
        o.owe(&[b]).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        // A damaged file is an error, not a silently forgotten debt.
        std::fs::write(d.path().join(OBLIGATIONS_FILE), "not a fingerprint\n").unwrap();
        assert!(Obligations::load(d.path()).is_err());
    }
}
