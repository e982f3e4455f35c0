//! CUDA graphs of the LoRA kernels: a decode step's launches replayed with one host call.
//!
//! Decode LoRA is launch-bound under cubecl 0.10: every launch crosses a channel to the
//! device's thread (5–7 µs of host time on the H100, against 2–5 µs of kernel), and cubecl
//! exposes no graph capture. Serving engines capture the decode step once and replay it;
//! this module does the same for cubecl kernels without changing them:
//!
//! 1. [`record_launches`] runs this crate's ordinary launch functions against a recording
//!    client ([`RecordingRuntime`]) that reports the real device's properties, so it receives
//!    the kernels, grids and packed arguments cubecl's CUDA runtime would have launched.
//! 2. [`GraphBuilder::capture`] compiles each distinct kernel with NVRTC under the options
//!    cubecl uses for the device's architecture, resolves each buffer binding to its device
//!    address through the CUDA client, and captures the launches on its own stream into a
//!    CUDA graph.
//! 3. [`LaunchGraph::replay`] launches the whole graph; its buffers stay allocated (held by
//!    the graph) for as long as it can replay.
//!
//! [`GraphBuilder::set_programmatic_launch`] captures with Hopper's programmatic dependent
//! launch instead: each kernel launches while the one before it runs, and the decode shrink
//! and expand load their adapter weights before they wait for it ([`GRID_DEPENDENCY_POINT`]).
//! On the H100 (BENCHMARKS.md, runs 62–65) that takes 35–45% off every single-token pair,
//! 20–38% off rank-16 pairs of 8 and 32 tokens, between 22% less and 5% more elsewhere, but
//! makes the MLA pairs of 32 and more tokens 5–22% slower: it stays a choice of the caller,
//! off by default.
//!
//! The graph runs on the builder's stream, not cubecl's: work cubecl queues that writes the
//! graph's inputs must be synchronised (`client.sync()`) before a replay, and the graph
//! ([`GraphBuilder::synchronize`]) before cubecl reads its outputs.

mod record;

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cubecl::client::ComputeClient;
use cubecl::cuda::{CudaCompiler, CudaDevice, CudaRuntime};
use cubecl::device::Device;
use cubecl::device_handle::DeviceHandle;
use cubecl::prelude::*;
use cubecl::server::ComputeServer;
use cubecl_runtime::id::KernelId;
use cubecl_runtime::storage::{ComputeStorage, ManagedResource};
use cudarc::driver::sys::{
    CUfunction_attribute, CUgraphInstantiate_flags, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchConfig, CUstream, CUstreamCaptureMode,
};
use cudarc::driver::{CudaContext, CudaFunction, CudaGraph, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::CompileOptions;

pub use record::{RecordedLaunch, RecordingDevice, RecordingRuntime, RecordingServer, record_launches};

use crate::cuda_source::{CudaOptions, cuda_options};

type CudaServer = <CudaRuntime as Runtime>::Server;
type GpuResource = <<CudaServer as ComputeServer>::Storage as ComputeStorage>::Resource;

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("CUDA driver: {call} failed: {error}")]
    Driver { call: &'static str, error: DriverError },
    #[error("kernel `{kernel}` did not compile: {reason}")]
    Compile { kernel: &'static str, reason: String },
    #[error("kernel `{kernel}` cannot be captured: {reason}")]
    Unsupported { kernel: &'static str, reason: String },
    #[error("buffer {index} of kernel `{kernel}` is not a live buffer of the CUDA client: {reason}")]
    Buffer { kernel: &'static str, index: usize, reason: String },
    #[error("cubecl's queued work failed before the capture: {0}")]
    CubeclQueue(String),
    #[error("a launch sequence to record asked the recording client to {operation}: only kernel launches can be captured")]
    NotRecordable { operation: &'static str },
    #[error(
        "the device (compute capability {major}.{minor}) is older than sm_70: cubecl passes kernel arguments as grid constants only from sm_70"
    )]
    Architecture { major: i32, minor: i32 },
}

fn driver(call: &'static str) -> impl FnOnce(DriverError) -> GraphError {
    move |error| GraphError::Driver { call, error }
}

/// One compiled kernel, loaded in the builder's context.
struct LoadedKernel {
    function: CudaFunction,
    entrypoint: String,
    block: (u32, u32, u32),
    shared_bytes: u32,
    registers: u32,
    /// Cubes one SM holds at once (the driver's occupancy calculation).
    cubes_per_sm: u32,
    /// Keeps the function's module loaded.
    _module: Arc<CudaModule>,
}

/// A recorded launch's kernel as CUDA C++, with what its launch needs.
#[derive(Debug, Clone)]
pub struct LoweredKernel {
    pub source: String,
    pub entrypoint: String,
    /// Threads per cube (x, y, z).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per cube.
    pub shared_bytes: u32,
}

/// The comment (`comment!` in a `#[cube]` kernel) that marks a kernel's grid dependency
/// point: before it, each thread reads only what no kernel of a graph writes (adapter weights,
/// batch metadata the host wrote) and writes nothing to global memory; every thread passes it
/// before any other read or write. Under a programmatic launch the point becomes the wait for
/// the kernel before, so the loads above it overlap that kernel's run.
pub const GRID_DEPENDENCY_POINT: &str = "lorac: grid dependency point";

/// Marks a [`GRID_DEPENDENCY_POINT`] in a kernel where `enabled` (comptime) and, at run time,
/// where the thread reaches it with `here` set. The one place that spells the comment
/// (`comment!` takes only a literal; the lowering test finds it by the constant).
#[cube]
pub(crate) fn grid_dependency_point(#[comptime] enabled: bool, here: bool) {
    if comptime!(enabled) {
        if here {
            comment!("lorac: grid dependency point");
        }
    }
}

/// What a grid dependency point becomes: wait until the kernel before this one in the stream
/// has finished and its writes are visible (`griddepcontrol.wait`), then let the kernel after
/// this one launch (`griddepcontrol.launch_dependents`). Triggering only after the wait keeps
/// at most two kernels resident: the running one and the next one's prologue.
const GRID_DEPENDENCY_WAIT: &str =
    "asm volatile(\"griddepcontrol.wait;\" ::: \"memory\");\nasm volatile(\"griddepcontrol.launch_dependents;\" ::: \"memory\");\n";

impl LoweredKernel {
    /// The kernel as the dependent of a programmatic launch (sm_90+): each of its
    /// [`GRID_DEPENDENCY_POINT`] comments becomes the wait for the kernel before it, or, in a
    /// kernel without one, its first statements wait. Either way it reads that kernel's
    /// output and writes only after the wait, as under a plain launch; what overlaps is this
    /// kernel's launch, cube scheduling and the loads above its point with the run before.
    ///
    /// Its pointers lose `__restrict__`: cubecl marks read-only buffers `const __restrict__`,
    /// a promise that nothing writes them while the kernel runs, so the compiler may read them
    /// through the non-coherent path and schedule those loads freely. Under a programmatic
    /// launch the kernel before still writes them: with the qualifier kept, the two-layer
    /// chain test (`cuda_graph_decode_chain_*`) read stale x on the H100 (run 64).
    pub fn with_grid_dependency(mut self) -> Result<Self, GraphError> {
        self.source = self.source.replace("__restrict__", "");
        let marker = format!("// {GRID_DEPENDENCY_POINT}\n");
        if self.source.contains(&marker) {
            self.source = self.source.replace(&marker, GRID_DEPENDENCY_WAIT);
            return Ok(self);
        }
        let kernel_start = self.source.find(&format!("{} (", self.entrypoint)).and_then(|at| {
            let params_end = at + self.source[at..].find(')')?;
            Some(params_end + self.source[params_end..].find('{')? + 1)
        });
        let Some(body) = kernel_start else {
            return Err(GraphError::Compile { kernel: "(lowered source)", reason: format!("no body for entry point {}", self.entrypoint) });
        };
        self.source.insert_str(body, &format!("\n{GRID_DEPENDENCY_WAIT}"));
        Ok(self)
    }
}

/// Lowers a recorded launch's kernel to CUDA C++ as cubecl's CUDA runtime would on a device of
/// compute capability `arch_version` (major·10 + minor). Needs no GPU.
pub fn lower_recorded(launch: &RecordedLaunch, arch_version: u32) -> Result<LoweredKernel, GraphError> {
    lower_with(launch, &cuda_options(arch_version))
}

fn lower_with(launch: &RecordedLaunch, options: &CudaOptions) -> Result<LoweredKernel, GraphError> {
    let kernel = launch.kernel.name();
    let compile_error = |reason: String| GraphError::Compile { kernel, reason };
    let compiled = launch
        .kernel
        .compile(&mut CudaCompiler::default(), options, launch.mode, launch.kernel.address_type())
        .map_err(|e| compile_error(e.to_string()))?;
    let shared_bytes = compiled.repr.as_ref().map_or(0, |repr| repr.shared_memory_size());
    let shared_bytes = u32::try_from(shared_bytes).map_err(|_| compile_error(format!("{shared_bytes} bytes of shared memory")))?;
    let dim = compiled.cube_dim;
    Ok(LoweredKernel { source: compiled.source, entrypoint: compiled.entrypoint_name, block: (dim.x, dim.y, dim.z), shared_bytes })
}

/// Captures recorded launches into CUDA graphs on one stream, compiling each distinct kernel
/// once.
pub struct GraphBuilder {
    device: CudaDevice,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    options: CudaOptions,
    arch_flag: String,
    /// Kernels compiled so far, by id, whether they were compiled for programmatic launch and
    /// the shared-memory carveout they prefer.
    kernels: HashMap<(KernelId, bool, Option<u8>), Arc<LoadedKernel>>,
    /// Capture launches as programmatic dependents of the launch before them (sm_90+).
    programmatic: bool,
    /// Preferred shared-memory carveout of every kernel, in percent of the most shared memory
    /// an SM offers; `None` leaves the driver's choice per kernel.
    carveout: Option<u8>,
    arch_version: u32,
}

impl GraphBuilder {
    /// A builder on `device`, in the primary context cubecl's CUDA runtime also uses (so both
    /// see the same device addresses).
    pub fn new(device: &CudaDevice) -> Result<Self, GraphError> {
        let context = CudaContext::new(device.index).map_err(driver("cuDevicePrimaryCtxRetain"))?;
        let (major, minor) = context.compute_capability().map_err(driver("cuDeviceGetAttribute"))?;
        if major < 7 {
            return Err(GraphError::Architecture { major, minor });
        }
        let version = (major * 10 + minor) as u32;
        // The flags cubecl's CUDA runtime passes NVRTC (`a` targets from sm_90 on).
        let arch_flag = format!("--gpu-architecture=sm_{version}{}", if version >= 90 { "a" } else { "" });
        let stream = context.new_stream().map_err(driver("cuStreamCreate"))?;
        Ok(Self {
            device: device.clone(),
            context,
            stream,
            options: cuda_options(version),
            arch_flag,
            kernels: HashMap::new(),
            programmatic: false,
            carveout: None,
            arch_version: version,
        })
    }

    /// Captures later graphs with programmatic dependent launches (Hopper's PDL): each kernel
    /// launches while the one before it runs and waits for it on the device (see
    /// [`LoweredKernel::with_grid_dependency`]). Needs sm_90 or newer. Kernels chosen for such
    /// a graph should be chosen for it too: [`crate::shrink::ShrinkKernel::choose_within_for`]
    /// and [`crate::expand::ExpandKernel::choose_summing_for`] with
    /// [`crate::shrink_mma::LaunchMode::Programmatic`].
    pub fn set_programmatic_launch(&mut self, on: bool) -> Result<(), GraphError> {
        if on && self.arch_version < 90 {
            return Err(GraphError::Unsupported {
                kernel: "(graph)",
                reason: format!("programmatic dependent launch needs sm_90, the device is sm_{}", self.arch_version),
            });
        }
        self.programmatic = on;
        Ok(())
    }

    /// Captures later graphs with every kernel preferring the same split of each SM's L1 and
    /// shared memory: `percent` of the most shared memory an SM offers (`None`: the driver's
    /// choice per kernel). The driver otherwise sizes the split per kernel (on the H100 the
    /// decode shrink gets 16 KiB of shared memory, the expand 135 KiB), and an SM changes its
    /// split only once it is idle: between kernels that differ it drains, and under a
    /// programmatic launch, where it is rarely idle, the next kernel's cubes may not fit.
    pub fn set_shared_memory_carveout(&mut self, percent: Option<u8>) -> Result<(), GraphError> {
        if percent.is_some_and(|p| p > 100) {
            return Err(GraphError::Unsupported { kernel: "(graph)", reason: format!("a carveout of {percent:?} percent") });
        }
        self.carveout = percent;
        Ok(())
    }

    fn load(&mut self, launch: &RecordedLaunch) -> Result<Arc<LoadedKernel>, GraphError> {
        let mut id = launch.kernel.id();
        id.mode(launch.mode);
        let id = (id, self.programmatic, self.carveout);
        if let Some(kernel) = self.kernels.get(&id) {
            return Ok(kernel.clone());
        }
        let name = launch.kernel.name();
        let compile_error = |reason: String| GraphError::Compile { kernel: name, reason };
        let lowered = lower_with(launch, &self.options)?;
        let lowered = if self.programmatic { lowered.with_grid_dependency()? } else { lowered };
        let mut options = vec![self.arch_flag.clone(), "-lineinfo".to_string()];
        for include in [cubecl::cuda::install::include_path(), cubecl::cuda::install::cccl_include_path()] {
            if include.exists() {
                options.push(format!("--include-path={}", include.display()));
            }
        }
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(&lowered.source, CompileOptions { options, ..Default::default() })
            .map_err(|e| compile_error(format!("NVRTC: {e}")))?;
        let module = self.context.load_module(ptx).map_err(driver("cuModuleLoadData"))?;
        let function = module.load_function(&lowered.entrypoint).map_err(driver("cuModuleGetFunction"))?;
        function
            .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, lowered.shared_bytes as i32)
            .map_err(driver("cuFuncSetAttribute"))?;
        if let Some(percent) = self.carveout {
            function
                .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, i32::from(percent))
                .map_err(driver("cuFuncSetAttribute"))?;
        }
        let registers = function.num_regs().map_err(driver("cuFuncGetAttribute"))? as u32;
        let (x, y, z) = lowered.block;
        let cubes_per_sm = function
            .occupancy_max_active_blocks_per_multiprocessor(x * y * z, lowered.shared_bytes as usize, None)
            .map_err(driver("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
        let kernel = Arc::new(LoadedKernel {
            function,
            entrypoint: lowered.entrypoint,
            block: lowered.block,
            shared_bytes: lowered.shared_bytes,
            registers,
            cubes_per_sm,
            _module: module,
        });
        self.kernels.insert(id, kernel.clone());
        Ok(kernel)
    }

    /// The device address of each of `launch`'s buffers, and the resources that keep them
    /// allocated, in one call to the CUDA server's thread.
    fn resolve(&self, server: &DeviceHandle<CudaServer>, launch: &RecordedLaunch) -> Result<Vec<ManagedResource<GpuResource>>, GraphError> {
        let stream = cubecl::stream_id::StreamId::current();
        let kernel = launch.kernel.name();
        let bindings = launch.args.buffers.clone();
        let resolved = server
            .submit_blocking(move |server| bindings.into_iter().map(|binding| server.get_resource(binding, stream)).collect::<Vec<_>>())
            .map_err(|e| GraphError::Buffer { kernel, index: 0, reason: format!("the CUDA server did not answer: {e:?}") })?;
        resolved
            .into_iter()
            .enumerate()
            .map(|(index, resource)| resource.map_err(|e| GraphError::Buffer { kernel, index, reason: e.to_string() }))
            .collect()
    }

    /// Captures `launches`, in order, into a graph. Everything cubecl has queued is finished
    /// first, so the graph's inputs written through the CUDA client are in place.
    pub fn capture(&mut self, cuda: &ComputeClient<CudaRuntime>, launches: &[RecordedLaunch]) -> Result<LaunchGraph, GraphError> {
        struct Prepared {
            kernel: Arc<LoadedKernel>,
            grid: (u32, u32, u32),
            addresses: Vec<u64>,
            info: Vec<u64>,
        }
        let server = DeviceHandle::<CudaServer>::new(self.device.to_id());
        let mut resources = Vec::new();
        let mut prepared = Vec::with_capacity(launches.len());
        for launch in launches {
            let name = launch.kernel.name();
            let unsupported = |reason: &str| GraphError::Unsupported { kernel: name, reason: reason.to_string() };
            let grid = match launch.count {
                CubeCount::Static(x, y, z) => (x, y, z),
                CubeCount::Dynamic(_) => return Err(unsupported("its cube count is read from a device buffer")),
            };
            if !launch.args.tensor_maps.is_empty() {
                return Err(unsupported("it takes TMA tensor maps"));
            }
            if launch.args.info.dynamic_metadata_offset < launch.args.info.data.len() {
                return Err(unsupported("it takes dynamic metadata (a separate device buffer in cubecl)"));
            }
            if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
                continue; // An empty grid does nothing (and CUDA refuses to launch it).
            }
            let kernel = self.load(launch)?;
            let buffers = self.resolve(&server, launch)?;
            let addresses = buffers.iter().map(|b| b.resource().ptr).collect();
            resources.extend(buffers);
            prepared.push(Prepared { kernel, grid, addresses, info: launch.args.info.data.clone() });
        }
        cubecl::future::block_on(cuda.sync()).map_err(|e| GraphError::CubeclQueue(e.to_string()))?;

        self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(driver("cuStreamBeginCapture"))?;
        let mut launched: Result<(), GraphError> = Ok(());
        for p in &mut prepared {
            // Parameters as cubecl passes them: one pointer to each buffer's address, then the
            // `info` block by value (a grid constant).
            let mut params: Vec<*mut c_void> = p.addresses.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
            params.push(p.info.as_mut_ptr() as *mut c_void);
            // SAFETY: the function was compiled from this launch's kernel, whose parameters are
            // exactly these buffers and this info block; the addresses are live allocations held
            // by `resources`; `params` outlives the call, which copies them into the graph node.
            let result = unsafe { launch(&p.kernel, p.grid, self.stream.cu_stream(), &mut params, self.programmatic) };
            if let Err(error) = result {
                launched = Err(GraphError::Driver { call: "cuLaunchKernel (capturing)", error });
                break;
            }
        }
        // End the capture even after a failed launch, so the stream is usable again.
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0)).map_err(driver("cuStreamEndCapture / cuGraphInstantiate"));
        launched?;
        let graph = graph?.ok_or(GraphError::Unsupported { kernel: "(graph)", reason: "the capture recorded nothing".into() })?;
        graph.upload().map_err(driver("cuGraphUpload"))?;
        let launches = prepared.into_iter().map(|p| (p.grid, p.kernel)).collect();
        Ok(LaunchGraph { graph, launches, _resources: resources })
    }

    /// Waits for every graph replayed so far.
    pub fn synchronize(&self) -> Result<(), GraphError> {
        self.stream.synchronize().map_err(driver("cuStreamSynchronize"))
    }
}

/// Launches `kernel` on `stream`, as a programmatic dependent of the previous launch when
/// `programmatic` (its source then waits for that launch itself).
///
/// # Safety
/// `params` must match the kernel's parameters and point at live values.
unsafe fn launch(
    kernel: &LoadedKernel,
    grid: (u32, u32, u32),
    stream: CUstream,
    params: &mut [*mut c_void],
    programmatic: bool,
) -> Result<(), DriverError> {
    if !programmatic {
        return unsafe {
            cudarc::driver::result::launch_kernel(kernel.function.cu_function(), grid, kernel.block, kernel.shared_bytes, stream, params)
        };
    }
    let mut attribute: CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let config = CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: kernel.block.0,
        blockDimY: kernel.block.1,
        blockDimZ: kernel.block.2,
        sharedMemBytes: kernel.shared_bytes,
        hStream: stream,
        attrs: &mut attribute,
        numAttrs: 1,
    };
    unsafe {
        cudarc::driver::sys::cuLaunchKernelEx(&config, kernel.function.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()).result()
    }
}

/// One launch of a graph as the device runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSummary {
    pub entrypoint: String,
    pub grid: (u32, u32, u32),
    /// Threads per cube (x, y, z).
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
    /// Registers per thread.
    pub registers: u32,
    /// Cubes one SM holds at once.
    pub cubes_per_sm: u32,
}

impl KernelSummary {
    pub fn cubes(&self) -> u64 {
        u64::from(self.grid.0) * u64::from(self.grid.1) * u64::from(self.grid.2)
    }
}

impl std::fmt::Display for KernelSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ((gx, gy, gz), (bx, by, bz)) = (self.grid, self.block);
        write!(
            f,
            "{}: {} cubes ({gx}×{gy}×{gz}) of {bx}×{by}×{bz} threads, {} registers, {} B shared, {} cubes per SM",
            self.entrypoint,
            self.cubes(),
            self.registers,
            self.shared_bytes,
            self.cubes_per_sm
        )
    }
}

/// A captured sequence of kernel launches.
pub struct LaunchGraph {
    graph: CudaGraph,
    /// Each launch's grid and kernel, in order (held so its module stays loaded).
    launches: Vec<((u32, u32, u32), Arc<LoadedKernel>)>,
    /// The buffers the kernels address: held so cubecl cannot free or reuse them.
    _resources: Vec<ManagedResource<GpuResource>>,
}

impl LaunchGraph {
    /// Launches every captured kernel, in order, on the builder's stream (asynchronously).
    pub fn replay(&self) -> Result<(), GraphError> {
        self.graph.launch().map_err(driver("cuGraphLaunch"))
    }

    /// How many kernel launches the graph holds.
    pub fn kernels(&self) -> usize {
        self.launches.len()
    }

    /// Each launch, in order: kernel, grid, block and what limits its occupancy.
    pub fn summaries(&self) -> impl Iterator<Item = KernelSummary> + '_ {
        self.launches.iter().map(|(grid, k)| KernelSummary {
            entrypoint: k.entrypoint.clone(),
            grid: *grid,
            block: k.block,
            shared_bytes: k.shared_bytes,
            registers: k.registers,
            cubes_per_sm: k.cubes_per_sm,
        })
    }
}
