//! What `serve` and `run` share: the plan, model directory, device and start-up adapters,
//! logging, and a progress bar while the engine starts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use lorac_plan::Plan;
use lorac_server::{AppState, Device, LoadObserver, LoadProgress, StartOptions};

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    /// NVIDIA GPU through cubecl's CUDA runtime.
    Cuda,
    /// Vulkan / Metal / DX12 through wgpu (also CPU drivers such as lavapipe).
    Wgpu,
    /// CUDA when a driver and GPU are present, wgpu otherwise.
    Auto,
}

#[derive(clap::Args)]
pub struct EngineArgs {
    /// The plan written by `lorac compile`.
    pub plan: PathBuf,
    /// Model directory with the weights and tokenizer (default: the one the plan was compiled from).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT adapter to load and pin at start-up, as NAME=PATH (repeatable).
    #[arg(long = "lora", value_name = "NAME=PATH")]
    pub lora: Vec<String>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Longest sequence, prompt plus completion (default: the model's max_position_embeddings,
    /// at most the plan's KV cache).
    #[arg(long)]
    pub max_model_len: Option<u32>,
}

/// What [`EngineArgs`] resolve to.
pub struct Resolved {
    pub plan: Plan,
    pub model_dir: PathBuf,
    /// `--lora` adapters, name and directory.
    pub adapters: Vec<(String, PathBuf)>,
}

impl EngineArgs {
    /// The plan, the model directory and the parsed `--lora` adapters.
    pub fn resolve(&self) -> Result<Resolved, String> {
        let plan = super::read_plan(&self.plan)?;
        let model_dir = match &self.model {
            Some(dir) => dir.clone(),
            None => {
                let recorded = PathBuf::from(&plan.source.model_dir);
                if !recorded.join("config.json").is_file() {
                    return Err(format!(
                        "{}: the plan was compiled from `{}`, which has no config.json here (paths are relative to where `lorac compile` ran); pass --model <dir>",
                        self.plan.display(),
                        recorded.display()
                    ));
                }
                recorded
            }
        };
        if !model_dir.is_dir() {
            return Err(format!("--model {}: not a directory", model_dir.display()));
        }
        let mut adapters = Vec::new();
        for arg in &self.lora {
            let (name, path) = lorac_server::parse_adapter_arg(arg).map_err(|e| format!("--lora {e}"))?;
            if adapters.iter().any(|(n, _)| *n == name) {
                return Err(format!("--lora: adapter name `{name}` given twice"));
            }
            adapters.push((name, path));
        }
        Ok(Resolved { plan, model_dir, adapters })
    }
}

/// Logs to stderr; `RUST_LOG` overrides `default`.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Starts the engine behind a progress bar: checkpoint bytes uploaded per tensor, then a
/// spinner while the KV cache, adapters and kernel warm-up follow. indicatif hides the bar
/// when stderr is not a terminal.
pub fn start_with_progress(plan: Plan, mut options: StartOptions) -> Result<(AppState, Device), String> {
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(format!("loading {}", options.model_dir.display()));
    bar.enable_steady_tick(Duration::from_millis(100));
    let observer = bar.clone();
    options.on_load = Some(LoadObserver(Arc::new(move |p: LoadProgress<'_>| {
        observer.set_length(p.bytes_total);
        observer.set_position(p.bytes_done);
        if p.bytes_done >= p.bytes_total {
            observer.set_message("weights on the device; KV cache, adapters and kernel warm-up");
        }
    })));
    let started = std::time::Instant::now();
    let result = lorac_server::start(plan, options).map_err(|e| e.to_string());
    bar.finish_and_clear();
    if result.is_ok() {
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "engine ready");
    }
    result
}
