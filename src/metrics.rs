//! The Prometheus endpoint (`metrics_listen`, `--metrics-listen ADDR`): a
//! small HTTP/1.1 server on its own thread that answers `GET /metrics` with
//! the text exposition format, rendered from one [`Report`] per scrape (the
//! same snapshot `replicafs status` prints).
//!
//! Not exported: recovery points (their count and the oldest one's age) do not
//! exist yet; a snapshot's own progress (files and bytes sent so far) is not
//! tracked by the shipper, so resync progress is the peer's state
//! (`replicafs_peer_state{state="catching up"}`), its lag in records and bytes,
//! and the dirty regions catch-up still has to resend.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::service::Reporter;
use crate::transport::status::{PeerStatus, Report};

/// Parses the address and binds it, with errors that name the fix.
pub fn listen(addr: &str) -> Result<TcpListener, String> {
    let sa: SocketAddr = addr.trim().parse().map_err(|_| {
        format!("metrics address {addr:?} is not IP:PORT (e.g. 127.0.0.1:9108 or [::]:9108)")
    })?;
    TcpListener::bind(sa).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("metrics: cannot listen on {sa}: the port is already in use (pick another metrics_listen / --metrics-listen)")
        } else {
            format!("metrics: cannot listen on {sa}: {e}")
        }
    })
}

/// Serves the metrics on `listener` for as long as the process runs.
pub fn serve(listener: TcpListener, reporter: Arc<Reporter>) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = answer(s, &reporter) {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        })?;
    tracing::info!(%addr, "metrics listening (GET /metrics)");
    Ok(addr)
}

fn answer(mut s: TcpStream, reporter: &Reporter) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("");
    let path = words.next().unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    let (code, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(&reporter.report()),
        ),
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "replicafs: metrics at /metrics\n".to_string(),
        ),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        out.push_str(&body);
    }
    s.write_all(out.as_bytes())?;
    s.flush()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes metric families: HELP, TYPE, then every sample of the family.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = if labels.is_empty() {
                writeln!(self.0, "{name} {}", num(*v))
            } else {
                writeln!(self.0, "{name}{{{labels}}} {}", num(*v))
            };
        }
    }
}

fn num(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15 {
        format!("{}", v as i64)
    } else if v.is_finite() {
        format!("{v}")
    } else {
        "NaN".into()
    }
}

fn peer_labels(p: &PeerStatus) -> String {
    let fp = if p.fingerprint.len() > 16 {
        &p.fingerprint[..16]
    } else {
        &p.fingerprint
    };
    format!(
        "peer=\"{}\",fingerprint=\"{}\"",
        escape(&p.address),
        escape(fp)
    )
}

/// The peer states a stateset series is exported for.
const PEER_STATES: [&str; 5] = [
    "connecting",
    "catching up",
    "replicating",
    "paused",
    "error",
];

/// The Prometheus text form of a report.
pub fn render(r: &Report) -> String {
    let s = &r.status;
    let mut o = Out(String::new());
    o.family(
        "replicafs_info",
        "gauge",
        "The daemon's role and version (always 1).",
        &[(
            format!(
                "role=\"{}\",version=\"{}\"",
                escape(&s.role),
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        )],
    );
    o.family(
        "replicafs_last_seq",
        "gauge",
        "The primary's newest journal seq, as far as this node knows.",
        &[(String::new(), s.last_seq as f64)],
    );
    if let Some(h) = &r.health {
        o.family(
            "replicafs_health_status",
            "gauge",
            "Replication health: 0 normal, 1 warning, 2 critical.",
            &[(String::new(), h.state.exit_code() as f64)],
        );
        o.family(
            "replicafs_health_info",
            "gauge",
            "The health state and its reason (always 1).",
            &[(
                format!(
                    "state=\"{}\",reason=\"{}\"",
                    h.state.name(),
                    escape(&h.reason)
                ),
                1.0,
            )],
        );
        o.family(
            "replicafs_health_lag_threshold_seconds",
            "gauge",
            "The lag above which health is warning or critical.",
            &[
                ("level=\"warning\"".into(), h.warn_lag_seconds),
                ("level=\"critical\"".into(), h.crit_lag_seconds),
            ],
        );
    }
    let per_peer = |f: &dyn Fn(&PeerStatus) -> Option<f64>| -> Vec<(String, f64)> {
        s.peers
            .iter()
            .filter_map(|p| f(p).map(|v| (peer_labels(p), v)))
            .collect()
    };
    o.family(
        "replicafs_peers",
        "gauge",
        "Peers this daemon replicates with (a replica: the primary once it connected).",
        &[(String::new(), s.peers.len() as f64)],
    );
    o.family(
        "replicafs_peer_connected",
        "gauge",
        "1 while the peer is connected.",
        &per_peer(&|p| Some(if p.connected { 1.0 } else { 0.0 })),
    );
    let mut states = Vec::new();
    for p in &s.peers {
        let mut names: Vec<&str> = PEER_STATES.to_vec();
        if !names.contains(&p.state.as_str()) {
            names.push(&p.state);
        }
        for n in names {
            states.push((
                format!("{},state=\"{}\"", peer_labels(p), escape(n)),
                if n == p.state { 1.0 } else { 0.0 },
            ));
        }
    }
    o.family(
        "replicafs_peer_state",
        "gauge",
        "1 for the peer's current state (\"catching up\" while a resync or catch-up runs).",
        &states,
    );
    o.family(
        "replicafs_peer_lag_seconds",
        "gauge",
        "Age of the oldest record the peer has not applied (0 on a replica, which cannot know).",
        &per_peer(&|p| Some(p.lag_seconds)),
    );
    o.family(
        "replicafs_peer_lag_bytes",
        "gauge",
        "Payload bytes sent to the peer and not yet applied.",
        &per_peer(&|p| Some(p.lag_bytes as f64)),
    );
    o.family(
        "replicafs_peer_lag_records",
        "gauge",
        "Records the primary has that the peer has not applied (the resync/catch-up still to do).",
        &per_peer(&|p| Some(p.lag_records as f64)),
    );
    o.family(
        "replicafs_peer_sent_seq",
        "gauge",
        "Highest seq sent to the peer (on a replica: the primary's newest).",
        &per_peer(&|p| Some(p.last_sent as f64)),
    );
    o.family(
        "replicafs_peer_received_seq",
        "gauge",
        "Highest seq the peer stored in its receive log.",
        &per_peer(&|p| Some(p.received as f64)),
    );
    o.family(
        "replicafs_peer_applied_seq",
        "gauge",
        "Highest seq the peer applied durably to its mirror.",
        &per_peer(&|p| Some(p.applied as f64)),
    );
    o.family(
        "replicafs_peer_mirror_applied_seq",
        "gauge",
        "Replica only: highest seq in the mirror, possibly not yet synced.",
        &per_peer(&|p| p.mirror_applied.map(|v| v as f64)),
    );
    o.family(
        "replicafs_peer_throughput_bytes_per_second",
        "gauge",
        "Payload bytes applied per second, recently.",
        &per_peer(&|p| Some(p.throughput_bytes_per_sec)),
    );
    o.family(
        "replicafs_peer_wire_bytes_total",
        "counter",
        "Bytes on the wire (compressed batches and snapshots) since the daemon started.",
        &per_peer(&|p| Some(p.wire_bytes as f64)),
    );
    o.family(
        "replicafs_peer_payload_bytes_total",
        "counter",
        "Payload bytes (uncompressed) replicated since the daemon started.",
        &per_peer(&|p| Some(p.payload_bytes as f64)),
    );
    o.family(
        "replicafs_peer_refused_records_total",
        "counter",
        "Replica only: records refused and applied as no-ops (see refused.log).",
        &per_peer(&|p| p.refused.as_ref().map(|r| r.count as f64)),
    );
    if let Some(j) = &r.journal {
        o.family(
            "replicafs_journal_bytes",
            "gauge",
            "Bytes of the journal's segment files.",
            &[(String::new(), j.bytes as f64)],
        );
        o.family(
            "replicafs_journal_cap_bytes",
            "gauge",
            "journal.cap_bytes: beyond it the oldest records are dropped and their regions marked dirty.",
            &[(String::new(), j.cap_bytes as f64)],
        );
        o.family(
            "replicafs_journal_records",
            "gauge",
            "Records held in the journal.",
            &[(String::new(), j.records as f64)],
        );
        o.family(
            "replicafs_journal_dropped_through_seq",
            "gauge",
            "Records through this seq were dropped unreplicated by the cap.",
            &[(String::new(), j.dropped_through as f64)],
        );
        o.family(
            "replicafs_journal_appended_payload_bytes_total",
            "counter",
            "Payload bytes journaled since the mount started.",
            &[(String::new(), j.payload_bytes_appended as f64)],
        );
        o.family(
            "replicafs_dirty_regions",
            "gauge",
            "Dirty regions catch-up still has to resend from the backing dir.",
            &[(String::new(), j.dirty_regions as f64)],
        );
        o.family(
            "replicafs_dirty_bytes",
            "gauge",
            "Bytes of the ranged dirty regions (whole-file regions are counted in replicafs_dirty_whole_files).",
            &[(String::new(), j.dirty_bytes as f64)],
        );
        o.family(
            "replicafs_dirty_whole_files",
            "gauge",
            "Dirty regions that cover a whole file.",
            &[(String::new(), j.dirty_whole_files as f64)],
        );
    }
    let by_kind = |m: &std::collections::BTreeMap<String, u64>| -> Vec<(String, f64)> {
        m.iter()
            .map(|(k, v)| (format!("kind=\"{}\"", escape(k)), *v as f64))
            .collect()
    };
    o.family(
        "replicafs_errors_total",
        "counter",
        "Errors since the daemon started, by kind: the module that logged them, or \"refused\" (records a replica refused).",
        &by_kind(&r.errors),
    );
    o.family(
        "replicafs_warnings_total",
        "counter",
        "Warnings logged since the daemon started, by the module that logged them.",
        &by_kind(&r.warnings),
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_addresses_are_refused_with_a_message() {
        for bad in ["", "9108", "localhost", "1.2.3.4", "1.2.3.4:99999", "[::1]"] {
            let e = listen(bad).unwrap_err();
            assert!(e.contains("IP:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
