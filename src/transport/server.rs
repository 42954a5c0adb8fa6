//! The replica's QUIC endpoint: accepts pinned primaries and feeds their
//! batches to the [`Replica`]. One primary connection is served at a time; a new
//! one (a reconnect after a partition) supersedes the old.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use super::io::{close_with, read_message, write_message};
use super::status::{PeerStatus, Status};
use super::tls::{self, Fingerprint, Identity};
use crate::protocol::Message;
use crate::protocol::{Decoder, Receiver, ReceiverEvent, state::ReceiverState};
use crate::replica::Replica;
use crate::replica::snapshot::SnapshotApplier;

#[derive(Default)]
struct ConnInfo {
    connected: bool,
    address: String,
    fingerprint: String,
    primary_last: u64,
    wire_bytes: u64,
    payload_bytes: u64,
    error: Option<String>,
    /// (time, payload applied) samples for the throughput.
    rate: Option<(Instant, u64, f64)>,
}

pub struct ReplicaServer {
    replica: Arc<Replica>,
    session: tokio::sync::Mutex<()>,
    generation: watch::Sender<u64>,
    info: Mutex<ConnInfo>,
}

impl ReplicaServer {
    pub fn new(replica: Arc<Replica>) -> Arc<ReplicaServer> {
        Arc::new(ReplicaServer {
            replica,
            session: tokio::sync::Mutex::new(()),
            generation: watch::channel(0).0,
            info: Mutex::new(ConnInfo::default()),
        })
    }

    fn info(&self) -> std::sync::MutexGuard<'_, ConnInfo> {
        self.info.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The replica's view for `replicafs status`.
    pub fn status(&self) -> Status {
        let r = &self.replica;
        let mut i = self.info();
        let received = r.received();
        let applied = r.applied();
        let mirror_applied = r.mirror_applied().max(applied);
        let payload = r.payload_applied();
        let now = Instant::now();
        let throughput = match i.rate {
            Some((t, p, rate)) if now.duration_since(t) < Duration::from_millis(500) => {
                let _ = p;
                rate
            }
            Some((t, p, _)) => {
                let rate = (payload - p) as f64 / now.duration_since(t).as_secs_f64();
                i.rate = Some((now, payload, rate));
                rate
            }
            None => {
                i.rate = Some((now, payload, 0.0));
                0.0
            }
        };
        let error = r.error().or_else(|| i.error.clone());
        let state = if error.is_some() {
            "error"
        } else if !i.connected {
            "paused"
        } else if applied < i.primary_last {
            "catching up"
        } else {
            "replicating"
        };
        Status {
            role: "replica".into(),
            last_seq: i.primary_last,
            peers: vec![PeerStatus {
                address: i.address.clone(),
                fingerprint: i.fingerprint.clone(),
                connected: i.connected,
                state: state.into(),
                error,
                last_sent: i.primary_last,
                received,
                applied,
                mirror_applied: Some(mirror_applied),
                lag_records: i.primary_last.saturating_sub(applied),
                lag_bytes: 0,
                lag_seconds: 0.0,
                throughput_bytes_per_sec: throughput,
                wire_bytes: i.wire_bytes,
                payload_bytes: i.payload_bytes,
                refused: Some(super::status::Refusals {
                    count: r.refusals().count(),
                    last: r.refusals().last(),
                }),
            }],
        }
    }
}

/// Binds the replica's endpoint.
pub fn endpoint(
    listen: SocketAddr,
    id: &Identity,
    trust: Vec<Fingerprint>,
) -> Result<quinn::Endpoint, String> {
    if trust.is_empty() {
        return Err("no trusted primary: give --trust FINGERPRINT (see `replicafs keygen`)".into());
    }
    let cfg = tls::server_config(id, trust)?;
    quinn::Endpoint::server(cfg, listen).map_err(|e| format!("cannot listen on {listen}: {e}"))
}

/// Accepts connections until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, server: Arc<ReplicaServer>) {
    while let Some(incoming) = endpoint.accept().await {
        let s = server.clone();
        tokio::spawn(async move { handle(incoming, s).await });
    }
}

async fn handle(incoming: quinn::Incoming, server: Arc<ReplicaServer>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            warn!(%remote, error = %e, "connection refused (TLS handshake failed; an unpinned certificate?)");
            return;
        }
    };
    let fp = tls::peer_fingerprint(&conn)
        .map(|f| f.to_string())
        .unwrap_or_default();
    info!(%remote, peer_fingerprint = %fp, "primary connected");
    let mut my_gen = 0;
    server.generation.send_modify(|g| {
        *g += 1;
        my_gen = *g;
    });
    let _session = server.session.lock().await;
    let gen_rx = server.generation.subscribe();
    if *gen_rx.borrow() != my_gen {
        close_with(&conn, None, "superseded by a newer connection").await;
        return;
    }
    {
        let mut i = server.info();
        i.connected = true;
        i.address = remote.to_string();
        i.fingerprint = fp.clone();
        i.error = None;
    }
    let mut send_slot = None;
    let result = session(&conn, &server, gen_rx, &mut send_slot).await;
    server.info().connected = false;
    match result {
        Ok(()) => info!(%remote, "primary closed the connection"),
        Err(reason) => {
            warn!(%remote, %reason, "closing the connection");
            server.info().error = Some(reason.clone());
            close_with(&conn, send_slot.as_mut(), &reason).await;
        }
    }
}

async fn session(
    conn: &quinn::Connection,
    server: &Arc<ReplicaServer>,
    mut gen_rx: watch::Receiver<u64>,
    send_slot: &mut Option<quinn::SendStream>,
) -> Result<(), String> {
    let replica = server.replica.clone();
    let (send, mut recv) =
        match tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("no stream: {e}")),
            Err(_) => return Err("no stream opened within 10 s".into()),
        };
    let send = send_slot.insert(send);
    let mut dec = Decoder::new();
    let mut rx = Receiver::new(replica.volume_id(), replica.received(), replica.applied());
    let mut progress = replica.progress();
    let mut snap: Option<Arc<std::sync::Mutex<SnapshotApplier>>> = None;
    gen_rx.borrow_and_update();
    loop {
        tokio::select! {
            m = read_message(&mut recv, &mut dec) => {
                let m = m.map_err(|e| match conn.close_reason() {
                    Some(r) => format!("connection closed: {r}"),
                    None => e,
                })?;
                let Some((m, wire)) = m else { return Ok(()) };
                server.info().wire_bytes += wire as u64;
                match rx.handle(m).map_err(|e| e.to_string())? {
                    ReceiverEvent::Welcome { volume_id, adopt, reply } => {
                        if adopt {
                            replica.adopt(volume_id)?;
                            info!(volume_id = format!("{volume_id:#018x}"), "mirror adopted by this primary");
                        }
                        write_message(send, &reply).await?;
                    }
                    ReceiverEvent::Snapshot(m) => {
                        if let Message::SnapshotBegin { at } = m {
                            info!(at, "receiving a full snapshot");
                            let rep = replica.clone();
                            let sa = keeping_alive(send, &mut rx, tokio::task::spawn_blocking(move || {
                                rep.begin_snapshot()?;
                                rep.snapshot_applier().map_err(|e| format!("snapshot: {e}"))
                            }))
                            .await?
                            .map_err(|e| e.to_string())??;
                            snap = Some(Arc::new(std::sync::Mutex::new(sa)));
                            // The reset is durable: tell the primary, whose
                            // resync obligation now rests with this replica
                            // (a fresh replica always gets a snapshot).
                            let ack = rx.snapshot_reset();
                            write_message(send, &ack).await?;
                            // Keepalives from now until the snapshot is applied.
                            let _ = rx.keepalive_due(Instant::now());
                            continue;
                        }
                        let sa = snap.clone().ok_or("snapshot message outside a snapshot")?;
                        let wire_payload = match &m {
                            Message::SnapshotData { data, .. } => data.len() as u64,
                            _ => 0,
                        };
                        keeping_alive(send, &mut rx, tokio::task::spawn_blocking(move || {
                            let mut sa = sa.lock().unwrap_or_else(|e| e.into_inner());
                            match m {
                                Message::SnapshotEntry { path, kind, mode, uid, gid, size, target, xattrs } => {
                                    sa.entry(&path, kind, mode, uid, gid, size, &target, &xattrs)
                                }
                                Message::SnapshotData { path, offset, data } => sa.data(&path, offset, data),
                                _ => Ok(()),
                            }
                        }))
                        .await?
                        .map_err(|e| e.to_string())?
                        .map_err(|e| format!("applying the snapshot: {e}"))?;
                        server.info().payload_bytes += wire_payload;
                    }
                    ReceiverEvent::SnapshotEnd { at, lenient_through } => {
                        let sa = snap.take().ok_or("snapshot end outside a snapshot")?;
                        let rep = replica.clone();
                        let (entries, bytes, removed) = keeping_alive(send, &mut rx, tokio::task::spawn_blocking(move || {
                            let sa = sa.lock().unwrap_or_else(|e| e.into_inner());
                            let removed = sa.finish().map_err(|e| format!("finishing the snapshot: {e}"))?;
                            rep.finish_snapshot(at, lenient_through)?;
                            Ok::<_, String>((sa.entries, sa.bytes, removed))
                        }))
                        .await?
                        .map_err(|e| e.to_string())??;
                        info!(at, lenient_through, entries, bytes, removed, "snapshot applied");
                        {
                            let mut i = server.info();
                            i.primary_last = i.primary_last.max(lenient_through);
                        }
                        let ack = rx.snapshot_applied(at);
                        write_message(send, &ack).await?;
                    }
                    ReceiverEvent::Store { first, last, records, frames, primary_last } => {
                        let payload: u64 = records.iter().map(|r| r.data.len() as u64).sum();
                        drop(records);
                        let rep = replica.clone();
                        tokio::task::spawn_blocking(move || rep.store(first, last, &frames))
                            .await
                            .map_err(|e| format!("store task failed: {e}"))??;
                        {
                            let mut i = server.info();
                            i.payload_bytes += payload;
                            i.primary_last = i.primary_last.max(primary_last);
                            i.error = None;
                        }
                        let p = progress.borrow_and_update().clone();
                        let ack = rx.stored(last, p.applied, p.error);
                        write_message(send, &ack).await?;
                    }
                }
            }
            r = progress.changed() => {
                if r.is_err() {
                    return Err("replica stopped".into());
                }
                if rx.state() == ReceiverState::Streaming && !rx.in_snapshot() {
                    let p = progress.borrow_and_update().clone();
                    let ack = rx.progress(p.received, p.applied, p.error);
                    write_message(send, &ack).await?;
                }
            }
            _ = gen_rx.changed() => {
                return Err("superseded by a newer connection".into());
            }
            // Between snapshot messages too: the primary may be slow to send
            // while it waits for what this replica has not read yet.
            _ = sleep_until(rx.keepalive_deadline()) => {
                if let Some(k) = rx.keepalive_due(Instant::now()) {
                    write_message(send, &k).await?;
                }
            }
        }
    }
}

/// Runs `work` (a step of applying a snapshot, which acknowledges nothing),
/// sending the keepalives that fall due meanwhile, so that the primary does
/// not take a slow snapshot for a dead peer.
async fn keeping_alive<T>(
    send: &mut quinn::SendStream,
    rx: &mut Receiver,
    work: impl std::future::Future<Output = T>,
) -> Result<T, String> {
    tokio::pin!(work);
    loop {
        if let Some(k) = rx.keepalive_due(Instant::now()) {
            write_message(send, &k).await?;
        }
        let due = rx.keepalive_deadline();
        tokio::select! {
            r = &mut work => return Ok(r),
            _ = sleep_until(due) => {}
        }
    }
}

/// Sleeps until `at`; forever when None.
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
