//! What the executor reads out of a plan for a dense GQA decoder: head counts, widths, which
//! LoRA buffer (if any) rides on each projection, and the checkpoint tensors of every weight.
//!
//! Everything comes from typed plan data: projections by their [`LinearRole`], the norms by the
//! projection whose input they produce, q_norm/k_norm from the attention node, tensor names from
//! [`PlanNode::weights`]. Every node of the plan is matched against the decoder step the
//! executor runs, so a plan of another shape (MoE, MLA, linear attention, output gates, biases,
//! extra norms) is refused instead of half-run.

use lorac_plan::{ActivationKind, KernelSpec, LinearRole, LoraBuffer, Plan, PlanNode, ValueId};

use super::error::{ExecResult, ExecutorError};

/// The projections of one decoder layer, in execution order: fused q|k|v, o, fused gate|up,
/// down. Per-layer arrays of the executor are indexed like this table.
pub(crate) const LAYER_PROJECTIONS: [LinearRole; 4] =
    [LinearRole::AttentionQkv, LinearRole::AttentionOut, LinearRole::MlpUp, LinearRole::MlpDown];

/// Index of `role` in [`LAYER_PROJECTIONS`].
fn projection_index(role: LinearRole) -> Option<usize> {
    LAYER_PROJECTIONS.iter().position(|r| *r == role)
}

/// Checkpoint tensors of one decoder layer, as the plan's nodes name them.
#[derive(Debug, Clone)]
pub(crate) struct LayerTensors {
    /// The RMSNorm weight in front of attention.
    pub input_norm: String,
    /// The RMSNorm weight in front of the MLP.
    pub post_norm: String,
    /// q_norm's and k_norm's weights (models with per-head q/k RMSNorm).
    pub qk_norm: Option<(String, String)>,
    /// Per projection of [`LAYER_PROJECTIONS`]: one weight per fused part, in row order.
    pub linears: [Vec<String>; 4],
}

/// Checkpoint tensors of the whole model, as the plan's nodes name them.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelTensors {
    pub embed: String,
    /// The embedding table's name when the embeddings are tied.
    pub lm_head: String,
    pub final_norm: String,
    pub layers: Vec<LayerTensors>,
}

impl ModelTensors {
    /// Every tensor the engine reads, each once (a tied lm_head is the embedding).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let lm_head = (self.lm_head != self.embed).then_some(self.lm_head.as_str());
        let layers = self.layers.iter().flat_map(|l| {
            let norms = [l.input_norm.as_str(), l.post_norm.as_str()].into_iter();
            let qk = l.qk_norm.iter().flat_map(|(q, k)| [q.as_str(), k.as_str()]);
            norms.chain(qk).chain(l.linears.iter().flatten().map(String::as_str))
        });
        [self.embed.as_str(), self.final_norm.as_str()].into_iter().chain(lm_head).chain(layers)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ModelDesc {
    pub layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub q_heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    /// QKᵀ scale, from the plan.
    pub softmax_scale: f32,
    pub inter: usize,
    /// Per layer, per entry of [`LAYER_PROJECTIONS`]: the LoRA buffer index.
    pub layer_lora: Vec<[Option<usize>; 4]>,
    pub embed_lora: Option<usize>,
    pub lm_head_lora: Option<usize>,
    pub tensors: ModelTensors,
}

impl ModelDesc {
    pub fn qkv_width(&self) -> usize {
        ((self.q_heads + 2 * self.kv_heads) * self.head_dim) as usize
    }
    pub fn attn_width(&self) -> usize {
        (self.q_heads * self.head_dim) as usize
    }
    /// `(out, in)` of layer projection `i` of [`LAYER_PROJECTIONS`].
    pub fn linear_shape(&self, i: usize) -> (usize, usize) {
        match i {
            0 => (self.qkv_width(), self.hidden),
            1 => (self.hidden, self.attn_width()),
            2 => (2 * self.inter, self.hidden),
            _ => (self.hidden, self.inter),
        }
    }
    /// Output rows of each fused part of layer projection `i`, in row order: q|k|v by heads,
    /// gate|up (the SwiGLU the executor runs), single parts otherwise.
    pub fn part_rows(&self, i: usize) -> Vec<usize> {
        let d = self.head_dim as usize;
        match i {
            0 => vec![self.q_heads as usize * d, self.kv_heads as usize * d, self.kv_heads as usize * d],
            1 => vec![self.hidden],
            2 => vec![self.inter, self.inter],
            _ => vec![self.hidden],
        }
    }
}

fn plan_err(msg: String) -> ExecutorError {
    ExecutorError::Plan(msg)
}

/// `node `label`` plus its layer, for messages.
fn describe_node(node: &PlanNode) -> String {
    match node.layer {
        Some(l) => format!("node `{}` of layer {l}", node.label),
        None => format!("node `{}`", node.label),
    }
}

fn role_name(role: Option<LinearRole>) -> String {
    role.map_or_else(|| "untyped".to_string(), |r| format!("{r:?}"))
}

/// The nodes of one decoder layer the executor runs.
#[derive(Default)]
struct LayerNodes<'p> {
    /// Per entry of [`LAYER_PROJECTIONS`].
    projections: [Option<&'p PlanNode>; 4],
    norms: Vec<&'p PlanNode>,
    attention: Option<&'p PlanNode>,
}

/// Puts `node` into an empty `slot`; a second node of the same kind is refused.
fn place<'p>(slot: &mut Option<&'p PlanNode>, node: &'p PlanNode, what: &str) -> ExecResult<()> {
    if let Some(first) = slot.replace(node) {
        return Err(ExecutorError::Unsupported(format!("two {what} ({} and {})", describe_node(first), describe_node(node))));
    }
    Ok(())
}

pub(crate) fn describe(plan: &Plan) -> ExecResult<ModelDesc> {
    if plan.parallel.tp != 1 || plan.ranks.len() != 1 {
        return Err(ExecutorError::Unsupported(format!("tensor parallelism {} (the executor runs tp = 1 only for now)", plan.parallel.tp)));
    }
    let buffers = &plan.ranks[0].lora_buffers;
    let layers = plan.model.num_layers as usize;
    let (hidden, vocab) = (plan.model.hidden_size as usize, plan.model.vocab_size as usize);
    let mut attention = None;
    let mut inter = None;
    let mut layer_lora = vec![[None; 4]; layers];
    let mut embed_lora = None;
    let mut lm_head_lora = None;
    let mut layer_nodes: Vec<LayerNodes> = (0..layers).map(|_| LayerNodes::default()).collect();
    let mut outer_norms = Vec::new();
    let (mut embedding, mut lm_head) = (None, None);
    for node in &plan.nodes {
        let Some(kid) = node.kernel else { continue };
        let spec = plan.kernels.get(kid.0 as usize).ok_or_else(|| plan_err(format!("{} names kernel {}", describe_node(node), kid.0)))?;
        let in_layer = match node.layer {
            Some(l) => {
                Some(layer_nodes.get_mut(l as usize).ok_or_else(|| plan_err(format!("{} of {layers} layers", describe_node(node))))?)
            }
            None => None,
        };
        match spec {
            KernelSpec::Attention { q_heads, kv_heads, head_dim, output_gate, qk_norm } => {
                if *output_gate {
                    return Err(ExecutorError::Unsupported("gated attention output".into()));
                }
                let a = (*q_heads, *kv_heads, *head_dim, *qk_norm);
                if attention.is_some_and(|b| b != a) {
                    return Err(ExecutorError::Unsupported("layers with different attention shapes".into()));
                }
                attention = Some(a);
                let layer = in_layer.ok_or_else(|| ExecutorError::Unsupported(format!("attention outside a layer ({})", node.label)))?;
                place(&mut layer.attention, node, "attention nodes")?;
            }
            KernelSpec::Activation { kind, width } => {
                if *kind != ActivationKind::SwiGlu {
                    return Err(ExecutorError::Unsupported(format!("activation {kind:?}")));
                }
                if inter.is_some_and(|w| w != *width) {
                    return Err(ExecutorError::Unsupported("layers with different MLP widths".into()));
                }
                inter = Some(*width);
            }
            KernelSpec::Gemm { .. } => match (in_layer, node.role, node.role.and_then(projection_index)) {
                (Some(layer), Some(role), Some(i)) => place(&mut layer.projections[i], node, &format!("{role:?} projections"))?,
                (None, Some(LinearRole::LmHead), _) => place(&mut lm_head, node, "lm_head projections")?,
                _ => return Err(ExecutorError::Unsupported(format!("a {} projection ({})", role_name(node.role), describe_node(node)))),
            },
            KernelSpec::EmbeddingGather { .. } => {
                if node.role != Some(LinearRole::Embedding) || node.layer.is_some() {
                    return Err(plan_err(format!("embedding {} plays {:?}", describe_node(node), node.role)));
                }
                place(&mut embedding, node, "embeddings")?;
            }
            KernelSpec::RmsNorm { .. } => match in_layer {
                Some(layer) => layer.norms.push(node),
                None => outer_norms.push(node),
            },
            KernelSpec::LoraShrink(_) | KernelSpec::LoraExpand(_) | KernelSpec::LoraEmbeddingShrink(_) => {
                let b = node.lora_buffer.ok_or_else(|| plan_err(format!("LoRA {} has no buffer", describe_node(node))))? as usize;
                let buf = buffers.get(b).ok_or_else(|| plan_err(format!("LoRA {} names buffer {b}", describe_node(node))))?;
                if buf.layer != node.layer {
                    return Err(plan_err(format!("LoRA {} names buffer {b} of layer {:?}", describe_node(node), buf.layer)));
                }
                let role = node.role.ok_or_else(|| plan_err(format!("LoRA {} adapts no linear role", describe_node(node))))?;
                // `in_layer` has checked the layer index.
                match (node.layer, role, projection_index(role)) {
                    (None, LinearRole::Embedding, _) => embed_lora = Some(b),
                    (None, LinearRole::LmHead, _) => lm_head_lora = Some(b),
                    (Some(l), _, Some(i)) => layer_lora[l as usize][i] = Some(b),
                    _ => return Err(ExecutorError::Unsupported(format!("LoRA on a {role:?} projection ({})", describe_node(node)))),
                }
            }
            KernelSpec::GatherRows { .. } | KernelSpec::Add { .. } | KernelSpec::Sample { .. } => {}
            other => return Err(ExecutorError::Unsupported(format!("kernel family `{}` ({})", other.family(), describe_node(node)))),
        }
    }
    let (q_heads, kv_heads, head_dim, qk_norm) = attention.ok_or_else(|| plan_err("no attention node".into()))?;
    let inter = inter.ok_or_else(|| plan_err("no activation node".into()))? as usize;
    let embedding = embedding.ok_or_else(|| plan_err("no embedding node".into()))?;
    let lm_head = lm_head.ok_or_else(|| plan_err("no lm_head projection".into()))?;
    if q_heads == 0 || kv_heads == 0 || q_heads % kv_heads != 0 || head_dim == 0 {
        return Err(plan_err(format!("attention with {q_heads} q heads, {kv_heads} kv heads of {head_dim}")));
    }
    let softmax_scale = plan.model.softmax_scale.ok_or_else(|| plan_err("no attention softmax scale".into()))? as f32;
    let mut desc = ModelDesc {
        layers,
        hidden,
        vocab,
        q_heads,
        kv_heads,
        head_dim,
        softmax_scale,
        inter,
        layer_lora,
        embed_lora,
        lm_head_lora,
        // Filled below, once the shapes the tensors are checked against are known.
        tensors: ModelTensors::default(),
    };

    for (l, nodes) in layer_nodes.iter().enumerate() {
        let projection =
            |i: usize| nodes.projections[i].ok_or_else(|| plan_err(format!("layer {l} lacks its {:?} projection", LAYER_PROJECTIONS[i])));
        let mut linears: [Vec<String>; 4] = Default::default();
        for (i, weights) in linears.iter_mut().enumerate() {
            let node = projection(i)?;
            check_gemm(plan, node, desc.linear_shape(i))?;
            let parts = desc.part_rows(i).len();
            if node.weights.len() != parts {
                return Err(ExecutorError::Unsupported(format!(
                    "{} reading {:?} (the executor needs {parts} plain weights, one per fused part, without biases or scales)",
                    describe_node(node),
                    node.weights
                )));
            }
            *weights = node.weights.clone();
        }
        // Pre-norm layers: one RMSNorm feeds q|k|v, another gate|up, and there are no others.
        let input_norm = feeding_norm(&nodes.norms, projection(0)?)?;
        let post_norm = feeding_norm(&nodes.norms, projection(2)?)?;
        if nodes.norms.len() != 2 || input_norm == post_norm {
            return Err(ExecutorError::Unsupported(format!(
                "layer {l} with RMSNorms {:?} (the executor runs one before attention and one before the MLP)",
                nodes.norms.iter().map(|n| &n.weights).collect::<Vec<_>>()
            )));
        }
        let attention = nodes.attention.ok_or_else(|| plan_err(format!("layer {l} has no attention node")))?;
        let qk_norm = match (qk_norm, attention.weights.as_slice()) {
            (true, [q, k]) => Some((q.clone(), k.clone())),
            (false, []) => None,
            (_, weights) => {
                return Err(plan_err(format!(
                    "{} reads {weights:?} (q_norm then k_norm with qk_norm, nothing without)",
                    describe_node(attention)
                )));
            }
        };
        desc.tensors.layers.push(LayerTensors { input_norm, post_norm, qk_norm, linears });
    }
    check_gemm(plan, lm_head, (vocab, hidden))?;
    if outer_norms.len() != 1 {
        return Err(ExecutorError::Unsupported(format!(
            "{} RMSNorms outside the layers (the executor runs the final norm only)",
            outer_norms.len()
        )));
    }
    desc.tensors.final_norm = feeding_norm(&outer_norms, lm_head)?;
    desc.tensors.embed = single_weight(embedding)?;
    desc.tensors.lm_head = single_weight(lm_head)?;

    for (l, lora) in desc.layer_lora.iter().enumerate() {
        for (i, b) in lora.iter().enumerate() {
            if let Some(b) = b {
                check_lora(&buffers[*b], desc.linear_shape(i), &desc.part_rows(i), &format!("layer {l} {:?}", LAYER_PROJECTIONS[i]))?;
            }
        }
    }
    if let Some(b) = desc.embed_lora {
        check_lora(&buffers[b], (hidden, vocab), &[hidden], "embed_tokens")?;
    }
    if let Some(b) = desc.lm_head_lora {
        check_lora(&buffers[b], (vocab, hidden), &[vocab], "lm_head")?;
    }
    Ok(desc)
}

/// The one checkpoint tensor of an embedding or lm_head node.
fn single_weight(node: &PlanNode) -> ExecResult<String> {
    match node.weights.as_slice() {
        [w] => Ok(w.clone()),
        other => Err(ExecutorError::Unsupported(format!("{} reading {other:?} (the executor needs one plain table)", describe_node(node)))),
    }
}

/// The weight of the RMSNorm among `norms` whose output is `projection`'s input.
fn feeding_norm(norms: &[&PlanNode], projection: &PlanNode) -> ExecResult<String> {
    let input: Option<&ValueId> = projection.inputs.first();
    let norm = norms.iter().find(|n| input.is_some_and(|v| n.outputs.contains(v))).ok_or_else(|| {
        ExecutorError::Unsupported(format!(
            "{} whose input is not an RMSNorm (the executor runs pre-norm layers)",
            describe_node(projection)
        ))
    })?;
    match norm.weights.as_slice() {
        [w] => Ok(w.clone()),
        other => Err(plan_err(format!("{} reads {other:?} (one weight expected)", describe_node(norm)))),
    }
}

/// The plan's GEMM shape agrees with the head counts and widths read from the other nodes.
fn check_gemm(plan: &Plan, node: &PlanNode, (out, inp): (usize, usize)) -> ExecResult<()> {
    if let Some(KernelSpec::Gemm { n, k, .. }) = node.kernel.and_then(|k| plan.kernels.get(k.0 as usize))
        && (*n as usize, *k as usize) != (out, inp)
    {
        return Err(plan_err(format!("{} is a [{k}] → [{n}] GEMM but the model needs [{inp}] → [{out}]", describe_node(node))));
    }
    Ok(())
}

/// A LoRA buffer's B rows must line up with the fused base output (every part packed, in
/// row order, unsharded), its A with the base input.
fn check_lora(buf: &LoraBuffer, (out, inp): (usize, usize), parts: &[usize], what: &str) -> ExecResult<()> {
    let l = &buf.layout;
    let widths: Vec<usize> = l.slices().iter().map(|s| s.width as usize).collect();
    if l.experts().is_some() || l.in_features() as usize != inp || l.out_features() as usize != out || widths != parts {
        return Err(ExecutorError::Unsupported(format!(
            "LoRA buffer of {what}: slices {widths:?} over input {} (the executor needs every fused part packed: {parts:?} over {inp})",
            l.in_features()
        )));
    }
    if l.slices().iter().enumerate().any(|(i, s)| s.group as usize != i) || l.groups() as usize != parts.len() {
        return Err(ExecutorError::Unsupported(format!("LoRA buffer of {what}: slices sharing an A block")));
    }
    Ok(())
}
