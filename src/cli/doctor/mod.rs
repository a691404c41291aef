//! `outpost doctor`: checks the setup `serve` would run with (data
//! directory, listener, upstream) and prints one verdict per line with what
//! to do about it; `--bazelrc` prints the client lines for this setup.

use crate::config::Config;

/// What `outpost doctor` was asked to do besides the checks.
#[derive(Debug, Clone, Default)]
pub struct DoctorOptions {
    /// Print only the `.bazelrc` lines for this setup.
    pub bazelrc: bool,
}

/// Runs the checks against `config` and prints the report; `Ok(false)` when
/// something is broken (the binary then exits 1).
pub async fn run(config: &Config, options: &DoctorOptions) -> anyhow::Result<bool> {
    let _ = (config, options);
    anyhow::bail!("outpost doctor is not built yet")
}
