//! `replicafs demo`: a primary and a replica on 127.0.0.1 in a local folder.

use clap::Args;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder for the demo's directories (created; must be empty or absent).
    #[arg(long, default_value = "./replicafs-demo")]
    pub dir: std::path::PathBuf,
}

pub fn run(_args: DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    Err("not yet".into())
}
