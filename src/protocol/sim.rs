//! Deterministic simulation of a sender and a receiver on a virtual clock:
//! no sockets, no threads, no sleeps. The world below plays the primary's
//! driver (journal reads, snapshots) and the replica's (store, apply, a slow
//! snapshot apply) around the two state machines, with a lossy reconnecting
//! link in between.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::message::{ApplyError, ApplyErrorKind, Message};
use super::state::{
    CloseCode, Gap, GapDecision, Receiver, ReceiverEvent, ReceiverState, Sender, SenderAction,
    SenderConfig, SenderEvent,
};
use crate::journal::record::{Op, Record};

const VID: u64 = 0x77;
const LATENCY: Duration = Duration::from_millis(5);

fn record(seq: u64) -> Record {
    Record {
        seq,
        op: Op::Write {
            path: format!("f{seq}").into_bytes(),
            offset: 0,
        },
        data: vec![seq as u8; 8],
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The replica fails every record with this kind of error.
    Failing(ApplyErrorKind),
    /// The replica reads nothing and says nothing.
    Silent,
    /// The replica repeats its last ack every second, applying nothing.
    Repeating,
}

struct World {
    base: Instant,
    t: Duration,
    config: SenderConfig,
    // The primary.
    journal_last: u64,
    /// Lowest seq the journal holds (below: dropped or trimmed).
    journal_first: u64,
    /// The records below `journal_first` were trimmed, not dropped.
    trimmed: bool,
    owed: bool,
    sender: Sender,
    // The replica, durable part.
    received: u64,
    applied: u64,
    /// Seqs applied since the last snapshot, in order.
    mirror: Vec<u64>,
    receiver: Receiver,
    fault: Option<Fault>,
    keepalives: bool,
    snapshot_apply: Duration,
    /// (done at, seq) of the snapshot being applied.
    applying: Option<(Duration, u64)>,
    last_repeat: Duration,
    // The link.
    to_replica: VecDeque<(Duration, Message)>,
    to_primary: VecDeque<(Duration, Message)>,
    /// How long the replica takes to reset for a snapshot (its applier
    /// finishing a retry first).
    begin_delay: Duration,
    /// Swap the next two acks on their way (a misbehaving link).
    reorder_next_acks: bool,
    // What happened.
    closes: Vec<(Duration, CloseCode)>,
    violations: u32,
    snapshots: Vec<Duration>,
    connections: u32,
}

impl World {
    fn new(journal_last: u64, received: u64, applied: u64) -> World {
        let config = SenderConfig {
            window_bytes: 1000,
            ..SenderConfig::default()
        };
        let mut w = World {
            base: Instant::now(),
            t: Duration::ZERO,
            config: config.clone(),
            journal_last,
            journal_first: 1,
            trimmed: false,
            owed: false,
            sender: Sender::new(VID, config),
            received,
            applied,
            mirror: Vec::new(),
            receiver: Receiver::new(Some(VID), received, applied),
            fault: None,
            keepalives: true,
            snapshot_apply: Duration::from_millis(50),
            applying: None,
            last_repeat: Duration::ZERO,
            to_replica: VecDeque::new(),
            to_primary: VecDeque::new(),
            reorder_next_acks: false,
            begin_delay: Duration::ZERO,
            closes: Vec::new(),
            violations: 0,
            snapshots: Vec::new(),
            connections: 0,
        };
        w.connect();
        w
    }

    fn now(&self) -> Instant {
        self.base + self.t
    }

    /// A new connection: both ends start over from the replica's durable
    /// state; whatever was on the wire is lost.
    fn connect(&mut self) {
        self.connections += 1;
        self.to_replica.clear();
        self.to_primary.clear();
        self.applying = None;
        self.sender = Sender::new(VID, self.config.clone());
        if self.owed {
            self.sender.owe_snapshot();
        }
        self.receiver = Receiver::new(Some(VID), self.received, self.applied);
        let hello = self.sender.hello_at(self.journal_last, self.now());
        self.to_replica.push_back((self.t + LATENCY, hello));
    }

    fn close(&mut self, code: CloseCode) {
        self.closes.push((self.t, code));
        if code == CloseCode::ReplicaAhead {
            self.owed = true;
        }
        self.connect();
    }

    fn reply(&mut self, m: Message) {
        self.to_primary.push_back((self.t + LATENCY, m));
        if self.reorder_next_acks {
            let n = self.to_primary.len();
            if n >= 2
                && matches!(self.to_primary[n - 1].1, Message::Ack { .. })
                && matches!(self.to_primary[n - 2].1, Message::Ack { .. })
            {
                let (a, b) = (
                    self.to_primary[n - 2].1.clone(),
                    self.to_primary[n - 1].1.clone(),
                );
                self.to_primary[n - 2].1 = b;
                self.to_primary[n - 1].1 = a;
                self.reorder_next_acks = false;
            }
        }
    }

    /// The primary's driver at the current time; false once it must wait.
    fn primary_step(&mut self) -> bool {
        while self.to_primary.front().is_some_and(|(at, _)| *at <= self.t) {
            let (_, m) = self.to_primary.pop_front().unwrap();
            match self.sender.handle_at(m, self.now()) {
                Ok(SenderEvent::SnapshotApplied { .. }) => self.owed = false,
                Ok(_) => {}
                Err(_) => {
                    self.violations += 1;
                    self.connect();
                    return true;
                }
            }
        }
        match self.sender.poll(self.now()) {
            Some(SenderAction::Close { code, .. }) => {
                self.close(code);
                true
            }
            Some(SenderAction::SendSnapshot(_)) => {
                let at = self.journal_last;
                self.snapshots.push(self.t);
                assert!(self.snapshots.len() < 1000, "a snapshot storm");
                self.to_replica
                    .push_back((self.t + LATENCY, Message::SnapshotBegin { at }));
                self.to_replica.push_back((
                    self.t + LATENCY,
                    Message::SnapshotEnd {
                        at,
                        lenient_through: at,
                    },
                ));
                self.sender.snapshot_sent_at(at, self.now());
                true
            }
            Some(SenderAction::SendBatch { from }) if from <= self.journal_last => {
                let through = if from < self.journal_first {
                    let gap = Gap {
                        from,
                        to: self.journal_first - 1,
                        trimmed: self.trimmed,
                        namespace_lost: false,
                    };
                    match self.sender.gap(gap) {
                        GapDecision::Skip { to } => to,
                        GapDecision::Snapshot => return true,
                        GapDecision::Close { code, .. } => {
                            self.close(code);
                            return true;
                        }
                    }
                } else {
                    self.journal_last.min(from + 9)
                };
                let records = (from.max(self.journal_first)..=through)
                    .map(record)
                    .collect();
                let m = self.sender.batch(records, through, self.journal_last);
                self.to_replica.push_back((self.t + LATENCY, m));
                self.sender.sent_at(through, 300, self.now());
                true
            }
            _ => false,
        }
    }

    /// The replica's driver at the current time; false once it must wait.
    fn replica_step(&mut self) -> bool {
        if self.fault == Some(Fault::Silent) {
            self.to_replica.clear();
            return false;
        }
        if self.fault == Some(Fault::Repeating)
            && self.receiver.state() == ReceiverState::Streaming
            && self.t >= self.last_repeat + Duration::from_secs(1)
        {
            self.last_repeat = self.t;
            let ack = self.receiver.progress(self.received, self.applied, None);
            self.reply(ack);
            return true;
        }
        if let Some((done, at)) = self.applying {
            if self.keepalives
                && let Some(k) = self.receiver.keepalive_due(self.now())
            {
                self.reply(k);
            }
            if self.t < done {
                return false;
            }
            self.applying = None;
            self.received = at;
            self.applied = at;
            let ack = self.receiver.snapshot_applied(at);
            self.reply(ack);
            return true;
        }
        let Some(at) = self.replica_ready_at() else {
            return false;
        };
        if at > self.t {
            return false;
        }
        let (_, m) = self.to_replica.pop_front().unwrap();
        let ev = match self.receiver.handle(m) {
            Ok(ev) => ev,
            Err(_) => {
                self.violations += 1;
                self.connect();
                return true;
            }
        };
        match ev {
            ReceiverEvent::Welcome { reply, .. } => self.reply(reply),
            ReceiverEvent::Snapshot(Message::SnapshotBegin { .. }) => {
                self.received = 0;
                self.applied = 0;
                self.mirror.clear();
                if let Some(Fault::Failing(ApplyErrorKind::Divergence)) = self.fault {
                    // The snapshot repairs the mirror.
                    self.fault = None;
                }
                let ack = self.receiver.snapshot_reset();
                self.reply(ack);
                // The clock for keepalives starts now.
                let _ = self.receiver.keepalive_due(self.now());
            }
            ReceiverEvent::Snapshot(_) => {}
            ReceiverEvent::SnapshotEnd { at, .. } => {
                self.applying = Some((self.t + self.snapshot_apply, at));
            }
            ReceiverEvent::Store { .. } if self.fault == Some(Fault::Repeating) => {}
            ReceiverEvent::Store { last, records, .. } => {
                self.received = last;
                let error = match self.fault {
                    Some(Fault::Failing(kind)) => {
                        Some(ApplyError::new(kind, format!("applying record {last}")))
                    }
                    _ => {
                        self.mirror.extend(records.iter().map(|r| r.seq));
                        self.applied = last;
                        None
                    }
                };
                let ack = self.receiver.stored(last, self.applied, error);
                self.reply(ack);
            }
        }
        true
    }

    /// When the replica can take the next message.
    fn replica_ready_at(&self) -> Option<Duration> {
        let (at, m) = self.to_replica.front()?;
        Some(match m {
            Message::SnapshotBegin { .. } => *at + self.begin_delay,
            _ => *at,
        })
    }

    fn next_event(&self) -> Option<Duration> {
        let base = self.base;
        let since = |i: Instant| i.saturating_duration_since(base);
        [
            self.sender.next_deadline().map(since),
            self.to_primary.front().map(|(t, _)| *t),
            self.replica_ready_at(),
            self.applying.map(|(t, _)| t),
            self.receiver
                .keepalive_deadline()
                .filter(|_| self.applying.is_some() && self.keepalives)
                .map(since),
            (self.fault == Some(Fault::Repeating))
                .then(|| self.last_repeat + Duration::from_secs(1)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs until nothing is left to do or `until` (virtual time).
    fn run(&mut self, until: Duration) {
        for _ in 0..1_000_000 {
            while self.primary_step() || self.replica_step() {}
            match self.next_event() {
                Some(t) if t <= until => self.t = self.t.max(t),
                _ => return,
            }
        }
        panic!("the simulation does not settle");
    }

    fn converged(&self) -> bool {
        self.applied == self.journal_last && self.sender.applied() == self.journal_last
    }

    fn closed_with(&self, code: CloseCode) -> usize {
        self.closes.iter().filter(|(_, c)| *c == code).count()
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// A fresh replica gets one snapshot, then the stream; nothing times out.
#[test]
fn fresh_replica_gets_one_snapshot_then_the_stream() {
    let mut w = World::new(40, 0, 0);
    w.run(HOUR);
    assert_eq!(w.snapshots.len(), 1);
    w.journal_last = 95;
    w.run(HOUR);
    assert!(w.converged(), "applied {} of {}", w.applied, w.journal_last);
    assert_eq!(w.snapshots.len(), 1);
    assert_eq!(w.mirror, (41..=95).collect::<Vec<_>>());
    assert!(w.closes.is_empty(), "{:?}", w.closes);
    assert_eq!(w.violations, 0);
}

/// Records the journal dropped at its cap (not trimmed) are skipped: the
/// dirty list covers them; no snapshot.
#[test]
fn a_dropped_gap_is_skipped_without_a_snapshot() {
    let mut w = World::new(60, 5, 5);
    w.journal_first = 20;
    w.run(HOUR);
    assert!(w.converged());
    assert!(w.snapshots.is_empty());
    assert_eq!(w.mirror, (20..=60).collect::<Vec<_>>());
}

/// Records trimmed from the journal (overflow past what the peer holds)
/// cannot be replayed: one snapshot brings the peer forward.
#[test]
fn a_trimmed_gap_gets_one_snapshot() {
    let mut w = World::new(60, 5, 5);
    w.journal_first = 20;
    w.trimmed = true;
    w.run(HOUR);
    assert!(w.converged());
    assert_eq!(w.snapshots.len(), 1);
    assert!(w.closes.is_empty());
}

/// A diverged mirror (typed code) gets a snapshot once the grace has
/// passed, and only then.
#[test]
fn divergence_gets_a_snapshot_after_the_grace() {
    let mut w = World::new(30, 10, 10);
    w.fault = Some(Fault::Failing(ApplyErrorKind::Divergence));
    w.run(HOUR);
    assert!(w.converged());
    assert_eq!(w.snapshots.len(), 1);
    assert!(w.snapshots[0] >= w.config.divergence_grace);
    assert!(w.closes.is_empty(), "{:?}", w.closes);
}

/// Other apply errors (disk full, I/O) are waited out: no snapshot, and the
/// replica catches up once it can apply again.
#[test]
fn other_apply_errors_are_waited_out() {
    for kind in [
        ApplyErrorKind::DiskFull,
        ApplyErrorKind::Io,
        ApplyErrorKind::Other,
    ] {
        let mut w = World::new(30, 10, 10);
        w.fault = Some(Fault::Failing(kind));
        w.run(Duration::from_secs(60));
        assert!(w.snapshots.is_empty(), "{kind:?}");
        assert_eq!(w.applied, 10);
        w.fault = None;
        // The replica applies what it holds and reconnects (a restart).
        w.applied = w.received;
        w.connect();
        w.run(HOUR);
        assert!(w.converged(), "{kind:?}");
        assert!(w.snapshots.is_empty(), "{kind:?}");
    }
}

/// A peer that says nothing while records are outstanding is given up at
/// the ack timeout, exactly, on the virtual clock.
#[test]
fn a_silent_peer_times_out() {
    let mut w = World::new(30, 10, 10);
    w.run(HOUR);
    assert!(w.converged());
    w.fault = Some(Fault::Silent);
    w.t += Duration::from_secs(100);
    w.journal_last = 35;
    let sent_at = w.t;
    w.run(sent_at + Duration::from_secs(31));
    assert_eq!(w.closes.len(), 1, "{:?}", w.closes);
    assert_eq!(
        w.closes[0],
        (sent_at + w.config.ack_timeout, CloseCode::AckTimeout)
    );
}

/// Duplicate acks are accepted but are no progress: a peer that repeats
/// its ack without applying still times out.
#[test]
fn duplicate_acks_do_not_keep_a_stuck_peer_alive() {
    let mut w = World::new(30, 10, 10);
    w.fault = Some(Fault::Repeating);
    w.run(Duration::from_secs(31));
    assert_eq!(w.violations, 0);
    assert_eq!(w.closed_with(CloseCode::AckTimeout), 1, "{:?}", w.closes);
}

/// A slow snapshot apply (ten ack timeouts long) sends keepalives, and the
/// primary waits for it: one snapshot, no timeout, then the stream.
#[test]
fn a_slow_snapshot_apply_with_keepalives_does_not_time_out() {
    let mut w = World::new(50, 0, 0);
    w.snapshot_apply = w.config.ack_timeout * 10;
    w.run(HOUR);
    assert!(w.closes.is_empty(), "{:?}", w.closes);
    assert_eq!(w.snapshots.len(), 1);
    w.journal_last = 70;
    w.run(2 * HOUR);
    assert!(w.converged());
    assert_eq!(w.snapshots.len(), 1);
}

/// Without keepalives the same slow apply is cut short by the ack timeout
/// and the snapshot starts over, again and again (the bug keepalives fix).
#[test]
fn a_slow_snapshot_apply_without_keepalives_never_finishes() {
    let mut w = World::new(50, 0, 0);
    w.snapshot_apply = w.config.ack_timeout * 10;
    w.keepalives = false;
    w.run(HOUR);
    assert!(w.closed_with(CloseCode::AckTimeout) > 10);
    assert!(w.snapshots.len() > 10);
    assert_eq!(w.applied, 0);
}

/// An ack that goes backwards (reordered on a misbehaving link) is a
/// protocol violation: the connection closes, and the next one resumes
/// from the replica's durable state.
#[test]
fn a_reordered_ack_closes_the_connection_and_the_next_one_resumes() {
    let mut w = World::new(10, 10, 10);
    w.run(HOUR);
    w.journal_last = 100;
    w.reorder_next_acks = true;
    w.run(HOUR);
    assert_eq!(w.violations, 1);
    assert_eq!(w.connections, 2);
    assert!(w.converged());
    assert!(w.snapshots.is_empty());
    // Every record applied once, in order.
    assert_eq!(w.mirror, (11..=100).collect::<Vec<_>>());
}

/// Reconnects at arbitrary points (what was on the wire is lost) never
/// skip or repeat a record.
#[test]
fn reconnects_lose_nothing_and_repeat_nothing() {
    let mut w = World::new(0, 0, 0);
    w.run(HOUR);
    for n in 1..=20u64 {
        w.journal_last += 7 * n;
        w.run(w.t + LATENCY * (n as u32 % 3));
        w.connect();
    }
    w.run(HOUR);
    assert!(w.converged());
    assert_eq!(w.mirror, (1..=w.journal_last).collect::<Vec<_>>());
    assert_eq!(w.snapshots.len(), 1);
    assert_eq!(w.violations, 0);
}

/// A replica that restarts with an older state (its receive log lost a
/// tail it had acknowledged) is resumed from what it holds now.
#[test]
fn a_peer_restarting_with_an_older_state_is_resumed_from_it() {
    let mut w = World::new(50, 0, 0);
    w.run(HOUR);
    assert!(w.converged());
    w.journal_last = 80;
    w.run(HOUR);
    // Back to seq 60, both received and applied.
    w.received = 60;
    w.applied = 60;
    w.mirror.retain(|&s| s <= 60);
    w.connect();
    w.run(HOUR);
    assert!(w.converged());
    assert_eq!(w.mirror, (51..=80).collect::<Vec<_>>());
    assert_eq!(w.snapshots.len(), 1);
}

/// A replica ahead of the journal (the primary lost its journal tail) is
/// closed with a typed code and owed a snapshot, which the next connection
/// sends.
#[test]
fn a_replica_ahead_of_the_journal_is_owed_a_snapshot() {
    let mut w = World::new(20, 30, 30);
    // One round trip: the welcome says 30.
    w.run(LATENCY * 3);
    assert_eq!(w.closed_with(CloseCode::ReplicaAhead), 1);
    // The journal moves past what the replica holds.
    w.journal_last = 40;
    w.connect();
    w.run(HOUR);
    assert!(w.converged());
    assert_eq!(w.snapshots.len(), 1);
    assert!(!w.owed);
}

/// What a replica ahead of the journal holds counts for nothing here: the
/// journal must not be trimmed on its seqs.
#[test]
fn a_replica_ahead_claims_nothing() {
    let now = Instant::now();
    let mut s = Sender::new(VID, SenderConfig::default());
    s.hello_at(20, now);
    s.handle_at(
        Message::Welcome {
            volume_id: VID,
            received: 30,
            applied: 30,
        },
        now,
    )
    .unwrap();
    assert_eq!((s.received(), s.applied(), s.trim_point()), (0, 0, 0));
    assert!(matches!(
        s.poll(now),
        Some(SenderAction::Close {
            code: CloseCode::ReplicaAhead,
            ..
        })
    ));
}

/// A diverged replica slow to reset for its snapshot keeps reporting the
/// divergence meanwhile (those acks are about its old state): it gets one
/// snapshot, not one per grace period.
#[test]
fn a_diverged_replica_slow_to_reset_gets_one_snapshot() {
    let mut w = World::new(30, 10, 10);
    w.fault = Some(Fault::Failing(ApplyErrorKind::Divergence));
    // Five grace periods (inside the ack timeout).
    w.begin_delay = w.config.divergence_grace * 5;
    w.run(HOUR);
    assert!(w.converged());
    assert_eq!(w.snapshots.len(), 1);
    assert!(w.closes.is_empty(), "{:?}", w.closes);
}
