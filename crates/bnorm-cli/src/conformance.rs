//! `bnorm conformance DIR`.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Replays every case in `dir`, one line per case, then `N passed, M failed`.
/// Returns the exit status: 0 when every case passed, 1 otherwise.
pub fn run(dir: &Path) -> Result<u8> {
    let results = bnorm::conformance::run_dir(dir)
        .with_context(|| format!("reading conformance cases from {}", dir.display()))?;
    if results.is_empty() {
        bail!("no *.safetensors case in {}", dir.display());
    }
    let mut failed = 0;
    for r in &results {
        if r.passed {
            outln!(
                "ok    {:<40} {} values; worst {}",
                r.name,
                r.compared,
                r.detail
            )?;
        } else {
            failed += 1;
            outln!("FAIL  {:<40} {}", r.name, r.detail)?;
        }
    }
    outln!("{} passed, {} failed", results.len() - failed, failed)?;
    Ok(if failed == 0 { 0 } else { 1 })
}
