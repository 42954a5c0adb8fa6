//! The `replicafs` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use replicafs::fuse::FuseOptions;
use replicafs::mount::{self, MountOptions};

#[derive(Parser)]
#[command(
    name = "replicafs",
    version,
    about = "A replicated FUSE datastore for VM disks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Present BACKING_DIR at MOUNTPOINT until SIGINT/SIGTERM or umount.
    Mount(MountArgs),
}

#[derive(clap::Args)]
struct MountArgs {
    /// The directory that really holds the files.
    backing_dir: PathBuf,
    /// An empty directory where the files appear.
    mountpoint: PathBuf,
    /// Where replicafs keeps its own state [default: BACKING_DIR/.replicafs, hidden from the mount].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Let users other than root use the mount (a hypervisor often runs as its own user).
    #[arg(long)]
    allow_other: bool,
    /// Mount read-only: every write gets EROFS.
    #[arg(long)]
    read_only: bool,
    /// Threads serving kernel requests [default: 2 x cores, at least 4].
    #[arg(long)]
    threads: Option<usize>,
    /// Do not let the kernel cache writes (slower; for debugging).
    #[arg(long)]
    no_writeback_cache: bool,
    /// Serve read-only opens by FUSE passthrough (needs --no-writeback-cache).
    /// While a file is open this way, opening it for writing fails with EIO.
    #[arg(long)]
    passthrough: bool,
    /// Accepted for compatibility: passthrough is off unless --passthrough.
    #[arg(long, hide = true)]
    no_passthrough: bool,
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replicafs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_mount(args: MountArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.threads == Some(0) {
        return Err("--threads must be at least 1".into());
    }
    let mut opts = MountOptions::new(args.backing_dir, args.mountpoint);
    opts.state_dir = args.state_dir;
    opts.allow_other = args.allow_other;
    opts.read_only = args.read_only;
    if let Some(t) = args.threads {
        opts.threads = t;
    }
    opts.fuse = FuseOptions {
        writeback_cache: !args.no_writeback_cache,
        passthrough: args.passthrough && !args.no_passthrough,
    };
    let mounted = mount::mount(&opts)?;
    mounted.run_until_signal()?;
    Ok(())
}
