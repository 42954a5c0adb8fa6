//! Man pages and shell completions, generated from the command line's clap
//! definitions (clap_mangen, clap_complete); the package installs them.

use std::path::Path;

use clap_complete::Shell;

/// Writes `replicafs.1` and one page per subcommand (`replicafs-mount.1`, ...)
/// into `dir`.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)
}

/// Writes the completion script for `shell` to `out`.
pub fn write_completions(mut cmd: clap::Command, shell: Shell, out: &mut dyn std::io::Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}
