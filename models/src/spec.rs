//! The typed architecture description every frontend produces.
//!
//! A frontend (one file per architecture under `arch/`) reads config.json and emits a
//! [`ModelSpec`]: layers made of generic blocks (GQA attention, MLA, Gated DeltaNet, Mamba2,
//! dense MLP, MoE), each holding its [`LinearSpec`]s with typed metadata: input width, output
//! slices, tensor-parallel style and how each dimension may be split. The compiler's passes
//! read only this metadata; Hugging Face names travel along for the edges (checking
//! safetensors, matching PEFT target modules, `inspect` output) and are never matched on.

use lorac_plan::DType;

/// How a dimension is split across tensor-parallel ranks, and which config field to blame when
/// it cannot be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardUnit {
    /// `count` heads of `head_dim` each. When `replicate_when_short` and tp is a multiple of
    /// `count`, each rank holds one head (KV heads under tp > num_key_value_heads).
    Heads { count: u32, head_dim: u32, field: &'static str, replicate_when_short: bool },
    /// A plain width that must divide by tp.
    Elements { width: u32, field: &'static str },
}

impl ShardUnit {
    pub fn full_width(&self) -> u32 {
        match *self {
            ShardUnit::Heads { count, head_dim, .. } => count * head_dim,
            ShardUnit::Elements { width, .. } => width,
        }
    }
}

/// Tensor-parallel style of a linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParallelStyle {
    /// Output split across ranks (each slice by its own [`ShardUnit`]).
    Column,
    /// Input split across ranks; outputs are all-reduced.
    Row,
    /// Every rank holds the whole layer.
    Replicated,
    /// Vocabulary split across ranks (embedding input, lm_head output), padded to a multiple of tp.
    Vocab,
}

/// One output partition of a linear layer (q inside qkv, z inside Mamba's in_proj...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceSpec {
    pub name: String,
    pub shard: ShardUnit,
}

impl SliceSpec {
    pub fn new(name: &str, shard: ShardUnit) -> Self {
        SliceSpec { name: name.to_string(), shard }
    }
    pub fn width(&self) -> u32 {
        self.shard.full_width()
    }
}

/// One Hugging Face module packed into a fused linear: it has its own weight tensor and, as a
/// PEFT target, its own LoRA A. Its output rows are `slices` in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfModule {
    /// PEFT's name for it (`q_proj`, `in_proj`, `embed_tokens`...).
    pub name: String,
    /// Tensor name prefix in the checkpoint, without `.weight`. For routed experts it holds
    /// `{expert}` where the expert index goes.
    pub path: String,
    pub slices: Vec<SliceSpec>,
}

impl HfModule {
    pub fn new(name: &str, path: String, slices: Vec<SliceSpec>) -> Self {
        HfModule { name: name.to_string(), path, slices }
    }
    /// A module with a single output slice named after itself.
    pub fn single(name: &str, path: String, shard: ShardUnit) -> Self {
        HfModule::new(name, path, vec![SliceSpec::new(name, shard)])
    }
    pub fn out_features(&self) -> u32 {
        self.slices.iter().map(SliceSpec::width).sum()
    }
}

/// Weight storage of a linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Plain weights in the model's dtype.
    Plain,
    /// fp8 e4m3 weights with one f32 `weight_scale_inv` per `block × block` tile.
    Fp8Block { block: u32 },
}

/// How a routed-expert linear is stored in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertSpec {
    pub count: u32,
    /// Field naming the expert count, for error messages.
    pub field: &'static str,
}

/// Where a linear layer sits; the compiler uses it for graph wiring and kernel choice, and
/// nothing in the passes depends on the module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearKind {
    Dense,
    /// Routed experts: one weight per expert, tokens reach them through the router.
    RoutedExperts,
    /// Token embedding (a lookup, not a GEMM).
    Embedding,
    /// Output projection to the vocabulary.
    LmHead,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    /// The fused name engines use (`qkv_proj`, `gate_up_proj_moe`...): shown by `inspect`.
    pub fused_name: &'static str,
    pub kind: LinearKind,
    pub in_features: u32,
    /// How the input splits under [`ParallelStyle::Row`] (ignored for other styles).
    pub in_shard: ShardUnit,
    pub modules: Vec<HfModule>,
    pub parallel: ParallelStyle,
    pub experts: Option<ExpertSpec>,
    pub bias: bool,
    pub format: WeightFormat,
}

impl LinearSpec {
    pub fn out_features(&self) -> u32 {
        self.modules.iter().map(HfModule::out_features).sum()
    }
    pub fn slices(&self) -> impl Iterator<Item = (usize, &SliceSpec)> {
        self.modules.iter().enumerate().flat_map(|(g, m)| m.slices.iter().map(move |s| (g, s)))
    }
}

/// How a non-linear parameter (norm weight, conv kernel, A_log...) is split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamShard {
    Replicated,
    /// Dimension `dim` is the concatenation of `parts`, each split across ranks on its own
    /// (a conv kernel over Mamba's x|B|C channels, for example).
    Split {
        dim: usize,
        parts: Vec<ShardUnit>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub path: String,
    pub shape: Vec<u32>,
    pub shard: ParamShard,
    /// Overrides the model dtype (f32 router biases, for example).
    pub dtype: Option<DType>,
}

impl ParamSpec {
    pub fn replicated(path: String, shape: Vec<u32>) -> Self {
        ParamSpec { path, shape, shard: ParamShard::Replicated, dtype: None }
    }
    pub fn split(path: String, shape: Vec<u32>, dim: usize, parts: Vec<ShardUnit>) -> Self {
        ParamSpec { path, shape, shard: ParamShard::Split { dim, parts }, dtype: None }
    }
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSpec {
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    /// Qwen3.5: q_proj also produces a sigmoid output gate (doubles the q width).
    pub output_gate: bool,
    /// Per-head RMSNorm on q and k before rotary embedding (Qwen3 family).
    pub qk_norm: bool,
    /// Multiplies QKᵀ before the softmax (`head_dim^-0.5`).
    pub softmax_scale: f64,
    pub qkv: LinearSpec,
    pub o: LinearSpec,
    /// With `qk_norm`: q_norm's weight, then k_norm's (the attention node lists them in this
    /// order and the runtime reads them so).
    pub params: Vec<ParamSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MlaSpec {
    pub num_heads: u32,
    pub q_lora_rank: Option<u32>,
    pub kv_lora_rank: u32,
    pub qk_nope_head_dim: u32,
    pub qk_rope_head_dim: u32,
    pub v_head_dim: u32,
    /// Multiplies QKᵀ before the softmax: `(qk_nope + qk_rope)^-0.5`, times yarn's mscale² when
    /// the rotary scaling sets `mscale_all_dim` (as DeepSeek-V3's reference code does).
    pub softmax_scale: f64,
    /// q_a_proj and kv_a_proj_with_mqa fused (replicated); without q_lora_rank only kv_a.
    pub qkv_a: LinearSpec,
    /// q_b_proj, or q_proj when q_lora_rank is null.
    pub q_b: LinearSpec,
    pub kv_b: LinearSpec,
    pub o: LinearSpec,
    pub params: Vec<ParamSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatedDeltaNetSpec {
    pub num_k_heads: u32,
    pub num_v_heads: u32,
    pub k_head_dim: u32,
    pub v_head_dim: u32,
    pub conv_kernel: u32,
    pub state_dtype: DType,
    pub in_qkvz: LinearSpec,
    pub in_ba: LinearSpec,
    pub out: LinearSpec,
    pub params: Vec<ParamSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mamba2Spec {
    pub num_heads: u32,
    pub head_dim: u32,
    pub n_groups: u32,
    pub state_size: u32,
    pub conv_kernel: u32,
    pub state_dtype: DType,
    pub in_proj: LinearSpec,
    pub out_proj: LinearSpec,
    pub params: Vec<ParamSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MixerSpec {
    Attention(AttentionSpec),
    Mla(MlaSpec),
    GatedDeltaNet(GatedDeltaNetSpec),
    Mamba2(Mamba2Spec),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// silu(gate) · up
    SwiGlu,
    /// relu(x)² on a single up projection (Nemotron-H).
    Relu2,
}

impl Activation {
    pub fn is_gated(self) -> bool {
        matches!(self, Activation::SwiGlu)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DenseMlpSpec {
    pub intermediate: u32,
    pub activation: Activation,
    /// gate_up_proj (gated) or up_proj (non-gated).
    pub up: LinearSpec,
    pub down: LinearSpec,
}

/// Latent MoE (Nemotron 3 Super): routed experts run in a smaller latent space.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentSpec {
    pub size: u32,
    pub fc1: LinearSpec,
    pub fc2: LinearSpec,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub num_experts: u32,
    pub top_k: u32,
    pub intermediate: u32,
    pub activation: Activation,
    pub experts_up: LinearSpec,
    pub experts_down: LinearSpec,
    pub shared: Option<DenseMlpSpec>,
    pub latent: Option<LatentSpec>,
    /// Router weight, score-correction bias, shared-expert gate.
    pub params: Vec<ParamSpec>,
}

// One per layer, built once: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum FfnSpec {
    Dense(DenseMlpSpec),
    Moe(MoeSpec),
}

/// One decoder layer. Most architectures have a mixer and an FFN; Nemotron-H layers have one.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    pub mixer: Option<MixerSpec>,
    pub ffn: Option<FfnSpec>,
    /// The RMSNorm weights in front of the mixer and the FFN (present exactly when the block is).
    pub mixer_norm: Option<ParamSpec>,
    pub ffn_norm: Option<ParamSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub model_type: String,
    pub hidden_size: u32,
    pub vocab_size: u32,
    pub dtype: DType,
    pub embedding: LinearSpec,
    pub layers: Vec<LayerSpec>,
    pub final_norm: ParamSpec,
    /// When `tie_word_embeddings`, lm_head reuses the embedding weight (no tensor of its own).
    pub lm_head: LinearSpec,
    pub tie_word_embeddings: bool,
    /// Checkpoint tensors that belong to parts lorac does not serve (vision tower,
    /// multi-token-prediction layers); the safetensors check skips them.
    pub ignored_weight_prefixes: Vec<String>,
    /// Where the decoder's fields sit in config.json (`text_config.` for Qwen3.5, else empty),
    /// so errors can name fields exactly.
    pub config_section: String,
    pub norm: lorac_plan::NormConstants,
    /// None for models whose attention has no rotary embedding (Nemotron-H).
    pub rope: Option<lorac_plan::Rope>,
    pub max_position_embeddings: Option<u32>,
}

impl ModelSpec {
    pub fn num_layers(&self) -> u32 {
        self.layers.len() as u32
    }
}

impl MixerSpec {
    /// The QKᵀ scale of softmax attention; None for the recurrent mixers.
    pub fn softmax_scale(&self) -> Option<f64> {
        match self {
            MixerSpec::Attention(a) => Some(a.softmax_scale),
            MixerSpec::Mla(m) => Some(m.softmax_scale),
            MixerSpec::GatedDeltaNet(_) | MixerSpec::Mamba2(_) => None,
        }
    }

    pub fn params(&self) -> &[ParamSpec] {
        match self {
            MixerSpec::Attention(a) => &a.params,
            MixerSpec::Mla(m) => &m.params,
            MixerSpec::GatedDeltaNet(d) => &d.params,
            MixerSpec::Mamba2(m) => &m.params,
        }
    }
}

impl ModelSpec {
    /// Every non-linear parameter (norms, conv kernels, router weights...).
    pub fn params(&self) -> Vec<&ParamSpec> {
        let mut out = Vec::new();
        for layer in &self.layers {
            out.extend(layer.mixer_norm.iter().chain(&layer.ffn_norm));
            if let Some(mixer) = &layer.mixer {
                out.extend(mixer.params());
            }
            if let Some(FfnSpec::Moe(moe)) = &layer.ffn {
                out.extend(&moe.params);
            }
        }
        out.push(&self.final_norm);
        out
    }
}
