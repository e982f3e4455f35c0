//! `lorac serve plan.bin`: the OpenAI-compatible HTTP server (see the lorac-server crate).

use std::net::SocketAddr;
use std::time::Duration;

use lorac_server::StartOptions;

use super::engine::{DeviceArg, EngineArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The `model` name clients use for the base model (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests that may wait for a place in the running batch; beyond it clients get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Seconds running requests may take to finish after SIGINT / SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

pub fn run(args: Args) -> Result<(), String> {
    // cubecl and wgpu log every device detail at info; keep their warnings only.
    super::engine::init_logging("info,cubecl_wgpu=warn,cubecl_cuda=warn,wgpu_core=warn,wgpu_hal=warn,naga=warn");
    let super::engine::Resolved { plan, model_dir, adapters } = args.engine.resolve()?;
    let address = format!("{}:{}", args.host, args.port);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| format!("cannot start the async runtime: {e}"))?;
    // Bind before the (slow) engine start-up, so a taken port fails at once.
    let listener = runtime.block_on(tokio::net::TcpListener::bind(&address)).map_err(|e| format!("cannot listen on {address}: {e}"))?;
    let local: SocketAddr = listener.local_addr().map_err(|e| format!("cannot listen on {address}: {e}"))?;
    let options = StartOptions {
        model_dir,
        device: args.engine.device.into(),
        served_model_name: args.served_model_name,
        adapters,
        max_queue: args.max_queue.max(1),
        max_model_len: args.engine.max_model_len,
        on_load: None,
    };
    let (state, device) = super::engine::start_with_progress(plan, options)?;
    let name = state.scheduler.info().served_model_name.clone();
    let adapters: Vec<String> = state.scheduler.models().into_iter().skip(1).map(|m| m.name).collect();
    tracing::info!(model = %name, %device, adapters = ?adapters, "serving on http://{local}");
    eprintln!("serving `{name}` on http://{local} (device {device}); Ctrl-C to stop");
    let grace = Duration::from_secs(args.shutdown_timeout);
    runtime.block_on(lorac_server::serve(listener, state, lorac_server::shutdown_signal(), grace)).map_err(|e| format!("server: {e}"))?;
    tracing::info!("stopped");
    Ok(())
}

impl From<DeviceArg> for lorac_server::DeviceChoice {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Cuda => lorac_server::DeviceChoice::Cuda,
            DeviceArg::Wgpu => lorac_server::DeviceChoice::Wgpu,
            DeviceArg::Auto => lorac_server::DeviceChoice::Auto,
        }
    }
}
