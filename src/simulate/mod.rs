//! Placeholder until the simulator lands.
#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {}
pub fn run(_: &SimulateArgs) -> crate::Result<()> {
    Err(crate::Error::Usage("simulate is not available yet".into()))
}
