//! The two ends' state machines, free of I/O: the transport feeds them decoded
//! messages and does what they return.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::frame::FrameError;
use super::message::{ApplyError, ApplyErrorKind, Message, decode_records, encode_records};
use crate::journal::record::{self, Op, Record};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("unexpected {got} message while {state}")]
    Unexpected {
        got: &'static str,
        state: &'static str,
    },
    #[error("records out of order: expected a batch from seq {expected}, got {first}..={last}")]
    OutOfOrder {
        expected: u64,
        first: u64,
        last: u64,
    },
    #[error("bad record in batch: {0}")]
    Record(#[from] record::FrameError),
    #[error("record seq {seq} outside its batch {first}..={last} or not increasing")]
    RecordSeq { seq: u64, first: u64, last: u64 },
    #[error(
        "ack went backwards or beyond what was sent (received {received}, applied {applied}, sent {sent})"
    )]
    BadAck {
        received: u64,
        applied: u64,
        sent: u64,
    },
    #[error(
        "the mirror belongs to another volume ({theirs:#018x}, this primary is {ours:#018x}); give the replica an empty mirror and state dir"
    )]
    VolumeMismatch { ours: u64, theirs: u64 },
    #[error("peer closed the connection: {0}")]
    Remote(String),
}

/// Batching limits and timers of a sender.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Most payload bytes in one batch.
    pub batch_bytes: usize,
    /// Most records in one batch.
    pub batch_records: usize,
    /// Most wire bytes sent and not yet acknowledged as received.
    pub window_bytes: u64,
    /// How long the peer may show no progress (no ack that moves, no
    /// keepalive) while something is outstanding before the connection is
    /// given up.
    pub ack_timeout: Duration,
    /// How long a replica may fail on a diverged mirror before it gets a
    /// snapshot (a failure may be a passing one).
    pub divergence_grace: Duration,
    /// How long the replica may take to answer the hello.
    pub handshake_timeout: Duration,
    /// The sender can take snapshots (it has the backing dir to read).
    pub can_snapshot: bool,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            batch_bytes: 4 << 20,
            batch_records: 4096,
            window_bytes: 64 << 20,
            ack_timeout: Duration::from_secs(30),
            divergence_grace: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(10),
            can_snapshot: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderState {
    AwaitWelcome,
    Streaming,
}

/// Why a sender gives up a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// No welcome within the handshake timeout.
    HandshakeTimeout,
    /// Records or a snapshot outstanding and no progress for the ack timeout.
    AckTimeout,
    /// The replica holds seqs beyond the journal's end (the primary lost its
    /// journal tail): the peer is owed a snapshot, sent on a later connection.
    ReplicaAhead,
    /// The replica needs a snapshot and this sender cannot take one.
    NoSnapshotSource,
}

/// Why a snapshot is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotReason {
    /// The replica holds nothing.
    Fresh,
    /// Owed after an unclean stop of the journal.
    Owed,
    /// The replica's mirror diverged (typed apply error, past the grace).
    Diverged,
    /// The journal cannot bring the peer forward (records trimmed, or
    /// namespace changes lost).
    JournalGap,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderAction {
    /// Take a snapshot, send it, then call [`Sender::snapshot_sent`].
    SendSnapshot(SnapshotReason),
    /// Read the journal from `from` and, once something there is durable,
    /// send it ([`Sender::batch`], [`Sender::sent`]); a gap read there goes
    /// to [`Sender::gap`].
    SendBatch { from: u64 },
    /// Give the connection up.
    Close { code: CloseCode, reason: String },
}

/// What the journal says about records it does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
    /// Trimmed (every peer had applied them... or so it seemed): not covered
    /// by the dirty list.
    pub trimmed: bool,
    /// A catch-up pass met a dropped namespace change.
    pub namespace_lost: bool,
}

/// What to do about a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GapDecision {
    /// Send an empty batch through `to`: the dirty list covers what the
    /// records held (catch-up records follow).
    Skip { to: u64 },
    /// The journal cannot bring the peer forward: a snapshot.
    Snapshot,
    /// Neither is possible.
    Close { code: CloseCode, reason: String },
}

/// How often a replica busy with a snapshot says it is alive: well inside
/// the sender's default ack timeout.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// The primary's end of one connection. Every policy decision (what to send,
/// when to snapshot, when to give up) is made here from inputs and `now`; the
/// driver performs the actions and sleeps until an input or
/// [`Sender::next_deadline`].
#[derive(Debug)]
pub struct Sender {
    pub config: SenderConfig,
    volume_id: u64,
    state: SenderState,
    /// The latest time an input carried.
    now: Option<Instant>,
    started: Option<Instant>,
    /// The journal's last seq when the hello went out.
    hello_last: u64,
    /// Next seq to put in a batch.
    next_seq: u64,
    received: u64,
    applied: u64,
    /// (last seq, wire bytes) of batches not yet acknowledged as received.
    inflight: VecDeque<(u64, u64)>,
    inflight_bytes: u64,
    remote_error: Option<ApplyError>,
    /// A snapshot taken after seq `.0` is on the wire; `.1`: the replica
    /// acknowledged its durable reset (an `Ack` of 0, 0), so later acks are
    /// about the snapshot.
    snapshot: Option<(u64, bool)>,
    /// A snapshot is due, and why.
    snapshot_due: Option<SnapshotReason>,
    /// The peer is owed a snapshot after an unclean stop.
    owed: bool,
    /// Since when the replica reports a diverged mirror.
    diverged_since: Option<Instant>,
    /// When the peer last showed progress, or when something became
    /// outstanding (the ack timeout runs from the later).
    progress_at: Option<Instant>,
    close: Option<(CloseCode, String)>,
}

/// What an incoming message changed, for the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// Handshake done: stream from this seq.
    Resume { from: u64 },
    /// The replica's progress moved (or its error changed).
    Progress,
    /// The replica has applied the snapshot taken after seq `at`, durably.
    SnapshotApplied { at: u64 },
}

impl Sender {
    pub fn new(volume_id: u64, config: SenderConfig) -> Sender {
        Sender {
            config,
            volume_id,
            state: SenderState::AwaitWelcome,
            now: None,
            started: None,
            hello_last: u64::MAX,
            next_seq: 1,
            received: 0,
            applied: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            remote_error: None,
            snapshot: None,
            snapshot_due: None,
            owed: false,
            diverged_since: None,
            progress_at: None,
            close: None,
        }
    }

    /// The first message, at `now`, with the journal's last seq.
    pub fn hello_at(&mut self, last_seq: u64, now: Instant) -> Message {
        self.tick(now);
        self.started = Some(now);
        self.hello_last = last_seq;
        self.hello(last_seq)
    }

    pub fn hello(&self, last_seq: u64) -> Message {
        Message::Hello {
            volume_id: self.volume_id,
            last_seq,
        }
    }

    /// The peer is owed a snapshot (after an unclean stop): it gets one once
    /// streaming, if this sender can take one.
    pub fn owe_snapshot(&mut self) {
        self.owed = true;
    }

    pub fn state(&self) -> SenderState {
        self.state
    }
    pub fn received(&self) -> u64 {
        self.received
    }
    pub fn applied(&self) -> u64 {
        self.applied
    }
    pub fn sent_through(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }
    pub fn remote_error(&self) -> Option<&ApplyError> {
        self.remote_error.as_ref()
    }
    /// The seq every record through which the peer has applied durably: what
    /// the journal may trim for this peer.
    pub fn trim_point(&self) -> u64 {
        self.applied
    }

    fn tick(&mut self, now: Instant) {
        // The clock never goes back, whatever a caller passes.
        self.now = Some(self.now.map_or(now, |n| n.max(now)));
    }

    fn clock(&self) -> Option<Instant> {
        self.now
    }

    /// Something (records, a snapshot) waits for the peer.
    fn outstanding(&self) -> bool {
        self.sent_through() > self.received || self.snapshot.is_some()
    }

    fn heard(&mut self) {
        self.progress_at = self.clock();
    }

    /// [`Sender::handle_at`] at the latest time an input carried.
    pub fn handle(&mut self, msg: Message) -> Result<SenderEvent, ProtocolError> {
        self.handle_inner(msg)
    }

    /// An incoming message, at `now`.
    pub fn handle_at(&mut self, msg: Message, now: Instant) -> Result<SenderEvent, ProtocolError> {
        self.tick(now);
        self.handle_inner(msg)
    }

    fn handle_inner(&mut self, msg: Message) -> Result<SenderEvent, ProtocolError> {
        match (self.state, msg) {
            (
                SenderState::AwaitWelcome,
                Message::Welcome {
                    volume_id,
                    received,
                    applied,
                },
            ) => {
                if volume_id != self.volume_id {
                    return Err(ProtocolError::VolumeMismatch {
                        ours: self.volume_id,
                        theirs: volume_id,
                    });
                }
                if applied > received || received == u64::MAX {
                    return Err(ProtocolError::BadAck {
                        received,
                        applied,
                        sent: received,
                    });
                }
                self.state = SenderState::Streaming;
                self.heard();
                if received > self.hello_last {
                    // What it holds is not this journal's: nothing of it
                    // counts (the journal must not be trimmed on it).
                    // Its seqs above the journal's end will name other
                    // content here: it is owed a snapshot (sent once the
                    // journal is past what it holds), never a resume that
                    // would skip them.
                    self.close = Some((
                        CloseCode::ReplicaAhead,
                        format!(
                            "the replica has received through seq {received} but this primary's journal ends at {}: the primary lost its journal tail; the replica needs a full resync",
                            self.hello_last
                        ),
                    ));
                    return Ok(SenderEvent::Progress);
                }
                self.received = received;
                self.applied = applied;
                self.next_seq = received + 1;
                if received == 0 && applied == 0 {
                    self.snapshot_due = Some(SnapshotReason::Fresh);
                } else if self.owed && self.config.can_snapshot {
                    self.snapshot_due = Some(SnapshotReason::Owed);
                }
                Ok(SenderEvent::Resume {
                    from: self.next_seq,
                })
            }
            (SenderState::Streaming, Message::Keepalive) => {
                self.heard();
                Ok(SenderEvent::Progress)
            }
            (
                SenderState::Streaming,
                Message::Ack {
                    received,
                    applied,
                    error,
                },
            ) if matches!(self.snapshot, Some((_, false))) => {
                // Until the replica says it has reset for the snapshot, its
                // acks are about what it held before: they move nothing.
                if received == 0 && applied == 0 {
                    self.snapshot = self.snapshot.map(|(at, _)| (at, true));
                    self.received = 0;
                    self.applied = 0;
                    self.inflight.clear();
                    self.inflight_bytes = 0;
                    self.set_remote_error(error);
                    self.heard();
                }
                Ok(SenderEvent::Progress)
            }
            (
                SenderState::Streaming,
                Message::Ack {
                    received,
                    applied,
                    error,
                },
            ) => {
                let sent = self.sent_through();
                if received < self.received
                    || applied < self.applied
                    || received > sent
                    || applied > received
                {
                    return Err(ProtocolError::BadAck {
                        received,
                        applied,
                        sent,
                    });
                }
                // An ack that moves is progress; a repeated one is not.
                if received > self.received || applied > self.applied {
                    self.heard();
                }
                self.received = received;
                self.applied = applied;
                self.set_remote_error(error);
                while let Some(&(last, bytes)) = self.inflight.front() {
                    if last > received {
                        break;
                    }
                    self.inflight.pop_front();
                    self.inflight_bytes -= bytes;
                }
                if let Some((at, true)) = self.snapshot
                    && applied >= at
                {
                    self.snapshot = None;
                    self.owed = false;
                    return Ok(SenderEvent::SnapshotApplied { at });
                }
                Ok(SenderEvent::Progress)
            }
            (_, Message::Goodbye { reason }) => Err(ProtocolError::Remote(reason)),
            (state, m) => Err(ProtocolError::Unexpected {
                got: m.name(),
                state: match state {
                    SenderState::AwaitWelcome => "waiting for welcome",
                    SenderState::Streaming => "streaming",
                },
            }),
        }
    }

    fn set_remote_error(&mut self, error: Option<ApplyError>) {
        let diverged = error
            .as_ref()
            .is_some_and(|e| e.kind == ApplyErrorKind::Divergence);
        if !diverged {
            self.diverged_since = None;
        } else if self.diverged_since.is_none() {
            self.diverged_since = self.clock();
        }
        self.remote_error = error;
    }

    /// What to do at `now`; None: wait for an input or [`Sender::next_deadline`].
    pub fn poll(&mut self, now: Instant) -> Option<SenderAction> {
        self.tick(now);
        let now = self.now?;
        if let Some((code, reason)) = self.close.clone() {
            return Some(SenderAction::Close { code, reason });
        }
        if self.state == SenderState::AwaitWelcome {
            let start = *self.started.get_or_insert(now);
            if now >= start + self.config.handshake_timeout {
                return Some(SenderAction::Close {
                    code: CloseCode::HandshakeTimeout,
                    reason: format!(
                        "no welcome within {} s",
                        self.config.handshake_timeout.as_secs()
                    ),
                });
            }
            return None;
        }
        if let Some(reason) = self.snapshot_due {
            if !self.config.can_snapshot {
                return Some(SenderAction::Close {
                    code: CloseCode::NoSnapshotSource,
                    reason:
                        "the replica needs a snapshot, but this sender has no backing dir to read"
                            .into(),
                });
            }
            return Some(SenderAction::SendSnapshot(reason));
        }
        // A replica that keeps failing on a record because its mirror does
        // not hold what the record expects has diverged (a namespace change
        // the primary lost in a crash): a snapshot, unless one is on its way
        // already. Other errors (disk full …) are waited out.
        if let Some(since) = self.diverged_since
            && self.snapshot.is_none()
            && self.config.can_snapshot
            && now >= since + self.config.divergence_grace
        {
            self.snapshot_due = Some(SnapshotReason::Diverged);
            return Some(SenderAction::SendSnapshot(SnapshotReason::Diverged));
        }
        if let Some(at) = self.ack_deadline()
            && now >= at
        {
            return Some(SenderAction::Close {
                code: CloseCode::AckTimeout,
                reason: format!(
                    "peer acknowledged nothing for {} s (no progress, no keepalive) with records {}..={} outstanding",
                    self.config.ack_timeout.as_secs(),
                    self.received + 1,
                    self.sent_through()
                ),
            });
        }
        self.wants().map(|from| SenderAction::SendBatch { from })
    }

    fn ack_deadline(&self) -> Option<Instant> {
        if !self.outstanding() {
            return None;
        }
        self.progress_at.map(|t| t + self.config.ack_timeout)
    }

    /// When [`Sender::poll`] may have something new to say without any input.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            SenderState::AwaitWelcome => self.started.map(|s| s + self.config.handshake_timeout),
            SenderState::Streaming => {
                let diverge = self
                    .diverged_since
                    .filter(|_| self.snapshot.is_none() && self.config.can_snapshot)
                    .map(|s| s + self.config.divergence_grace);
                match (self.ack_deadline(), diverge) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    /// The seq the next batch starts at, if the window lets another batch out.
    pub fn wants(&self) -> Option<u64> {
        (self.state == SenderState::Streaming && self.inflight_bytes < self.config.window_bytes)
            .then_some(self.next_seq)
    }

    /// The journal does not hold `gap.from..=gap.to` (`gap.from` is the seq
    /// [`Sender::wants`] gave).
    pub fn gap(&mut self, gap: Gap) -> GapDecision {
        if !self.config.can_snapshot {
            return GapDecision::Close {
                code: CloseCode::NoSnapshotSource,
                reason: format!(
                    "the journal no longer holds records {}..={} and there is no catch-up source",
                    gap.from, gap.to
                ),
            };
        }
        if gap.trimmed || gap.namespace_lost {
            self.snapshot_due = Some(SnapshotReason::JournalGap);
            return GapDecision::Snapshot;
        }
        // Dropped (cap) or lost records: their regions were marked dirty
        // before they left the index, and catch-up passes journal those
        // regions again, necessarily after the gap. So the gap can be skipped
        // now; the mirror is consistent again once the dirty list is worked
        // off.
        GapDecision::Skip { to: gap.to }
    }

    /// A batch of `records` (seqs from [`Sender::wants`] through `through`, some
    /// possibly absent), overwrites coalesced.
    pub fn batch(&mut self, records: Vec<Record>, through: u64, primary_last: u64) -> Message {
        let first = self.next_seq;
        let records = coalesce(records);
        self.next_seq = through + 1;
        Message::Batch {
            first,
            last: through,
            primary_last,
            frames: encode_records(&records),
        }
    }

    /// A fresh replica (nothing received, nothing applied) gets a snapshot
    /// before the stream.
    pub fn needs_snapshot(&self) -> bool {
        self.snapshot_due.is_some()
    }

    /// [`Sender::snapshot_sent_at`] at the latest time an input carried.
    pub fn snapshot_sent(&mut self, at: u64) {
        let now = self.now;
        self.snapshot_sent_inner(at, now);
    }

    /// The snapshot taken after seq `at` is on the wire: stream from `at + 1`.
    /// Acks count again once the replica acknowledged its reset; the one that
    /// reaches `at` then yields [`SenderEvent::SnapshotApplied`].
    pub fn snapshot_sent_at(&mut self, at: u64, now: Instant) {
        self.tick(now);
        let now = self.now;
        self.snapshot_sent_inner(at, now);
    }

    fn snapshot_sent_inner(&mut self, at: u64, now: Option<Instant>) {
        self.next_seq = at + 1;
        self.snapshot = Some((at, false));
        self.snapshot_due = None;
        self.diverged_since = None;
        // The replica applies what was sent from here on.
        self.progress_at = now;
    }

    /// The transport put a batch ending at `last` on the wire (`wire_bytes` long).
    pub fn sent(&mut self, last: u64, wire_bytes: u64) {
        let now = self.now;
        self.sent_inner(last, wire_bytes, now);
    }

    pub fn sent_at(&mut self, last: u64, wire_bytes: u64, now: Instant) {
        self.tick(now);
        let now = self.now;
        self.sent_inner(last, wire_bytes, now);
    }

    fn sent_inner(&mut self, last: u64, wire_bytes: u64, now: Option<Instant>) {
        // The ack timeout starts when something becomes outstanding, not at
        // the last progress before an idle spell.
        if (self.inflight.is_empty() && self.snapshot.is_none()) || self.progress_at.is_none() {
            self.progress_at = now;
        }
        self.inflight.push_back((last, wire_bytes));
        self.inflight_bytes += wire_bytes;
    }
}

/// Drops writes whose bytes a later write of the same path in the same run of
/// data records overwrites entirely. A namespace record ends a run (paths may
/// change meaning across it). The batch is applied as a unit, so the replica
/// never rests in a state between the dropped write and the one that covers it.
pub fn coalesce(records: Vec<Record>) -> Vec<Record> {
    let mut keep = vec![true; records.len()];
    // Per path, the ranges later writes of the current run cover.
    let mut later: std::collections::HashMap<&[u8], Vec<(u64, u64)>> = Default::default();
    for (i, r) in records.iter().enumerate().rev() {
        if r.op.is_namespace() {
            later.clear();
            continue;
        }
        if let Op::Write { path, offset } = &r.op {
            let end = offset.saturating_add(r.data.len() as u64);
            let ranges = later.entry(path.as_slice()).or_default();
            if !r.data.is_empty() && ranges.iter().any(|&(s, e)| s <= *offset && end <= e) {
                keep[i] = false;
            } else if ranges.len() < 64 {
                ranges.push((*offset, end));
            }
        }
    }
    records
        .into_iter()
        .zip(keep)
        .filter_map(|(r, k)| k.then_some(r))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverState {
    AwaitHello,
    Streaming,
}

/// What the transport must do after a message reached the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// Persist `volume_id` (when `adopt`) and send the reply.
    Welcome {
        volume_id: u64,
        adopt: bool,
        reply: Message,
    },
    /// A snapshot message to apply to the mirror (begin, entry, data).
    Snapshot(Message),
    /// The snapshot is complete: the mirror is at `at`, tolerant through
    /// `lenient_through`; acknowledge with [`Receiver::progress`].
    SnapshotEnd { at: u64, lenient_through: u64 },
    /// Store these records durably, then call [`Receiver::stored`].
    Store {
        first: u64,
        last: u64,
        records: Vec<Record>,
        /// The batch's journal frames as received (checked), for the log.
        frames: Vec<u8>,
        primary_last: u64,
    },
}

/// The replica's end of one connection.
#[derive(Debug)]
pub struct Receiver {
    state: ReceiverState,
    volume_id: Option<u64>,
    /// Next seq a batch must start at.
    expected: u64,
    received: u64,
    applied: u64,
    in_snapshot: bool,
    /// From a snapshot's begin until the driver says it is applied (its
    /// end message is followed by the longest step, finishing it).
    applying_snapshot: bool,
    /// When the next keepalive is due while applying a snapshot.
    keepalive_at: Option<Instant>,
}

impl Receiver {
    /// `volume_id` is the mirror's owner (None for a fresh mirror).
    pub fn new(volume_id: Option<u64>, received: u64, applied: u64) -> Receiver {
        Receiver {
            state: ReceiverState::AwaitHello,
            volume_id,
            expected: received + 1,
            received,
            applied,
            in_snapshot: false,
            applying_snapshot: false,
            keepalive_at: None,
        }
    }

    pub fn state(&self) -> ReceiverState {
        self.state
    }

    /// Between a snapshot's begin and end (progress acks would be stale).
    pub fn in_snapshot(&self) -> bool {
        self.in_snapshot
    }

    /// While a snapshot is applied there is no progress to acknowledge: a
    /// keepalive every [`KEEPALIVE_INTERVAL`] tells the primary the replica
    /// is working, so its ack timeout does not cut a slow snapshot short.
    pub fn keepalive_due(&mut self, now: Instant) -> Option<Message> {
        if !self.applying_snapshot {
            self.keepalive_at = None;
            return None;
        }
        match self.keepalive_at {
            Some(at) if now < at => None,
            Some(_) => {
                self.keepalive_at = Some(now + KEEPALIVE_INTERVAL);
                Some(Message::Keepalive)
            }
            None => {
                self.keepalive_at = Some(now + KEEPALIVE_INTERVAL);
                None
            }
        }
    }

    /// When [`Receiver::keepalive_due`] has one to send (None: not in a
    /// snapshot, or the clock has not started).
    pub fn keepalive_deadline(&self) -> Option<Instant> {
        self.keepalive_at.filter(|_| self.applying_snapshot)
    }

    /// The snapshot that ended at `at` is applied and durable: the ack to
    /// send (keepalives stop).
    pub fn snapshot_applied(&mut self, at: u64) -> Message {
        self.applying_snapshot = false;
        self.keepalive_at = None;
        self.progress(at, at, None)
    }

    /// The replica has durably reset for the snapshot that began: the ack
    /// that tells the primary (received and applied 0; it sends nothing else
    /// until the snapshot's end).
    pub fn snapshot_reset(&mut self) -> Message {
        self.received = 0;
        self.applied = 0;
        Message::Ack {
            received: 0,
            applied: 0,
            error: None,
        }
    }

    pub fn handle(&mut self, msg: Message) -> Result<ReceiverEvent, ProtocolError> {
        match (self.state, msg) {
            (ReceiverState::AwaitHello, Message::Hello { volume_id, .. }) => {
                let fresh = self.received == 0 && self.applied == 0;
                let adopt = match self.volume_id {
                    Some(v) if v == volume_id => false,
                    Some(v) if !fresh => {
                        return Err(ProtocolError::VolumeMismatch {
                            ours: v,
                            theirs: volume_id,
                        });
                    }
                    _ => true,
                };
                self.volume_id = Some(volume_id);
                self.state = ReceiverState::Streaming;
                Ok(ReceiverEvent::Welcome {
                    volume_id,
                    adopt,
                    reply: Message::Welcome {
                        volume_id,
                        received: self.received,
                        applied: self.applied,
                    },
                })
            }
            (ReceiverState::Streaming, m @ Message::SnapshotBegin { at })
                if !self.in_snapshot && at >= self.expected - 1 && at < u64::MAX =>
            {
                self.in_snapshot = true;
                self.applying_snapshot = true;
                Ok(ReceiverEvent::Snapshot(m))
            }
            (
                ReceiverState::Streaming,
                m @ (Message::SnapshotEntry { .. } | Message::SnapshotData { .. }),
            ) if self.in_snapshot => Ok(ReceiverEvent::Snapshot(m)),
            (
                ReceiverState::Streaming,
                Message::SnapshotEnd {
                    at,
                    lenient_through,
                },
            ) if self.in_snapshot && lenient_through >= at && at < u64::MAX => {
                self.in_snapshot = false;
                self.expected = at + 1;
                self.received = at;
                self.applied = at;
                Ok(ReceiverEvent::SnapshotEnd {
                    at,
                    lenient_through,
                })
            }
            (
                ReceiverState::Streaming,
                Message::Batch {
                    first,
                    last,
                    primary_last,
                    frames,
                },
            ) if !self.in_snapshot => {
                if first != self.expected || last < first || last == u64::MAX {
                    return Err(ProtocolError::OutOfOrder {
                        expected: self.expected,
                        first,
                        last,
                    });
                }
                let records = decode_records(&frames)?;
                let mut prev = first - 1;
                for r in &records {
                    if r.seq <= prev || r.seq > last {
                        return Err(ProtocolError::RecordSeq {
                            seq: r.seq,
                            first,
                            last,
                        });
                    }
                    prev = r.seq;
                }
                self.expected = last + 1;
                Ok(ReceiverEvent::Store {
                    first,
                    last,
                    records,
                    frames,
                    primary_last,
                })
            }
            (_, Message::Goodbye { reason }) => Err(ProtocolError::Remote(reason)),
            (state, m) => Err(ProtocolError::Unexpected {
                got: m.name(),
                state: match state {
                    ReceiverState::AwaitHello => "waiting for hello",
                    ReceiverState::Streaming => "streaming",
                },
            }),
        }
    }

    /// The records through `last` are durable: the acknowledgement to send.
    pub fn stored(&mut self, last: u64, applied: u64, error: Option<ApplyError>) -> Message {
        self.progress(last, applied, error)
    }

    /// Progress to report (monotonic: never goes back).
    pub fn progress(&mut self, received: u64, applied: u64, error: Option<ApplyError>) -> Message {
        self.received = self.received.max(received);
        self.applied = self.applied.max(applied).min(self.received);
        Message::Ack {
            received: self.received,
            applied: self.applied,
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(received: u64, applied: u64) -> Message {
        Message::Ack {
            received,
            applied,
            error: None,
        }
    }

    fn streaming(received: u64, applied: u64) -> (Sender, Receiver) {
        let mut s = Sender::new(7, SenderConfig::default());
        let mut r = Receiver::new(Some(7), received, applied);
        let ReceiverEvent::Welcome { reply, .. } = r.handle(s.hello(20)).unwrap() else {
            panic!("no welcome");
        };
        s.handle(reply).unwrap();
        (s, r)
    }

    /// A snapshot counts as applied only after the replica acknowledged its
    /// reset and then the snapshot's seq: an earlier ack that happens to
    /// reach the same seq (sent before the replica saw the snapshot) does not.
    #[test]
    fn snapshot_applied_only_after_the_reset_and_the_end() {
        let (mut s, mut r) = streaming(9, 5);
        // The replica applies what it had while the primary sends a snapshot
        // taken after seq 9: that ack is stale.
        s.snapshot_sent(9);
        let stale = r.progress(9, 9, None);
        assert_eq!(s.handle(stale).unwrap(), SenderEvent::Progress);
        assert_eq!(s.applied(), 5);
        // The replica processes SnapshotBegin and resets durably.
        assert!(matches!(
            r.handle(Message::SnapshotBegin { at: 9 }),
            Ok(ReceiverEvent::Snapshot(_))
        ));
        assert!(r.in_snapshot());
        assert_eq!(s.handle(r.snapshot_reset()).unwrap(), SenderEvent::Progress);
        assert_eq!((s.received(), s.applied()), (0, 0));
        r.handle(Message::SnapshotEnd {
            at: 9,
            lenient_through: 11,
        })
        .unwrap();
        assert!(!r.in_snapshot());
        assert_eq!(
            s.handle(r.progress(9, 9, None)).unwrap(),
            SenderEvent::SnapshotApplied { at: 9 }
        );
        assert_eq!((s.received(), s.applied()), (9, 9));
        // Once only; the stream goes on from 10 and acks are checked again.
        assert_eq!(s.wants(), Some(10));
        s.batch(vec![], 10, 20);
        s.sent(10, 10);
        assert_eq!(s.handle(ack(10, 10)).unwrap(), SenderEvent::Progress);
        assert!(s.handle(ack(11, 10)).is_err());
    }

    /// A fresh replica's reset ack looks like its welcome; it still counts.
    #[test]
    fn fresh_replica_snapshot_is_applied_after_its_reset() {
        let (mut s, mut r) = streaming(0, 0);
        assert!(s.needs_snapshot());
        s.snapshot_sent(3);
        // An ack of the snapshot's seq before the reset was seen is refused
        // as applied.
        assert_eq!(s.handle(ack(3, 3)).unwrap(), SenderEvent::Progress);
        assert_eq!(s.applied(), 0);
        r.handle(Message::SnapshotBegin { at: 3 }).unwrap();
        s.handle(r.snapshot_reset()).unwrap();
        r.handle(Message::SnapshotEnd {
            at: 3,
            lenient_through: 3,
        })
        .unwrap();
        assert_eq!(
            s.handle(r.progress(3, 3, None)).unwrap(),
            SenderEvent::SnapshotApplied { at: 3 }
        );
    }
}
