//! Numeric model constants the runtime needs besides shapes: normalisation and rotary
//! embedding. Parsed once by the frontends, carried by the plan.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NormConstants {
    pub eps: f64,
    /// RMSNorm multiplies by `1 + w` instead of `w` (Qwen3-Next, Qwen3.5).
    pub unit_offset: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub theta: f64,
    /// Leading dimensions of each head that rotate (partial rotary factor × head_dim).
    pub rotary_dim: u32,
    pub scaling: RopeScaling,
}

/// The rope types of transformers' `modeling_rope_utils` that lorac implements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: u32,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: u32,
        beta_fast: f64,
        beta_slow: f64,
        mscale: f64,
        mscale_all_dim: f64,
    },
    /// Multimodal rope (Qwen3.5): text tokens use the same position on every section.
    MRope {
        sections: Vec<u32>,
        interleaved: bool,
    },
}
