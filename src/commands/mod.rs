//! One file per subcommand.

pub mod compile;
pub mod engine;
pub mod graph;
pub mod inspect;
pub mod run;
pub mod serve;

use std::io::Write;
use std::path::Path;

use lorac_plan::Plan;

/// Reads and checks a plan.bin, naming the file in every error.
pub fn read_plan(path: &Path) -> Result<Plan, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    lorac_plan::decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes a report to stdout; a reader that stops early (`| head`) is not an error.
pub fn print(text: &str) -> Result<(), String> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("cannot write to stdout: {e}")),
        _ => Ok(()),
    }
}
