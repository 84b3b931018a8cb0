//! `diskstream demo` (placeholder while it is written).

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

pub async fn run(_args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
