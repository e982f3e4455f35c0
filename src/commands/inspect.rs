use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    plan: PathBuf,
    /// Print the machine-readable report.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), String> {
    let plan = super::read_plan(&args.plan)?;
    if args.json {
        let text = serde_json::to_string_pretty(&lorac::report::json(&plan)).map_err(|e| e.to_string())?;
        super::print(&format!("{text}\n"))
    } else {
        super::print(&lorac::report::human(&plan))
    }
}
