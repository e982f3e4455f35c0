//! What the executor reads out of a plan for a dense GQA decoder (Llama, Qwen3): head counts,
//! widths, and which LoRA buffer (if any) rides on each projection. Every node of the plan is
//! matched against the decoder step the executor runs, so a plan of another shape (MoE, MLA,
//! linear attention, output gates) is refused instead of half-run.

use lorac_plan::{ActivationKind, KernelSpec, LoraBuffer, Plan};

use super::error::{ExecResult, ExecutorError};

/// The projections of one decoder layer, in execution order.
pub(crate) const LAYER_LINEARS: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

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
    pub qk_norm: bool,
    /// Per layer, per entry of [`LAYER_LINEARS`]: the LoRA buffer index.
    pub layer_lora: Vec<[Option<usize>; 4]>,
    pub embed_lora: Option<usize>,
    pub lm_head_lora: Option<usize>,
}

impl ModelDesc {
    pub fn qkv_width(&self) -> usize {
        ((self.q_heads + 2 * self.kv_heads) * self.head_dim) as usize
    }
    pub fn attn_width(&self) -> usize {
        (self.q_heads * self.head_dim) as usize
    }
    /// `(out, in)` of layer projection `i` of [`LAYER_LINEARS`].
    pub fn linear_shape(&self, i: usize) -> (usize, usize) {
        match i {
            0 => (self.qkv_width(), self.hidden),
            1 => (self.hidden, self.attn_width()),
            2 => (2 * self.inter, self.hidden),
            _ => (self.hidden, self.inter),
        }
    }
    /// The HF modules fused (row-concatenated) into layer projection `i`, in row order.
    pub fn linear_parts(i: usize) -> &'static [&'static str] {
        match i {
            0 => &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            1 => &["self_attn.o_proj"],
            2 => &["mlp.gate_proj", "mlp.up_proj"],
            _ => &["mlp.down_proj"],
        }
    }
    /// Output rows of each fused part of layer projection `i`.
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

pub(crate) fn describe(plan: &Plan) -> ExecResult<ModelDesc> {
    if !matches!(plan.model.model_type.as_str(), "llama" | "qwen3") {
        return Err(ExecutorError::Unsupported(format!(
            "model type `{}` (the executor runs dense Llama and Qwen3 decoders)",
            plan.model.model_type
        )));
    }
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
    let mut linears = vec![[false; 4]; layers];
    let mut lm_head_seen = false;
    for node in &plan.nodes {
        let Some(kid) = node.kernel else { continue };
        let spec = plan.kernels.get(kid.0 as usize).ok_or_else(|| plan_err(format!("node `{}` names kernel {}", node.label, kid.0)))?;
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
            KernelSpec::Gemm { .. } => {
                let module = node.label.strip_prefix("linear ").unwrap_or(&node.label);
                match node.layer {
                    Some(l) => {
                        let i = LAYER_LINEARS
                            .iter()
                            .position(|m| *m == module)
                            .ok_or_else(|| ExecutorError::Unsupported(format!("projection `{}` in layer {l}", node.label)))?;
                        let slot = linears.get_mut(l as usize).ok_or_else(|| plan_err(format!("node `{}` names layer {l}", node.label)))?;
                        slot[i] = true;
                    }
                    None if module == "lm_head" => lm_head_seen = true,
                    None => return Err(ExecutorError::Unsupported(format!("projection `{}`", node.label))),
                }
            }
            KernelSpec::LoraShrink(_) | KernelSpec::LoraExpand(_) | KernelSpec::LoraEmbeddingShrink(_) => {
                let b = node.lora_buffer.ok_or_else(|| plan_err(format!("LoRA node `{}` has no buffer", node.label)))? as usize;
                let buf = buffers.get(b).ok_or_else(|| plan_err(format!("LoRA node `{}` names buffer {b}", node.label)))?;
                match (buf.layer, buf.module.as_str()) {
                    (None, "embed_tokens") => embed_lora = Some(b),
                    (None, "lm_head") => lm_head_lora = Some(b),
                    (Some(l), m) => {
                        let i = LAYER_LINEARS
                            .iter()
                            .position(|x| *x == m)
                            .ok_or_else(|| ExecutorError::Unsupported(format!("LoRA on `{m}`")))?;
                        let slot = layer_lora.get_mut(l as usize).ok_or_else(|| plan_err(format!("LoRA buffer {b} names layer {l}")))?;
                        slot[i] = Some(b);
                    }
                    (None, m) => return Err(ExecutorError::Unsupported(format!("LoRA on `{m}`"))),
                }
            }
            KernelSpec::EmbeddingGather { .. }
            | KernelSpec::GatherRows { .. }
            | KernelSpec::RmsNorm { .. }
            | KernelSpec::Add { .. }
            | KernelSpec::Sample { .. } => {}
            other => return Err(ExecutorError::Unsupported(format!("kernel family `{}` (node `{}`)", other.family(), node.label))),
        }
    }
    let (q_heads, kv_heads, head_dim, qk_norm) = attention.ok_or_else(|| plan_err("no attention node".into()))?;
    let inter = inter.ok_or_else(|| plan_err("no activation node".into()))? as usize;
    if let Some(l) = linears.iter().position(|l| l.iter().any(|x| !x)) {
        return Err(plan_err(format!("layer {l} lacks one of the projections {LAYER_LINEARS:?}")));
    }
    if !lm_head_seen {
        return Err(plan_err("no lm_head projection".into()));
    }
    if q_heads == 0 || kv_heads == 0 || q_heads % kv_heads != 0 || head_dim == 0 {
        return Err(plan_err(format!("attention with {q_heads} q heads, {kv_heads} kv heads of {head_dim}")));
    }
    let softmax_scale = plan.model.softmax_scale.ok_or_else(|| plan_err("no attention softmax scale".into()))? as f32;
    let desc = ModelDesc {
        layers,
        hidden,
        vocab,
        q_heads,
        kv_heads,
        head_dim,
        softmax_scale,
        inter,
        qk_norm,
        layer_lora,
        embed_lora,
        lm_head_lora,
    };
    check_gemms(plan, &desc)?;
    for (l, lora) in desc.layer_lora.iter().enumerate() {
        for (i, b) in lora.iter().enumerate() {
            if let Some(b) = b {
                check_lora(&buffers[*b], desc.linear_shape(i), &desc.part_rows(i), &format!("layer {l} {}", LAYER_LINEARS[i]))?;
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

/// The plan's GEMM shapes agree with the head counts and widths read from the other nodes.
fn check_gemms(plan: &Plan, desc: &ModelDesc) -> ExecResult<()> {
    for node in &plan.nodes {
        let Some(KernelSpec::Gemm { n, k, .. }) = node.kernel.and_then(|k| plan.kernels.get(k.0 as usize)) else { continue };
        let module = node.label.strip_prefix("linear ").unwrap_or(&node.label);
        let expected = match node.layer {
            Some(_) => LAYER_LINEARS.iter().position(|m| *m == module).map(|i| desc.linear_shape(i)),
            None => Some((desc.vocab, desc.hidden)),
        };
        if let Some((out, inp)) = expected
            && (*n as usize, *k as usize) != (out, inp)
        {
            return Err(plan_err(format!("node `{}` is a [{k}] → [{n}] GEMM but the model needs [{inp}] → [{out}]", node.label)));
        }
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
