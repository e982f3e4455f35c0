//! Graphviz pictures of one layer of a compiled plan (`lorac graph`).

use lorac_plan::Plan;
use petgraph::dot::{Config, Dot};
use petgraph::graph::{DiGraph, NodeIndex};

/// The nodes of `layer` and the values flowing between them; values that come from earlier
/// layers appear as one `input` node, values read by later layers lead to one `output` node.
pub fn layer_dot(plan: &Plan, layer: u32) -> Option<String> {
    let mut g: DiGraph<String, String> = DiGraph::new();
    let mut writer: std::collections::HashMap<u32, NodeIndex> = std::collections::HashMap::new();
    let mut members = Vec::new();
    for node in plan.nodes.iter().filter(|n| n.layer == Some(layer)) {
        let kernel = node.kernel.map(|k| format!("\nkernel {}", plan.kernels[k.0 as usize].family())).unwrap_or_default();
        let index = g.add_node(format!("{}{kernel}", node.label));
        for v in &node.outputs {
            writer.insert(v.0, index);
        }
        members.push((node, index));
    }
    if members.is_empty() {
        return None;
    }
    let input = g.add_node(format!("from layer {}", layer.saturating_sub(1)));
    let value_label = |v: u32| {
        let value = &plan.values[v as usize];
        format!("{} [{}]", value.name.rsplit('.').next().unwrap_or(&value.name), value.width)
    };
    for (node, index) in &members {
        for v in &node.inputs {
            let from = writer.get(&v.0).copied().unwrap_or(input);
            g.add_edge(from, *index, value_label(v.0));
        }
    }
    let later_reads: std::collections::HashSet<u32> =
        plan.nodes.iter().filter(|n| n.layer.is_none_or(|l| l > layer)).flat_map(|n| n.inputs.iter().map(|v| v.0)).collect();
    let output = g.add_node(format!("to layer {}", layer + 1));
    for (node, index) in &members {
        for v in node.outputs.iter().filter(|v| later_reads.contains(&v.0)) {
            g.add_edge(*index, output, value_label(v.0));
        }
    }
    let body = format!("{}", Dot::with_config(&g, &[Config::GraphContentOnly]));
    Some(format!("digraph layer{layer} {{\n    rankdir=TB;\n    node [shape=box];\n{body}}}\n"))
}
