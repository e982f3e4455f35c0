//! The CUDA C++ of the tensor-core LoRA kernels for a GPU that is not attached, from cubecl's
//! own CUDA code generator, so the kernels that only run on NVIDIA hardware can be expanded,
//! compiled and inspected on a machine without one.
//!
//! On wgpu (CI's lavapipe) the tensor-core shrink and expand run with an emulated multiply,
//! which tests their tiling but not their MMA code. Here their configurations are derived for
//! a described device ([`h100_properties`]) exactly as the runtime derives them from a live
//! client, and each kernel is expanded to cubecl IR and lowered to CUDA C++ with the options
//! cubecl's CUDA runtime uses on that architecture. `lora_bench --cuda-sources DIR` writes the
//! prefill cases' sources; `scripts/nvrtc_check.py` compiles them with NVRTC and ptxas (from
//! PyPI wheels, no GPU) and prints registers, spills, occupancy and PTX instruction counts.
//! Expansion needs a `ComputeClient` of some runtime because cubecl's kernel types carry one;
//! the kernels here read nothing from its device properties, so a wgpu client (lavapipe)
//! serves.

use cubecl::cuda::CudaCompiler;
use cubecl::features::{MmaConfig, Plane, TypeUsage};
use cubecl::ir::{BarrierLevel, DeviceProperties, ElemType, FloatKind, HardwareProperties, MemoryDeviceProperties, OpaqueType};
use cubecl::prelude::*;
use cubecl::server::ExecutionMode;
use cubecl::{CompilationError, Compiler};

use crate::config::ExpandConfig;
use crate::expand::expand_kernel::ExpandKernel as ScalarExpandKernel;
use crate::expand_mma::{MmaExpandConfig, expand_mma_kernel::ExpandMmaKernel};
use crate::expand_mma_pipelined::{A_VECTOR, expand_mma_pipelined_kernel::ExpandMmaPipelinedKernel};
use crate::moe_combine::{COMBINE_THREADS, moe_combine_kernel::MoeCombineKernel};
use crate::moe_grouped::{ALIGN_THREADS, AlignConfig, moe_align_kernel::MoeAlignKernel};
use crate::shrink_mma::{MmaShrinkConfig, TILE, shrink_mma_kernel::ShrinkMmaKernel};
use crate::shrink_mma_pipelined::shrink_mma_pipelined_kernel::ShrinkMmaPipelinedKernel;

/// The properties cubecl's CUDA runtime (0.10) reports for an H100 SXM (sm_90, 132
/// multiprocessors, 227 KiB of opt-in shared memory per cube, 32-lane warps), as far as the
/// kernel configurations read them: MMA shapes (cooperative and manual), `ldmatrix`,
/// `stmatrix`, asynchronous copies and block barriers, shared memory, multiprocessors, plane
/// width and load width.
pub fn h100_properties() -> DeviceProperties {
    let hardware = HardwareProperties {
        load_width: 128,
        plane_size_min: 32,
        plane_size_max: 32,
        max_bindings: 1024,
        max_shared_memory_size: 232_448,
        max_cube_count: (u32::MAX >> 1, 65_535, 65_535),
        max_units_per_cube: 1024,
        max_cube_dim: (1024, 1024, 64),
        num_streaming_multiprocessors: Some(132),
        num_cpu_cores: None,
        num_tensor_cores: Some(4),
        min_tensor_cores_dim: Some(8),
        max_vector_size: usize::MAX,
    };
    let memory = MemoryDeviceProperties { max_page_size: 20 << 30, alignment: 256 };
    let mut props = DeviceProperties::new(Default::default(), memory, hardware, cubecl::profile::TimingMethod::System);
    props.register_type_usage(OpaqueType::Barrier(BarrierLevel::Cube), TypeUsage::Buffer);
    props.features.copy_async = true;
    props.features.plane.insert(Plane::Ops);
    props.features.plane.insert(Plane::Sync);
    let f32_ty: StorageType = ElemType::Float(FloatKind::F32).into();
    for kind in [FloatKind::F16, FloatKind::BF16] {
        let elem: StorageType = ElemType::Float(kind).into();
        props.features.matmul.cmma.insert(MmaConfig { a_type: elem, b_type: elem, cd_type: f32_ty, m: TILE, n: TILE, k: TILE });
        props.features.matmul.mma.insert(MmaConfig { a_type: elem, b_type: elem, cd_type: f32_ty, m: 16, n: 8, k: 16 });
        props.features.matmul.ldmatrix.insert(elem);
        props.features.matmul.stmatrix.insert(elem);
    }
    props
}

/// The compiler options cubecl's CUDA runtime sets on sm_90 (grid constants, clusters, fast
/// math, `elect.sync`), so the generated source is the one the device would compile.
fn sm90_options() -> CudaOptions {
    cuda_options(90)
}

/// The compiler options cubecl's CUDA runtime (0.10) sets for compute capability
/// `arch_version` (major·10 + minor): fast math always, grid constants from sm_70, fast `tanh`
/// from sm_75, clusters and `elect.sync` from sm_90.
pub fn cuda_options(arch_version: u32) -> CudaOptions {
    let mut options = CudaOptions { warp_size: 32, ..Default::default() };
    let features = &mut options.supports_features;
    features.fast_math = true;
    features.grid_constants = arch_version >= 70;
    features.fast_tanh = arch_version >= 75;
    features.clusters = arch_version >= 90;
    features.elect_sync = arch_version >= 90;
    options
}

pub type CudaOptions = <CudaCompiler as Compiler>::CompilationOptions;

fn lower(definition: cubecl::prelude::KernelDefinition) -> Result<String, CompilationError> {
    let address = u32::as_type_native_unchecked().storage_type();
    let compiled = CudaCompiler::default().compile(definition, &sm90_options(), ExecutionMode::Unchecked, address)?;
    Ok(compiled.to_string())
}

fn settings(cube_dim: CubeDim) -> KernelSettings {
    KernelSettings::default().cube_dim(cube_dim).address_type(AddressType::U32)
}

/// CUDA C++ of the tensor-core shrink for `config` (register-staged or pipelined, as its
/// `stages` says), as the CUDA runtime would launch it.
pub fn shrink_source<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    config: MmaShrinkConfig,
) -> Result<String, CompilationError> {
    // One compilation argument per array parameter (none is an in-place alias).
    let a = || ArrayCompilationArg { inplace: None };
    let settings = settings(CubeDim::new_2d(32, config.warps()));
    let n = config.vector as usize;
    // Arguments in the kernel's order: seven arrays, the scalars `k` and `x_row_divisor`, the
    // vector width `N`, the tile and the grid dependency point (marked: a comment until a
    // programmatic launch lowers it).
    let definition = if config.stages > 1 {
        ShrinkMmaPipelinedKernel::<F, R>::new(settings, client.clone(), a(), a(), a(), a(), a(), a(), a(), (), (), n, config, true).define()
    } else {
        ShrinkMmaKernel::<F, R>::new(settings, client.clone(), a(), a(), a(), a(), a(), a(), a(), (), (), n, config, true).define()
    };
    lower(definition)
}

/// CUDA C++ of the tensor-core expand for `config` (register-staged or pipelined).
pub fn expand_source<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    config: MmaExpandConfig,
) -> Result<String, CompilationError> {
    // One compilation argument per array parameter (none is an in-place alias).
    let a = || ArrayCompilationArg { inplace: None };
    let settings = settings(CubeDim::new_2d(32, config.warps()));
    let (ny, nb) = (config.out_vector as usize, config.rank_vector as usize);
    // Arguments in the kernel's order: nine arrays, the scalars `out_features` and
    // `token_splits`, the vector widths of y, B (and the staged intermediate).
    let definition = if config.stages > 1 {
        ExpandMmaPipelinedKernel::<F, R>::new(
            settings,
            client.clone(),
            a(),
            a(),
            a(),
            a(),
            a(),
            a(),
            a(),
            a(),
            a(),
            (),
            (),
            ny,
            nb,
            A_VECTOR,
            config,
        )
        .define()
    } else {
        ExpandMmaKernel::<F, R>::new(
            settings,
            client.clone(),
            a(),
            a(),
            a(),
            a(),
            a(),
            a(),
            a(),
            a(),
            a(),
            (),
            (),
            ny,
            nb,
            config,
            true,
            true,
        )
        .define()
    };
    lower(definition)
}

/// CUDA C++ of the CUDA-core (decode) expand for `config` (`crate::expand`), whose B staging
/// and reduction only meet NVRTC on a GPU otherwise.
pub fn scalar_expand_source<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    config: ExpandConfig,
) -> Result<String, CompilationError> {
    let a = || ArrayCompilationArg { inplace: None };
    let settings = settings(CubeDim::new_1d(config.threads));
    let (ny, nb) = (config.out_vector as usize, config.rank_vector as usize);
    // Arguments in the kernel's order: nine arrays, the scalar `out_features`, the vector
    // widths of y and B, the config, the grid dependency point (host-written segments) and y
    // read before it (the expand of a pair).
    let kernel = ScalarExpandKernel::<F, R>::new(
        settings,
        client.clone(),
        a(),
        a(),
        a(),
        a(),
        a(),
        a(),
        a(),
        a(),
        a(),
        (),
        ny,
        nb,
        config,
        true,
        true,
    );
    lower(kernel.define())
}

/// CUDA C++ of the single-cube kernel that groups MoE pairs by (slot, expert) on the device
/// (`crate::moe_grouped`), for `chunk`-pair segments over `dense_slots` (slot, expert) groups
/// (few enough: counts in shared memory; else in global memory): its atomics only run on a GPU
/// through the CUDA runtime, so this is where they are first compiled.
pub fn moe_align_source<R: Runtime>(client: &ComputeClient<R>, chunk: u32, dense_slots: u32) -> Result<String, CompilationError> {
    let a = || ArrayCompilationArg { inplace: None };
    let settings = settings(CubeDim::new_1d(ALIGN_THREADS));
    let config = AlignConfig::new(chunk, dense_slots);
    // Arguments in the kernel's order: eight arrays, five scalars.
    let kernel = MoeAlignKernel::<R>::new(settings, client.clone(), a(), a(), a(), a(), a(), a(), a(), a(), (), (), (), (), (), config);
    lower(kernel.define())
}

/// CUDA C++ of the router-weighted combine behind the grouped MoE down expand
/// (`crate::moe_combine`) for `F` in vectors of `vector` elements and top-`topk` routing.
pub fn moe_combine_source<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    vector: usize,
    topk: u32,
) -> Result<String, CompilationError> {
    let a = || ArrayCompilationArg { inplace: None };
    let settings = settings(CubeDim::new_1d(COMBINE_THREADS));
    // Arguments in the kernel's order: five arrays, two scalars.
    let kernel = MoeCombineKernel::<F, R>::new(settings, client.clone(), a(), a(), a(), a(), a(), (), vector, topk);
    lower(kernel.define())
}
