//! `compress prune --structured`: placeholder replaced by the structured-pruning work.

use crate::prune::{Args, Unit};

pub fn run(_a: &Args, _unit: Unit) -> anyhow::Result<()> {
    anyhow::bail!("--structured is not built yet")
}
