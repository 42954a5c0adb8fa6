//! The `replicafs` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use replicafs::config::Config;
use replicafs::fuse::FuseOptions;
use replicafs::journal::apply::Applier;
use replicafs::journal::{Journal, Op};
use replicafs::mount::{self, MountOptions, STATE_DIR_NAME};

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REPLICAFS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mount(args) => run_mount(args),
        Command::Journal { command } => run_journal(command),
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

fn run_mount(args: MountArgs) -> Result<(), BoxError> {
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let opts = mount_options(&args, &config)?;
    let mounted = mount::mount(&opts)?;
    let config_path = args.config.clone();
    let cli_excludes = args.exclude.clone();
    mounted.run_until_signal(move || {
        let path = config_path.as_ref()?;
        match Config::load(path) {
            Ok(c) => {
                let mut rules = c.exclude;
                rules.extend(cli_excludes.iter().cloned());
                Some(rules)
            }
            Err(e) => {
                tracing::warn!(error = %e, "config not reloaded");
                None
            }
        }
    })?;
    Ok(())
}

fn open_journal(state_dir: &Path) -> Result<Journal, BoxError> {
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
    let (j, _) = Journal::open(state_dir, Default::default())
        .map_err(|e| format!("{e} (is a mount using this state dir? stop it first)"))?;
    Ok(j)
}

fn show_path(p: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(p))
}

fn describe(op: &Op) -> String {
    match op {
        Op::Write { path, offset } => format!("{} offset={offset}", show_path(path)),
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
            let j = open_journal(&state.state_dir)?;
            let s = j.stats();
            let dirty = j.dirty().regions()?;
            if json {
                let mut v = serde_json::to_value(&s)?;
                v["dirty"] = serde_json::to_value(&dirty)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
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
            }
        }
        JournalCommand::Dump {
            state,
            from,
            to,
            payload,
        } => {
            let j = open_journal(&state.state_dir)?;
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
        JournalCommand::Replay { state, target, to } => {
            let j = open_journal(&state.state_dir)?;
            let applier = Applier::new(&target)
                .map_err(|e| format!("cannot open target {}: {e}", target.display()))?;
            let mut n = 0u64;
            let mut last = None;
            for r in j.records(0, to.unwrap_or(u64::MAX)) {
                let r = r?;
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
