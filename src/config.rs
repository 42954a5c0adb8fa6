//! The configuration file: one TOML file, every option documented in the README
//! with its default. Unknown keys and bad values are refused with the line and a
//! reason; command-line flags override what the file says.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::journal::JournalOptions;
use crate::journal::exclude::Exclusions;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The directory that holds the files. No default (CLI argument or here).
    pub backing_dir: Option<PathBuf>,
    /// Where the files appear. No default (CLI argument or here).
    pub mountpoint: Option<PathBuf>,
    /// replicafs's own state (journal, keys). Default: BACKING_DIR/.replicafs.
    pub state_dir: Option<PathBuf>,
    /// Let other users (the hypervisor's) use the mount. Default false.
    pub allow_other: bool,
    /// Refuse every write with EROFS. Default false.
    pub read_only: bool,
    /// Threads serving kernel requests. Default 2 x cores (4..32).
    pub threads: Option<usize>,
    /// Kernel writeback cache. Default true.
    pub writeback_cache: bool,
    /// FUSE passthrough for read-only opens (only when the writeback cache is off,
    /// the kernel refuses both together; while a file is open this way, opening
    /// it for writing fails with EIO). Default false.
    pub passthrough: bool,
    /// Globs of paths never journaled or replicated. Default none.
    pub exclude: Vec<String>,
    pub journal: JournalConfig,
    /// Replicas this mount streams to. Default none.
    pub peers: Vec<PeerConfig>,
    /// How the mount replicates.
    pub replication: ReplicationConfig,
    /// Settings of `replicafs replica`.
    pub replica: ReplicaConfig,
    /// Serve Prometheus metrics over HTTP at this IP:PORT (`GET /metrics`).
    /// Default: off.
    pub metrics_listen: Option<String>,
    /// Lag thresholds of the health verdict.
    pub health: HealthConfig,
}

/// `[health]`: when replication health turns warning or critical.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Lag above which health is warning. Default "30s".
    pub warn_lag: String,
    /// Lag above which health is critical. Default "5m".
    pub crit_lag: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            warn_lag: "30s".into(),
            crit_lag: "5m".into(),
        }
    }
}

impl HealthConfig {
    pub fn thresholds(&self) -> Result<crate::health::Thresholds, String> {
        let warn = crate::health::parse_duration(&self.warn_lag)
            .map_err(|e| format!("health.warn_lag: {e}"))?;
        let crit = crate::health::parse_duration(&self.crit_lag)
            .map_err(|e| format!("health.crit_lag: {e}"))?;
        crate::health::Thresholds::new(warn, crit).map_err(|e| format!("[health]: {e}"))
    }
}

/// One replica: `{ address = "host:port", fingerprint = "<64 hex digits>" }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub address: String,
    /// SHA-256 of the replica's certificate (`replicafs keygen` prints it).
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// zstd level for batches (1..=22); 0 sends raw. Default 3.
    pub compression_level: i32,
    /// Wire bytes per second per peer; 0 is unlimited. Default 0.
    pub bandwidth_limit: u64,
    /// Most payload bytes per batch. Default 4 MiB.
    pub batch_bytes: usize,
    /// Most records per batch. Default 4096.
    pub batch_records: usize,
    /// Most wire bytes in flight (sent, not yet stored by the peer). Default 64 MiB.
    pub window_bytes: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            compression_level: 3,
            bandwidth_limit: 0,
            batch_bytes: 4 << 20,
            batch_records: 4096,
            window_bytes: 64 << 20,
        }
    }
}

/// `replicafs replica` settings (flags override them).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaConfig {
    /// The directory the primary's files are replicated into.
    pub mirror: Option<PathBuf>,
    /// UDP address to listen on, e.g. "0.0.0.0:7070".
    pub listen: Option<String>,
    /// Fingerprints of the primaries allowed in.
    pub trust: Vec<String>,
    /// Where to present the mirror read-only (optional).
    pub mount: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Journal every mutation. Default true.
    pub enabled: bool,
    #[serde(flatten)]
    pub options: JournalOptions,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            enabled: true,
            options: JournalOptions::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backing_dir: None,
            mountpoint: None,
            state_dir: None,
            allow_other: false,
            read_only: false,
            threads: None,
            writeback_cache: true,
            passthrough: false,
            exclude: Vec::new(),
            journal: JournalConfig::default(),
            peers: Vec::new(),
            replication: ReplicationConfig::default(),
            replica: ReplicaConfig::default(),
            metrics_listen: None,
            health: HealthConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read(path.display().to_string(), e))?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the file in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let message = match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: {}", e.message())
                }
                None => e.message().to_string(),
            };
            ConfigError::Parse {
                path: origin.to_string(),
                message,
            }
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: origin.to_string(),
            message,
        })?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.threads == Some(0) {
            return Err("threads must be at least 1".into());
        }
        if matches!(self.threads, Some(t) if t > 256) {
            return Err("threads must be at most 256".into());
        }
        Exclusions::new(&self.exclude)?;
        self.journal.options.validate()?;
        for p in &self.peers {
            crate::transport::shipper::Peer::parse(&format!("{}={}", p.address, p.fingerprint))?;
        }
        for t in &self.replica.trust {
            crate::transport::tls::Fingerprint::parse(t)?;
        }
        self.health.thresholds()?;
        if let Some(m) = &self.metrics_listen {
            m.parse::<std::net::SocketAddr>().map_err(|_| {
                format!("metrics_listen {m:?} is not IP:PORT (e.g. 127.0.0.1:9108)")
            })?;
        }
        let r = &self.replication;
        if !(0..=22).contains(&r.compression_level) {
            return Err("replication.compression_level must be 0..=22".into());
        }
        if r.batch_records == 0 || r.batch_bytes < 4096 || r.window_bytes < r.batch_bytes as u64 {
            return Err("replication: batch_records >= 1, batch_bytes >= 4096 and window_bytes >= batch_bytes".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("", "t").unwrap(), Config::default());
    }

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
backing_dir = "/srv/vm"
mountpoint = "/mnt/vm"
allow_other = true
threads = 8
exclude = ["**/pagefile*", "*.swap"]
[journal]
cap_bytes = 1073741824
sync_activity_log = false
"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.threads, Some(8));
        assert_eq!(c.exclude.len(), 2);
        assert_eq!(c.journal.options.cap_bytes, 1 << 30);
        assert!(!c.journal.options.sync_activity_log);
    }

    #[test]
    fn payload_modes_parse() {
        use crate::journal::PayloadMode;
        assert_eq!(
            Config::default().journal.options.payload,
            PayloadMode::Backing
        );
        for (text, want) in [
            ("journal", PayloadMode::Journal),
            ("backing", PayloadMode::Backing),
        ] {
            let c = Config::parse(&format!("[journal]\npayload = \"{text}\"\n"), "t").unwrap();
            assert_eq!(c.journal.options.payload, want);
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_the_line() {
        let e = Config::parse("threads = 2\nbogus = 1\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("bogus"), "{e}");
        let e = Config::parse("[journal]\ncap = 5\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cap"), "{e}");
    }

    #[test]
    fn replication_settings_parse() {
        let fp = "ab".repeat(32);
        let c = Config::parse(
            &format!(
                "peers = [{{ address = \"10.0.0.2:7070\", fingerprint = \"{fp}\" }}]\n[replication]\ncompression_level = 5\nbandwidth_limit = 1000000\n[replica]\nmirror = \"/srv/mirror\"\nlisten = \"0.0.0.0:7070\"\ntrust = [\"{fp}\"]\n"
            ),
            "t",
        )
        .unwrap();
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.replication.compression_level, 5);
        assert_eq!(c.replica.trust.len(), 1);
        assert!(
            Config::parse("peers = [{ address = \"a:1\", fingerprint = \"xx\" }]", "t").is_err()
        );
        assert!(Config::parse("[replication]\nlevel = 1", "t").is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            "threads = 0",
            "threads = -1",
            "threads = \"many\"",
            "exclude = [\"a[\"]",
            "[journal]\ncap_bytes = 10",
            "[journal]\nextent_bytes = 5000",
            "metrics_listen = \"localhost\"",
            "[health]\nwarn_lag = \"soon\"",
            "[health]\nwarn_lag = \"10m\"\ncrit_lag = \"5m\"",
            "[journal]\npayload = \"disk\"",
            "[journal]\nheld_records = 99999999999",
            // Set by the daemon from its peers, not a key.
            "[journal]\nhold_for_peers = true",
        ] {
            assert!(Config::parse(bad, "t").is_err(), "{bad} accepted");
        }
    }
}
