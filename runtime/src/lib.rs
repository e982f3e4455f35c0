//! lorac runtime: multi-LoRA kernels written in cubecl, generic over the cubecl runtime (CUDA on
//! the serving GPU, wgpu/lavapipe in CI), indexing the adapter pool through the compiler's
//! [`lorac_plan::LoraLayout`].
//!
//! Kernel families, one file each, each with a plain f64 CPU reference beside it:
//! * [`shrink`]: segmented shrink `a = x · Aᵀ` per adapter slot, 1–5 packed groups
//!   ([`shrink_mma`]: its tensor-core variant for prefill segments; [`shrink_mma_pipelined`]:
//!   the same with asynchronous copies into several stages);
//! * [`expand`]: segmented expand `y += scale · a · Bᵀ` over slices of unequal widths
//!   ([`expand_mma`]: its tensor-core variant for prefill segments, y as the accumulator;
//!   [`expand_mma_pipelined`]: the same with asynchronous copies, delta added to staged y);
//! * [`fused`]: shrink and expand in one launch for decode batches (launch-bound);
//! * [`gemm_expand`]: the expand that follows a shrink folded into the base GEMM (A stored
//!   after W, one GEMM for both): base output plus each token's delta in one pass;
//! * [`chunked`]: the prefill variant, segments cut into fixed chunks under a fixed grid;
//! * [`embedding`]: embedding LoRA (A is a column lookup, then expand);
//! * [`moe`]: routed-expert LoRA, gated and non-gated, router-weighted down projection
//!   ([`moe_grouped`]: pairs grouped by (slot, expert) through the dense kernels, for prefill;
//!   [`moe_combine`]: the router's weighted sum behind its down expand).
//!
//! [`mma_fragments`] says how the tensor-core kernels multiply their fragments and holds the
//! hand-managed way (`ldmatrix`, m16n8k16 MMAs) the shrink takes on CUDA.
//!
//! [`cuda_graph`] replays recorded launches of these kernels as CUDA graphs (decode without
//! cubecl's per-launch host cost); [`cuda_source`] lowers the tensor-core kernels to CUDA C++
//! for a described GPU (an H100), so they are expanded and checked without one (CI has no GPU).

pub mod batch;
pub mod buffer;
pub mod chunked;
pub mod config;
pub mod cuda_graph;
pub mod cuda_source;
pub mod embedding;
pub mod error;
pub mod executor;
pub mod expand;
pub mod expand_mma;
pub mod expand_mma_pipelined;
pub mod fused;
pub mod gemm_expand;
pub mod mma_fragments;
pub mod moe;
pub mod moe_combine;
pub mod moe_grouped;
pub mod ops;
pub mod pool;
pub mod shrink;
pub mod shrink_mma;
pub mod shrink_mma_pipelined;
pub mod testing;

pub use batch::{DeviceSegments, NO_SLOT, Segments};
pub use buffer::DeviceBuffer;
pub use config::{ExpandConfig, ShrinkConfig};
pub use error::{LoraError, Result};
pub use pool::AdapterPool;
