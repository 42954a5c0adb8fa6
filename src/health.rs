//! Replication health: normal / warning / critical with a reason, judged from
//! one status snapshot against lag thresholds. The daemon puts its verdict in
//! every status answer (so `replicafs status`, `--json` and the metrics show
//! the same one); `replicafs status --check` judges the same snapshot again
//! when given other thresholds, and maps the verdict to the monitoring-plugin
//! exit codes (0 ok, 1 warning, 2 critical, 3 unknown).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::transport::status::{PeerStatus, Status};

/// The lag thresholds of a verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub warn_lag: Duration,
    pub crit_lag: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            warn_lag: Duration::from_secs(30),
            crit_lag: Duration::from_secs(300),
        }
    }
}

impl Thresholds {
    pub fn new(warn_lag: Duration, crit_lag: Duration) -> Result<Thresholds, String> {
        if warn_lag > crit_lag {
            return Err(format!(
                "the warning lag ({}) is above the critical lag ({})",
                show_duration(warn_lag),
                show_duration(crit_lag)
            ));
        }
        Ok(Thresholds { warn_lag, crit_lag })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    Normal,
    Warning,
    Critical,
}

impl HealthState {
    pub fn name(self) -> &'static str {
        match self {
            HealthState::Normal => "normal",
            HealthState::Warning => "warning",
            HealthState::Critical => "critical",
        }
    }

    /// The monitoring-plugin exit code (3, unknown, is for no verdict at all).
    pub fn exit_code(self) -> u8 {
        match self {
            HealthState::Normal => 0,
            HealthState::Warning => 1,
            HealthState::Critical => 2,
        }
    }

    /// The monitoring-plugin word.
    pub fn plugin_word(self) -> &'static str {
        match self {
            HealthState::Normal => "OK",
            HealthState::Warning => "WARNING",
            HealthState::Critical => "CRITICAL",
        }
    }
}

/// A verdict and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub state: HealthState,
    pub reason: String,
    pub warn_lag_seconds: f64,
    pub crit_lag_seconds: f64,
}

fn peer_name(p: &PeerStatus) -> String {
    if !p.address.is_empty() {
        p.address.clone()
    } else if p.fingerprint.len() >= 16 {
        p.fingerprint[..16].to_string()
    } else {
        "the primary".into()
    }
}

/// Judges a snapshot: the worst of its peers decides.
///
/// - a connected peer in error (e.g. a diverged mirror): critical;
/// - lag above `crit_lag`: critical; above `warn_lag`: warning;
/// - a peer not connected (down, unreachable): warning; its lag then grows
///   with every write, so it turns critical once the thresholds say so;
/// - a replica that refused records: warning;
/// - a primary without peers: normal (nothing to replicate to).
pub fn evaluate(s: &Status, t: &Thresholds) -> Health {
    let mut worst = (HealthState::Normal, String::new());
    let mut note = |state: HealthState, why: String| {
        if state > worst.0 {
            worst = (state, why);
        }
    };
    for p in &s.peers {
        let name = peer_name(p);
        let lag = Duration::from_secs_f64(p.lag_seconds.max(0.0));
        match (&p.error, p.connected) {
            (Some(e), true) => note(HealthState::Critical, format!("peer {name}: error: {e}")),
            (Some(e), false) => note(
                HealthState::Warning,
                format!(
                    "peer {name}: not connected, {} records behind: {e}",
                    p.lag_records
                ),
            ),
            (None, false) => note(
                HealthState::Warning,
                format!(
                    "peer {name}: not connected ({}), {} records behind",
                    p.state, p.lag_records
                ),
            ),
            (None, true) => {}
        }
        if lag > t.crit_lag {
            note(
                HealthState::Critical,
                format!(
                    "peer {name}: lag {:.1} s above {}",
                    p.lag_seconds,
                    show_duration(t.crit_lag)
                ),
            );
        } else if lag > t.warn_lag {
            note(
                HealthState::Warning,
                format!(
                    "peer {name}: lag {:.1} s above {}",
                    p.lag_seconds,
                    show_duration(t.warn_lag)
                ),
            );
        }
        if let Some(r) = p.refused.as_ref().filter(|r| r.count > 0) {
            note(
                HealthState::Warning,
                format!("{} records refused (see refused.log)", r.count),
            );
        }
    }
    let reason = if worst.0 != HealthState::Normal {
        worst.1
    } else if s.peers.is_empty() {
        if s.role == "replica" {
            "no primary has connected yet".into()
        } else {
            "no peers configured".into()
        }
    } else {
        let lag = s.peers.iter().map(|p| p.lag_seconds).fold(0.0, f64::max);
        let behind = s.peers.iter().map(|p| p.lag_records).max().unwrap_or(0);
        let connected = s.peers.iter().filter(|p| p.connected).count();
        format!(
            "{connected} of {} peer{} connected, lag {lag:.1} s, {behind} records",
            s.peers.len(),
            if s.peers.len() == 1 { "" } else { "s" }
        )
    };
    Health {
        state: worst.0,
        reason,
        warn_lag_seconds: t.warn_lag.as_secs_f64(),
        crit_lag_seconds: t.crit_lag.as_secs_f64(),
    }
}

/// The one line of `status --check`, with performance data after the `|`.
pub fn check_line(s: &Status, h: &Health) -> String {
    let lag = s.peers.iter().map(|p| p.lag_seconds).fold(0.0, f64::max);
    let records = s.peers.iter().map(|p| p.lag_records).max().unwrap_or(0);
    let connected = s.peers.iter().filter(|p| p.connected).count();
    format!(
        "REPLICAFS {} - {} {}: {} | lag_seconds={lag:.3}s;{};{} lag_records={records} peers_connected={connected};;;0;{}",
        h.state.plugin_word(),
        s.role,
        h.state.name(),
        h.reason,
        h.warn_lag_seconds,
        h.crit_lag_seconds,
        s.peers.len()
    )
}

/// Parses "500ms", "30s", "5m", "1h", "2d" (a whole number and a unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!(
            "{text:?} is not a duration: want a whole number and a unit, ms, s, m, h or d (e.g. 30s, 5m, 1h)"
        )
    };
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => return Err(bad()),
    }
    .ok_or_else(|| format!("{text:?} is too long a duration"))?;
    Ok(Duration::from_millis(ms))
}

pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_garbage_is_refused() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        for bad in [
            "",
            "s",
            "30",
            "5 min",
            "-5s",
            "1.5s",
            "abc",
            "99999999999999999999d",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("duration"), "{bad}: {e}");
        }
        assert_eq!(show_duration(Duration::from_secs(300)), "5m");
        assert!(Thresholds::new(Duration::from_secs(10), Duration::from_secs(5)).is_err());
    }

    fn peer(connected: bool, lag: f64) -> PeerStatus {
        PeerStatus {
            address: "10.0.0.2:7070".into(),
            connected,
            state: if connected {
                "replicating"
            } else {
                "connecting"
            }
            .into(),
            lag_seconds: lag,
            ..PeerStatus::default()
        }
    }

    #[test]
    fn verdicts() {
        let t = Thresholds::default();
        let mut s = Status {
            role: "primary".into(),
            last_seq: 9,
            peers: vec![peer(true, 0.0)],
        };
        assert_eq!(evaluate(&s, &t).state, HealthState::Normal);
        s.peers[0].lag_seconds = 31.0;
        assert_eq!(evaluate(&s, &t).state, HealthState::Warning);
        s.peers[0].lag_seconds = 301.0;
        let h = evaluate(&s, &t);
        assert_eq!(h.state, HealthState::Critical);
        assert!(h.reason.contains("lag"), "{}", h.reason);
        s.peers = vec![peer(false, 0.0)];
        assert_eq!(evaluate(&s, &t).state, HealthState::Warning);
        s.peers[0].error = Some("cannot connect".into());
        assert_eq!(evaluate(&s, &t).state, HealthState::Warning);
        s.peers[0].lag_seconds = 400.0;
        assert_eq!(evaluate(&s, &t).state, HealthState::Critical);
        s.peers = vec![peer(true, 0.0)];
        s.peers[0].error = Some("diverged".into());
        assert_eq!(evaluate(&s, &t).state, HealthState::Critical);
        s.peers.clear();
        assert_eq!(evaluate(&s, &t).state, HealthState::Normal);
    }
}
