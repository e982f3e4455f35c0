//! A cubecl runtime whose client records kernel launches instead of running them.
//!
//! cubecl 0.10 launches each kernel through a channel to a per-device thread (5–7 µs of host
//! time per launch on the H100, more than a decode LoRA kernel runs) and exposes neither its
//! CUDA stream nor a graph-capture API. The launch functions of this crate are generic over the
//! runtime, so running them against [`RecordingRuntime`] yields exactly what cubecl's CUDA
//! runtime would have launched: the kernel (its CUDA compiler task), the grid, and the packed
//! arguments (buffer bindings and the `info` block of scalars and array lengths). The graph
//! builder in [`super`] compiles and launches those records itself.
//!
//! The recording client reports the properties of the device it stands in for, so every kernel
//! configuration the launch functions derive from them is the one the real device would get.
//! Nothing here touches a GPU: buffers are only referred to, never read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cubecl::cuda::{CudaCompiler, CudaRuntime};
use cubecl::device::{Device, DeviceId, DeviceService, ServerUtilitiesHandle};
use cubecl::future::DynFut;
use cubecl::ir::{DeviceProperties, TargetProperties};
use cubecl::prelude::*;
use cubecl::profile::ProfileDuration;
use cubecl::server::{
    Binding, ComputeServer, CopyDescriptor, ExecutionMode, KernelArguments, ProfileError, ProfilingToken, ServerCommunication, ServerError,
    ServerUtilities,
};
use cubecl::stream_id::StreamId;
use cubecl::zspace::{Shape, Strides};
use cubecl::{CubeTask, bytes::Bytes, client::ComputeClient};
use cubecl_runtime::allocator::PitchedMemoryLayoutPolicy;
use cubecl_runtime::logging::ServerLogger;
use cubecl_runtime::memory_management::{ManagedMemoryHandle, MemoryAllocationMode, MemoryUsage};
use cubecl_runtime::storage::{BytesStorage, ManagedResource};

use super::GraphError;

/// `DeviceId::type_id` of recording devices, apart from every real runtime's.
const RECORDING_TYPE_ID: u16 = 0x4c52;

/// One kernel launch as cubecl's CUDA runtime would have received it.
pub struct RecordedLaunch {
    pub kernel: Box<dyn CubeTask<CudaCompiler>>,
    pub count: CubeCount,
    pub args: KernelArguments,
    pub mode: ExecutionMode,
}

impl std::fmt::Debug for RecordedLaunch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordedLaunch")
            .field("kernel", &self.kernel.name())
            .field("count", &self.count)
            .field("buffers", &self.args.buffers.len())
            .field("info_words", &self.args.info.data.len())
            .finish()
    }
}

/// What a recording session received: its launches, and any other request (a write, an
/// allocation), which a graph of launches cannot replay.
#[derive(Default)]
struct Recording {
    launches: Vec<RecordedLaunch>,
    refused: Vec<&'static str>,
}

type Log = Arc<Mutex<Recording>>;

fn lock(log: &Log) -> MutexGuard<'_, Recording> {
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A device that stands in for one real device's properties; one per distinct set of
/// properties in a process (see [`record_launches`]).
#[derive(Clone, Debug, Default)]
pub struct RecordingDevice {
    pub index: u16,
}

impl Device for RecordingDevice {
    fn from_id(device_id: DeviceId) -> Self {
        Self { index: device_id.index_id }
    }

    fn to_id(&self) -> DeviceId {
        DeviceId::new(RECORDING_TYPE_ID, self.index)
    }
}

/// The cubecl runtime of the recording client: CUDA's compiler and target, a server that keeps
/// launches.
#[derive(Clone, Debug)]
pub struct RecordingRuntime;

impl Runtime for RecordingRuntime {
    type Compiler = CudaCompiler;
    type Server = RecordingServer;
    type Device = RecordingDevice;

    fn client(device: &Self::Device) -> ComputeClient<Self> {
        ComputeClient::load(device)
    }

    fn name(_client: &ComputeClient<Self>) -> &'static str {
        "cuda-recording"
    }

    fn require_array_lengths() -> bool {
        // Same `info` layout as the CUDA runtime's.
        CudaRuntime::require_array_lengths()
    }

    fn max_cube_count() -> (u32, u32, u32) {
        CudaRuntime::max_cube_count()
    }

    fn can_read_tensor(shape: &Shape, strides: &Strides) -> bool {
        CudaRuntime::can_read_tensor(shape, strides)
    }

    fn target_properties() -> TargetProperties {
        CudaRuntime::target_properties()
    }

    fn enumerate_devices(_type_id: u16, _info: &()) -> Vec<DeviceId> {
        Vec::new()
    }
}

/// Keeps every launch it is sent; every other request is refused (the recording client owns
/// no memory: buffers come from the real device's client).
pub struct RecordingServer {
    utilities: Arc<ServerUtilities<Self>>,
    log: Log,
}

impl std::fmt::Debug for RecordingServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingServer").finish_non_exhaustive()
    }
}

fn refused(what: &str) -> ServerError {
    ServerError::Generic {
        reason: format!("the launch-recording client does not {what}: use the real device's client"),
        backtrace: Default::default(),
    }
}

impl DeviceService for RecordingServer {
    fn init(device_id: DeviceId) -> Self {
        // Registered by `recorder` through `ComputeClient::init` before any client loads it.
        panic!("recording device {device_id} used before `record_launches` registered it")
    }

    fn utilities(&self) -> ServerUtilitiesHandle {
        self.utilities.clone()
    }
}

impl ServerCommunication for RecordingServer {
    const SERVER_COMM_ENABLED: bool = false;
}

impl RecordingServer {
    fn refuse(&self, operation: &'static str) {
        lock(&self.log).refused.push(operation);
    }
}

impl ComputeServer for RecordingServer {
    type Kernel = Box<dyn CubeTask<CudaCompiler>>;
    type Info = ();
    type MemoryLayoutPolicy = PitchedMemoryLayoutPolicy;
    type Storage = BytesStorage;

    fn initialize_memory(&mut self, _memory: ManagedMemoryHandle, _size: u64, _stream_id: StreamId) {
        self.refuse("allocate memory");
    }

    fn logger(&self) -> Arc<ServerLogger> {
        self.utilities.logger.clone()
    }

    fn utilities(&self) -> Arc<ServerUtilities<Self>> {
        self.utilities.clone()
    }

    fn read(&mut self, _descriptors: Vec<CopyDescriptor>, _stream_id: StreamId) -> DynFut<Result<Vec<Bytes>, ServerError>> {
        self.refuse("read buffers");
        Box::pin(async { Err(refused("read buffers")) })
    }

    fn write(&mut self, _descriptors: Vec<(CopyDescriptor, Bytes)>, _stream_id: StreamId) {
        self.refuse("write buffers");
    }

    fn sync(&mut self, _stream_id: StreamId) -> DynFut<Result<(), ServerError>> {
        Box::pin(async { Ok(()) })
    }

    fn get_resource(
        &mut self,
        _binding: Binding,
        _stream_id: StreamId,
    ) -> Result<ManagedResource<<Self::Storage as cubecl_runtime::storage::ComputeStorage>::Resource>, ServerError> {
        self.refuse("resolve buffers");
        Err(refused("own buffers"))
    }

    unsafe fn launch(&mut self, kernel: Self::Kernel, count: CubeCount, args: KernelArguments, mode: ExecutionMode, _stream_id: StreamId) {
        lock(&self.log).launches.push(RecordedLaunch { kernel, count, args, mode });
    }

    fn flush(&mut self, _stream_id: StreamId) -> Result<(), ServerError> {
        Ok(())
    }

    fn memory_usage(&mut self, _stream_id: StreamId) -> Result<MemoryUsage, ServerError> {
        Err(refused("own memory"))
    }

    fn memory_cleanup(&mut self, _stream_id: StreamId) {}

    fn start_profile(&mut self, _stream_id: StreamId) -> Result<ProfilingToken, ServerError> {
        Err(refused("profile"))
    }

    fn end_profile(&mut self, _stream_id: StreamId, _token: ProfilingToken) -> Result<ProfileDuration, ProfileError> {
        Err(ProfileError::NotRegistered { backtrace: Default::default() })
    }

    fn allocation_mode(&mut self, _mode: MemoryAllocationMode, _stream_id: StreamId) {}
}

struct Recorder {
    client: ComputeClient<RecordingRuntime>,
    log: Log,
    /// One recording session at a time per recorder: the log is shared.
    session: Mutex<()>,
}

/// The recorders of this process, one per distinct set of device properties.
fn recorder(properties: &DeviceProperties) -> &'static Recorder {
    static RECORDERS: OnceLock<Mutex<HashMap<u64, &'static Recorder>>> = OnceLock::new();
    let mut recorders = RECORDERS.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let next_index = recorders.len() as u16;
    recorders.entry(properties.checksum()).or_insert_with(|| {
        let log = Log::default();
        let utilities = ServerUtilities::new(
            properties.clone(),
            Arc::new(ServerLogger::default()),
            (),
            PitchedMemoryLayoutPolicy::new(properties.memory.alignment as usize),
        );
        let server = RecordingServer { utilities: Arc::new(utilities), log: log.clone() };
        let client = ComputeClient::init(&RecordingDevice { index: next_index }, server);
        // Leaked on purpose: cubecl's device registry keeps the server for the process anyway.
        Box::leak(Box::new(Recorder { client, log, session: Mutex::new(()) }))
    })
}

/// Runs `launches` against a client that stands in for a device with `properties` and returns
/// what it launched, in order. Buffers passed to the launch functions must come from the real
/// device's client: the recording client allocates, reads and writes nothing, and a session
/// that asked it to is an error (its launches would replay without those writes).
pub fn record_launches<T>(
    properties: &DeviceProperties,
    launches: impl FnOnce(&ComputeClient<RecordingRuntime>) -> T,
) -> Result<(T, Vec<RecordedLaunch>), GraphError> {
    let recorder = recorder(properties);
    let _session: MutexGuard<'_, ()> = recorder.session.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // A session that panicked part-way may have left launches behind, some still queued.
    recorder.client.flush().map_err(|_| GraphError::NotRecordable { operation: "flush the launch queue" })?;
    *lock(&recorder.log) = Recording::default();
    let out = launches(&recorder.client);
    // Launches reach the server through a channel: a blocking call drains it.
    let flushed = recorder.client.flush();
    let recording = std::mem::take(&mut *lock(&recorder.log));
    if let Some(operation) = recording.refused.first() {
        return Err(GraphError::NotRecordable { operation });
    }
    flushed.map_err(|_| GraphError::NotRecordable { operation: "flush the launch queue" })?;
    Ok((out, recording.launches))
}
