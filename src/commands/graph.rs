use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    plan: PathBuf,
    /// The decoder layer to show.
    #[arg(long)]
    layer: u32,
    /// Print Graphviz DOT instead of a listing.
    #[arg(long)]
    dot: bool,
}

pub fn run(args: Args) -> Result<(), String> {
    let plan = super::read_plan(&args.plan)?;
    if args.layer >= plan.model.num_layers {
        return Err(format!("--layer {}: the model has layers 0-{}", args.layer, plan.model.num_layers - 1));
    }
    if args.dot {
        let dot = lorac_compiler::dot::layer_dot(&plan, args.layer).ok_or_else(|| format!("layer {} has no nodes", args.layer))?;
        return super::print(&dot);
    }
    let mut listing = String::new();
    for node in plan.nodes.iter().filter(|n| n.layer == Some(args.layer)) {
        let width = |v: &lorac_plan::ValueId| {
            let value = &plan.values[v.0 as usize];
            format!("{}[{}]", value.name, value.width)
        };
        let inputs: Vec<String> = node.inputs.iter().map(width).collect();
        let outputs: Vec<String> = node.outputs.iter().map(width).collect();
        let kernel = node.kernel.map(|k| format!("{:?}", plan.kernels[k.0 as usize])).unwrap_or_default();
        listing.push_str(&format!("{:<32} {} -> {}\n{:<32} {kernel}\n", node.label, inputs.join(", "), outputs.join(", "), ""));
        if !node.weights.is_empty() {
            listing.push_str(&format!("{:<32} reads {}\n", "", node.weights.join(", ")));
        }
    }
    super::print(&listing)
}
