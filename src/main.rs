//! The `replicafs` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use replicafs::config::Config;
use replicafs::fuse::FuseOptions;
use replicafs::journal::apply::Applier;
use replicafs::journal::{Inspection, Op};
use replicafs::mount::{self, MountOptions, STATE_DIR_NAME};
use replicafs::protocol::SenderConfig;
use replicafs::service::Reporter;
use replicafs::transport::catchup::{CatchUp, WholeRegions};
use replicafs::transport::shipper::{Peer, Shipper, ShipperOptions};
use replicafs::transport::status::{self, Status, StatusServer};
use replicafs::transport::tls::{Fingerprint, Identity};

#[derive(Parser)]
#[command(
    name = "replicafs",
    version,
    about = "A journaled, replicated FUSE datastore for VM disks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Present BACKING_DIR at MOUNTPOINT until SIGINT/SIGTERM or umount.
    Mount(MountArgs),
    /// Inspect or replay the journal in a state directory (while not mounted).
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Create this node's certificate and key in the state dir; print its fingerprint.
    Keygen {
        #[command(flatten)]
        state: StateArgs,
        /// Replace an existing identity.
        #[arg(long)]
        force: bool,
    },
    /// Receive a primary's changes into a mirror directory.
    Replica(ReplicaArgs),
    /// Replication status of the daemon (mount or replica) using a state dir.
    Status {
        #[command(flatten)]
        state: StateArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Monitoring-plugin check: print one line, exit 0 ok, 1 warning,
        /// 2 critical, 3 unknown (no daemon answers, bad arguments).
        #[arg(long, conflicts_with = "json")]
        check: bool,
        /// With --check: lag above which the check warns [default: the daemon's [health] warn_lag, 30s].
        #[arg(long, value_name = "DURATION", value_parser = parse_lag, requires = "check")]
        warn_lag: Option<std::time::Duration>,
        /// With --check: lag above which the check is critical [default: the daemon's [health] crit_lag, 5m].
        #[arg(long, value_name = "DURATION", value_parser = parse_lag, requires = "check")]
        crit_lag: Option<std::time::Duration>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages into DIR (used to build the package).
    #[command(hide = true)]
    ManPages { dir: PathBuf },
    /// Run a primary and a replica on 127.0.0.1 in a local folder and show replication.
    Demo(replicafs::demo::DemoArgs),
}

#[derive(Args)]
struct ReplicaArgs {
    /// TOML configuration file (its [replica] table); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The directory the primary's files are replicated into.
    #[arg(long)]
    mirror: Option<PathBuf>,
    /// UDP address to listen on (e.g. 0.0.0.0:7070).
    #[arg(long)]
    listen: Option<String>,
    /// The replica's state (identity, receive log, applied seq).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Fingerprint of a primary allowed in (repeatable).
    #[arg(long = "trust", value_name = "FINGERPRINT")]
    trust: Vec<String>,
    /// Present the mirror read-only at this (empty) directory.
    #[arg(long, value_name = "MOUNTPOINT")]
    mount: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (or `metrics_listen` in the config).
    #[arg(long, value_name = "IP:PORT")]
    metrics_listen: Option<String>,
}

fn parse_lag(s: &str) -> Result<std::time::Duration, String> {
    replicafs::health::parse_duration(s)
}

type BoxError = Box<dyn std::error::Error>;

#[derive(Args)]
struct MountArgs {
    /// The directory that really holds the files (or `backing_dir` in the config).
    backing_dir: Option<PathBuf>,
    /// An empty directory where the files appear (or `mountpoint` in the config).
    mountpoint: Option<PathBuf>,
    /// TOML configuration file; flags given here override it. SIGHUP rereads its `exclude`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where replicafs keeps its state [default: BACKING_DIR/.replicafs, hidden from the mount].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Let users other than root use the mount (a hypervisor often runs as its own user).
    #[arg(long)]
    allow_other: bool,
    /// Mount read-only: every write gets EROFS (nothing is journaled).
    #[arg(long)]
    read_only: bool,
    /// Threads serving kernel requests [default: 2 x cores, at least 4].
    #[arg(long)]
    threads: Option<usize>,
    /// Do not let the kernel cache writes.
    #[arg(long)]
    no_writeback_cache: bool,
    /// Serve read-only opens by FUSE passthrough (needs --no-writeback-cache).
    /// While a file is open this way, opening it for writing fails with EIO.
    #[arg(long)]
    passthrough: bool,
    /// Accepted for compatibility: passthrough is off unless --passthrough.
    #[arg(long, hide = true)]
    no_passthrough: bool,
    /// Never journal or replicate paths matching this glob (repeatable; adds to the config's).
    #[arg(long = "exclude", value_name = "GLOB")]
    exclude: Vec<String>,
    /// Do not journal (a plain passthrough mount).
    #[arg(long)]
    no_journal: bool,
    /// Journal cap in bytes [default: 8 GiB].
    #[arg(long, value_name = "BYTES")]
    journal_cap: Option<u64>,
    /// Replicate to this replica (repeatable; adds to the config's `peers`).
    #[arg(long = "peer", value_name = "ADDR=FINGERPRINT")]
    peer: Vec<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (or `metrics_listen` in the config).
    #[arg(long, value_name = "IP:PORT")]
    metrics_listen: Option<String>,
}

#[derive(Args)]
struct StateArgs {
    /// The state directory (a mount's --state-dir, or BACKING_DIR/.replicafs).
    #[arg(long)]
    state_dir: PathBuf,
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Counts, sizes, oldest and newest seq, dirty regions.
    Stats {
        #[command(flatten)]
        state: StateArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The records, one per line.
    Dump {
        #[command(flatten)]
        state: StateArgs,
        /// First seq to show.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Last seq to show.
        #[arg(long)]
        to: Option<u64>,
        /// Also print payload bytes (hex, first 64 bytes per record).
        #[arg(long)]
        payload: bool,
    },
    /// Checks the journal against the backing dir: every write record's bytes
    /// are in its payload, in a preimage, or still in the backing file, or a
    /// later record changed them. Exits 1 when one is not.
    Verify {
        #[command(flatten)]
        state: StateArgs,
        /// The backing dir [default: the state dir's parent, for BACKING/.replicafs].
        #[arg(long)]
        backing: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Applies the records, in order, onto TARGET (a copy of the starting directory).
    Replay {
        #[command(flatten)]
        state: StateArgs,
        /// The directory to apply the records to.
        #[arg(long)]
        target: PathBuf,
        /// Stop after this seq.
        #[arg(long)]
        to: Option<u64>,
    },
}

fn main() -> ExitCode {
    // Two malloc arenas, before any thread starts: buffers allocated by the
    // request threads and freed by the shipper otherwise leave each thread's
    // arena holding freed memory (the mount daemon's peak RSS under 4 KiB
    // random writes with a peer: 178 MiB with the default arenas, 124 MiB
    // with two, bench/RESULTS.md).
    // SAFETY: mallopt with a valid parameter, before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    replicafs::service::init_logging();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // A monitoring check given bad arguments is "unknown" (3), not "critical" (2).
        Err(e) if e.use_stderr() && std::env::args().any(|a| a == "--check") => {
            let _ = e.print();
            return ExitCode::from(3);
        }
        Err(e) => e.exit(),
    };
    if !matches!(
        cli.command,
        Command::Demo(_)
            | Command::Status { .. }
            | Command::Completions { .. }
            | Command::ManPages { .. }
    ) {
        // Whatever the daemon creates for itself (journal, sled index, keys,
        // status socket, replica state) is private. Files made on a caller's
        // behalf through the mount get the caller's umask instead (see the volume).
        // SAFETY: umask has no preconditions.
        unsafe {
            let old = libc::umask(0o077);
            libc::umask(old | 0o077);
        }
    }
    let result = match cli.command {
        Command::Mount(args) => run_mount(args),
        Command::Journal { command } => run_journal(command),
        Command::Keygen { state, force } => run_keygen(&state.state_dir, force),
        Command::Replica(args) => run_replica(args),
        Command::Status {
            state,
            check: true,
            warn_lag,
            crit_lag,
            ..
        } => return run_check(&state.state_dir, warn_lag, crit_lag),
        Command::Status { state, json, .. } => run_status(&state.state_dir, json),
        Command::Completions { shell } => {
            replicafs::assets::write_completions(
                <Cli as clap::CommandFactory>::command(),
                shell,
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::ManPages { dir } => {
            replicafs::assets::write_man_pages(<Cli as clap::CommandFactory>::command(), &dir)
                .map_err(|e| format!("cannot write man pages into {}: {e}", dir.display()).into())
        }
        Command::Demo(args) => replicafs::demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replicafs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn mount_options(args: &MountArgs, config: &Config) -> Result<MountOptions, BoxError> {
    let backing = args
        .backing_dir
        .clone()
        .or(config.backing_dir.clone())
        .ok_or("no backing dir: give BACKING_DIR or set backing_dir in the config")?;
    let mountpoint = args
        .mountpoint
        .clone()
        .or(config.mountpoint.clone())
        .ok_or("no mountpoint: give MOUNTPOINT or set mountpoint in the config")?;
    if args.threads == Some(0) {
        return Err("--threads must be at least 1".into());
    }
    let mut opts = MountOptions::new(backing, mountpoint);
    opts.state_dir = args.state_dir.clone().or(config.state_dir.clone());
    opts.allow_other = args.allow_other || config.allow_other;
    opts.read_only = args.read_only || config.read_only;
    if let Some(t) = args.threads.or(config.threads) {
        opts.threads = t;
    }
    opts.fuse = FuseOptions {
        writeback_cache: config.writeback_cache && !args.no_writeback_cache,
        passthrough: (config.passthrough || args.passthrough) && !args.no_passthrough,
    };
    opts.exclude = config.exclude.clone();
    opts.exclude.extend(args.exclude.iter().cloned());
    replicafs::journal::exclude::Exclusions::new(&opts.exclude)?;
    let mut journal = config.journal.options.clone();
    if let Some(cap) = args.journal_cap {
        journal.cap_bytes = cap;
    }
    journal.validate()?;
    opts.journal = (config.journal.enabled && !args.no_journal).then_some(journal);
    Ok(opts)
}

/// The metrics listener the flag or else the config asks for, bound now:
/// a port in use stops the start with a clear error.
fn metrics_listener(
    flag: Option<&String>,
    config: &Config,
) -> Result<Option<std::net::TcpListener>, BoxError> {
    match flag.or(config.metrics_listen.as_ref()) {
        Some(a) => Ok(Some(replicafs::metrics::listen(a)?)),
        None => Ok(None),
    }
}

fn run_mount(args: MountArgs) -> Result<(), BoxError> {
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let mut opts = mount_options(&args, &config)?;
    let mut peers = Vec::new();
    for p in &config.peers {
        peers.push(Peer::parse(&format!("{}={}", p.address, p.fingerprint))?);
    }
    for p in &args.peer {
        peers.push(Peer::parse(p)?);
    }
    if !peers.is_empty() && opts.journal.is_none() {
        return Err("replication needs the journal: drop --no-journal or the peers".into());
    }
    if let Some(j) = opts.journal.as_mut() {
        // Writes kept in the backing file are held for peers to read back.
        j.hold_for_peers = !peers.is_empty();
    }
    // Before the mount opens the journal: did it close cleanly last time?
    let journal_dir = replicafs::journal::journal_dir(
        &opts
            .state_dir
            .clone()
            .unwrap_or_else(|| opts.backing.join(STATE_DIR_NAME)),
    );
    let unclean = journal_dir.is_dir() && !journal_dir.join("CLEAN").exists();
    let thresholds = config.health.thresholds()?;
    // Bound before mounting: a port in use stops the start with a clear error.
    let metrics = metrics_listener(args.metrics_listen.as_ref(), &config)?;
    let signals = mount::stop_signals()?;
    let mounted = mount::mount(&opts)?;
    let state_dir = mounted.checked.state_dir.clone();
    let shipper = match mounted.journal() {
        Some(j) if !peers.is_empty() => {
            let r = &config.replication;
            Some(Shipper::start(
                j.clone(),
                &state_dir,
                ShipperOptions {
                    peers,
                    compression_level: r.compression_level,
                    bandwidth_limit: r.bandwidth_limit,
                    sender: SenderConfig {
                        batch_bytes: r.batch_bytes,
                        batch_records: r.batch_records,
                        window_bytes: r.window_bytes,
                        ..SenderConfig::default()
                    },
                    snapshot_first: unclean,
                },
                Some(CatchUp {
                    volume: mounted.volume.clone(),
                    backing: mounted.checked.backing.clone(),
                    source: Box::new(WholeRegions),
                }),
            )?)
        }
        _ => None,
    };
    let reporter = match &shipper {
        Some(s) => Reporter::new(s.status_fn(), mounted.journal().cloned(), thresholds),
        None => {
            let journal = mounted.journal().cloned();
            Reporter::new(
                move || Status {
                    role: "primary".into(),
                    last_seq: journal.as_ref().map(|j| j.last_seq()).unwrap_or(0),
                    peers: vec![],
                },
                mounted.journal().cloned(),
                thresholds,
            )
        }
    };
    let r2 = reporter.clone();
    let _status = StatusServer::start(&state_dir, move || r2.report())
        .map_err(|e| format!("status socket: {e}"))?;
    if let Some(l) = metrics {
        replicafs::metrics::serve(l, reporter)?;
    }
    replicafs::service::notify_ready("mounted");
    let config_path = args.config.clone();
    let cli_excludes = args.exclude.clone();
    mounted.run_until_signal(signals, move || {
        let path = config_path.as_ref()?;
        match Config::load(path) {
            Ok(c) => {
                let mut rules = c.exclude;
                rules.extend(cli_excludes.iter().cloned());
                Some(rules)
            }
            Err(e) => {
                tracing::error!(error = %e, "config not reloaded; keeping the old exclusion rules");
                None
            }
        }
    })?;
    replicafs::service::notify_stopping();
    Ok(())
}

fn run_keygen(state_dir: &Path, force: bool) -> Result<(), BoxError> {
    let id = Identity::generate()?;
    id.save(state_dir, force)?;
    println!("{}", id.fingerprint());
    Ok(())
}

fn run_status(state_dir: &Path, json: bool) -> Result<(), BoxError> {
    let r = status::query_report(state_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", status::render_report(&r));
    }
    Ok(())
}

/// `status --check`: one line, the monitoring-plugin exit code. The verdict
/// is judged from the daemon's own snapshot; thresholds given here replace
/// the daemon's.
fn run_check(
    state_dir: &Path,
    warn: Option<std::time::Duration>,
    crit: Option<std::time::Duration>,
) -> ExitCode {
    use replicafs::health::{self, Thresholds};
    let r = match status::query_report(state_dir) {
        Ok(r) => r,
        Err(e) => {
            println!("REPLICAFS UNKNOWN - {e}");
            return ExitCode::from(3);
        }
    };
    let daemon = r
        .health
        .as_ref()
        .map(|h| Thresholds {
            warn_lag: std::time::Duration::from_secs_f64(h.warn_lag_seconds),
            crit_lag: std::time::Duration::from_secs_f64(h.crit_lag_seconds),
        })
        .unwrap_or_default();
    let t = match Thresholds::new(
        warn.unwrap_or(daemon.warn_lag),
        crit.unwrap_or(daemon.crit_lag),
    ) {
        Ok(t) => t,
        Err(e) => {
            println!("REPLICAFS UNKNOWN - {e}");
            return ExitCode::from(3);
        }
    };
    let h = health::evaluate(&r.status, &t);
    println!("{}", health::check_line(&r.status, &h));
    ExitCode::from(h.state.exit_code())
}

fn run_replica(args: ReplicaArgs) -> Result<(), BoxError> {
    use replicafs::replica::Replica;
    use replicafs::transport::server::{self, ReplicaServer};
    use std::sync::Arc;
    // Caught from the start, so an early SIGTERM still stops cleanly.
    let mut signals = mount::stop_signals()?;
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let rc = &config.replica;
    let mirror = args
        .mirror
        .clone()
        .or(rc.mirror.clone())
        .ok_or("no mirror: give --mirror DIR or set [replica] mirror")?;
    let listen = args
        .listen
        .clone()
        .or(rc.listen.clone())
        .ok_or("no listen address: give --listen ADDR or set [replica] listen")?;
    let listen: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| format!("--listen {listen}: {e} (want IP:PORT)"))?;
    let state_dir = args
        .state_dir
        .clone()
        .or(config.state_dir.clone())
        .ok_or("no state dir: give --state-dir DIR")?;
    let mut trust = Vec::new();
    for t in rc.trust.iter().chain(args.trust.iter()) {
        trust.push(Fingerprint::parse(t)?);
    }
    let mountpoint = args.mount.clone().or(rc.mount.clone());
    let thresholds = config.health.thresholds()?;
    let metrics = metrics_listener(args.metrics_listen.as_ref(), &config)?;
    let id = Identity::load(&state_dir)?;
    let replica = Arc::new(Replica::open(&state_dir, &mirror)?);
    // After the open, which refuses a state dir holding the mirror: the state
    // of an older version may have loose modes.
    mount::secure_state_dir(&state_dir)
        .map_err(|e| format!("cannot make {} private: {e}", state_dir.display()))?;
    let srv = ReplicaServer::new(replica.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("replicafs-recv")
        .enable_all()
        .build()?;
    let endpoint = {
        let _g = rt.enter();
        server::endpoint(listen, &id, trust)?
    };
    rt.spawn(server::serve(endpoint.clone(), srv.clone()));
    let s2 = srv.clone();
    let reporter = Reporter::new(move || s2.status(), None, thresholds);
    let r2 = reporter.clone();
    let _status = StatusServer::start(&state_dir, move || r2.report())
        .map_err(|e| format!("status socket: {e}"))?;
    if let Some(l) = metrics {
        replicafs::metrics::serve(l, reporter)?;
    }
    tracing::info!(
        %listen,
        fingerprint = %id.fingerprint(),
        mirror = %replica.mirror().display(),
        "replica listening"
    );
    let result: Result<(), BoxError> = match mountpoint {
        Some(mp) => {
            let mut opts = MountOptions::new(replica.mirror().to_path_buf(), mp);
            opts.read_only = true;
            opts.journal = None;
            opts.state_dir = Some(state_dir.clone());
            opts.fuse = FuseOptions {
                writeback_cache: false,
                passthrough: config.passthrough,
            };
            let mounted = mount::mount(&opts)?;
            replicafs::service::notify_ready("listening, mirror mounted");
            mounted
                .run_until_signal(signals, || None)
                .map_err(Into::into)
        }
        None => {
            replicafs::service::notify_ready("listening");
            let sig = signals
                .forever()
                .find(|s| *s != signal_hook::consts::SIGHUP);
            tracing::info!(signal = ?sig, "signal received; stopping");
            Ok(())
        }
    };
    replicafs::service::notify_stopping();
    endpoint.close(quinn::VarInt::from_u32(0), b"replica shutting down");
    replica.stop();
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

/// Opens a state dir's journal for inspection: read-only, so that looking at
/// a crashed state dir leaves the next mount everything its recovery needs.
fn inspect_journal(state_dir: &Path) -> Result<Inspection, BoxError> {
    if !state_dir.is_dir() {
        return Err(format!(
            "{} is not a state directory (a mount's --state-dir, or BACKING_DIR/{STATE_DIR_NAME})",
            state_dir.display()
        )
        .into());
    }
    if !replicafs::journal::journal_dir(state_dir).is_dir() {
        return Err(format!("{} holds no journal", state_dir.display()).into());
    }
    Inspection::open(state_dir).map_err(|e| format!("cannot read the journal: {e}").into())
}

fn show_path(p: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(p))
}

fn describe(op: &Op) -> String {
    match op {
        Op::Write { path, offset } => format!("{} offset={offset}", show_path(path)),
        Op::WriteBacked {
            path,
            offset,
            len,
            crc,
        } => format!(
            "{} offset={offset} len={len} crc={crc:08x} (bytes in the backing file)",
            show_path(path)
        ),
        Op::Preimage { of } => format!("bytes of seq {of}"),
        Op::Truncate { path, size } => format!("{} size={size}", show_path(path)),
        Op::Fallocate {
            path,
            mode,
            offset,
            len,
        } => {
            format!(
                "{} mode={mode:#x} offset={offset} len={len}",
                show_path(path)
            )
        }
        Op::Mknod {
            path,
            mode,
            rdev,
            uid,
            gid,
        } => {
            format!(
                "{} mode={mode:o} rdev={rdev} owner={uid}:{gid}",
                show_path(path)
            )
        }
        Op::Mkdir {
            path,
            mode,
            uid,
            gid,
        } => {
            format!("{} mode={mode:o} owner={uid}:{gid}", show_path(path))
        }
        Op::Symlink { path, target, .. } => format!("{} -> {}", show_path(path), show_path(target)),
        Op::Link { existing, path } => format!("{} => {}", show_path(existing), show_path(path)),
        Op::Unlink { path } | Op::Rmdir { path } | Op::RemoveTree { path } => show_path(path),
        Op::Rename { from, to, flags } => {
            format!("{} -> {} flags={flags:#x}", show_path(from), show_path(to))
        }
        Op::SetAttr {
            path,
            mode,
            uid,
            gid,
            atime,
            mtime,
        } => format!(
            "{} mode={mode:?} uid={uid:?} gid={gid:?} atime={:?} mtime={:?}",
            show_path(path),
            atime.map(|t| t.sec),
            mtime.map(|t| t.sec)
        ),
        Op::SetXattr {
            path, name, value, ..
        } => {
            format!(
                "{} {}={} bytes",
                show_path(path),
                show_path(name),
                value.len()
            )
        }
        Op::RemoveXattr { path, name } => format!("{} {}", show_path(path), show_path(name)),
    }
}

fn run_journal(cmd: JournalCommand) -> Result<(), BoxError> {
    match cmd {
        JournalCommand::Stats { state, json } => {
            let j = inspect_journal(&state.state_dir)?;
            let s = &j.stats;
            let dirty = &j.dirty;
            if json {
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                println!(
                    "stopped cleanly    {}",
                    if j.clean {
                        "yes"
                    } else {
                        "no (the next mount recovers)"
                    }
                );
                println!("records            {}", s.records);
                println!(
                    "oldest seq         {}",
                    s.oldest_seq.map_or("-".into(), |v| v.to_string())
                );
                println!(
                    "newest seq         {}",
                    s.newest_seq.map_or("-".into(), |v| v.to_string())
                );
                println!("next seq           {}", s.next_seq);
                println!(
                    "segments           {} ({} bytes)",
                    s.segments, s.segment_bytes
                );
                println!("index (sled) bytes {}", s.sled_bytes);
                println!("trimmed through    {}", s.trimmed_through);
                println!("dropped through    {}", s.dropped_through);
                println!("dirty regions      {}", dirty.len());
                for d in dirty.iter().take(50) {
                    if d.is_whole() {
                        println!("  {} (whole)", show_path(&d.path));
                    } else {
                        println!("  {} [{}, +{})", show_path(&d.path), d.offset, d.len);
                    }
                }
                if dirty.len() > 50 {
                    println!("  … {} more", dirty.len() - 50);
                }
                if !j.clean {
                    println!("torn tail bytes    {}", j.torn_bytes);
                    println!(
                        "hot extents        {} (dirty after the next mount)",
                        j.hot_extents.len()
                    );
                    for (path, index) in j.hot_extents.iter().take(50) {
                        println!("  {path:?} extent {index}");
                    }
                }
            }
        }
        JournalCommand::Dump {
            state,
            from,
            to,
            payload,
        } => {
            let j = inspect_journal(&state.state_dir)?;
            for r in j.records(from, to.unwrap_or(u64::MAX)) {
                let r = r?;
                print!("{:>10} {:<11} {}", r.seq, r.op.name(), describe(&r.op));
                if !r.data.is_empty() {
                    print!(" len={}", r.data.len());
                }
                println!();
                if payload && !r.data.is_empty() {
                    let hex: String = r.data.iter().take(64).map(|b| format!("{b:02x}")).collect();
                    println!(
                        "           {hex}{}",
                        if r.data.len() > 64 { "…" } else { "" }
                    );
                }
            }
        }
        JournalCommand::Verify {
            state,
            backing,
            json,
        } => {
            let backing = match backing {
                Some(b) => b,
                None if state.state_dir.file_name() == Some(STATE_DIR_NAME.as_ref()) => state
                    .state_dir
                    .parent()
                    .map(Path::to_path_buf)
                    .ok_or("the state dir has no parent: give --backing")?,
                None => {
                    return Err("give --backing (the state dir is not BACKING/.replicafs)".into());
                }
            };
            let j = inspect_journal(&state.state_dir)?;
            let rep = replicafs::journal::verify::verify(|| j.records(0, u64::MAX), &backing)
                .map_err(|e| format!("cannot read the journal: {e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                println!("records                      {}", rep.records);
                println!("writes with their bytes      {}", rep.writes_with_payload);
                println!("writes kept in the backing:");
                println!("  bytes in a preimage        {}", rep.preserved);
                println!("  bytes in place             {}", rep.in_place);
                println!("  changed by a later record  {}", rep.superseded);
                println!("bad preimages                {:?}", rep.bad_preimages);
                println!("bytes nowhere, unexplained   {:?}", rep.unexplained);
            }
            if !rep.ok() {
                return Err(format!(
                    "{} write records have bytes nowhere, {} preimages do not match their write",
                    rep.unexplained.len(),
                    rep.bad_preimages.len()
                )
                .into());
            }
        }
        JournalCommand::Replay { state, target, to } => {
            let j = inspect_journal(&state.state_dir)?;
            let applier = Applier::new(&target)
                .map_err(|e| format!("cannot open target {}: {e}", target.display()))?;
            let mut n = 0u64;
            let mut last = None;
            for r in j.records(0, to.unwrap_or(u64::MAX)) {
                let r = r?;
                if matches!(r.op, Op::WriteBacked { .. }) {
                    return Err(format!(
                        "record {} keeps its bytes in the backing file (journal.payload = \"backing\"): \
                         this journal cannot replay a mount on its own; a journal written with \
                         journal.payload = \"journal\" can",
                        r.seq
                    )
                    .into());
                }
                applier
                    .apply(&r)
                    .map_err(|e| format!("record {} ({}): {e}", r.seq, r.op.name()))?;
                n += 1;
                last = Some(r.seq);
            }
            println!(
                "applied {n} records{} onto {}",
                last.map(|s| format!(" through seq {s}"))
                    .unwrap_or_default(),
                target.display()
            );
        }
    }
    Ok(())
}
