//! Lowering: the typed architecture description becomes the dataflow graph of one forward
//! step. Values are described by how they shard (`WidthSpec`), not yet by per-rank widths.
//!
//! Reads: a `ModelSpec`. Guarantees: one node per operation in program order, every value
//! produced before it is used, one `Linear` table entry per linear layer (routed experts are a
//! single entry per layer, not one per expert).

use lorac_models::ModelSpec;
use lorac_models::spec::*;
use lorac_plan::{DType, LinearRole, Rows};

use crate::ir::*;
use crate::weights::linear_tensors;

struct Lowering<'a> {
    g: Graph,
    dtype: DType,
    spec: &'a ModelSpec,
}

pub fn lower(spec: &ModelSpec) -> Graph {
    let mut l = Lowering { g: Graph::default(), dtype: spec.dtype.activation(), spec };
    l.model();
    l.g
}

impl Lowering<'_> {
    fn value(&mut self, name: String, rows: Rows, width: WidthSpec) -> ValueId {
        self.g.add_value(name, rows, width, self.dtype)
    }

    fn node(&mut self, op: Op, layer: Option<u32>, inputs: Vec<ValueId>, outputs: Vec<ValueId>) {
        self.node_reading(op, layer, inputs, outputs, &[]);
    }

    /// A node that also reads checkpoint tensors (norm weights, conv kernels, router...).
    fn node_reading(&mut self, op: Op, layer: Option<u32>, inputs: Vec<ValueId>, outputs: Vec<ValueId>, params: &[ParamSpec]) {
        let node = self.g.push_node(op, layer, inputs, outputs);
        self.g.dag[node].weights = params.iter().map(|p| p.path.clone()).collect();
    }

    /// Adds a linear layer to the table (before its input value exists, so that value can be
    /// described as "what this layer takes in").
    fn declare(&mut self, spec: &LinearSpec, role: LinearRole, layer: Option<u32>, top_k: Option<u32>) -> LinearId {
        self.g.linears.push(Linear { spec: spec.clone(), role, layer, top_k, shard: None, lora: None })
    }

    /// Applies a declared linear to `inputs` (the activation first); returns its output.
    fn apply(&mut self, id: LinearId, inputs: Vec<ValueId>, rows: Rows) -> ValueId {
        let linear = &self.g.linears[id];
        let name = name_in(linear.layer, linear.spec.fused_name);
        let (layer, kind) = (linear.layer, linear.spec.kind);
        // A tied lm_head reads the embedding table.
        let source = if kind == LinearKind::LmHead && self.spec.tie_word_embeddings { &self.spec.embedding } else { &linear.spec };
        let weights = linear_tensors(source).into_iter().map(|t| t.name).collect();
        let out = self.value(name, rows, WidthSpec::LinearOut(id));
        let op = if kind == LinearKind::Embedding { Op::Embedding(id) } else { Op::Linear(id) };
        let node = self.g.push_node(op, layer, inputs, vec![out]);
        self.g.dag[node].weights = weights;
        out
    }

    fn linear(&mut self, spec: &LinearSpec, role: LinearRole, layer: Option<u32>, input: ValueId, rows: Rows) -> ValueId {
        let id = self.declare(spec, role, layer, None);
        self.apply(id, vec![input], rows)
    }

    /// `core` (attention, SSM...) followed by the row-parallel projection that consumes its
    /// output: the core's output is exactly what that projection takes in.
    #[allow(clippy::too_many_arguments)]
    fn core_then(
        &mut self,
        out_proj: &LinearSpec,
        out_role: LinearRole,
        layer: Option<u32>,
        name: &str,
        op: Op,
        inputs: Vec<ValueId>,
        rows: Rows,
        params: &[ParamSpec],
    ) -> ValueId {
        let id = self.declare(out_proj, out_role, layer, None);
        let core = self.value(name_in(layer, name), rows, WidthSpec::LinearIn(id));
        self.node_reading(op, layer, inputs, vec![core], params);
        self.apply(id, vec![core], rows)
    }

    fn norm(&mut self, input: ValueId, weight: &ParamSpec, layer: Option<u32>, name: &str) -> ValueId {
        let rows = self.g.values[input].rows;
        let width = self.spec.hidden_size;
        let out = self.value(name_in(layer, name), rows, WidthSpec::Full(width));
        self.node_reading(Op::RmsNorm { width }, layer, vec![input], vec![out], std::slice::from_ref(weight));
        out
    }

    fn add(&mut self, a: ValueId, b: ValueId, width: u32, layer: Option<u32>, name: &str) -> ValueId {
        let rows = self.g.values[a].rows;
        let out = self.value(name_in(layer, name), rows, WidthSpec::Full(width));
        self.node(Op::Add, layer, vec![a, b], vec![out]);
        out
    }

    fn model(&mut self) {
        let spec = self.spec;
        let hidden = spec.hidden_size;
        let ids = self.g.add_value("token_ids", Rows::Tokens, WidthSpec::Full(1), DType::I32);
        self.node(Op::TokenIds, None, vec![], vec![ids]);
        let mut h = self.linear(&spec.embedding, LinearRole::Embedding, None, ids, Rows::Tokens);
        for (i, layer) in spec.layers.iter().enumerate() {
            let i = Some(i as u32);
            if let (Some(mixer), Some(norm)) = (&layer.mixer, &layer.mixer_norm) {
                let x = self.norm(h, norm, i, "input_norm");
                let y = self.mixer(mixer, x, i);
                h = self.add(h, y, hidden, i, "mixer_residual");
            }
            if let (Some(ffn), Some(norm)) = (&layer.ffn, &layer.ffn_norm) {
                let x = self.norm(h, norm, i, "ffn_norm");
                let y = self.ffn(ffn, x, i);
                h = self.add(h, y, hidden, i, "ffn_residual");
            }
        }
        let last = self.value("last_hidden".into(), Rows::Seqs, WidthSpec::Full(hidden));
        self.node(Op::GatherLast, None, vec![h], vec![last]);
        let x = self.norm(last, &spec.final_norm, None, "final_norm");
        let logits = self.linear(&spec.lm_head, LinearRole::LmHead, None, x, Rows::Seqs);
        let next = self.g.add_value("next_tokens", Rows::Seqs, WidthSpec::Full(1), DType::I32);
        self.node(Op::Sample, None, vec![logits], vec![next]);
    }

    fn mixer(&mut self, mixer: &MixerSpec, x: ValueId, layer: Option<u32>) -> ValueId {
        let rows = Rows::Tokens;
        match mixer {
            MixerSpec::Attention(a) => {
                let qkv = self.linear(&a.qkv, LinearRole::AttentionQkv, layer, x, rows);
                let op = Op::Attention {
                    heads: a.num_heads,
                    kv_heads: a.num_kv_heads,
                    head_dim: a.head_dim,
                    output_gate: a.output_gate,
                    qk_norm: a.qk_norm,
                };
                self.core_then(&a.o, LinearRole::AttentionOut, layer, "attn", op, vec![qkv], rows, &a.params)
            }
            MixerSpec::Mla(m) => {
                let fused = self.linear(&m.qkv_a, LinearRole::MlaLatent, layer, x, rows);
                let kv_lat = self.value(name_in(layer, "kv_latent"), rows, WidthSpec::Full(m.kv_lora_rank));
                let k_rope = self.value(name_in(layer, "k_rope"), rows, WidthSpec::Full(m.qk_rope_head_dim));
                let mut outputs = vec![kv_lat, k_rope];
                // Without q_lora_rank the query projection reads the hidden state directly.
                let q_input = match m.q_lora_rank {
                    Some(q_lora) => {
                        let q_lat = self.value(name_in(layer, "q_latent"), rows, WidthSpec::Full(q_lora));
                        outputs.insert(0, q_lat);
                        q_lat
                    }
                    None => x,
                };
                let op = Op::MlaLatentNorm {
                    q_lora_rank: m.q_lora_rank.unwrap_or(0),
                    kv_lora_rank: m.kv_lora_rank,
                    qk_rope_head_dim: m.qk_rope_head_dim,
                };
                self.node_reading(op, layer, vec![fused], outputs, &m.params);
                let q = self.linear(&m.q_b, LinearRole::MlaQuery, layer, q_input, rows);
                let kv = self.linear(&m.kv_b, LinearRole::MlaKv, layer, kv_lat, rows);
                let op = Op::Mla {
                    heads: m.num_heads,
                    kv_lora_rank: m.kv_lora_rank,
                    qk_nope_head_dim: m.qk_nope_head_dim,
                    qk_rope_head_dim: m.qk_rope_head_dim,
                    v_head_dim: m.v_head_dim,
                };
                self.core_then(&m.o, LinearRole::MlaOut, layer, "attn", op, vec![q, kv, k_rope], rows, &[])
            }
            MixerSpec::GatedDeltaNet(d) => {
                let qkvz = self.linear(&d.in_qkvz, LinearRole::DeltaNetQkvz, layer, x, rows);
                let ba = self.linear(&d.in_ba, LinearRole::DeltaNetBa, layer, x, rows);
                let op = Op::GatedDeltaNet {
                    k_heads: d.num_k_heads,
                    v_heads: d.num_v_heads,
                    k_head_dim: d.k_head_dim,
                    v_head_dim: d.v_head_dim,
                    conv_kernel: d.conv_kernel,
                    state_dtype: d.state_dtype,
                };
                self.core_then(&d.out, LinearRole::DeltaNetOut, layer, "gdn", op, vec![qkvz, ba], rows, &d.params)
            }
            MixerSpec::Mamba2(m) => {
                let zxbcdt = self.linear(&m.in_proj, LinearRole::Mamba2In, layer, x, rows);
                let op = Op::Mamba2 {
                    heads: m.num_heads,
                    head_dim: m.head_dim,
                    groups: m.n_groups,
                    state_size: m.state_size,
                    conv_kernel: m.conv_kernel,
                    state_dtype: m.state_dtype,
                };
                self.core_then(&m.out_proj, LinearRole::Mamba2Out, layer, "ssm", op, vec![zxbcdt], rows, &m.params)
            }
        }
    }

    /// A dense MLP; `roles` are its up and down projections' (the FFN's own or a shared expert's).
    fn dense_mlp(&mut self, mlp: &DenseMlpSpec, roles: [LinearRole; 2], x: ValueId, layer: Option<u32>, name: &str) -> ValueId {
        let rows = self.g.values[x].rows;
        let [up_role, down_role] = roles;
        let up = self.linear(&mlp.up, up_role, layer, x, rows);
        self.core_then(&mlp.down, down_role, layer, name, Op::Activation(mlp.activation), vec![up], rows, &[])
    }

    fn ffn(&mut self, ffn: &FfnSpec, x: ValueId, layer: Option<u32>) -> ValueId {
        match ffn {
            FfnSpec::Dense(mlp) => self.dense_mlp(mlp, [LinearRole::MlpUp, LinearRole::MlpDown], x, layer, "mlp_act"),
            FfnSpec::Moe(moe) => {
                let hidden = self.spec.hidden_size;
                let routing = self.g.add_value(name_in(layer, "routing"), Rows::Tokens, WidthSpec::Full(2 * moe.top_k), DType::F32);
                let router = Op::Router { experts: moe.num_experts, top_k: moe.top_k };
                self.node_reading(router, layer, vec![x], vec![routing], &moe.params);
                let (expert_in, expert_width) = match &moe.latent {
                    Some(latent) => (self.linear(&latent.fc1, LinearRole::LatentIn, layer, x, Rows::Tokens), latent.size),
                    None => (x, hidden),
                };
                let routed = Rows::RoutedTokens { top_k: moe.top_k };
                let top_k = Some(moe.top_k);
                let up_id = self.declare(&moe.experts_up, LinearRole::ExpertsUp, layer, top_k);
                let up = self.apply(up_id, vec![expert_in, routing], routed);
                let down_id = self.declare(&moe.experts_down, LinearRole::ExpertsDown, layer, top_k);
                let act = self.value(name_in(layer, "experts_act"), routed, WidthSpec::LinearIn(down_id));
                self.node(Op::Activation(moe.activation), layer, vec![up], vec![act]);
                let down = self.apply(down_id, vec![act, routing], routed);
                let combined = self.value(name_in(layer, "moe_combined"), Rows::Tokens, WidthSpec::Full(expert_width));
                self.node(Op::MoeCombine { top_k: moe.top_k }, layer, vec![down, routing], vec![combined]);
                let mut y = match &moe.latent {
                    Some(latent) => self.linear(&latent.fc2, LinearRole::LatentOut, layer, combined, Rows::Tokens),
                    None => combined,
                };
                if let Some(shared) = &moe.shared {
                    let ys = self.dense_mlp(shared, [LinearRole::SharedExpertUp, LinearRole::SharedExpertDown], x, layer, "shared_act");
                    y = self.add(y, ys, hidden, layer, "moe_out");
                }
                y
            }
        }
    }
}

fn name_in(layer: Option<u32>, name: &str) -> String {
    match layer {
        Some(i) => format!("layers.{i}.{name}"),
        None => name.to_string(),
    }
}
