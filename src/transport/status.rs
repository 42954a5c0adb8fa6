//! Live status over a Unix socket in the state directory (`status.sock`):
//! a client connects and reads one JSON document; `replicafs status` prints it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::warn;

pub const SOCKET_NAME: &str = "status.sock";

/// One peer's replication, as either end sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    /// Address (primary side) or remote address (replica side).
    pub address: String,
    pub fingerprint: String,
    pub connected: bool,
    /// "connecting", "catching up", "replicating", "paused", "error".
    pub state: String,
    pub error: Option<String>,
    pub last_sent: u64,
    pub received: u64,
    /// Durably applied: on a replica, the mirror is synced and `replica.state`
    /// says so; this is what the replica acknowledges and the primary trims on.
    pub applied: u64,
    /// Replica side only: how far the mirror has been brought, possibly not
    /// yet durable (at least `applied`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_applied: Option<u64>,
    pub lag_records: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    /// Payload bytes applied per second, recently.
    pub throughput_bytes_per_sec: f64,
    pub wire_bytes: u64,
    pub payload_bytes: u64,
    /// Replica side only: records and snapshot entries refused (applied as
    /// no-ops; see `STATE/refused.log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusals>,
}

/// What a replica refused since it started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Refusals {
    pub count: u64,
    /// The latest one: seq, op, path and reason.
    pub last: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// "primary" or "replica".
    pub role: String,
    /// The primary's newest seq (as far as this node knows).
    pub last_seq: u64,
    pub peers: Vec<PeerStatus>,
}

/// What a daemon answers on its status socket: the replication status, its
/// journal, the problems it logged and its health verdict. One such snapshot
/// feeds `replicafs status` (text, `--json`, `--check`) and the metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    #[serde(flatten)]
    pub status: Status,
    /// The mount's journal (a primary with the journal on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<JournalStatus>,
    /// Errors logged since the daemon started, by module ("journal",
    /// "transport", ...); on a replica also "refused" (records refused).
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    /// Warnings logged since the daemon started, by module.
    #[serde(default)]
    pub warnings: BTreeMap<String, u64>,
    /// Judged by the daemon against its `[health]` thresholds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::health::Health>,
}

/// A primary's journal, as the metrics and `status` show it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JournalStatus {
    /// Bytes of the segment files on disk.
    pub bytes: u64,
    /// `journal.cap_bytes`.
    pub cap_bytes: u64,
    pub records: u64,
    pub oldest_seq: Option<u64>,
    /// Records dropped unreplicated by the cap, through this seq.
    pub dropped_through: u64,
    /// Dirty regions waiting for catch-up (re-read from the backing dir).
    pub dirty_regions: u64,
    /// Bytes of the ranged dirty regions.
    pub dirty_bytes: u64,
    /// Dirty regions that cover a whole file (their size is not counted above).
    pub dirty_whole_files: u64,
    /// Payload bytes appended since the mount started.
    pub payload_bytes_appended: u64,
}

/// Serves `status()` on `state_dir/status.sock` until dropped.
pub struct StatusServer {
    path: PathBuf,
    /// (dev, ino) of the socket file we bound, so that drop removes only ours.
    socket_id: Option<(u64, u64)>,
    stop: Arc<AtomicBool>,
    /// Dropping it wakes the server thread; no path involved, so a state dir
    /// renamed or removed meanwhile cannot make shutdown hang.
    wake: Option<UnixStream>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusServer {
    pub fn start<T: Serialize>(
        state_dir: &Path,
        status: impl Fn() -> T + Send + 'static,
    ) -> std::io::Result<StatusServer> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let path = state_dir.join(SOCKET_NAME);
        if UnixStream::connect(&path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is served by a running daemon: use another --state-dir",
                    path.display()
                ),
            ));
        }
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        // Owner only: status names peers and their fingerprints.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let socket_id = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let (wake, woken) = UnixStream::pair()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || {
                let mut fds = [
                    libc::pollfd {
                        fd: listener.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: woken.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                while !stop2.load(Ordering::Acquire) {
                    // SAFETY: two valid pollfds that outlive the call.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                    if n < 0 {
                        let e = std::io::Error::last_os_error();
                        if e.kind() != std::io::ErrorKind::Interrupted {
                            warn!(error = %e, "status socket poll failed");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        continue;
                    }
                    if fds[1].revents != 0 || stop2.load(Ordering::Acquire) {
                        break;
                    }
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                            let body = serde_json::to_vec(&status()).unwrap_or_default();
                            let _ = s.write_all(&body);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            warn!(error = %e, "status socket accept failed");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })?;
        Ok(StatusServer {
            path,
            socket_id,
            stop,
            wake: Some(wake),
            thread: Some(thread),
        })
    }
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        self.stop.store(true, Ordering::Release);
        // Closing our end makes the thread's end readable: poll returns.
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.socket_id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Asks the daemon running on `state_dir` for its status.
pub fn query(state_dir: &Path) -> Result<Status, String> {
    query_report(state_dir).map(|r| r.status)
}

/// Asks the daemon running on `state_dir` for its whole report.
pub fn query_report(state_dir: &Path) -> Result<Report, String> {
    let path = state_dir.join(SOCKET_NAME);
    let mut s = UnixStream::connect(&path).map_err(|e| {
        format!(
            "no daemon answers on {}: {e} (is `replicafs mount` or `replicafs replica` running with this --state-dir?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    serde_json::from_slice(&buf).map_err(|e| format!("bad status answer: {e}"))
}

fn human_bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

/// The human form of a report: health, the status, the journal.
pub fn render_report(r: &Report) -> String {
    let mut out = String::new();
    if let Some(h) = &r.health {
        out.push_str(&format!("health {}: {}\n", h.state.name(), h.reason));
    }
    out.push_str(&render(&r.status));
    if let Some(j) = &r.journal {
        out.push_str(&format!(
            "journal {} of {} cap, {} records, {} dirty regions ({} + {} whole files)\n",
            human_bytes(j.bytes as f64),
            human_bytes(j.cap_bytes as f64),
            j.records,
            j.dirty_regions,
            human_bytes(j.dirty_bytes as f64),
            j.dirty_whole_files
        ));
    }
    for (what, counts) in [("errors", &r.errors), ("warnings", &r.warnings)] {
        let nonzero: Vec<String> = counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if !nonzero.is_empty() {
            out.push_str(&format!("{what} logged: {}\n", nonzero.join(", ")));
        }
    }
    out
}

/// The human form of a status.
pub fn render(s: &Status) -> String {
    let mut out = format!("role {}  last seq {}\n", s.role, s.last_seq);
    if s.peers.is_empty() {
        out.push_str("no peers\n");
    }
    for p in &s.peers {
        out.push_str(&format!(
            "peer {} ({})\n  {}{}{}\n  sent {}  received {}  applied {}{}\n  lag {} records, {}, {:.2} s\n  throughput {}/s  wire {}  payload {}\n",
            if p.address.is_empty() { "-" } else { &p.address },
            if p.fingerprint.len() > 16 {
                &p.fingerprint[..16]
            } else if p.fingerprint.is_empty() {
                "no primary yet"
            } else {
                &p.fingerprint
            },
            if p.connected { "connected, " } else { "not connected, " },
            p.state,
            p.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default(),
            p.last_sent,
            p.received,
            p.applied,
            p.mirror_applied
                .map(|m| format!(" (in the mirror, not all synced yet: {m})"))
                .filter(|_| p.mirror_applied > Some(p.applied))
                .unwrap_or_default(),
            p.lag_records,
            human_bytes(p.lag_bytes as f64),
            p.lag_seconds,
            human_bytes(p.throughput_bytes_per_sec),
            human_bytes(p.wire_bytes as f64),
            human_bytes(p.payload_bytes as f64),
        ));
        if let Some(r) = p.refused.as_ref().filter(|r| r.count > 0) {
            out.push_str(&format!(
                "  refused {} records (applied as no-ops; see refused.log){}\n",
                r.count,
                r.last
                    .as_ref()
                    .map(|l| format!(", last: {l}"))
                    .unwrap_or_default()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_dropped(server: StatusServer) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(server);
            let _ = tx.send(());
        });
        // A deadline against a hang, not a timing assertion.
        rx.recv_timeout(Duration::from_secs(60)).is_ok()
    }

    #[test]
    fn serves_status_and_the_socket_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let server = StatusServer::start(dir.path(), || Status {
            role: "primary".into(),
            last_seq: 7,
            peers: vec![],
        })
        .unwrap();
        let mode = std::fs::metadata(dir.path().join(SOCKET_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "status.sock mode {mode:o}");
        assert_eq!(query(dir.path()).unwrap().last_seq, 7);
        assert!(wait_dropped(server), "drop hung");
        assert!(!dir.path().join(SOCKET_NAME).exists());
    }

    #[test]
    fn drop_returns_after_the_state_dir_was_renamed() {
        let base = tempfile::tempdir().unwrap();
        let old = base.path().join("state");
        std::fs::create_dir(&old).unwrap();
        let server = StatusServer::start(&old, Status::default).unwrap();
        std::fs::rename(&old, base.path().join("moved")).unwrap();
        assert!(wait_dropped(server), "drop hung after the state dir moved");
        // The moved socket is not ours to find by path any more; nothing else
        // was created at the old path.
        assert!(!old.exists());
    }
}
