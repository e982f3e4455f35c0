//! LoRA insertion.
//!
//! Reads: the requested targets (PEFT module names, fused names, `all`, `all-linear`), the
//! LoRA shape options and every linear's per-rank shard.
//! Guarantees: each targeted linear gets one [`LoraModule`] whose layout is derived from its
//! shard (so pool and base layer agree on every rank), followed in program order by a shrink
//! and an expand node; the expand updates the linear's output in place, before any
//! all-reduce (the LoRA delta of a row-parallel layer is a partial sum like the base output).
//! Linears that are not targeted, or that the model does not have, get nothing.

use std::collections::BTreeSet;
use std::num::NonZeroU32;

use lorac_models::spec::{LinearKind, ParallelStyle};
use lorac_plan::{DType, ExpertDims, LoraLayout, LoraSlice, MoeLoraMode, Rows};

use crate::error::CompileError;
use crate::ir::*;

/// `all`: every linear layer, embedding and lm_head included.
pub const ALL: &str = "all";
/// `all-linear`: PEFT's meaning, every linear layer except the output layer (and the
/// embedding, which is not a linear layer).
pub const ALL_LINEAR: &str = "all-linear";

pub struct LoraOptions<'a> {
    pub targets: &'a [String],
    pub max_rank: NonZeroU32,
    pub max_loras: NonZeroU32,
    pub moe_lora: MoeLoraMode,
}

/// Which linears the targets select, and the HF module names that ends up covering.
pub struct Selection {
    pub linears: Vec<LinearId>,
    pub modules: Vec<String>,
}

fn matches(linear: &Linear, target: &str) -> bool {
    let spec = &linear.spec;
    match target {
        ALL => true,
        ALL_LINEAR => matches!(spec.kind, LinearKind::Dense | LinearKind::RoutedExperts),
        name => spec.fused_name == name || spec.modules.iter().any(|m| m.name == name),
    }
}

/// Every name a user may give for this model.
pub fn valid_targets(g: &Graph) -> Vec<String> {
    let mut names = BTreeSet::new();
    for l in g.linears.values() {
        names.insert(l.spec.fused_name.to_string());
        names.extend(l.spec.modules.iter().map(|m| m.name.clone()));
    }
    let mut valid = vec![ALL.to_string(), ALL_LINEAR.to_string()];
    valid.extend(names);
    valid
}

pub fn select(g: &Graph, targets: &[String], model_type: &str) -> Result<Selection, CompileError> {
    if targets.is_empty() {
        return Err(CompileError::Option {
            option: "--lora-target-modules",
            message: format!("give at least one module, `{ALL}` or `{ALL_LINEAR}`"),
        });
    }
    for target in targets {
        if !g.linears.values().any(|l| matches(l, target)) {
            return Err(CompileError::UnknownTarget {
                target: target.clone(),
                model_type: model_type.to_string(),
                valid: valid_targets(g),
            });
        }
    }
    let linears: Vec<LinearId> = g.linears.iter().filter(|(_, l)| targets.iter().any(|t| matches(l, t))).map(|(id, _)| id).collect();
    let modules: BTreeSet<String> = linears.iter().flat_map(|id| g.linears[*id].spec.modules.iter().map(|m| m.name.clone())).collect();
    Ok(Selection { linears, modules: modules.into_iter().collect() })
}

/// The pool layout of one linear on one rank. Every packed HF module keeps its own A even if
/// only some were named: adapters differ in which members they train, and the pool must take
/// any of them.
pub fn layout(linear: &Linear, opts: &LoraOptions, module: &str) -> Result<LoraLayout, CompileError> {
    let shard = linear.shard.as_ref().expect("LoRA runs after sharding");
    let slices = shard.slices.iter().map(|s| LoraSlice { name: s.name.clone(), width: s.width, group: s.group }).collect();
    let experts = match &shard.experts {
        Some((local, _)) => {
            let local = NonZeroU32::new(*local).expect("experts divide into non-empty groups");
            // Shared-outer: one A on the up-projection's input side (column-parallel), one
            // B on the down-projection's output side (row-parallel).
            let shared = |side: ParallelStyle| {
                if opts.moe_lora == MoeLoraMode::SharedOuter && linear.spec.parallel == side { NonZeroU32::MIN } else { local }
            };
            Some(ExpertDims { a: shared(ParallelStyle::Column), b: shared(ParallelStyle::Row) })
        }
        None => None,
    };
    let groups = linear.spec.modules.len() as u32;
    LoraLayout::new(opts.max_loras, opts.max_rank, shard.in_features, groups, slices, experts)
        .map_err(|source| CompileError::Layout { module: module.to_string(), source })
}

pub fn run(g: &mut Graph, opts: &LoraOptions, selection: &Selection) -> Result<(), CompileError> {
    for &id in &selection.linears {
        let name = g.linears[id].spec.fused_name;
        let layout = layout(&g.linears[id], opts, name)?;
        let a_shared = layout.experts().is_some_and(|e| e.a.get() == 1);
        let width = layout.intermediate_width();
        let lora = g.loras.push(LoraModule { linear: id, layout });
        g.linears[id].lora = Some(lora);
        insert_nodes(g, id, lora, width, a_shared);
    }
    Ok(())
}

fn insert_nodes(g: &mut Graph, id: LinearId, lora: LoraId, width: u32, a_shared_by_experts: bool) {
    let position =
        g.order.iter().position(|n| matches!(g.dag[*n].op, Op::Linear(l) | Op::Embedding(l) if l == id)).expect("every linear has a node");
    let node = g.order[position];
    let (inputs, output, layer) = {
        let n = &g.dag[node];
        (n.inputs.clone(), n.outputs[0], n.layer)
    };
    let base = g.values[output].clone();
    // Per-expert A: the shrink runs per (token, chosen expert); a shared A once per token.
    let shrink_rows = match (g.linears[id].top_k, a_shared_by_experts) {
        (Some(top_k), false) => Rows::RoutedTokens { top_k },
        _ => g.values[inputs[0]].rows,
    };
    let a = g.add_value(format!("{}.lora_a", base.name), shrink_rows, WidthSpec::LoraIntermediate(lora), DType::F32);
    g.values[a].rank_width = Some(width);
    let updated = g.add_value(format!("{}.lora", base.name), base.rows, base.width.clone(), base.dtype);
    g.values[updated].rank_width = base.rank_width;
    g.values[updated].alias_of = Some(output);
    let consumers = g.consumers(output);
    // Routed experts also read the routing (which experts, which weights).
    let routing: Vec<ValueId> = inputs.iter().skip(1).copied().collect();
    let mut shrink_inputs = vec![inputs[0]];
    shrink_inputs.extend(&routing);
    let mut expand_inputs = vec![a, output];
    expand_inputs.extend(&routing);
    g.insert_node(position + 1, Op::LoraShrink(lora), layer, shrink_inputs, vec![a]);
    g.insert_node(position + 2, Op::LoraExpand(lora), layer, expand_inputs, vec![updated]);
    for consumer in consumers {
        g.replace_input(consumer, output, updated);
    }
}
