//! Multi-LoRA kernel benchmark (bf16 storage, 8 pool slots) on cubecl's CUDA runtime.
//!
//! For every case it prints the median time per launch over many back-to-back launches on one
//! stream (host clock around the batch, synchronised), the minimum bytes the kernel must move,
//! the achieved GB/s and that as a fraction of the device-to-device copy bandwidth measured in
//! the same run. Inputs rotate over enough independent buffer sets that each launch streams
//! its adapters from HBM, not from the 50 MB L2.
//!
//! Decode (T ≤ 128) and prefill (T ≥ 1024) cases are also timed replayed from CUDA graphs
//! (see `graph_rows`; `--no-graphs` leaves them out). For decode, where
//! `ShrinkKernel::choose_within` picks the shrink with K splits for a caller with room for
//! their copies, that pair too, "graph splitk default"; `--decode-sweep` adds the CUDA-core
//! kernels' tilings, see `decode_sweep`; `--split-k` the tensor-core shrink with K splits, see
//! `split_k_sweep`; `--decode-mma-expand` the tensor-core expand in decode pairs, see
//! `decode_mma_expand`. `--prefill-split-k` times prefill pairs with K split across the
//! shrink's cubes (see `prefill_split_k`); `--prefill-tiles` larger shrink tiles from CUDA
//! graphs (see `prefill_tile_sweep`); `--expand-splits` the prefill expand's token split (see
//! `prefill_expand_splits`).
//!
//! Usage: `lora_bench [--quick] [--prefill-only] [--prefill-split-k] [--prefill-tiles] [--expand-splits] [--no-graphs] [--case NAME-PART,...] [--variant NAME-PART,...]
//! (a case part starting with `^` matches the start of the name)
//! [--csv FILE] [--profile-pass]`, or `lora_bench --cuda-sources DIR` (no GPU needed: writes
//! the CUDA C++ of the H100's prefill tensor-core kernels, see `write_cuda_sources`).
//! `--profile-pass` launches every kernel a few times with no timing loop, for `ncu` to time
//! the kernels themselves; prefill cases add a sweep over the tensor-core kernels' tile shapes.

use std::io::Write;
use std::num::NonZeroU32;
use std::time::Instant;

use cubecl::cuda::CudaRuntime;
use cubecl::ir::DeviceProperties;
use cubecl::prelude::*;
use half::bf16;
use lorac_plan::{ExpertDims, LoraLayout, LoraSlice};
use lorac_runtime::chunked::ChunkedPlan;
use lorac_runtime::cuda_graph::{GraphBuilder, LaunchGraph, RecordingRuntime, record_launches};
use lorac_runtime::expand::{ExpandKernel, launch_expand, launch_pair_expand};
use lorac_runtime::expand_mma::MmaExpandConfig;
use lorac_runtime::fused::launch_fused;
use lorac_runtime::mma_fragments::Fragments;
use lorac_runtime::moe::{MoeInput, MoeOutput, MoeRouting, launch_moe_expand, launch_moe_shrink};
use lorac_runtime::moe_combine::PairScratch;
use lorac_runtime::moe_grouped::{MoeGroups, launch_moe_grouped_expand, launch_moe_grouped_expand_weighted, launch_moe_grouped_shrink};
use lorac_runtime::shrink::{ShrinkKernel, launch_shrink};
use lorac_runtime::shrink_mma::{LaunchMode, MmaShrinkConfig, SPLIT_K_COPIES, ShrinkTile, TALL_SPLIT_COPIES, WIDE_SPLIT_COPIES};
use lorac_runtime::testing::{Rng, StorageElem};
use lorac_runtime::{AdapterPool, DeviceBuffer, DeviceSegments, ExpandConfig, Segments, ShrinkConfig};

const SLOTS: u32 = 8;
const L2_BYTES: f64 = 50e6;
/// Shared memory of the compact prefill shrink tiles `prefill_split_k` sweeps: four cubes per
/// H100 multiprocessor (227 KiB).
const COMPACT_SHARED: u32 = 56 * 1024;

struct Opts {
    quick: bool,
    /// Tiny shapes on wgpu with f32: checks the benchmark's own plumbing without a GPU.
    smoke: bool,
    profile_pass: bool,
    /// Only the prefill (T = 4096) dense cases, with their tile sweep.
    prefill_only: bool,
    /// Only the cases whose name contains this (e.g. `"qkv R=16 T=32 adapters=8"`), so a
    /// profiler can be pointed at one case.
    case_filter: Option<String>,
    /// Only the tile-sweep variants whose name contains one of these comma-separated parts
    /// (e.g. `"expand m1 n8 s3"`, or `"w2x2 k64,w1x1"`).
    variant_filter: Option<String>,
    /// Also time decode cases replayed from CUDA graphs (CUDA runs only).
    graphs: bool,
    /// Decode cases: sweep the CUDA-core shrink's and expand's tilings, each timed from a
    /// CUDA graph (where the kernel, not the launch, is what the time measures).
    decode_sweep: bool,
    /// Decode cases: the register-staged tensor-core expand whatever the segment lengths
    /// (see `decode_mma_expand`).
    decode_mma_expand: bool,
    /// Decode cases: sweep the tensor-core shrink with K split across cubes, and time the
    /// best one's pair with the expand that sums its partial copies (see `split_k_sweep`).
    split_k: bool,
    /// Prefill cases: the default and compact tensor-core shrink tiles with K split 1–8
    /// ways, and the fastest of each split count paired with the expand summing its copies
    /// (see `prefill_split_k`).
    prefill_split_k: bool,
    /// Prefill cases, from CUDA graphs: tensor-core shrink tiles of 64 and 128 tokens by up
    /// to every A row, by K groups, chunk and stages, with 1, 2 and 4 K splits (see
    /// `prefill_tile_sweep`); leaves out the launch-timed tile sweep.
    prefill_tiles: bool,
    /// Prefill cases, from CUDA graphs: the tensor-core expand's token split (how many cubes
    /// share a segment's token tiles) by tile and depth, on 1 and 2 copies of the
    /// intermediate (see `prefill_expand_splits`); leaves out the launch-timed tile sweep.
    expand_splits: bool,
}

impl Opts {
    /// A part starting with `^` matches the start of the case name ("^gate_up" leaves out
    /// "moe_gate_up"); any other part matches anywhere in it.
    fn selects(&self, case: &str) -> bool {
        self.case_filter.as_deref().is_none_or(|f| {
            f.split(',').any(|part| match part.strip_prefix('^') {
                Some(prefix) => case.starts_with(prefix),
                None => case.contains(part),
            })
        })
    }

    fn selects_variant(&self, variant: &str) -> bool {
        self.variant_filter.as_deref().is_none_or(|f| f.split(',').any(|part| variant.contains(part)))
    }
}

#[cube(launch_unchecked)]
fn copy_kernel<N: Size>(input: &Array<Vector<u32, N>>, output: &mut Array<Vector<u32, N>>, len: u32) {
    let mut i = ABSOLUTE_POS;
    let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    while i < len as usize {
        output[i] = input[i];
        i += stride;
    }
}

#[cube(launch_unchecked)]
fn empty_kernel(out: &mut Array<u32>, never: u32) {
    // Never true at run time; keeps the kernel from being an empty body.
    if ABSOLUTE_POS as u32 == never {
        out[0] = 1;
    }
}

fn sync<R: Runtime>(client: &ComputeClient<R>) {
    cubecl::future::block_on(client.sync()).expect("device sync");
}

/// Median over `reps` of the mean time per call of `iters` back-to-back calls, in µs.
fn time_us<R: Runtime>(client: &ComputeClient<R>, opts: &Opts, iters: usize, mut f: impl FnMut(usize)) -> f64 {
    if opts.profile_pass {
        for i in 0..3 {
            f(i);
        }
        sync(client);
        return f64::NAN;
    }
    let reps = if opts.quick { 5 } else { 15 };
    for i in 0..iters.min(50) {
        f(i);
    }
    sync(client);
    let mut samples: Vec<f64> = (0..reps)
        .map(|rep| {
            let t0 = Instant::now();
            for i in 0..iters {
                f(rep * iters + i);
            }
            sync(client);
            t0.elapsed().as_secs_f64() * 1e6 / iters as f64
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn copy_bandwidth<R: Runtime>(client: &ComputeClient<R>, opts: &Opts) -> f64 {
    let words = if opts.smoke { 1 << 20 } else { 256 << 20 }; // 1 GiB of u32
    let src = client.empty(words * 4);
    let dst = client.empty(words * 4);
    let n = 4;
    let t = time_us(client, opts, 20, |_| unsafe {
        copy_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(132 * 16, 1, 1),
            CubeDim::new_1d(256),
            n,
            ArrayArg::from_raw_parts(src.clone(), words / n),
            ArrayArg::from_raw_parts(dst.clone(), words / n),
            (words / n) as u32,
        )
    });
    2.0 * (words * 4) as f64 / (t * 1e-6) / 1e9
}

/// Time per kernel of empty kernels replayed from one CUDA graph: the device's floor per
/// kernel once no host launch is in the way (None, with the reason, without CUDA graphs).
fn graph_kernel_floor(opts: &Opts) -> Option<f64> {
    let out = CudaRuntime::client(&Default::default()).empty(4);
    let kernels = 64;
    graph_pair_us(opts, 1000, kernels, "empty kernels", |rec| {
        for _ in 0..kernels {
            unsafe {
                empty_kernel::launch_unchecked::<RecordingRuntime>(
                    rec,
                    CubeCount::Static(1, 1, 1),
                    CubeDim::new_1d(32),
                    ArrayArg::from_raw_parts(out.clone(), 1),
                    u32::MAX,
                )
            }
        }
        Ok(())
    })
}

/// Per-launch cost of a kernel that does nothing: back-to-back throughput and launch+sync latency.
fn launch_overhead<R: Runtime>(client: &ComputeClient<R>, opts: &Opts) -> (f64, f64) {
    let out = client.empty(4);
    let launch = || unsafe {
        empty_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(32),
            ArrayArg::from_raw_parts(out.clone(), 1),
            u32::MAX,
        )
    };
    let back_to_back = time_us(client, opts, 1000, |_| launch());
    let latency = time_us(client, opts, 1, |_| {
        launch();
        sync(client);
    });
    (back_to_back, latency)
}

fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap()
}

fn slice(name: &str, width: u32, group: u32) -> LoraSlice {
    LoraSlice { name: name.into(), width, group }
}

struct Module {
    name: &'static str,
    in_features: u32,
    groups: u32,
    slices: Vec<LoraSlice>,
}

fn modules(smoke: bool) -> Vec<Module> {
    if smoke {
        return vec![Module {
            name: "mla_qkv_a_small",
            in_features: 64,
            groups: 2,
            slices: vec![slice("q_a", 48, 0), slice("kv_a", 18, 1)],
        }];
    }
    vec![
        Module { name: "qkv", in_features: 4096, groups: 3, slices: vec![slice("q", 4096, 0), slice("k", 1024, 1), slice("v", 1024, 2)] },
        Module { name: "gate_up", in_features: 4096, groups: 2, slices: vec![slice("gate", 14336, 0), slice("up", 14336, 1)] },
        Module { name: "mla_qkv_a", in_features: 7168, groups: 2, slices: vec![slice("q_a", 1536, 0), slice("kv_a", 576, 1)] },
    ]
}

#[derive(Default)]
struct Row {
    case: String,
    variant: String,
    shrink_us: f64,
    expand_us: f64,
    pair_us: f64,
    shrink_bytes: f64,
    expand_bytes: f64,
}

impl Row {
    fn total_bytes(&self) -> f64 {
        self.shrink_bytes + self.expand_bytes
    }
    fn csv_header() -> &'static str {
        "case,variant,shrink_us,expand_us,pair_us,shrink_MB,expand_MB,shrink_GBps,expand_GBps,pair_GBps,pair_frac_copy,launch_share"
    }
    fn csv(&self, copy_bw: f64, launch_us: f64) -> String {
        let gbps = |bytes: f64, us: f64| bytes / (us * 1e-6) / 1e9;
        format!(
            "{},{},{:.2},{:.2},{:.2},{:.3},{:.3},{:.0},{:.0},{:.0},{:.3},{:.2}",
            self.case,
            self.variant,
            self.shrink_us,
            self.expand_us,
            self.pair_us,
            self.shrink_bytes / 1e6,
            self.expand_bytes / 1e6,
            gbps(self.shrink_bytes, self.shrink_us),
            gbps(self.expand_bytes, self.expand_us),
            gbps(self.total_bytes(), self.pair_us),
            gbps(self.total_bytes(), self.pair_us) / copy_bw,
            (2.0 * launch_us / self.pair_us).min(1.0),
        )
    }
}

fn random_upload<R: Runtime, E: StorageElem>(client: &ComputeClient<R>, rng: &mut Rng, n: usize) -> (Vec<E>, DeviceBuffer<E>) {
    let (host, _) = rng.tensor::<E>(n, 1.0);
    let dev = DeviceBuffer::upload(client, &host);
    (host, dev)
}

/// How many independent buffer sets make the rotation stream from HBM, within a memory budget.
fn rotation_sets(bytes_moved: f64, bytes_per_set: f64) -> usize {
    let want = (4.0 * L2_BYTES / bytes_moved).ceil() as usize;
    let budget = (16e9 / bytes_per_set) as usize;
    want.clamp(2, 64).min(budget.max(1))
}

struct DenseSet<E: StorageElem> {
    pool: AdapterPool<E>,
    x: DeviceBuffer<E>,
    y: DeviceBuffer<E>,
    /// One copy of the intermediate.
    a: DeviceBuffer<f32>,
    /// The intermediate of the case's default shrink where it writes several copies (the
    /// engine's choice at prefill, see `dense_case`).
    a_copies: Option<DeviceBuffer<f32>>,
}

fn dense_case<R: Runtime, E: StorageElem>(
    client: &ComputeClient<R>,
    opts: &Opts,
    m: &Module,
    rank: u32,
    tokens: u32,
    adapters: u32,
) -> Vec<Row> {
    let layout = LoraLayout::new(nz(SLOTS), nz(rank), m.in_features, m.groups, m.slices.clone(), None).unwrap();
    let rng = &mut Rng::new(u64::from(rank * 131 + tokens * 7 + adapters));
    let (k, c_r, out) = (m.in_features as f64, f64::from(m.groups * rank), f64::from(layout.out_features()));
    let t = f64::from(tokens);
    let elem = size_of::<E>() as f64;
    let n_ad = f64::from(adapters);
    // x read once, each distinct adapter's A read once, f32 intermediate written (shrink);
    // intermediate read, each distinct adapter's B read once, y read and written (expand).
    let shrink_bytes = t * k * elem + n_ad * c_r * k * elem + t * c_r * 4.0;
    let expand_bytes = t * c_r * 4.0 + n_ad * out * f64::from(rank) * elem + 2.0 * t * out * elem;
    let set_bytes = (layout.a_elements() + layout.b_elements()) as f64 * elem + t * (k + out) * elem + t * c_r * 4.0;
    let sets = rotation_sets(shrink_bytes + expand_bytes, set_bytes);
    let ranks = vec![rank; SLOTS as usize];
    let scales = vec![0.5f32; SLOTS as usize];
    // Tokens spread round-robin over the adapters, as a decode batch would be.
    let token_slots: Vec<Option<u32>> = (0..tokens).map(|i| Some(i % adapters)).collect();
    let segs = Segments::from_token_slots(&token_slots, SLOTS).unwrap();
    let dev = segs.upload(client);
    // Prefill: the shrink the serving engine chooses for an intermediate sized by
    // `ShrinkKernel::intermediate_len` (for the "segmented" and "graph" rows), with its copies.
    // Decode keeps `launch_shrink`'s one-copy choice there ("graph splitk default" is the
    // engine's).
    let default_shrink = (tokens >= 1024).then(|| {
        let room = ShrinkKernel::intermediate_len::<R, E>(client, &layout, tokens as usize);
        ShrinkKernel::choose_for_room::<R, E>(client, &layout, segs.num_segments(), segs.max_segment_len(), tokens, room)
    });
    let default_copies = default_shrink.map_or(1, |k| k.intermediate_copies());
    let (a_host, _) = rng.tensor::<E>(layout.a_elements() as usize, 0.05);
    let (b_host, _) = rng.tensor::<E>(layout.b_elements() as usize, 0.05);
    let mut data: Vec<DenseSet<E>> = (0..sets)
        .map(|_| DenseSet {
            pool: AdapterPool::new(
                &layout,
                DeviceBuffer::upload(client, &a_host),
                DeviceBuffer::upload(client, &b_host),
                &ranks,
                &scales,
                client,
            )
            .unwrap(),
            x: random_upload(client, rng, (t * k) as usize).1,
            y: random_upload(client, rng, (t * out) as usize).1,
            a: DeviceBuffer::empty(client, (t * c_r) as usize),
            a_copies: (default_copies > 1).then(|| DeviceBuffer::empty(client, default_copies as usize * (t * c_r) as usize)),
        })
        .collect();
    let iters = if opts.smoke {
        3
    } else if tokens >= 1024 {
        20
    } else {
        200
    };
    let case = dense_case_name(m, rank, tokens, adapters);
    let dense = DenseCase { layout: &layout, host_segs: &segs, segs: &dev, iters, case: &case, shrink_bytes, expand_bytes, default_shrink };
    let mut rows = vec![time_dense(client, opts, &dense, &dev, &mut data, "segmented", None)];
    if tokens >= 1024 && !opts.prefill_tiles && !opts.expand_splits {
        rows.extend(tile_sweep(client, opts, &layout, &segs, &dev, &mut data, iters, &case, shrink_bytes, expand_bytes));
        if opts.prefill_split_k {
            rows.extend(prefill_split_k(client, opts, &dense, &mut data));
        }
    }
    if tokens <= 8 {
        // One launch for both halves; it never writes or reads the intermediate.
        let n = data.len();
        let pair_us = time_us(client, opts, iters, |i| {
            let d = &mut data[i % n];
            launch_fused(client, &layout, &d.pool, &dev, &d.x, &mut d.y, None).unwrap()
        });
        let inter = t * c_r * 4.0;
        rows.push(Row {
            case: case.clone(),
            variant: "fused".into(),
            shrink_us: f64::NAN,
            expand_us: f64::NAN,
            pair_us,
            shrink_bytes: shrink_bytes - inter,
            expand_bytes: expand_bytes - inter,
        });
    }
    // Decode and prefill (not the chunked prefill of 256 to 1023 tokens) from CUDA graphs too.
    let decode_batch = tokens <= 128;
    if opts.graphs && (decode_batch || tokens >= 1024) {
        // One builder for both: the sweep reuses the kernels the graph rows compiled.
        match GraphBuilder::new(&Default::default()) {
            Ok(mut builder) => {
                rows.extend(graph_rows(opts, &mut builder, &dense, &mut data));
                if !decode_batch && opts.prefill_tiles {
                    rows.extend(prefill_tile_sweep(opts, &mut builder, &dense, &mut data));
                }
                if !decode_batch && opts.expand_splits {
                    rows.extend(prefill_expand_splits(opts, &mut builder, &dense, &mut data));
                }
                if decode_batch {
                    rows.extend(decode_graph_rows::<R, E>(client, opts, &mut builder, &dense, &mut data));
                }
            }
            Err(e) => eprintln!("{case}: no CUDA graphs: {e}"),
        }
    }
    if tokens >= 256 {
        let plan = ChunkedPlan::new::<R, E>(client, &layout, tokens, 64).unwrap();
        let chunks = plan.prepare(&segs).unwrap().upload(client);
        rows.push(time_dense(client, opts, &dense, &chunks, &mut data, "chunked64", Some(&plan)));
    }
    rows
}

/// The decode-only graph rows: the automatic choice for a caller with room for split-K
/// copies ("graph splitk default", where it splits), and the `--split-k` and
/// `--decode-sweep` sweeps.
fn decode_graph_rows<R: Runtime, E: StorageElem>(
    client: &ComputeClient<R>,
    opts: &Opts,
    builder: &mut GraphBuilder,
    decode: &DenseCase,
    data: &mut [DenseSet<E>],
) -> Vec<Row> {
    let mut rows = Vec::new();
    let (num_segments, max_len) = (decode.host_segs.num_segments(), decode.host_segs.max_segment_len());
    let choice = |launch| {
        let kernel = ShrinkKernel::choose_within_for::<R, E>(client, decode.layout, num_segments, max_len, SPLIT_K_COPIES, launch);
        match kernel {
            ShrinkKernel::Mma { config, .. } if config.k_splits > 1 => Some(config),
            _ => None,
        }
    };
    let split = choice(LaunchMode::Plain);
    if let Some(config) = split {
        rows.extend(split_k_pair(
            opts,
            builder,
            decode,
            data,
            "graph splitk default",
            None,
            config,
            SummingExpand::Default(LaunchMode::Plain),
        ));
    }
    // Where a caller capturing graphs with programmatic launch gets a split the plain choice
    // does not make (segments of 4 to 15 tokens).
    let programmatic_split = choice(LaunchMode::Programmatic).filter(|config| split != Some(*config));
    if let Some(config) = programmatic_split {
        rows.extend(split_k_pair(
            opts,
            builder,
            decode,
            data,
            "graph splitk pdl-choice",
            None,
            config,
            SummingExpand::Default(LaunchMode::Programmatic),
        ));
    }
    if opts.split_k {
        rows.extend(split_k_sweep(opts, builder, decode, data));
    }
    if opts.decode_sweep {
        rows.extend(decode_sweep(opts, builder, decode, data));
    }
    if opts.decode_mma_expand {
        rows.extend(decode_mma_expand(opts, builder, decode, data, split.or(programmatic_split)));
    }
    rows
}

/// Decode only: the register-staged tensor-core expand (one 16-token fragment row by 2, 4 or
/// 8 column fragments per cube) whatever the batch's segments, where the default takes it
/// only from 8-token segments on (`MmaExpandConfig::for_decode`, chosen from run 67's
/// timings of these rows). "mma expand nN": alone in a graph of every rotation set (expand column)
/// and paired with the default shrink (pair column); "... pdl" and "... pdl carveout": the
/// pair as "graph pdl" and "graph pdl carveout" in `graph_rows`. Where the default for a
/// caller with room for copies splits K (`split`: "graph splitk default", else the programmatic
/// choice "graph splitk pdl-choice"), also that shrink's pair with each tile summing its copies
/// ("splitk pair mma nN", as `split_k_pair` times it).
fn decode_mma_expand<E: StorageElem>(
    opts: &Opts,
    builder: &mut GraphBuilder,
    decode: &DenseCase,
    data: &mut [DenseSet<E>],
    split: Option<MmaShrinkConfig>,
) -> Vec<Row> {
    let DenseCase { layout, iters, case, .. } = *decode;
    let cuda = CudaRuntime::client(&Default::default());
    let sets = data.len();
    let mut rows = Vec::new();
    for n_frags in [2, 4, 8] {
        let name = format!("mma expand n{n_frags}");
        let Some(config) = MmaExpandConfig::with_tile::<E>(cuda.properties(), layout, 1, n_frags) else { continue };
        if !config.tensor_cores() || !opts.selects_variant(&name) {
            continue;
        }
        if let Some(shrink) = split {
            let variant = format!("splitk pair mma n{n_frags}");
            rows.extend(split_k_pair(opts, builder, decode, data, &variant, None, shrink, SummingExpand::Tile(config)));
        }
        let expand = Some(ExpandKernel::Mma { config, token_splits: 0 });
        let mut time = |builder: &mut GraphBuilder, with_shrink: bool| {
            let launch = |rec: &ComputeClient<RecordingRuntime>| launch_sets(rec, decode, data, (with_shrink, true), expand);
            time_recorded(opts, builder, &cuda, sets, iters, launch).unwrap_or_else(|e| {
                eprintln!("{case} {name}: {e}");
                f64::NAN
            })
        };
        let expand_us = time(builder, false);
        let pair_us = time(builder, true);
        eprintln!("{case} {name}: expand {expand_us:.2} pair {pair_us:.2} us");
        rows.push(decode.row(name.clone(), f64::NAN, expand_us, pair_us));
        for (suffix, pair_us) in pdl_timings(builder, |b| time(b, true)).into_iter().flatten() {
            eprintln!("{case} {name}: pair {suffix} {pair_us:.2} us");
            rows.push(decode.row(format!("{name} {suffix}"), f64::NAN, f64::NAN, pair_us));
        }
    }
    rows
}

/// Launches through `rec`, for every rotation set, the halves of its pair that `halves` says
/// (shrink, expand): the default shrink into the set's intermediate, and `expand` (`None`: the
/// default) from it into y.
fn launch_sets<E: StorageElem>(
    rec: &ComputeClient<RecordingRuntime>,
    decode: &DenseCase,
    data: &mut [DenseSet<E>],
    (shrink, expand): (bool, bool),
    expand_kernel: Option<ExpandKernel>,
) -> lorac_runtime::Result<()> {
    let DenseCase { layout, segs, default_shrink, .. } = *decode;
    data.iter_mut().try_for_each(|d| {
        let DenseSet { pool, x, y, a, a_copies } = d;
        let a = a_copies.as_mut().unwrap_or(a);
        if shrink {
            launch_shrink(rec, layout, pool, segs, x, a, default_shrink)?;
        }
        if expand {
            // Right after its shrink, the expand reads y before its wait (under PDL).
            let launch = if shrink { launch_pair_expand } else { launch_expand };
            launch(rec, layout, pool, segs, a, y, expand_kernel)?;
        }
        Ok(())
    })
}

/// One dense case for the functions that time its variants (from CUDA graphs, or the
/// prefill split-K sweep): its layout, batch (on the host and the device), iterations per
/// timing batch, name and the minimum bytes each kernel moves.
#[derive(Clone, Copy)]
struct DenseCase<'a> {
    layout: &'a LoraLayout,
    host_segs: &'a Segments,
    segs: &'a DeviceSegments,
    iters: usize,
    case: &'a str,
    shrink_bytes: f64,
    expand_bytes: f64,
    /// The shrink of the "segmented" and "graph" rows (`None`: `launch_shrink`'s choice),
    /// writing into `DenseSet::a_copies` where it writes several copies.
    default_shrink: Option<ShrinkKernel>,
}

impl DenseCase<'_> {
    /// A row of this case with the given times (NaN where not timed).
    fn row(&self, variant: String, shrink_us: f64, expand_us: f64, pair_us: f64) -> Row {
        let (shrink_bytes, expand_bytes) = (self.shrink_bytes, self.expand_bytes);
        Row { case: self.case.to_string(), variant, shrink_us, expand_us, pair_us, shrink_bytes, expand_bytes }
    }

    /// One intermediate of `copies` copies (a split-K shrink's partial sums) per rotation set.
    fn partial_copies<R: Runtime>(&self, client: &ComputeClient<R>, sets: usize, copies: u32) -> Vec<DeviceBuffer<f32>> {
        let intermediate = self.segs.tokens() as usize * self.layout.intermediate_width() as usize;
        (0..sets).map(|_| DeviceBuffer::empty(client, copies as usize * intermediate)).collect()
    }
}

/// Decode and prefill cases replayed from CUDA graphs (`lorac_runtime::cuda_graph`), the way a
/// serving loop replays its decode step, with no cubecl launch in the timed loop (for prefill,
/// whose kernels outlast a launch, this shows what the host's launches still cost):
/// * "graph": one graph holding the shrink and expand of every rotation set, back to back (as
///   a decode step's graph holds every layer's), replayed; the time is per pair (the shrink
///   and expand columns: graphs of only the shrinks, only the expands);
/// * "graph per pair": one graph per rotation set holding one shrink and one expand, the
///   graphs replayed in turn: each pair pays a graph launch;
/// * "graph pdl": "graph" with programmatic dependent launches (sm_90+): each kernel launches
///   while the one before it runs, loads its adapter weights and waits for it on the device;
/// * "graph pdl carveout": "graph pdl" with every kernel preferring the largest shared-memory
///   carveout (`GraphBuilder::set_shared_memory_carveout`);
/// * "fused graph" (T ≤ 8): the fused kernel of every set in one graph.
///
/// Host clock around `replays` replays after a stream synchronise, median of 15 batches.
fn graph_rows<E: StorageElem>(opts: &Opts, builder: &mut GraphBuilder, decode: &DenseCase, data: &mut [DenseSet<E>]) -> Vec<Row> {
    let DenseCase { layout, segs, iters, case, shrink_bytes, expand_bytes, .. } = *decode;
    let cuda = CudaRuntime::client(&Default::default());
    let sets = data.len();
    // Which halves of each set's pair to time: (shrink, expand).
    let time_one_graph = |builder: &mut GraphBuilder, data: &mut [DenseSet<E>], halves: (bool, bool)| {
        time_recorded(opts, builder, &cuda, sets, iters, |rec| launch_sets(rec, decode, data, halves, None)).unwrap()
    };
    let row = |variant: &str, pair_us: f64, saved: f64| Row {
        case: case.to_string(),
        variant: variant.into(),
        shrink_us: f64::NAN,
        expand_us: f64::NAN,
        pair_us,
        shrink_bytes: shrink_bytes - saved,
        expand_bytes: expand_bytes - saved,
    };
    let mut rows = Vec::new();

    let shrink_us = time_one_graph(builder, data, (true, false));
    let expand_us = time_one_graph(builder, data, (false, true));
    let pair_us = time_one_graph(builder, data, (true, true));
    rows.push(Row { shrink_us, expand_us, ..row("graph", pair_us, 0.0) });

    let (done, launches) = record_launches(cuda.properties(), |rec| launch_sets(rec, decode, data, (true, true), None)).unwrap();
    done.unwrap();
    let per_pair: Vec<LaunchGraph> = launches.chunks(launches.len() / sets).map(|pair| builder.capture(&cuda, pair).unwrap()).collect();
    drop(launches);
    for kernel in per_pair[0].summaries() {
        eprintln!("{case}: {kernel}");
    }
    let pair_us = time_graphs(opts, builder, &per_pair, 1, iters);
    rows.push(row("graph per pair", pair_us, 0.0));
    drop(per_pair);

    // The same graph as "graph", each kernel a programmatic dependent of the one before it,
    // and so with every kernel on the largest shared-memory split (an SM changes its split
    // only when idle, which it rarely is between programmatic launches).
    for (suffix, pair_us) in pdl_timings(builder, |b| time_one_graph(b, data, (true, true))).into_iter().flatten() {
        rows.push(row(&format!("graph {suffix}"), pair_us, 0.0));
    }

    let tokens = segs.tokens();
    if tokens <= 8 {
        let fused = |rec: &ComputeClient<RecordingRuntime>| {
            data.iter_mut().try_for_each(|d| launch_fused(rec, layout, &d.pool, segs, &d.x, &mut d.y, None))
        };
        let pair_us = time_recorded(opts, builder, &cuda, sets, iters, fused).unwrap();
        let inter = f64::from(tokens) * f64::from(layout.intermediate_width()) * 4.0;
        rows.push(row("fused graph", pair_us, inter));
    }
    rows
}

/// Decode only: the CUDA-core shrink over rows per cube × tokens per tile × threads, and the
/// CUDA-core expand over tokens per tile × threads, each kernel alone in a graph of every
/// rotation set (see `graph_rows`); rows carry one kernel's time.
fn decode_sweep<E: StorageElem>(opts: &Opts, builder: &mut GraphBuilder, decode: &DenseCase, data: &mut [DenseSet<E>]) -> Vec<Row> {
    let DenseCase { layout, host_segs, segs, iters, case, .. } = *decode;
    let cuda = CudaRuntime::client(&Default::default());
    let (num_segments, max_len) = (host_segs.num_segments(), host_segs.max_segment_len());
    let elem = size_of::<E>();
    let sets = data.len();
    let default_shrink = ShrinkConfig::new(&cuda, layout, elem, num_segments, max_len);
    let default_expand = ExpandConfig::new(&cuda, layout, elem, num_segments, max_len);
    let mut shrinks = Vec::new();
    for rows in [2, 4, 8].into_iter().filter(|r| layout.max_rank().is_multiple_of(*r)) {
        for tokens in [1, 2, 4].into_iter().filter(|&t| t <= max_len.next_power_of_two()) {
            for threads in [128, 256] {
                let config = ShrinkConfig {
                    rows_per_cube: rows,
                    tokens_per_tile: tokens,
                    token_splits: max_len.div_ceil(tokens),
                    threads,
                    plane_size: default_shrink.plane_size,
                    ..default_shrink
                };
                let mark = if config == default_shrink { " (default)" } else { "" };
                shrinks.push((format!("sweep shrink r{rows} t{tokens} th{threads}{mark}"), config));
            }
        }
    }
    let mut expands = Vec::new();
    for tokens in [1, 2, 4, 8].into_iter().filter(|&t| t <= max_len.next_power_of_two()) {
        for threads in [64, 128, 256] {
            let tiles = max_len.div_ceil(tokens);
            let config =
                ExpandConfig { tokens_per_tile: tokens, threads, token_splits: tiles.min(default_expand.token_splits), ..default_expand };
            let mark = if config == default_expand { " (default)" } else { "" };
            expands.push((format!("sweep expand t{tokens} th{threads} s{}{mark}", config.token_splits), config));
        }
    }
    let mut rows = Vec::new();
    let mut time = |name: String, data: &mut [DenseSet<E>], shrink: Option<ShrinkKernel>, expand: Option<ExpandKernel>| {
        let launch = |rec: &ComputeClient<RecordingRuntime>| {
            data.iter_mut().try_for_each(|d| match (shrink, expand) {
                (Some(kernel), _) => launch_shrink(rec, layout, &d.pool, segs, &d.x, &mut d.a, Some(kernel)),
                (None, Some(kernel)) => launch_expand(rec, layout, &d.pool, segs, &d.a, &mut d.y, Some(kernel)),
                (None, None) => Ok(()),
            })
        };
        let us = match time_recorded(opts, builder, &cuda, sets, iters, launch) {
            Ok(us) => us,
            Err(e) => {
                eprintln!("{case} {name}: {e}");
                return;
            }
        };
        let (shrink_us, expand_us) = if shrink.is_some() { (us, f64::NAN) } else { (f64::NAN, us) };
        eprintln!("{case} {name}: {us:.2} us");
        rows.push(decode.row(name, shrink_us, expand_us, f64::NAN));
    };
    for (name, config) in shrinks {
        time(name, data, Some(ShrinkKernel::Scalar(config)), None);
    }
    for (name, config) in expands {
        time(name, data, None, Some(ExpandKernel::Scalar(config)));
    }
    rows
}

/// Decode only: the tensor-core shrink with K split across cubes (one 16-token fragment row
/// per cube; 1 or the widest row block of up to four fragments; 1–16 K groups; 2–32 splits,
/// each split's share in chunks of 128 inputs, or 256 for 16 K groups; staged through
/// registers or 2–4 shared-memory stages, " stN"), each alone in a graph
/// of every rotation set (see `graph_rows`); then, for each split count, the fastest shrink's
/// pair with the CUDA-core expand summing its copies ("splitk pair", see `split_k_pair`) and
/// with the default one ("splitk pair default": the tensor-core expand from 8-token segments,
/// plain and under PDL).
/// The bytes count the intermediate once, as for the other kernels (the copies add
/// `k_splits − 1` more).
fn split_k_sweep<E: StorageElem>(opts: &Opts, builder: &mut GraphBuilder, decode: &DenseCase, data: &mut [DenseSet<E>]) -> Vec<Row> {
    let DenseCase { layout, segs, .. } = *decode;
    let cuda = CudaRuntime::client(&Default::default());
    let device = cuda.properties();
    let sets = data.len();
    let widest = MmaShrinkConfig::widest_row_block(layout);
    let mut rows = Vec::new();
    // The fastest shrink of each split count: the expand reads every copy, so fewer splits
    // may make the faster pair.
    let mut best: Vec<(f64, MmaShrinkConfig)> = Vec::new();
    for k_splits in [2, 4, 8, 16, 32] {
        let mut best_here: Option<(f64, MmaShrinkConfig)> = None;
        let mut partials = decode.partial_copies(&cuda, sets, k_splits);
        for n_frags in [1, widest].into_iter().take(if widest > 1 { 2 } else { 1 }) {
            let tiles = [1, 2, 4, 8, 16].into_iter().filter_map(|k_groups| {
                let chunks = [128, 256, 64, 32, 16];
                MmaShrinkConfig::split_k_tile::<E>(device, layout, n_frags, k_groups, k_splits, &chunks)
            });
            // Each tile staged through registers (one chunk ahead) and, where the device has
            // asynchronous copies, through 2–4 shared-memory stages (up to three chunks ahead).
            let staged = tiles.flat_map(|config| (1..=4).filter_map(move |stages| config.with_stages::<E>(device, stages)));
            for config in staged {
                let name = format!("splitk {}", split_k_tile_name(&config));
                if !opts.selects_variant(&name) {
                    continue;
                }
                let kernel = ShrinkKernel::Mma { config, tiles_per_segment: 0 };
                let launch = |rec: &ComputeClient<RecordingRuntime>| {
                    data.iter().zip(&mut partials).try_for_each(|(d, p)| launch_shrink(rec, layout, &d.pool, segs, &d.x, p, Some(kernel)))
                };
                rows.extend(time_variant(opts, builder, (decode, sets), name, Half::Shrink, config, &mut best_here, launch));
            }
        }
        best.extend(best_here);
    }
    for (shrink_us, config) in best {
        rows.extend(split_k_pair(opts, builder, decode, data, "splitk pair", Some(shrink_us), config, SummingExpand::CudaCore));
        rows.extend(split_k_pair(
            opts,
            builder,
            decode,
            data,
            "splitk pair default",
            Some(shrink_us),
            config,
            SummingExpand::Default(LaunchMode::Plain),
        ));
    }
    rows
}

/// Which column of a row a kernel timed alone fills.
#[derive(Clone, Copy)]
enum Half {
    Shrink,
    Expand,
}

/// Times `record` (one kernel of each of the `sets` rotation sets) replayed from a CUDA graph: the row of
/// variant `name` with that time in `half`'s column (`None`, and a log line, where it fails),
/// and `config` kept in `best` where it is the fastest so far.
#[allow(clippy::too_many_arguments)]
fn time_variant<C: Copy>(
    opts: &Opts,
    builder: &mut GraphBuilder,
    (dense, sets): (&DenseCase, usize),
    name: String,
    half: Half,
    config: C,
    best: &mut Option<(f64, C)>,
    record: impl FnOnce(&ComputeClient<RecordingRuntime>) -> lorac_runtime::Result<()>,
) -> Option<Row> {
    let cuda = CudaRuntime::client(&Default::default());
    let case = dense.case;
    match time_recorded(opts, builder, &cuda, sets, dense.iters, record) {
        Ok(us) => {
            eprintln!("{case} {name}: {us:.2} us");
            if best.is_none_or(|(b, _)| us < b) {
                *best = Some((us, config));
            }
            Some(match half {
                Half::Shrink => dense.row(name, us, f64::NAN, f64::NAN),
                Half::Expand => dense.row(name, f64::NAN, us, f64::NAN),
            })
        }
        Err(e) => {
            eprintln!("{case} {name}: {e}");
            None
        }
    }
}

/// A split-K shrink tile as the sweep's rows name it: "nN gG kK sS", A-row fragments, K
/// groups, chunk and splits, then " stN" for one staged through N shared-memory stages.
fn split_k_tile_name(config: &MmaShrinkConfig) -> String {
    let stages = if config.stages > 1 { format!(" st{}", config.stages) } else { String::new() };
    format!("n{} g{} k{} s{}{stages}", config.n_frags, config.k_groups, config.k_chunk, config.k_splits)
}

/// Which expand sums a split-K shrink's copies in `split_k_pair`.
#[derive(Clone, Copy, PartialEq)]
enum SummingExpand {
    /// The CUDA-core expand (the split-K sweep's pairs).
    CudaCore,
    /// What a caller launching the pair this way chooses for the copies
    /// (`ExpandKernel::choose_summing_for`; plainly: what `launch_expand` chooses).
    Default(LaunchMode),
    /// This tensor-core tile, summing the copies (`--decode-mma-expand`).
    Tile(MmaExpandConfig),
}

/// The pair of the split-K shrink `config` and the `summing` expand of its copies, from one
/// graph of every rotation set, that expand alone, and the shrink alone unless it was timed
/// already (`shrink_us`); the row's variant is `variant` and the tile. With the default
/// expand, also the pair under programmatic launch ("... pdl"), and so with every kernel
/// preferring the largest shared-memory carveout ("... pdl carveout").
#[allow(clippy::too_many_arguments)]
fn split_k_pair<E: StorageElem>(
    opts: &Opts,
    builder: &mut GraphBuilder,
    decode: &DenseCase,
    data: &mut [DenseSet<E>],
    variant: &str,
    shrink_us: Option<f64>,
    config: MmaShrinkConfig,
    summing: SummingExpand,
) -> Vec<Row> {
    let DenseCase { layout, host_segs, segs, iters, case, .. } = *decode;
    let cuda = CudaRuntime::client(&Default::default());
    let sets = data.len();
    let k_splits = config.k_splits;
    let mut partials = decode.partial_copies(&cuda, sets, k_splits);
    let shrink = ShrinkKernel::Mma { config, tiles_per_segment: 0 };
    let (num_segments, max_len) = (host_segs.num_segments(), host_segs.max_segment_len());
    let expand = match summing {
        SummingExpand::CudaCore => {
            ExpandKernel::Scalar(ExpandConfig::new(&cuda, layout, size_of::<E>(), num_segments, max_len).summing(k_splits))
        }
        SummingExpand::Default(launch) => {
            ExpandKernel::choose_summing_for::<CudaRuntime, E>(&cuda, layout, num_segments, max_len, k_splits, launch)
        }
        SummingExpand::Tile(tile) => match tile.summing::<E>(cuda.properties(), k_splits) {
            Some(config) => ExpandKernel::Mma { config, token_splits: 0 },
            None => return Vec::new(),
        },
    };
    let mut time_halves = |builder: &mut GraphBuilder, (with_shrink, with_expand): (bool, bool)| {
        let launch = |rec: &ComputeClient<RecordingRuntime>| {
            data.iter_mut().zip(&mut partials).try_for_each(|(d, p)| {
                if with_shrink {
                    launch_shrink(rec, layout, &d.pool, segs, &d.x, p, Some(shrink))?;
                }
                if with_expand {
                    let launch = if with_shrink { launch_pair_expand } else { launch_expand };
                    launch(rec, layout, &d.pool, segs, p, &mut d.y, Some(expand))?;
                }
                Ok(())
            })
        };
        time_recorded(opts, builder, &cuda, sets, iters, launch)
    };
    let expand_name = match expand {
        ExpandKernel::Scalar(_) => String::new(),
        ExpandKernel::Mma { config, .. } => format!(" expand m{} n{}", config.m_frags, config.n_frags),
    };
    let name = format!("{variant} {}{expand_name}", split_k_tile_name(&config));
    let shrink_us = match shrink_us {
        Some(us) => Ok(us),
        None => time_halves(builder, (true, false)),
    };
    let mut rows = Vec::new();
    match (shrink_us, time_halves(builder, (false, true)), time_halves(builder, (true, true))) {
        (Ok(shrink_us), Ok(expand_us), Ok(pair_us)) => {
            eprintln!("{case} {name}: shrink {shrink_us:.2} expand {expand_us:.2} pair {pair_us:.2} us");
            rows.push(decode.row(name.clone(), shrink_us, expand_us, pair_us));
        }
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => eprintln!("{case} {name}: {e}"),
    }
    let timings = if summing != SummingExpand::CudaCore { pdl_timings(builder, |b| time_halves(b, (true, true))) } else { None };
    for (suffix, us) in timings.into_iter().flatten() {
        match us {
            Ok(pair_us) => rows.push(decode.row(format!("{name} {suffix}"), f64::NAN, f64::NAN, pair_us)),
            Err(e) => eprintln!("{case} {name} {suffix}: {e}"),
        }
    }
    rows
}

/// `time` under programmatic dependent launch ("pdl"), then so with every kernel preferring the
/// largest shared-memory carveout ("pdl carveout"); the builder is left as it was. `None`
/// where the device has no programmatic launch.
fn pdl_timings<T>(builder: &mut GraphBuilder, mut time: impl FnMut(&mut GraphBuilder) -> T) -> Option<[(&'static str, T); 2]> {
    builder.set_programmatic_launch(true).ok()?;
    let pdl = time(builder);
    builder.set_shared_memory_carveout(Some(100)).unwrap();
    let carveout = time(builder);
    builder.set_shared_memory_carveout(None).unwrap();
    builder.set_programmatic_launch(false).unwrap();
    Some([("pdl", pdl), ("pdl carveout", carveout)])
}

/// Median over batches of the time per pair of `graphs` replayed in turn (about `iters` pairs
/// per batch), each replay holding `pairs_per_replay` pairs, in µs.
fn time_graphs(opts: &Opts, builder: &GraphBuilder, graphs: &[LaunchGraph], pairs_per_replay: usize, iters: usize) -> f64 {
    let replays = iters.div_ceil(pairs_per_replay).max(graphs.len());
    let run = |n: usize| {
        for i in 0..n {
            graphs[i % graphs.len()].replay().unwrap();
        }
        builder.synchronize().unwrap();
    };
    run(graphs.len() * 2);
    let reps = if opts.quick { 5 } else { 15 };
    let mut samples: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            run(replays);
            t0.elapsed().as_secs_f64() * 1e6 / (replays * pairs_per_replay) as f64
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn dense_case_name(m: &Module, rank: u32, tokens: u32, adapters: u32) -> String {
    format!("{} R={rank} T={tokens} adapters={adapters}", m.name)
}

/// The case's pair on `segs` (its batch, or the chunked plan's chunks) through back-to-back
/// cubecl launches: `plan`'s kernels, else the case's default shrink and the default expand.
fn time_dense<R: Runtime, E: StorageElem>(
    client: &ComputeClient<R>,
    opts: &Opts,
    dense: &DenseCase,
    segs: &DeviceSegments,
    data: &mut [DenseSet<E>],
    variant: &'static str,
    plan: Option<&ChunkedPlan>,
) -> Row {
    let DenseCase { layout, iters, default_shrink, .. } = *dense;
    let n = data.len();
    let shrink = |d: &mut DenseSet<E>| {
        let DenseSet { pool, x, a, a_copies, .. } = d;
        match plan {
            Some(p) => p.launch_shrink(client, layout, pool, segs, x, a).unwrap(),
            None => launch_shrink(client, layout, pool, segs, x, a_copies.as_mut().unwrap_or(a), default_shrink).unwrap(),
        }
    };
    let expand = |d: &mut DenseSet<E>| {
        let DenseSet { pool, y, a, a_copies, .. } = d;
        match plan {
            Some(p) => p.launch_expand(client, layout, pool, segs, a, y).unwrap(),
            None => launch_expand(client, layout, pool, segs, a_copies.as_ref().unwrap_or(a), y, None).unwrap(),
        }
    };
    let shrink_us = time_us(client, opts, iters, |i| shrink(&mut data[i % n]));
    let expand_us = time_us(client, opts, iters, |i| expand(&mut data[i % n]));
    let pair_us = time_us(client, opts, iters, |i| {
        let d = &mut data[i % n];
        shrink(d);
        expand(d);
    });
    dense.row(variant.into(), shrink_us, expand_us, pair_us)
}

/// Prefill only: each tensor-core tile shape of the shrink and of the expand timed on its own
/// (and the CUDA-core expand for comparison), so the defaults can be checked against the
/// alternatives in the same run. Rows carry one kernel's time; their pair time is NaN.
#[allow(clippy::too_many_arguments)]
fn tile_sweep<R: Runtime, E: StorageElem>(
    client: &ComputeClient<R>,
    opts: &Opts,
    layout: &LoraLayout,
    segs: &Segments,
    dev: &DeviceSegments,
    data: &mut [DenseSet<E>],
    iters: usize,
    case: &str,
    shrink_bytes: f64,
    expand_bytes: f64,
) -> Vec<Row> {
    let n = data.len();
    let (num_segments, max_len) = (segs.num_segments(), segs.max_segment_len());
    let default_shrink = ShrinkKernel::choose::<R, E>(client, layout, num_segments, max_len);
    let default_expand = ExpandKernel::choose::<R, E>(client, layout, num_segments, max_len);
    let mut rows = Vec::new();
    let row = |variant: String, shrink_us: f64, expand_us: f64| Row {
        case: case.to_string(),
        variant,
        shrink_us,
        expand_us,
        pair_us: f64::NAN,
        shrink_bytes,
        expand_bytes,
    };
    let default_mma = match default_shrink {
        ShrinkKernel::Mma { config, .. } => Some(config),
        ShrinkKernel::Scalar(_) => None,
    };
    let shrinks = shrink_variants::<E>(client.properties(), layout, default_mma);
    for (name, config) in shrinks.into_iter().filter(|(name, _)| opts.selects_variant(name)) {
        let kernel = ShrinkKernel::Mma { config, tiles_per_segment: 0 };
        let us = time_us(client, opts, iters, |i| {
            let d = &mut data[i % n];
            launch_shrink(client, layout, &d.pool, dev, &d.x, &mut d.a, Some(kernel)).unwrap()
        });
        let mark = if kernel == default_shrink { " (default)" } else { "" };
        rows.push(row(format!("{name}{mark}"), us, f64::NAN));
    }
    let scalar = ExpandKernel::Scalar(ExpandConfig::new(client, layout, size_of::<E>(), num_segments, max_len));
    let tensor_core = expand_variants::<E>(client.properties(), layout).into_iter();
    let expands = std::iter::once(("expand cuda-core".to_string(), scalar))
        .chain(tensor_core.map(|(name, config, token_splits)| (name, ExpandKernel::Mma { config, token_splits })));
    for (name, kernel) in expands.filter(|(name, _)| opts.selects_variant(name)) {
        let us = time_us(client, opts, iters, |i| {
            let d = &mut data[i % n];
            launch_expand(client, layout, &d.pool, dev, &d.a, &mut d.y, Some(kernel)).unwrap()
        });
        let mark = if kernel == default_expand { " (default)" } else { "" };
        rows.push(row(format!("{name}{mark}"), f64::NAN, us));
    }
    rows
}

/// Prefill with K split across the shrink's cubes. The default tiles use 88–109 KiB of
/// shared memory, so a multiprocessor holds one or two of their cubes and more cubes only
/// queue (runs 54–56, and run 57's ncu: the MLA R=64 shrink ran one warp per scheduler). So
/// the sweep times, with 1, 2, 4 and 8 splits, the default tile and compact tiles of the
/// default row block that fit [`COMPACT_SHARED`] (32- and 64-token tiles, one-fragment warps
/// and 2×1 to 2×4 warp blocks, one K group, 64-wide chunks in two or three stages or
/// 128-wide ones in two), each shrink on its own. Then the fastest shrink of each split
/// count is paired with the default expand for the batch summing that many copies
/// ([`ExpandKernel::choose_summing`]); shrink, expand and pair timed from back-to-back
/// launches. The minimum bytes are the case's: the extra copies are part of what is measured.
/// (Run 56's sweep of 32–128-token tiles with the default chunk and depth is `866a002`.)
fn prefill_split_k<R: Runtime, E: StorageElem>(
    client: &ComputeClient<R>,
    opts: &Opts,
    prefill: &DenseCase,
    data: &mut [DenseSet<E>],
) -> Vec<Row> {
    let DenseCase { layout, host_segs, segs: dev, iters, .. } = *prefill;
    let (num_segments, max_len) = (host_segs.num_segments(), host_segs.max_segment_len());
    let ShrinkKernel::Mma { config: base, .. } = ShrinkKernel::choose::<R, E>(client, layout, num_segments, max_len) else {
        return Vec::new();
    };
    let device = client.properties();
    let n = data.len();
    let mut rows = Vec::new();
    let mut best: Vec<(f64, MmaShrinkConfig)> = Vec::new();
    for k_splits in [1, 2, 4, 8] {
        let mut partials = prefill.partial_copies(client, n, k_splits);
        let mut best_here: Option<(f64, MmaShrinkConfig)> = None;
        let mut tried = Vec::new();
        let compact = [(2, 1, 1), (2, 2, 1), (4, 2, 1), (4, 2, 2), (4, 2, 4)].into_iter().flat_map(|(m, wm, wn)| {
            let tile = ShrinkTile::new(m, base.n_frags).with_warps(wm, wn);
            [(64, 3), (64, 2), (128, 2)].into_iter().filter_map(move |(kc, stages)| {
                MmaShrinkConfig::with_tile_chunk::<E>(device, layout, tile, kc, 1)
                    .and_then(|c| c.with_stages::<E>(device, stages))
                    .filter(|c| c.shared_bytes_per_cube::<E>() <= COMPACT_SHARED)
            })
        });
        for config in std::iter::once(base).chain(compact).filter_map(|c| c.with_k_splits(layout, k_splits)) {
            if tried.contains(&config) {
                continue;
            }
            tried.push(config);
            let (m, nf, wm, wn) = (config.m_frags, config.n_frags, config.warp_m, config.warp_n);
            let (kc, kg, st) = (config.k_chunk, config.k_groups, config.stages);
            let kib = config.shared_bytes_per_cube::<E>() / 1024;
            let mark = if config.with_k_splits(layout, 1) == Some(base) { " default tile" } else { "" };
            let variant = format!("splitk shrink m{m} n{nf} w{wm}x{wn} k{kc} g{kg} s{st} {kib}KiB x{k_splits}{mark}");
            if !opts.selects_variant(&variant) {
                continue;
            }
            let kernel = ShrinkKernel::Mma { config, tiles_per_segment: 0 };
            let us = time_us(client, opts, iters, |i| {
                let d = &data[i % n];
                launch_shrink(client, layout, &d.pool, dev, &d.x, &mut partials[i % n], Some(kernel)).unwrap()
            });
            if best_here.is_none_or(|(b, _)| us < b) {
                best_here = Some((us, config));
            }
            rows.push(prefill.row(variant, us, f64::NAN, f64::NAN));
        }
        best.extend(best_here);
    }
    for (_, config) in best {
        let k_splits = config.k_splits;
        let mut partials = prefill.partial_copies(client, n, k_splits);
        let shrink = ShrinkKernel::Mma { config, tiles_per_segment: 0 };
        let expand = ExpandKernel::choose_summing::<R, E>(client, layout, num_segments, max_len, k_splits);
        let expand_name = match expand {
            ExpandKernel::Mma { config, .. } => format!("expand m{} n{} s{}", config.m_frags, config.n_frags, config.stages),
            ExpandKernel::Scalar(_) => "expand cuda-core".to_string(),
        };
        let (m, nf, kc, kg) = (config.m_frags, config.n_frags, config.k_chunk, config.k_groups);
        let (wm, wn, st) = (config.warp_m, config.warp_n, config.stages);
        let variant = format!("splitk pair m{m} n{nf} w{wm}x{wn} k{kc} g{kg} s{st} x{k_splits} + {expand_name}");
        let mut launch = |i: usize, (with_shrink, with_expand): (bool, bool)| {
            let (d, p) = (&mut data[i % n], &mut partials[i % n]);
            if with_shrink {
                launch_shrink(client, layout, &d.pool, dev, &d.x, p, Some(shrink)).unwrap();
            }
            if with_expand {
                launch_expand(client, layout, &d.pool, dev, p, &mut d.y, Some(expand)).unwrap();
            }
        };
        let shrink_us = time_us(client, opts, iters, |i| launch(i, (true, false)));
        let expand_us = time_us(client, opts, iters, |i| launch(i, (false, true)));
        let pair_us = time_us(client, opts, iters, |i| launch(i, (true, true)));
        rows.push(prefill.row(variant, shrink_us, expand_us, pair_us));
    }
    rows
}

/// Prefill, from CUDA graphs: does the shrink wait on the L2? Its default tiles (64 tokens ×
/// 64 A rows at rank 64) re-read x once per row block and A once per token tile, so at rank
/// 64 a qkv shrink pulls about 200 MB through the L2 for 49 MB of inputs. This times, each
/// alone in a graph of every rotation set, tiles of 64 and 128 tokens by 4 to 12 row
/// fragments (up to every A row), warp blocks of 2×2 to 4×4 fragments, one, two or four K
/// groups (4 to 24 warps), 64- and 128-wide chunks in three or four stages (two where three
/// do not fit), with 1, 2 and 4 K splits where the grid holds at least
/// 96 cubes; then the fastest of each split count in a pair with the default expand summing
/// its copies (`split_k_pair`, plainly and under PDL). The row names give the tile, its
/// cubes and the megabytes its cubes stage (x and A over their share of K, summed over the
/// grid: what the L2 serves). Then expand tiles of 128 to 256 columns on intermediates of as
/// many copies as those shrinks write, each alone, and each best shrink paired also with
/// the fastest expand for its copies.
fn prefill_tile_sweep<E: StorageElem>(opts: &Opts, builder: &mut GraphBuilder, prefill: &DenseCase, data: &mut [DenseSet<E>]) -> Vec<Row> {
    let DenseCase { layout, host_segs, segs, .. } = *prefill;
    let cuda = CudaRuntime::client(&Default::default());
    let device = cuda.properties();
    let sets = data.len();
    let row_frags = layout.intermediate_width() / 16;
    let (num_segments, max_len) = (host_segs.num_segments() as u64, u64::from(host_segs.max_segment_len()));
    let elem = size_of::<E>() as u64;
    let mut rows = Vec::new();
    let mut best: Vec<(f64, MmaShrinkConfig)> = Vec::new();
    for k_splits in [1, 2, 4] {
        let mut partials = prefill.partial_copies(&cuda, sets, k_splits);
        let mut best_here: Option<(f64, MmaShrinkConfig)> = None;
        let mut tried = Vec::new();
        let row_blocks = [4, 6, 8, 12].into_iter().filter(|n| row_frags.is_multiple_of(*n));
        let tiles = [4, 8].into_iter().flat_map(|m| row_blocks.clone().map(move |n| (m, n)));
        let blocks = [(2, 2), (2, 4), (4, 2), (2, 3), (4, 3), (4, 4)];
        let configs = tiles.flat_map(|(m, n)| blocks.into_iter().flat_map(move |(wm, wn)| [1, 2, 4].map(|kg| (m, n, wm, wn, kg))));
        // 64- and 128-wide chunks in 2 to 4 stages.
        let staging = [64, 128].map(|k_chunk| [2, 3, 4].map(|stages| (k_chunk, stages)));
        let configs = configs.flat_map(|c| staging.into_iter().flatten().map(move |s| (c, s)));
        for ((m, n, wm, wn, kg), (k_chunk, stages)) in configs {
            let tile = ShrinkTile::new(m, n).with_warps(wm, wn);
            let config = MmaShrinkConfig::with_tile_chunk::<E>(device, layout, tile, k_chunk, kg)
                .filter(|c| (4..=24).contains(&c.warps()))
                .and_then(|c| c.with_stages::<E>(device, stages))
                .and_then(|c| c.with_k_splits(layout, k_splits));
            let Some(config) = config.filter(|c| !tried.contains(c)) else { continue };
            tried.push(config);
            let cubes = num_segments * max_len.div_ceil(u64::from(m) * 16) * u64::from(row_frags / n) * u64::from(k_splits);
            if cubes < 96 {
                continue;
            }
            // Each cube stages its token tile's x and its row block's A over its share of K.
            let l2_mb = (cubes * u64::from((m + n) * 16) * u64::from(layout.in_features() / k_splits) * elem) as f64 / 1e6;
            let name = format!(
                "tiles shrink m{m} n{n} w{wm}x{wn} g{kg} k{k_chunk} s{} x{k_splits} {cubes} cubes {l2_mb:.0} MB staged",
                config.stages
            );
            if !opts.selects_variant(&name) {
                continue;
            }
            let kernel = ShrinkKernel::Mma { config, tiles_per_segment: 0 };
            let launch = |rec: &ComputeClient<RecordingRuntime>| {
                data.iter().zip(&mut partials).try_for_each(|(d, p)| launch_shrink(rec, layout, &d.pool, segs, &d.x, p, Some(kernel)))
            };
            rows.extend(time_variant(opts, builder, (prefill, sets), name, Half::Shrink, config, &mut best_here, launch));
        }
        best.extend(best_here);
    }
    // The expand tiles, each alone in a graph, reading one intermediate of as many copies as
    // a best shrink writes: 16- and 32-token tiles of 128 to 256 columns (a wider block
    // re-reads each token's intermediate row for fewer column blocks), staged through
    // registers or 2–3 stages.
    let mut best_expand: Vec<(f64, MmaExpandConfig)> = Vec::new();
    for copies in [1, 2, 4] {
        if !best.iter().any(|(_, c)| c.k_splits == copies) {
            continue;
        }
        let partials = prefill.partial_copies(&cuda, sets, copies);
        let mut best_here: Option<(f64, MmaExpandConfig)> = None;
        for (m, n) in [(1, 8), (2, 8), (1, 12), (1, 16)] {
            // (256 columns fit the register-staged budget up to rank 32 only.)
            let Some(tile) = MmaExpandConfig::with_tile::<E>(device, layout, m, n) else { continue };
            for stages in [1, 2, 3] {
                let Some(config) = tile.with_stages::<E>(device, stages).and_then(|c| c.summing::<E>(device, copies)) else {
                    continue;
                };
                let name = format!("tiles expand m{m} n{n} s{stages} x{copies}");
                if !opts.selects_variant(&name) {
                    continue;
                }
                let kernel = ExpandKernel::Mma { config, token_splits: 0 };
                let launch = |rec: &ComputeClient<RecordingRuntime>| {
                    data.iter_mut()
                        .zip(&partials)
                        .try_for_each(|(d, p)| launch_expand(rec, layout, &d.pool, segs, p, &mut d.y, Some(kernel)))
                };
                rows.extend(time_variant(opts, builder, (prefill, sets), name, Half::Expand, config, &mut best_here, launch));
            }
        }
        best_expand.extend(best_here);
    }
    for (shrink_us, config) in best {
        let (m, n, wm, wn, kg) = (config.m_frags, config.n_frags, config.warp_m, config.warp_n, config.k_groups);
        let variant = format!("tiles pair m{m} n{n} w{wm}x{wn} g{kg}");
        let default = SummingExpand::Default(LaunchMode::Plain);
        rows.extend(split_k_pair(opts, builder, prefill, data, &variant, Some(shrink_us), config, default));
        if let Some((_, expand)) = best_expand.iter().find(|(_, e)| e.a_splits == config.k_splits) {
            let variant = format!("{variant} s{}", expand.stages);
            rows.extend(split_k_pair(opts, builder, prefill, data, &variant, Some(shrink_us), config, SummingExpand::Tile(*expand)));
        }
    }
    rows
}

/// `--expand-splits`: the prefill tensor-core expand alone from CUDA graphs, 16- and 32-token
/// tiles of 128 columns and 16-token tiles of 256 in 2–4 stages, on an intermediate of 1 and
/// 2 copies, with each segment's token tiles shared out over 1 to 16 cubes (and the default
/// split). Before runs 132–133 the default aimed at about eight cubes per multiprocessor, but
/// the pipelined tiles hold so much shared memory and so many registers that three to five
/// are resident (runs 57 and 132, ncu): the other cubes wait their turn, and each runs only a
/// few tiles through its stages. Each row names its grid and shared memory.
fn prefill_expand_splits<E: StorageElem>(
    opts: &Opts,
    builder: &mut GraphBuilder,
    prefill: &DenseCase,
    data: &mut [DenseSet<E>],
) -> Vec<Row> {
    let DenseCase { layout, host_segs, segs, .. } = *prefill;
    let cuda = CudaRuntime::client(&Default::default());
    let device = cuda.properties();
    let (num_segments, max_len) = (host_segs.num_segments(), host_segs.max_segment_len());
    let default = MmaExpandConfig::for_batch::<E>(device, layout, num_segments, max_len);
    let (mut rows, sets) = (Vec::new(), data.len());
    for copies in [1, 2, TALL_SPLIT_COPIES] {
        let partials = prefill.partial_copies(&cuda, sets, copies);
        let default_here = default.and_then(|d| d.batch_summing::<E>(device, layout, copies));
        for (m, n, stages) in [(1, 8), (2, 8), (1, 16)].into_iter().flat_map(|(m, n)| [2, 3, 4].map(|stages| (m, n, stages))) {
            let tile = MmaExpandConfig::with_pipelined_tile::<E>(device, layout, m, n, stages);
            let Some(by_default) = tile.and_then(|c| c.summing::<E>(device, copies)) else {
                continue;
            };
            // Tiles multiplied by hand also on cooperative matrices (with the f32 delta tile).
            let cooperative = by_default.multiplies_by_hand().then(|| by_default.with_fragments::<E>(device, Fragments::Cmma)).flatten();
            for config in std::iter::once(by_default).chain(cooperative) {
                let fragments = if config.multiplies_by_hand() { "by hand" } else { "wmma" };
                let mut tried = Vec::new();
                for requested in [0, 1, 2, 3, 4, 6, 8, 16] {
                    let splits = config.token_splits(device, layout, num_segments, max_len, requested);
                    if requested != 0 && tried.contains(&splits) {
                        continue;
                    }
                    tried.push(splits);
                    let cubes = config.column_blocks(layout) * num_segments as u32 * splits;
                    let kib = config.shared_memory::<E>().div_ceil(1024);
                    let mark = if requested == 0 && default_here == Some(config) { " (default)" } else { "" };
                    let split = if requested == 0 { "default".to_string() } else { requested.to_string() };
                    let name =
                        format!("expand-splits m{m} n{n} s{stages} x{copies} {fragments} t{split}={splits} {cubes} cubes {kib} KiB{mark}");
                    if !opts.selects_variant(&name) {
                        continue;
                    }
                    let kernel = ExpandKernel::Mma { config, token_splits: requested };
                    let launch = |rec: &ComputeClient<RecordingRuntime>| {
                        data.iter_mut()
                            .zip(&partials)
                            .try_for_each(|(d, p)| launch_expand(rec, layout, &d.pool, segs, p, &mut d.y, Some(kernel)))
                    };
                    rows.extend(time_variant(opts, builder, (prefill, sets), name, Half::Expand, config, &mut None, launch));
                }
            }
        }
    }
    rows
}

/// The tensor-core shrink variants of the sweep for this layout on this device.
/// Register-staged: the default tile only (the K-group and chunk sweeps of runs 9-11 chose
/// its defaults). Pipelined (three stages, or two where three do not fit): 16- to 128-token
/// tiles (16 gives an under-filled grid, such as MLA's 128 cubes at T = 4096, twice the
/// cubes), the default row block and one covering every A row, warp blocks of up to 4×4
/// fragments, 64- and 128-wide chunks, and the K groups that give a cube 4–16 warps (the
/// sweeps of runs 12 and 15 put depth and chunk within a few percent of each other for
/// one-fragment warps). Empty where there is no default tensor-core shrink.
fn shrink_variants<E: StorageElem>(
    device: &DeviceProperties,
    layout: &LoraLayout,
    default_config: Option<MmaShrinkConfig>,
) -> Vec<(String, MmaShrinkConfig)> {
    let mut shrinks = Vec::new();
    let Some(default_config) = default_config else {
        return shrinks;
    };
    let (m, nf, kg, kc) = (default_config.m_frags, default_config.n_frags, default_config.k_groups, default_config.k_chunk);
    if let Some(config) = MmaShrinkConfig::with_tile_chunk::<E>(device, layout, default_config.tile(), kc, kg) {
        shrinks.push((format!("shrink m{m} n{nf} w{}x{} k{kc} g{kg}", config.warp_m, config.warp_n), config));
    }
    let row_frags = layout.intermediate_width() / 16;
    let blocks = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (4, 2), (2, 4), (4, 4)];
    let mut pipelined = Vec::new();
    for (m, nf) in [1, 2, 4, 8].into_iter().flat_map(|m| [nf, row_frags].map(|nf| (m, nf))) {
        for ((wm, wn), kc, kg) in blocks.into_iter().flat_map(|b| [64, 128].into_iter().flat_map(move |kc| [1, 2, 4].map(|kg| (b, kc, kg))))
        {
            let tile = ShrinkTile::new(m, nf).with_warps(wm, wn);
            let config = MmaShrinkConfig::with_tile_chunk::<E>(device, layout, tile, kc, kg)
                .filter(|c| (4..=16).contains(&c.warps()))
                .and_then(|c| c.with_stages::<E>(device, 3).or_else(|| c.with_stages::<E>(device, 2)));
            if let Some(config) = config.filter(|c| !pipelined.contains(c)) {
                pipelined.push(config);
                shrinks.push((format!("shrink m{m} n{nf} w{wm}x{wn} k{kc} g{kg} s{}", config.stages), config));
            }
        }
    }
    if default_config.stages > 1 && !pipelined.contains(&default_config) {
        let (wm, wn) = (default_config.warp_m, default_config.warp_n);
        shrinks.push((format!("shrink m{m} n{nf} w{wm}x{wn} k{kc} g{kg} s{}", default_config.stages), default_config));
    }
    // The default tile one stage deeper: the prefill shrink waits on memory with two to three
    // stages of 16 KiB in flight per cube, about one wave of cubes.
    if let Some(deeper) = default_config.with_stages::<E>(device, default_config.stages + 1).filter(|_| default_config.stages > 1) {
        let (wm, wn) = (deeper.warp_m, deeper.warp_n);
        shrinks.push((format!("shrink m{m} n{nf} w{wm}x{wn} k{kc} g{kg} s{} deeper", deeper.stages), deeper));
    }
    shrinks
}

/// The tensor-core expand variants of the sweep (name, configuration, token splits; 0 = the
/// default split): register-staged and pipelined 16- and 32-token tiles of 128 columns (the
/// widest; the sweeps of runs 9 and 14 ruled out narrower ones), at each depth, with the
/// default token split and with four cubes per segment and column block.
fn expand_variants<E: StorageElem>(device: &DeviceProperties, layout: &LoraLayout) -> Vec<(String, MmaExpandConfig, u32)> {
    let mut expands = Vec::new();
    for m in [1, 2] {
        if let Some(config) = MmaExpandConfig::with_tile::<E>(device, layout, m, 8) {
            expands.push((format!("expand m{m} n8"), config, 0));
            for stages in [2, 3, 4] {
                if let Some(config) = config.with_stages::<E>(device, stages) {
                    expands.push((format!("expand m{m} n8 s{stages}"), config, 0));
                    expands.push((format!("expand m{m} n8 s{stages} x4"), config, 4));
                }
            }
        }
    }
    expands
}

/// `--cuda-sources DIR`: the CUDA C++ of every tensor-core kernel the prefill sweeps and
/// defaults would launch on an H100 (T = 4096 in 8 segments), lowered without a GPU
/// (`lorac_runtime::cuda_source`), one file per (case, variant). Compile them with
/// `scripts/nvrtc_check.py DIR`.
fn write_cuda_sources(dir: &str) -> std::io::Result<()> {
    use lorac_runtime::cuda_source::{
        expand_source, h100_properties, moe_align_source, moe_combine_source, scalar_expand_source, shrink_source,
    };
    std::fs::create_dir_all(dir)?;
    let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
    let device = &h100_properties();
    let (segments, tokens) = (8, 4096 / 8);
    // 8 slots × 64 experts (counts in shared memory) and × 4096 experts (in global memory).
    for dense_slots in [512, 32768] {
        let align = moe_align_source(&client, MOE_CHUNK, dense_slots).map_err(|e| std::io::Error::other(format!("moe align: {e:?}")))?;
        std::fs::write(format!("{dir}/moe_align__chunk{MOE_CHUNK}_dense{dense_slots}.cu"), align)?;
    }
    let combine = moe_combine_source::<_, bf16>(&client, 8, 8).map_err(|e| std::io::Error::other(format!("moe combine: {e:?}")))?;
    std::fs::write(format!("{dir}/moe_combine__bf16_v8_top8.cu"), combine)?;
    let mut written = 3;
    for m in modules(false) {
        for rank in [16, 64] {
            let layout = LoraLayout::new(nz(SLOTS), nz(rank), m.in_features, m.groups, m.slices.clone(), None).unwrap();
            let case = format!("{}_R{rank}", m.name);
            let default_shrink = MmaShrinkConfig::for_batch::<bf16>(device, &layout, segments, tokens);
            // (variant, source, header: the shrink's grid size for this batch and the bytes its
            // cubes stage from L2, x once per row block and A once per cube).
            let mut sources = Vec::new();
            let k_bytes = u64::from(m.in_features) * 2;
            let shrink_cubes = |c: &MmaShrinkConfig| {
                let cubes = tokens.div_ceil(c.tile_tokens()) * segments as u32 * c.row_blocks();
                let staged = 4096 * k_bytes * u64::from(c.row_blocks()) + u64::from(cubes) * u64::from(c.n_frags * 16) * k_bytes;
                Some(format!("// lorac: grid cubes {cubes}, staged MB {:.0}\n", staged as f64 / 1e6))
            };
            let shrinks = default_shrink.map(|c| ("shrink default".to_string(), c)).into_iter();
            // The wide prefill tiles with K splits (`wide_split_for`) at every depth that fits.
            let wide = MmaShrinkConfig::wide_split_layouts::<bf16>(device, &layout).flat_map(|wide| {
                (2..=4).filter_map(move |stages| wide.with_stages::<bf16>(device, stages)).map(|c| {
                    let name = format!(
                        "shrink wide m{} n{} w{}x{} g{} s{} x{}",
                        c.m_frags, c.n_frags, c.warp_m, c.warp_n, c.k_groups, c.stages, c.k_splits
                    );
                    (name, c)
                })
            });
            for (name, config) in shrinks.chain(shrink_variants::<bf16>(device, &layout, default_shrink)).chain(wide) {
                sources.push((name, shrink_source::<_, bf16>(&client, config), shrink_cubes(&config)));
            }
            let default_expand = MmaExpandConfig::for_batch::<bf16>(device, &layout, segments, tokens);
            let variants = expand_variants::<bf16>(device, &layout).into_iter().filter(|(_, _, splits)| *splits == 0);
            // The default tile adding up the wide tiles' copies in 2 and 3 stages (its own depth
            // is one of them).
            let summing = [WIDE_SPLIT_COPIES, TALL_SPLIT_COPIES].into_iter().flat_map(|copies| {
                let tile = default_expand.and_then(|d| d.batch_summing::<bf16>(device, &layout, copies));
                let depths = [2, 3].map(|stages| tile.and_then(|t| t.with_stages::<bf16>(device, stages)?.summing::<bf16>(device, copies)));
                depths.into_iter().flatten().map(move |c| (format!("expand summing x{copies} s{}", c.stages), c))
            });
            let expands = default_expand
                .map(|c| ("expand default".to_string(), c))
                .into_iter()
                .chain(variants.map(|(n, c, _)| (n, c)))
                .chain(summing);
            for (name, config) in expands {
                sources.push((name, expand_source::<_, bf16>(&client, config), None));
            }
            // The decode expand of T = 32 tokens over the 8 adapters.
            let decode = ExpandConfig::for_device(device, &layout, 2, segments, 32 / segments as u32);
            sources.push(("expand scalar decode T32".into(), scalar_expand_source::<_, bf16>(&client, decode), None));
            for (name, source, cubes) in sources {
                let source = source.map_err(|e| std::io::Error::other(format!("{case} {name}: {e:?}")))?;
                // nvrtc_check.py reads the grid size from this line to estimate waves.
                let header = cubes.unwrap_or_default();
                std::fs::write(format!("{dir}/{case}__{}.cu", name.replace(' ', "_")), header + &source)?;
                written += 1;
            }
        }
    }
    eprintln!("wrote {written} CUDA sources to {dir}");
    Ok(())
}

/// Pairs per segment when MoE pairs are grouped on the device.
const MOE_CHUNK: u32 = 32;

/// Which MoE LoRA path a row times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MoeGrouping {
    /// One set of cubes per (token, expert) pair (`lorac_runtime::moe`).
    Pairs,
    /// Pairs grouped by (slot, expert) on the host, through the dense kernels.
    Host,
    /// The same, grouped on the device.
    Device,
}

/// What one MoE timing launches for a set: the device grouping (its own launches, only for
/// [`MoeGrouping::Device`]), the shrink, the expand.
#[derive(Clone, Copy)]
struct MoeSteps {
    regroup: bool,
    shrink: bool,
    expand: bool,
}

impl MoeSteps {
    const SHRINK: MoeSteps = MoeSteps { regroup: false, shrink: true, expand: false };
    const EXPAND: MoeSteps = MoeSteps { regroup: false, shrink: false, expand: true };
    /// A serving step: the grouping launches in front of the pair.
    const STEP: MoeSteps = MoeSteps { regroup: true, shrink: true, expand: true };
}

/// One MoE module's LoRA launches on a path (`grouping`), for the timed rows and the graphs
/// alike. The grouped router-weighted expand (down) includes its combine (the pair scratch
/// read and cleared).
#[derive(Clone, Copy)]
struct MoeLaunch<'a, E: CubeElement> {
    layout: &'a LoraLayout,
    pool: &'a AdapterPool<E>,
    segs: &'a DeviceSegments,
    input: MoeInput,
    output: MoeOutput,
    grouping: MoeGrouping,
}

impl<E: StorageElem> MoeLaunch<'_, E> {
    fn launch<R: Runtime>(&self, client: &ComputeClient<R>, s: &mut MoeSet<E>, steps: MoeSteps) -> lorac_runtime::Result<()> {
        let MoeLaunch { layout, pool, segs, input, output, grouping } = *self;
        if grouping == MoeGrouping::Pairs {
            if steps.shrink {
                launch_moe_shrink(client, layout, pool, segs, &s.routing, input, &s.x, &mut s.a)?;
            }
            if steps.expand {
                launch_moe_expand(client, layout, pool, segs, &s.routing, output, &s.a, &mut s.y)?;
            }
            return Ok(());
        }
        if grouping == MoeGrouping::Device && steps.regroup {
            s.device_groups.regroup(client, segs, &s.routing)?;
        }
        let groups = if grouping == MoeGrouping::Host { &s.host_groups } else { &s.device_groups };
        if steps.shrink {
            launch_moe_grouped_shrink(client, layout, pool, groups, &s.x, &mut s.a, None)?;
        }
        if steps.expand {
            match s.scratch.as_mut() {
                None => launch_moe_grouped_expand(client, layout, pool, groups, &s.a, &mut s.y, None)?,
                Some(scratch) => {
                    launch_moe_grouped_expand_weighted(client, layout, pool, groups, segs, &s.routing, &s.a, scratch, &mut s.y, None)?
                }
            }
        }
        Ok(())
    }
}

/// One of the MoE case's rotating input sets.
struct MoeSet<E: CubeElement> {
    routing: MoeRouting,
    host_groups: MoeGroups,
    device_groups: MoeGroups,
    x: DeviceBuffer<E>,
    y: DeviceBuffer<E>,
    /// The intermediate.
    a: DeviceBuffer<f32>,
    /// Per-pair rows of the grouped router-weighted expand (down only).
    scratch: Option<PairScratch<E>>,
}

/// OLMoE-style routed experts: hidden 2048, expert intermediate 1024, 64 experts, top-8.
fn moe_case<R: Runtime, E: StorageElem>(client: &ComputeClient<R>, opts: &Opts, rank: u32, tokens: u32, adapters: u32) -> Vec<Row> {
    let (hidden, inter, experts, topk) = if opts.smoke { (64u32, 32u32, 8u32, 2u32) } else { (2048u32, 1024u32, 64u32, 8u32) };
    let elem = size_of::<E>() as f64;
    let dims = ExpertDims { a: nz(experts), b: nz(experts) };
    let gate_up =
        LoraLayout::new(nz(SLOTS), nz(rank), hidden, 2, vec![slice("gate", inter, 0), slice("up", inter, 1)], Some(dims)).unwrap();
    let down = LoraLayout::new(nz(SLOTS), nz(rank), inter, 1, vec![slice("down", hidden, 0)], Some(dims)).unwrap();
    let rng = &mut Rng::new(u64::from(rank * 17 + tokens));
    let ranks = vec![rank; SLOTS as usize];
    let scales = vec![0.5f32; SLOTS as usize];
    let token_slots: Vec<Option<u32>> = (0..tokens).map(|i| Some(i % adapters)).collect();
    let segs = Segments::from_token_slots(&token_slots, SLOTS).unwrap();
    let dev = segs.upload(client);
    let pairs = (tokens * topk) as usize;
    let sets = if opts.smoke { 2 } else { 16 };
    let mut rows = Vec::new();
    for (name, layout, input, output) in [
        ("moe_gate_up", &gate_up, MoeInput::PerToken, MoeOutput::PerPair),
        ("moe_down", &down, MoeInput::PerPair, MoeOutput::RouterWeighted),
        // down into per-pair rows, the router's weighted sum left to the base combine (which
        // the grouped path can run as a dense expand)
        ("moe_down_per_pair", &down, MoeInput::PerPair, MoeOutput::PerPair),
    ] {
        let case = format!("{name} R={rank} T={tokens} adapters={adapters}");
        if !opts.selects(&case) {
            continue;
        }
        let pool = AdapterPool::new(
            layout,
            random_upload(client, rng, layout.a_elements() as usize).1,
            random_upload(client, rng, layout.b_elements() as usize).1,
            &ranks,
            &scales,
            client,
        )
        .unwrap();
        let (k, out, c_r) = (layout.in_features() as usize, layout.out_features() as usize, (layout.groups() * rank) as usize);
        let x_rows = if input == MoeInput::PerToken { tokens as usize } else { pairs };
        let y_rows = if output == MoeOutput::PerPair { pairs } else { tokens as usize };
        let mut distinct = 0.0;
        // Routing and pair groupings built outside the timed region, like the baseline's
        // per-adapter indices.
        let mut data: Vec<MoeSet<E>> = (0..sets)
            .map(|_| {
                let mut ids = Vec::with_capacity(pairs);
                for _ in 0..tokens {
                    let mut chosen: Vec<u32> = Vec::new();
                    while chosen.len() < topk as usize {
                        let e = rng.range(0, experts - 1);
                        if !chosen.contains(&e) {
                            chosen.push(e);
                        }
                    }
                    ids.extend(chosen);
                }
                let mut keys: Vec<(u32, u32)> = ids.iter().enumerate().map(|(p, &e)| (p as u32 / topk % adapters, e)).collect();
                keys.sort();
                keys.dedup();
                distinct += keys.len() as f64 / sets as f64;
                let weights: Vec<f32> = (0..pairs).map(|_| 1.0 / topk as f32).collect();
                let routing = MoeRouting::new(client, tokens, topk, experts, &ids, &weights).unwrap();
                let host_groups = MoeGroups::new(client, layout, &pool, &segs, topk, experts, &ids, input, output).unwrap();
                let mut device_groups =
                    MoeGroups::on_device(client, layout, &pool, tokens, topk, experts, MOE_CHUNK, input, output).unwrap();
                device_groups.regroup(client, &dev, &routing).unwrap();
                MoeSet {
                    routing,
                    host_groups,
                    device_groups,
                    x: random_upload(client, rng, x_rows * k).1,
                    y: random_upload(client, rng, y_rows * out).1,
                    a: DeviceBuffer::empty(client, pairs * c_r),
                    scratch: (output == MoeOutput::RouterWeighted).then(|| PairScratch::zeroed(client, pairs, out).unwrap()),
                }
            })
            .collect();
        let shrink_bytes = x_rows as f64 * k as f64 * elem + distinct * (c_r * k) as f64 * elem + (pairs * c_r) as f64 * 4.0;
        let expand_bytes = (pairs * c_r) as f64 * 4.0 + distinct * (out * rank as usize) as f64 * elem + 2.0 * (y_rows * out) as f64 * elem;
        let iters = if opts.smoke { 3 } else { 100 };
        // Per pair; grouped by (slot, expert) on the host; grouped on the device into
        // MOE_CHUNK-pair segments, its pair time with the grouping launches in front, as a
        // serving step runs it. The grouped router-weighted expand (down) includes its combine
        // (the pair scratch read and cleared), which expand_bytes leaves out.
        for grouping in [MoeGrouping::Pairs, MoeGrouping::Host, MoeGrouping::Device] {
            let moe = MoeLaunch { layout, pool: &pool, segs: &dev, input, output, grouping };
            let shrink_us = time_us(client, opts, iters, |i| moe.launch(client, &mut data[i % sets], MoeSteps::SHRINK).unwrap());
            let expand_us = time_us(client, opts, iters, |i| moe.launch(client, &mut data[i % sets], MoeSteps::EXPAND).unwrap());
            let pair_us = time_us(client, opts, iters, |i| moe.launch(client, &mut data[i % sets], MoeSteps::STEP).unwrap());
            let variant = match grouping {
                MoeGrouping::Pairs => "pairs".to_string(),
                MoeGrouping::Host => "grouped".to_string(),
                MoeGrouping::Device => format!("grouped on device (chunk {MOE_CHUNK}; pair with the grouping)"),
            };
            rows.push(Row { case: case.clone(), variant, shrink_us, expand_us, pair_us, shrink_bytes, expand_bytes });
        }
        if opts.graphs {
            // Each grouping's kernels of every set in one CUDA graph, replayed (see
            // `graph_rows`): per pair; grouped on the host (shrink, expand); grouped on the
            // device (grouping, shrink, expand).
            for grouping in [MoeGrouping::Pairs, MoeGrouping::Host, MoeGrouping::Device] {
                let moe = MoeLaunch { layout, pool: &pool, segs: &dev, input, output, grouping };
                let pair_us =
                    graph_pair_us(opts, iters, sets, &case, |rec| data.iter_mut().try_for_each(|s| moe.launch(rec, s, MoeSteps::STEP)));
                let variant = match grouping {
                    MoeGrouping::Pairs => "pairs graph",
                    MoeGrouping::Host => "grouped graph",
                    MoeGrouping::Device => "grouped on device graph",
                };
                if let Some(pair_us) = pair_us {
                    let (shrink_us, expand_us) = (f64::NAN, f64::NAN);
                    rows.push(Row {
                        case: case.clone(),
                        variant: variant.into(),
                        shrink_us,
                        expand_us,
                        pair_us,
                        shrink_bytes,
                        expand_bytes,
                    });
                }
            }
        }
    }
    rows
}

/// The time per set of the launches `record` makes for `sets` rotation sets, captured into one
/// CUDA graph and replayed (None, with the reason on stderr, when the graph cannot be built).
fn graph_pair_us(
    opts: &Opts,
    iters: usize,
    sets: usize,
    case: &str,
    record: impl FnOnce(&ComputeClient<RecordingRuntime>) -> lorac_runtime::Result<()>,
) -> Option<f64> {
    let cuda = CudaRuntime::client(&Default::default());
    let timed = GraphBuilder::new(&Default::default())
        .map_err(|e| e.to_string())
        .and_then(|mut builder| time_recorded(opts, &mut builder, &cuda, sets, iters, record));
    timed.map_err(|e| eprintln!("{case}: no CUDA graph: {e}")).ok()
}

/// The launches `record` makes for `sets` rotation sets, captured into one graph on `builder`
/// and replayed (`time_graphs`): µs per set, or why the graph could not be built.
fn time_recorded(
    opts: &Opts,
    builder: &mut GraphBuilder,
    cuda: &ComputeClient<CudaRuntime>,
    sets: usize,
    iters: usize,
    record: impl FnOnce(&ComputeClient<RecordingRuntime>) -> lorac_runtime::Result<()>,
) -> Result<f64, String> {
    let (done, launches) = record_launches(cuda.properties(), record).map_err(|e| e.to_string())?;
    done.map_err(|e| e.to_string())?;
    let graph = builder.capture(cuda, &launches).map_err(|e| e.to_string())?;
    Ok(time_graphs(opts, builder, std::slice::from_ref(&graph), sets, iters))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let opts = Opts {
        quick: flag("--quick"),
        smoke: flag("--smoke"),
        profile_pass: flag("--profile-pass"),
        prefill_only: flag("--prefill-only"),
        case_filter: value("--case"),
        variant_filter: value("--variant"),
        graphs: !flag("--no-graphs") && !flag("--smoke") && !flag("--profile-pass"),
        decode_sweep: flag("--decode-sweep"),
        decode_mma_expand: flag("--decode-mma-expand"),
        split_k: flag("--split-k"),
        prefill_split_k: flag("--prefill-split-k"),
        prefill_tiles: flag("--prefill-tiles"),
        expand_splits: flag("--expand-splits"),
    };
    let csv_path = value("--csv");
    if let Some(dir) = value("--cuda-sources") {
        if let Err(e) = write_cuda_sources(&dir) {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    } else if opts.smoke {
        run::<cubecl::wgpu::WgpuRuntime, f32>(&opts, csv_path);
    } else {
        run::<CudaRuntime, bf16>(&opts, csv_path);
    }
}

fn run<R: Runtime, E: StorageElem>(opts: &Opts, csv_path: Option<String>) {
    let client = R::client(&Default::default());
    let props = client.properties();
    eprintln!(
        "device: SMs {:?}, plane {}..{}, max vector {}",
        props.hardware.num_streaming_multiprocessors,
        props.hardware.plane_size_min,
        props.hardware.plane_size_max,
        props.hardware.max_vector_size
    );

    let copy_bw = copy_bandwidth(&client, opts);
    let (launch_us, launch_latency_us) = launch_overhead(&client, opts);
    println!("# copy bandwidth (cubecl copy kernel, read+write): {copy_bw:.0} GB/s");
    println!("# empty cubecl kernel: {launch_us:.2} us per launch back-to-back, {launch_latency_us:.2} us launch+sync");
    if opts.graphs {
        let floor = graph_kernel_floor(opts).unwrap_or(f64::NAN);
        println!("# empty kernel replayed from a CUDA graph: {floor:.2} us per kernel");
        eprintln!("empty kernel replayed from a CUDA graph: {floor:.2} us per kernel");
    }

    let mut rows = Vec::new();
    let ranks: &[u32] = if opts.quick || opts.smoke { &[16] } else { &[16, 64] };
    let shapes: &[(u32, u32)] =
        if opts.smoke { &[(1, 1), (8, 8), (300, 8)] } else { &[(1, 1), (8, 1), (8, 8), (32, 1), (32, 8), (128, 1), (128, 8), (4096, 8)] };
    for m in modules(opts.smoke) {
        for &rank in ranks {
            for &(tokens, adapters) in shapes {
                if (opts.prefill_only && tokens < 1024) || !opts.selects(&dense_case_name(&m, rank, tokens, adapters)) {
                    continue;
                }
                let case_rows = dense_case::<R, E>(&client, opts, &m, rank, tokens, adapters);
                for r in &case_rows {
                    eprintln!("{} {}: shrink {:.2} expand {:.2} pair {:.2} us", r.case, r.variant, r.shrink_us, r.expand_us, r.pair_us);
                }
                rows.extend(case_rows);
                write_csv(csv_path.as_deref(), copy_bw, launch_us, launch_latency_us, &rows);
            }
        }
    }
    let moe_shapes: &[(u32, u32)] = if opts.smoke { &[(1, 1), (8, 8)] } else { &[(1, 1), (8, 8), (32, 8), (128, 8), (1024, 8)] };
    for &rank in ranks {
        for &(tokens, adapters) in moe_shapes.iter().filter(|_| !opts.prefill_only) {
            let names = ["moe_gate_up", "moe_down", "moe_down_per_pair"];
            if !names.iter().any(|m| opts.selects(&format!("{m} R={rank} T={tokens} adapters={adapters}"))) {
                continue;
            }
            rows.extend(moe_case::<R, E>(&client, opts, rank, tokens, adapters));
            write_csv(csv_path.as_deref(), copy_bw, launch_us, launch_latency_us, &rows);
        }
    }
    if opts.profile_pass {
        return;
    }
    print!("{}", write_csv(csv_path.as_deref(), copy_bw, launch_us, launch_latency_us, &rows));
}

/// The CSV of the rows so far, also written to `path` (after every case, so a run cut short
/// keeps what it measured).
fn write_csv(path: Option<&str>, copy_bw: f64, launch_us: f64, launch_latency_us: f64, rows: &[Row]) -> String {
    let mut text =
        format!("# copy_GBps={copy_bw:.0} launch_us={launch_us:.2} launch_sync_us={launch_latency_us:.2}\n{}\n", Row::csv_header());
    for r in rows {
        text.push_str(&r.csv(copy_bw, launch_us));
        text.push('\n');
    }
    if let Some(path) = path {
        std::fs::File::create(path).and_then(|mut f| f.write_all(text.as_bytes())).expect("write csv");
    }
    text
}
