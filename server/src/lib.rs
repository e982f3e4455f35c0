//! lorac's serving layer: `lorac serve` and `lorac run` are built from these pieces.
//!
//! - [`text`]: tokenizer, chat template, stop tokens, incremental detokenization.
//! - [`scheduler`]: the thread that owns the engine and runs continuous batching.
//! - [`adapter_registry`]: adapter names → pool slots, leases, LRU eviction, pins.
//! - [`http`]: the OpenAI-compatible API over the scheduler.
//! - [`backend`]: device (CUDA / wgpu) and dtype dispatch onto `lorac_runtime`'s engine.

pub(crate) mod adapter_registry;
pub mod backend;
pub mod error;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod sampling;
pub mod scheduler;
pub mod text;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lorac_plan::Plan;
pub use lorac_runtime::executor::LoadProgress;

pub use backend::{Backend, Device, DeviceChoice};
pub use error::{ApiError, ServerError};
pub use http::{AppState, router};
pub use scheduler::{EngineInfo, Event, FinishReason, Request, SchedulerConfig, SchedulerHandle, Usage};
pub use text::TextCodec;

/// How to start a server (or a one-shot `lorac run`).
#[derive(Debug, Clone)]
pub struct StartOptions {
    pub model_dir: PathBuf,
    pub device: DeviceChoice,
    /// The `model` name of the base model (default: the model directory's name).
    pub served_model_name: Option<String>,
    /// Loaded and pinned at start-up.
    pub adapters: Vec<(String, PathBuf)>,
    pub max_queue: usize,
    /// Longest sequence (prompt + completion); default: the model's `max_position_embeddings`,
    /// at most the KV cache's size (see `EngineOptions::for_plan`).
    pub max_model_len: Option<u32>,
    /// Told of each weight tensor's upload while the engine starts (a progress bar).
    pub on_load: Option<LoadObserver>,
}

/// A callback for weight loading progress ([`LoadProgress`]), called from the engine thread.
#[derive(Clone)]
pub struct LoadObserver(pub Arc<dyn Fn(LoadProgress<'_>) + Send + Sync>);

impl std::fmt::Debug for LoadObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadObserver")
    }
}

/// The name the base model is served under when none is given: the model directory's name.
pub fn default_served_name(model_dir: &Path) -> String {
    let canonical = model_dir.canonicalize().unwrap_or_else(|_| model_dir.to_path_buf());
    canonical.file_name().map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
}

/// Parses a `name=path` adapter argument.
pub fn parse_adapter_arg(arg: &str) -> Result<(String, PathBuf), String> {
    match arg.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_string(), PathBuf::from(path))),
        _ => Err(format!("`{arg}` is not NAME=PATH")),
    }
}

/// Loads the tokenizer, starts the scheduler thread (which builds the engine and loads the
/// start-up adapters), and returns the state the HTTP router serves, with the device used.
pub fn start(plan: Plan, options: StartOptions) -> Result<(AppState, Device), ServerError> {
    let codec = Arc::new(TextCodec::from_model_dir(&options.model_dir)?);
    let vocab = plan.model.vocab_size as usize;
    if codec.vocab_size() > vocab {
        return Err(ServerError::Tokenizer {
            path: options.model_dir.join("tokenizer.json"),
            message: format!("the tokenizer has {} tokens but the model's vocabulary has {vocab}", codec.vocab_size()),
        });
    }
    let served_model_name = options.served_model_name.clone().unwrap_or_else(|| default_served_name(&options.model_dir));
    if let Some((name, _)) = options.adapters.iter().find(|(name, _)| *name == served_model_name) {
        return Err(ServerError::Invalid(format!("adapter name `{name}` is the served model's name")));
    }
    let device = Arc::new(OnceLock::new());
    let device_out = Arc::clone(&device);
    let model_dir = options.model_dir.clone();
    let choice = options.device;
    let max_model_len = options.max_model_len;
    let on_load = options.on_load.clone();
    let make_backend = move || {
        let (backend, device) = backend::build_backend(choice, plan, &model_dir, max_model_len, on_load.as_ref())?;
        let _ = device_out.set(device);
        Ok(backend)
    };
    let config = SchedulerConfig { served_model_name, max_queue: options.max_queue, adapters: options.adapters };
    let scheduler = SchedulerHandle::start(make_backend, Arc::clone(&codec), config)?;
    let device = device.get().copied().unwrap_or(Device::Wgpu);
    Ok((AppState { scheduler, codec }, device))
}

/// Serves `state` on `listener` until `shutdown` resolves; then stops taking requests, lets
/// running generations finish for `grace` (then ends them with an error event), waits for
/// open responses and stops the scheduler thread.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let scheduler = state.scheduler.clone();
    let on_signal = scheduler.clone();
    let app = router(state).layer(axum::middleware::from_fn(log_request));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!(grace_seconds = grace.as_secs_f64(), "shutdown requested: finishing running requests");
            on_signal.shutdown(grace);
        })
        .await?;
    scheduler.shutdown(Duration::ZERO);
    tokio::task::spawn_blocking(move || scheduler.join()).await.map_err(std::io::Error::other)?;
    Ok(())
}

async fn log_request(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    tracing::debug!(%method, %path, status = response.status().as_u16(), "http");
    response
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
