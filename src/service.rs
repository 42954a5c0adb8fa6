//! Running as a service: logging that reads well in journald, counts of the
//! warnings and errors logged (by module), readiness for systemd
//! (`Type=notify`), and the [`Reporter`] that assembles the one status
//! snapshot the status socket, `--check` and the metrics all show.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::{Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::health::{self, Thresholds};
use crate::journal::Journal;
use crate::transport::status::{JournalStatus, Report, Status};

/// True when stderr goes to journald (systemd sets these for its services).
pub fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

/// Warnings and errors logged by this process, by module.
#[derive(Default)]
struct Counts {
    map: Mutex<BTreeMap<(String, bool), Arc<AtomicU64>>>,
}

fn counts() -> &'static Counts {
    static C: OnceLock<Counts> = OnceLock::new();
    C.get_or_init(Counts::default)
}

/// "replicafs::transport::shipper" -> "transport"; another crate's -> its name.
fn module_of(target: &str) -> String {
    let mut it = target.split("::");
    let first = it.next().unwrap_or("other");
    match (first, it.next()) {
        ("replicafs", Some(m)) => m.to_string(),
        ("replicafs", None) => "main".to_string(),
        (other, _) => other.to_string(),
    }
}

struct CountLayer;

impl<S: Subscriber> Layer<S> for CountLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let key = (module_of(event.metadata().target()), level == Level::ERROR);
        let c = counts()
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone();
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// (errors, warnings) logged so far, by module.
pub fn logged_problems() -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let mut errors = BTreeMap::new();
    let mut warnings = BTreeMap::new();
    for ((module, is_error), n) in counts()
        .map
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let into = if *is_error {
            &mut errors
        } else {
            &mut warnings
        };
        into.insert(module.clone(), n.load(Ordering::Relaxed));
    }
    (errors, warnings)
}

/// Logs to stderr with the level from `REPLICAFS_LOG` (default info). Under
/// systemd, journald stamps each line itself: no second timestamp, no colour.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REPLICAFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if under_systemd() {
        fmt.without_time().with_ansi(false).boxed()
    } else {
        fmt.boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(CountLayer)
        .try_init();
}

/// Tells systemd (if it started us with `Type=notify`) that the service is up.
pub fn notify_ready(what: &str) {
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(what),
    ]) {
        tracing::warn!(error = %e, "cannot tell systemd the service is ready");
    }
}

/// Tells systemd the service is stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// The modules whose problems are always exported (zero until one comes).
const KINDS: [&str; 8] = [
    "main",
    "mount",
    "volume",
    "fuse",
    "journal",
    "protocol",
    "transport",
    "replica",
];

/// Builds the daemon's report: the transport's status, the journal, the
/// logged problems and the health verdict, all from one snapshot.
pub struct Reporter {
    status: Mutex<Box<dyn FnMut() -> Status + Send>>,
    journal: Option<Arc<Journal>>,
    thresholds: Thresholds,
}

impl Reporter {
    pub fn new(
        status: impl FnMut() -> Status + Send + 'static,
        journal: Option<Arc<Journal>>,
        thresholds: Thresholds,
    ) -> Arc<Reporter> {
        Arc::new(Reporter {
            status: Mutex::new(Box::new(status)),
            journal,
            thresholds,
        })
    }

    pub fn report(&self) -> Report {
        let status = (self.status.lock().unwrap_or_else(|e| e.into_inner()))();
        let journal = self.journal.as_ref().map(|j| journal_status(j));
        let (mut errors, mut warnings) = logged_problems();
        // Every kind is there from the start, so a rate() sees the first one.
        for m in KINDS {
            errors.entry(m.to_string()).or_insert(0);
            warnings.entry(m.to_string()).or_insert(0);
        }
        let refused: u64 = status
            .peers
            .iter()
            .filter_map(|p| p.refused.as_ref())
            .map(|r| r.count)
            .sum();
        if status.role == "replica" {
            errors.insert("refused".into(), refused);
        }
        let health = health::evaluate(&status, &self.thresholds);
        Report {
            status,
            journal,
            errors,
            warnings,
            health: Some(health),
        }
    }
}

fn journal_status(j: &Journal) -> JournalStatus {
    let s = j.stats();
    let regions = j.dirty().regions().unwrap_or_default();
    let whole = regions.iter().filter(|r| r.is_whole()).count() as u64;
    let ranged: u64 = regions
        .iter()
        .filter(|r| !r.is_whole())
        .map(|r| r.len)
        .sum();
    JournalStatus {
        bytes: s.segment_bytes,
        cap_bytes: j.options().cap_bytes,
        records: s.records,
        oldest_seq: s.oldest_seq,
        dropped_through: s.dropped_through,
        dirty_regions: regions.len() as u64,
        dirty_bytes: ranged,
        dirty_whole_files: whole,
        payload_bytes_appended: s.payload_bytes_appended,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_from_targets() {
        assert_eq!(module_of("replicafs::transport::shipper"), "transport");
        assert_eq!(module_of("replicafs"), "main");
        assert_eq!(module_of("quinn::connection"), "quinn");
    }
}
