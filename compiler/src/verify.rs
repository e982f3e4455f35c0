//! The graph verifier, run after every pass in debug builds (as rustc validates MIR and
//! Cranelift verifies after each pass): it checks the invariants every pass relies on.

use std::collections::HashSet;

use crate::error::CompileError;
use crate::ir::*;

pub fn verify(g: &Graph, pass: &'static str) -> Result<(), CompileError> {
    let fail = |message: String| Err(CompileError::Verify { pass, message });
    let in_order: HashSet<_> = g.order.iter().copied().collect();
    if in_order.len() != g.order.len() || in_order.len() != g.dag.node_count() {
        return fail(format!("program order lists {} nodes ({} distinct) of {}", g.order.len(), in_order.len(), g.dag.node_count()));
    }
    if petgraph::algo::is_cyclic_directed(&g.dag) {
        return fail("the dataflow graph has a cycle".into());
    }
    let sharded = pass != "lower";
    let mut written = HashSet::new();
    for (index, node) in g.nodes_in_order() {
        for v in &node.inputs {
            if !written.contains(v) {
                return fail(format!("{:?} reads `{}` before it is written", node.op, g.values[*v].name));
            }
        }
        let edges: HashSet<ValueId> = g.dag.edges_directed(index, petgraph::Direction::Incoming).map(|e| *e.weight()).collect();
        if edges != node.inputs.iter().copied().collect() {
            return fail(format!("{:?}: edges do not match its inputs", node.op));
        }
        for v in &node.outputs {
            if !written.insert(*v) {
                return fail(format!("`{}` is written twice", g.values[*v].name));
            }
            if g.values[*v].producer != Some(index) {
                return fail(format!("`{}` does not record its producer", g.values[*v].name));
            }
        }
        if sharded && let Some(v) = node.inputs.iter().chain(&node.outputs).find(|v| g.values[**v].rank_width.is_none()) {
            return fail(format!("`{}` has no per-rank width", g.values[*v].name));
        }
    }
    for (id, lora) in g.loras.iter() {
        let linear = &g.linears[lora.linear];
        let Some(shard) = &linear.shard else { return fail("LoRA on an unsharded linear".into()) };
        if linear.lora != Some(id) || lora.layout.in_features() != shard.in_features || lora.layout.out_features() != shard.out_features() {
            return fail(format!("LoRA layout of {} disagrees with its linear", linear.spec.fused_name));
        }
    }
    Ok(())
}
