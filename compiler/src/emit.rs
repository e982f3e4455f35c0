//! Emission: the finished graph becomes a [`Plan`]: kernels deduplicated into one table,
//! nodes in execution order, and per rank the LoRA buffers (with their place in the adapter
//! pool) and the memory totals.

use std::collections::HashMap;

use lorac_models::spec::ParallelStyle;
use lorac_plan::*;

use crate::ir::{self, Graph, Op};
use crate::passes::memory::{ALIGN, ActivationPlan};

pub struct RankTotals {
    pub weights: u64,
    pub kv_cache: u64,
    pub state_cache: u64,
}

fn parallel_kind(style: ParallelStyle) -> ParallelKind {
    match style {
        ParallelStyle::Column => ParallelKind::Column,
        ParallelStyle::Row => ParallelKind::Row,
        ParallelStyle::Replicated => ParallelKind::Replicated,
        ParallelStyle::Vocab => ParallelKind::Vocab,
    }
}

fn label(g: &Graph, op: &Op) -> String {
    let linear_name = |id: ir::LinearId| g.linears[id].spec.fused_name;
    let lora_name = |id: ir::LoraId| linear_name(g.loras[id].linear);
    match op {
        Op::TokenIds => "token_ids".into(),
        Op::Embedding(id) => format!("embedding {}", linear_name(*id)),
        Op::RmsNorm { .. } => "rms_norm".into(),
        Op::Linear(id) => format!("linear {}", linear_name(*id)),
        Op::Attention { .. } => "attention".into(),
        Op::MlaLatentNorm { .. } => "mla_latent_norm".into(),
        Op::Mla { .. } => "mla_attention".into(),
        Op::GatedDeltaNet { .. } => "gated_delta_net".into(),
        Op::Mamba2 { .. } => "mamba2".into(),
        Op::Activation(a) => format!("activation {a:?}").to_lowercase(),
        Op::Router { .. } => "router".into(),
        Op::MoeCombine { .. } => "moe_combine".into(),
        Op::Add => "add".into(),
        Op::AllReduce => "all_reduce".into(),
        Op::GatherLast => "gather_last".into(),
        Op::Sample => "sample".into(),
        Op::LoraShrink(id) => format!("lora_shrink {}", lora_name(*id)),
        Op::LoraExpand(id) => format!("lora_expand {}", lora_name(*id)),
    }
}

/// One rank's LoRA buffers, laid out back to back (aligned) in its adapter pool.
fn lora_buffers(g: &Graph, rank: usize, lora_dtype: DType) -> (Vec<LoraBuffer>, u64) {
    let mut offset = 0u64;
    let mut place = |elements: u64| {
        let at = offset;
        offset = (offset + elements * lora_dtype.size_bytes()).next_multiple_of(ALIGN);
        at
    };
    let buffers = g
        .loras
        .values()
        .map(|module| {
            let linear = &g.linears[module.linear];
            let shard = linear.shard.as_ref().expect("emitted graphs are sharded");
            let a_offset = place(module.layout.a_elements());
            let b_offset = place(module.layout.b_elements());
            LoraBuffer {
                layer: linear.layer,
                module: linear.spec.fused_name.to_string(),
                parallel: parallel_kind(linear.spec.parallel),
                layout: module.layout.clone(),
                slice_rows: shard.slices.iter().map(|s| s.rows[rank]).collect(),
                input_cols: shard.input_cols[rank],
                experts: shard.experts.as_ref().map(|(_, ranges)| ranges[rank]),
                hf_modules: linear.spec.modules.iter().map(|m| m.name.clone()).collect(),
                hf_paths: linear.spec.modules.iter().map(|m| m.path.clone()).collect(),
                a_offset,
                b_offset,
            }
        })
        .collect();
    (buffers, offset)
}

pub struct EmitInput<'a> {
    pub graph: &'a Graph,
    pub activations: &'a ActivationPlan,
    pub totals: RankTotals,
    pub source: Source,
    pub model: ModelSummary,
    pub parallel: Parallel,
    pub lora: LoraSettings,
    pub limits: Limits,
}

pub fn emit(input: EmitInput) -> Plan {
    let g = input.graph;
    let mut kernels: Vec<KernelSpec> = Vec::new();
    let mut kernel_ids: HashMap<KernelSpec, KernelId> = HashMap::new();
    let nodes = g
        .nodes_in_order()
        .map(|(_, node)| {
            let kernel = node.kernel.as_ref().map(|k| {
                *kernel_ids.entry(k.clone()).or_insert_with(|| {
                    kernels.push(k.clone());
                    KernelId(kernels.len() as u32 - 1)
                })
            });
            let lora_buffer = match node.op {
                Op::LoraShrink(id) | Op::LoraExpand(id) => Some(ir::Id::index(id) as u32),
                _ => None,
            };
            let role = match node.op {
                Op::Linear(id) | Op::Embedding(id) => Some(g.linears[id].role),
                Op::LoraShrink(id) | Op::LoraExpand(id) => Some(g.linears[g.loras[id].linear].role),
                _ => None,
            };
            PlanNode {
                label: label(g, &node.op),
                layer: node.layer,
                kernel,
                inputs: node.inputs.iter().map(|v| ValueId(ir::Id::index(*v) as u32)).collect(),
                outputs: node.outputs.iter().map(|v| ValueId(ir::Id::index(*v) as u32)).collect(),
                lora_buffer,
                role,
                weights: node.weights.clone(),
            }
        })
        .collect();
    let values = g
        .values
        .iter()
        .map(|(id, v)| {
            let (bytes, arena_offset) = input.activations.placement[ir::Id::index(id)];
            PlanValue { name: v.name.clone(), rows: v.rows, width: v.rank_width.unwrap_or(0), dtype: v.dtype, bytes, arena_offset }
        })
        .collect();
    let ranks = (0..input.parallel.tp as usize)
        .map(|rank| {
            let (lora_buffers, lora_pool) = lora_buffers(g, rank, input.lora.dtype);
            let t = &input.totals;
            let activations = input.activations.arena_bytes;
            let total = t.weights + lora_pool + activations + t.kv_cache + t.state_cache;
            RankPlan {
                rank: rank as u32,
                lora_buffers,
                memory: Memory { weights: t.weights, lora_pool, activations, kv_cache: t.kv_cache, state_cache: t.state_cache, total },
            }
        })
        .collect();
    Plan {
        source: input.source,
        model: input.model,
        parallel: input.parallel,
        lora: input.lora,
        limits: input.limits,
        kernels,
        nodes,
        values,
        ranks,
    }
}
