//! The engine behind the scheduler: [`Backend`] hides the runtime (CUDA or wgpu) and the
//! storage dtype (the plan's), so the scheduler is written once.

use std::panic::AssertUnwindSafe;
use std::path::Path;

use cubecl::Runtime;
use lorac_plan::{DType, Plan};
use lorac_runtime::executor::{Engine, EngineElem, EngineOptions, ExecResult, LoadProgress, LogitsMode, SeqId, SeqInput, StepOutput};

use crate::LoadObserver;
use crate::error::ServerError;

/// What the scheduler asks of an engine (see [`Engine`]); lives on the scheduler's thread.
pub trait Backend {
    fn plan(&self) -> &Plan;
    /// Longest sequence (prompt + generated) the engine holds.
    fn max_seq_len(&self) -> u32;
    /// Tokens per KV-cache page.
    fn page_size(&self) -> u32;
    fn add_sequence(&mut self) -> SeqId;
    fn release_sequence(&mut self, seq: SeqId) -> ExecResult<()>;
    fn load_adapter(&mut self, slot: u32, dir: &Path, name: &str) -> ExecResult<()>;
    fn unload_adapter(&mut self, slot: u32) -> ExecResult<()>;
    fn step(&mut self, batch: &[SeqInput], mode: LogitsMode) -> ExecResult<StepOutput>;
}

impl<R: Runtime, F: EngineElem> Backend for Engine<R, F> {
    fn plan(&self) -> &Plan {
        Engine::plan(self)
    }
    fn max_seq_len(&self) -> u32 {
        self.options().max_seq_len
    }
    fn page_size(&self) -> u32 {
        self.options().page_size
    }
    fn add_sequence(&mut self) -> SeqId {
        Engine::add_sequence(self)
    }
    fn release_sequence(&mut self, seq: SeqId) -> ExecResult<()> {
        Engine::release_sequence(self, seq)
    }
    fn load_adapter(&mut self, slot: u32, dir: &Path, name: &str) -> ExecResult<()> {
        self.load_adapter_named(slot, dir, name)
    }
    fn unload_adapter(&mut self, slot: u32) -> ExecResult<()> {
        Engine::unload_adapter(self, slot).map(|_| ())
    }
    fn step(&mut self, batch: &[SeqInput], mode: LogitsMode) -> ExecResult<StepOutput> {
        Engine::step(self, batch, mode)
    }
}

/// Which device runs the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cuda,
    Wgpu,
    /// CUDA when a driver and a GPU answer, wgpu (Vulkan, Metal, DX12, or a CPU driver such as
    /// lavapipe) otherwise.
    Auto,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cuda" => Ok(DeviceChoice::Cuda),
            "wgpu" => Ok(DeviceChoice::Wgpu),
            "auto" => Ok(DeviceChoice::Auto),
            other => Err(format!("unknown device `{other}` (cuda, wgpu or auto)")),
        }
    }
}

/// The CUDA driver library can be opened. cubecl's CUDA runtime panics when it cannot, so
/// `auto` looks first.
pub fn cuda_driver_present() -> bool {
    let names: &[&str] = if cfg!(windows) { &["nvcuda.dll"] } else { &["libcuda.so.1", "libcuda.so"] };
    names.iter().any(|name| {
        // Safety: opening the NVIDIA driver library runs only its own initialisers.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

/// Runs `f`, turning a panic (cubecl panics on device failures) into an error.
fn catch<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, ServerError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        let detail =
            panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("no detail");
        ServerError::Device(format!("{what} failed: {detail}"))
    })
}

/// Which device [`build_backend`] picked, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cuda,
    Wgpu,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cuda => "cuda",
            Device::Wgpu => "wgpu",
        })
    }
}

/// Creates the device client and the engine for `plan` (weights from `model_dir`), in the
/// plan's dtype.
pub fn build_backend(
    choice: DeviceChoice,
    plan: Plan,
    model_dir: &Path,
    max_model_len: Option<u32>,
    on_load: Option<&LoadObserver>,
) -> Result<(Box<dyn Backend>, Device), ServerError> {
    let device = match choice {
        DeviceChoice::Cuda => {
            if !cuda_driver_present() {
                return Err(ServerError::Device("--device cuda: the CUDA driver library (libcuda) cannot be loaded".into()));
            }
            Device::Cuda
        }
        DeviceChoice::Wgpu => Device::Wgpu,
        DeviceChoice::Auto => {
            if cuda_driver_present() && catch("CUDA client", cuda_client).is_ok() {
                Device::Cuda
            } else {
                Device::Wgpu
            }
        }
    };
    let backend = match device {
        Device::Cuda => engine_for_dtype(catch("CUDA client creation", cuda_client)?, plan, model_dir, max_model_len, on_load)?,
        Device::Wgpu => engine_for_dtype(catch("wgpu client creation", wgpu_client)?, plan, model_dir, max_model_len, on_load)?,
    };
    Ok((backend, device))
}

fn cuda_client() -> cubecl::client::ComputeClient<cubecl::cuda::CudaRuntime> {
    cubecl::cuda::CudaRuntime::client(&cubecl::cuda::CudaDevice::new(0))
}

fn wgpu_client() -> cubecl::client::ComputeClient<cubecl::wgpu::WgpuRuntime> {
    cubecl::wgpu::WgpuRuntime::client(&Default::default())
}

fn engine_for_dtype<R: Runtime>(
    client: cubecl::client::ComputeClient<R>,
    plan: Plan,
    model_dir: &Path,
    max_model_len: Option<u32>,
    on_load: Option<&LoadObserver>,
) -> Result<Box<dyn Backend>, ServerError> {
    let dtype = plan.model.dtype.activation();
    let mut options = EngineOptions::for_plan(&plan);
    if let Some(len) = max_model_len {
        options.max_seq_len = len;
    }
    let mut progress = |p: LoadProgress<'_>| {
        if let Some(observer) = on_load {
            (observer.0)(p);
        }
    };
    let backend: Box<dyn Backend> = match dtype {
        DType::F32 => {
            Box::new(catch("engine start-up", || Engine::<R, f32>::with_progress(client, plan, model_dir, options, &mut progress))??)
        }
        DType::BF16 => {
            Box::new(catch("engine start-up", || Engine::<R, half::bf16>::with_progress(client, plan, model_dir, options, &mut progress))??)
        }
        other => return Err(ServerError::Invalid(format!("the plan's dtype {other} has no engine (f32 and bf16 do)"))),
    };
    Ok(backend)
}
