//! Tensor-parallel sharding.
//!
//! Reads: each linear's parallel style and shard units, `--tp` and `--ep`.
//! Guarantees: every linear has a [`LinearShard`] (per-rank widths and the row/column/expert
//! ranges of the full weights each rank takes), every value has its per-rank width, and when
//! tp > 1 an `AllReduce` sits wherever a partial sum (output of a row-parallel or
//! vocab-parallel layer, and anything linear computed from it) meets an operation that needs
//! the full value. Any split that does not divide is an error naming the config field.

use std::collections::HashMap;

use lorac_models::spec::{LinearKind, ParallelStyle, ShardUnit};

use crate::error::CompileError;
use crate::ir::*;

/// The share of one dimension each rank takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub width: u32,
    /// Per rank, the range of the full dimension.
    pub ranges: Vec<(u32, u32)>,
}

impl Split {
    fn whole(width: u32, tp: u32) -> Split {
        Split { width, ranges: vec![(0, width); tp as usize] }
    }
}

/// Splits one dimension over `tp` ranks (`module` only names the culprit in errors).
pub fn split(unit: &ShardUnit, tp: u32, module: &str) -> Result<Split, CompileError> {
    let ranks = 0..tp;
    match *unit {
        ShardUnit::Heads { count, head_dim, field, replicate_when_short } => {
            if count % tp == 0 {
                let per = count / tp * head_dim;
                Ok(Split { width: per, ranges: ranks.map(|r| (r * per, (r + 1) * per)).collect() })
            } else if replicate_when_short && tp.is_multiple_of(count) {
                // tp > heads: each rank holds one head, shared by tp / count ranks.
                let ranks_per_head = tp / count;
                Ok(Split {
                    width: head_dim,
                    ranges: ranks.map(|r| (r / ranks_per_head * head_dim, (r / ranks_per_head + 1) * head_dim)).collect(),
                })
            } else {
                let message = if replicate_when_short {
                    format!("{count}: tp must divide it, or be a multiple of it so each rank holds one replicated head")
                } else {
                    format!("{count} is not divisible by tp {tp}")
                };
                Err(CompileError::Indivisible { module: module.to_string(), field: field.to_string(), tp, message })
            }
        }
        ShardUnit::Elements { width, field } => {
            if width % tp == 0 {
                let per = width / tp;
                Ok(Split { width: per, ranges: ranks.map(|r| (r * per, (r + 1) * per)).collect() })
            } else {
                Err(CompileError::Indivisible {
                    module: module.to_string(),
                    field: field.to_string(),
                    tp,
                    message: format!("{width} is not divisible by tp {tp}"),
                })
            }
        }
    }
}

/// The vocabulary is padded so every rank holds ceil(vocab / tp) rows; the last rank's real
/// rows may be fewer.
pub fn vocab_split(vocab: u32, tp: u32) -> Split {
    let per = vocab.div_ceil(tp);
    Split { width: per, ranges: (0..tp).map(|r| ((r * per).min(vocab), ((r + 1) * per).min(vocab))).collect() }
}

fn module_name(linear: &Linear) -> String {
    let path = &linear.spec.modules[0].path;
    let path = path.rsplit_once('.').map_or(path.as_str(), |(parent, _)| parent);
    format!("{path}.{}", linear.spec.fused_name).replace(".{expert}", "")
}

pub fn shard_linear(linear: &Linear, tp: u32, ep: u32) -> Result<LinearShard, CompileError> {
    let spec = &linear.spec;
    let name = module_name(linear);
    // Routed experts: `ep` groups of experts, each split over the remaining tp / ep ranks.
    let (tp_inner, experts) = match spec.experts {
        Some(e) if spec.kind == LinearKind::RoutedExperts => {
            if e.count % ep != 0 {
                let message = format!("{} is not divisible by --ep {ep}", e.count);
                return Err(CompileError::Indivisible { module: name, field: e.field.to_string(), tp, message });
            }
            let local = e.count / ep;
            let inner = tp / ep;
            let ranges = (0..tp).map(|r| (r / inner * local, (r / inner + 1) * local)).collect();
            (inner, Some((local, ranges)))
        }
        _ => (tp, None),
    };
    let expand = |s: Split| -> Split {
        // An inner split over tp / ep ranks repeats for each expert group.
        if tp_inner == tp { s } else { Split { width: s.width, ranges: (0..tp).map(|r| s.ranges[(r % tp_inner) as usize]).collect() } }
    };
    let whole_out = |tp: u32| -> Vec<SliceShard> {
        spec.slices()
            .map(|(g, s)| SliceShard { name: s.name.clone(), group: g as u32, width: s.width(), rows: vec![(0, s.width()); tp as usize] })
            .collect()
    };
    let (input, slices) = match spec.parallel {
        ParallelStyle::Column => {
            let slices = spec
                .slices()
                .map(|(g, s)| {
                    let sp = expand(split(&s.shard, tp_inner, &name)?);
                    Ok(SliceShard { name: s.name.clone(), group: g as u32, width: sp.width, rows: sp.ranges })
                })
                .collect::<Result<Vec<_>, CompileError>>()?;
            (Split::whole(spec.in_features, tp), slices)
        }
        ParallelStyle::Row => (expand(split(&spec.in_shard, tp_inner, &name)?), whole_out(tp)),
        ParallelStyle::Replicated => (Split::whole(spec.in_features, tp), whole_out(tp)),
        ParallelStyle::Vocab => match spec.kind {
            LinearKind::Embedding => (vocab_split(spec.in_features, tp), whole_out(tp)),
            _ => {
                let vocab = spec.out_features();
                let sp = vocab_split(vocab, tp);
                let (g, s) = spec.slices().next().expect("lm_head has one slice");
                (
                    Split::whole(spec.in_features, tp),
                    vec![SliceShard { name: s.name.clone(), group: g as u32, width: sp.width, rows: sp.ranges }],
                )
            }
        },
    };
    Ok(LinearShard { in_features: input.width, slices, input_cols: input.ranges, experts })
}

pub fn run(g: &mut Graph, tp: u32, ep: u32) -> Result<(), CompileError> {
    if !tp.is_multiple_of(ep) {
        return Err(CompileError::Option {
            option: "--ep",
            message: format!("{ep} must divide --tp {tp} (experts are split over tp / ep ranks)"),
        });
    }
    let shards = g.linears.values().map(|l| shard_linear(l, tp, ep)).collect::<Result<Vec<_>, _>>()?;
    for (linear, shard) in g.linears.values_mut().zip(shards) {
        linear.shard = Some(shard);
    }
    let widths = g
        .values
        .values()
        .map(|v| match &v.width {
            WidthSpec::Full(w) => Ok(Some(*w)),
            WidthSpec::Split(parts) => parts.iter().map(|p| split(p, tp, &v.name).map(|s| s.width)).sum::<Result<u32, _>>().map(Some),
            WidthSpec::LinearOut(id) => Ok(g.linears[*id].shard.as_ref().map(LinearShard::out_features)),
            WidthSpec::LinearIn(id) => Ok(g.linears[*id].shard.as_ref().map(|s| s.in_features)),
            // LoRA intermediates do not exist yet; the LoRA pass sizes them.
            WidthSpec::LoraIntermediate(_) => Ok(None),
        })
        .collect::<Result<Vec<_>, CompileError>>()?;
    for (value, width) in g.values.values_mut().zip(widths) {
        value.rank_width = width;
    }
    if tp > 1 {
        insert_all_reduces(g);
    }
    Ok(())
}

/// Tracks which values are partial sums across ranks and all-reduces them just before the
/// first operation that needs the full value. Linear operations (Add of two partials, the MoE
/// combine, a replicated linear) keep a partial sum partial, so an MoE block with shared
/// experts needs one all-reduce, not three.
fn insert_all_reduces(g: &mut Graph) {
    let mut partial = std::collections::HashSet::new();
    let mut reduced: HashMap<ValueId, ValueId> = HashMap::new();
    let mut position = 0;
    while position < g.order.len() {
        let node = g.order[position];
        let (op, inputs, outputs) = {
            let n = &g.dag[node];
            (n.op.clone(), n.inputs.clone(), n.outputs.clone())
        };
        let is_partial = |v: &ValueId| partial.contains(v);
        // Operations linear in their partial inputs pass the partial sum on unreduced.
        let propagates = match &op {
            Op::Add => inputs.iter().all(is_partial),
            Op::MoeCombine { .. } => is_partial(&inputs[0]),
            Op::Linear(id) => g.linears[*id].spec.parallel == ParallelStyle::Replicated && is_partial(&inputs[0]),
            _ => false,
        };
        let starts_partial = match &op {
            Op::Embedding(id) => g.linears[*id].spec.parallel == ParallelStyle::Vocab,
            Op::Linear(id) => g.linears[*id].spec.parallel == ParallelStyle::Row,
            _ => false,
        };
        let output_partial = propagates || starts_partial;
        let needs_full: Vec<ValueId> = if propagates { Vec::new() } else { inputs.iter().copied().filter(is_partial).collect() };
        for v in needs_full {
            if reduced.contains_key(&v) {
                continue;
            }
            let value = &g.values[v];
            let (name, rows, width, dtype) = (format!("{}.all_reduced", value.name), value.rows, value.rank_width, value.dtype);
            let full = g.add_value(name, rows, WidthSpec::Full(width.unwrap_or(0)), dtype);
            g.values[full].rank_width = width;
            let layer = g.dag[node].layer;
            g.insert_node(position, Op::AllReduce, layer, vec![v], vec![full]);
            position += 1;
            reduced.insert(v, full);
            // Once reduced, every later reader takes the full copy: the residual stream stays
            // whole, as engines keep it.
            for later in position..g.order.len() {
                let consumer = g.order[later];
                g.replace_input(consumer, v, full);
            }
        }
        if output_partial {
            partial.extend(outputs);
        }
        position += 1;
    }
}
