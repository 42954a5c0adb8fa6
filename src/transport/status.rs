//! Live status over a Unix socket in the state directory (`status.sock`):
//! a client connects and reads one JSON document; `replicafs status` prints it.

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
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// "primary" or "replica".
    pub role: String,
    /// The primary's newest seq (as far as this node knows).
    pub last_seq: u64,
    pub peers: Vec<PeerStatus>,
}

/// Serves `status()` on `state_dir/status.sock` until dropped.
pub struct StatusServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusServer {
    pub fn start(
        state_dir: &Path,
        status: impl Fn() -> Status + Send + 'static,
    ) -> std::io::Result<StatusServer> {
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
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            if stop2.load(Ordering::Acquire) {
                                break;
                            }
                            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                            let body = serde_json::to_vec(&status()).unwrap_or_default();
                            let _ = s.write_all(&body);
                        }
                        Err(e) => {
                            warn!(error = %e, "status socket accept failed");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })?;
        Ok(StatusServer {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Asks the daemon running on `state_dir` for its status.
pub fn query(state_dir: &Path) -> Result<Status, String> {
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
    }
    out
}
