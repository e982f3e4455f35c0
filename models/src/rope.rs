//! Normalisation and rotary-embedding constants, from either spelling of config.json:
//! `rope_theta` + `rope_scaling` (hub configs) or `rope_parameters` (transformers 5).

use lorac_plan::{NormConstants, Rope, RopeScaling};
use serde::Deserialize;
use serde_json::Value;

use crate::config::ConfigFile;
use crate::error::ModelError;

#[derive(Debug, Default, Deserialize)]
struct RopeFields {
    rope_type: Option<String>,
    /// Older configs spell `rope_type` as `type`.
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<u32>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    mrope_section: Option<Vec<u32>>,
    mrope_interleaved: Option<bool>,
}

/// The decoder's config object (`text_config` for nested configs) and its field prefix.
fn section<'a>(cfg: &'a ConfigFile, nested: Option<&str>) -> (&'a Value, String) {
    match nested.and_then(|n| cfg.root.get(n).map(|v| (v, format!("{n}.")))) {
        Some(found) => found,
        None => (&cfg.root, String::new()),
    }
}

/// RMSNorm epsilon (`rms_norm_eps`, `layer_norm_epsilon` or `norm_eps`; 1e-6 when absent, as
/// transformers defaults).
pub fn norm(cfg: &ConfigFile, nested: Option<&str>, unit_offset: bool) -> Result<NormConstants, ModelError> {
    let (obj, prefix) = section(cfg, nested);
    for field in ["rms_norm_eps", "layer_norm_epsilon", "norm_eps"] {
        if let Some(v) = obj.get(field) {
            let eps = v.as_f64().filter(|e| e.is_finite() && *e > 0.0 && *e < 1.0);
            return match eps {
                Some(eps) => Ok(NormConstants { eps, unit_offset }),
                None => {
                    Err(ModelError::field(&cfg.path, format!("{prefix}{field}"), format!("expected a positive number below 1, found {v}")))
                }
            };
        }
    }
    Ok(NormConstants { eps: 1e-6, unit_offset })
}

/// Rotary embedding over `head_dim`-wide heads.
pub fn rope(cfg: &ConfigFile, nested: Option<&str>, head_dim: u32) -> Result<Rope, ModelError> {
    let (obj, prefix) = section(cfg, nested);
    let parse = |value: &Value, field: String| -> Result<RopeFields, ModelError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let inner = e.path().to_string();
            ModelError::field(&cfg.path, format!("{prefix}{field}.{inner}"), e.into_inner().to_string())
        })
    };
    // transformers 5 keeps everything under rope_parameters; hub configs split it.
    let (params, field) = match obj.get("rope_parameters") {
        Some(v @ Value::Object(_)) => (parse(v, "rope_parameters".into())?, "rope_parameters"),
        _ => {
            let mut p = match obj.get("rope_scaling") {
                Some(v @ Value::Object(_)) => parse(v, "rope_scaling".into())?,
                _ => RopeFields::default(),
            };
            let top = parse(obj, String::new()).unwrap_or_default();
            p.rope_theta = p.rope_theta.or(top.rope_theta);
            p.partial_rotary_factor = p.partial_rotary_factor.or(top.partial_rotary_factor);
            (p, "rope_scaling")
        }
    };
    let bad = |name: &str, message: String| ModelError::field(&cfg.path, format!("{prefix}{field}.{name}"), message);
    let theta = params.rope_theta.unwrap_or(10000.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(bad("rope_theta", format!("expected a positive number, found {theta}")));
    }
    let partial = params.partial_rotary_factor.unwrap_or(1.0);
    let rotary_dim = (f64::from(head_dim) * partial).round() as u32;
    let valid = partial > 0.0 && partial <= 1.0 && rotary_dim > 0 && rotary_dim.is_multiple_of(2);
    if !valid {
        return Err(bad("partial_rotary_factor", format!("{partial} of head_dim {head_dim} is not an even number of dimensions")));
    }
    let need = |v: Option<f64>, name: &str| v.filter(|x| x.is_finite()).ok_or_else(|| bad(name, "missing or not a finite number".into()));
    let need_u32 = |v: Option<u32>, name: &str| v.filter(|x| *x > 0).ok_or_else(|| bad(name, "missing or zero".into()));
    let kind = params.rope_type.clone().or(params.legacy_type.clone()).unwrap_or_else(|| "default".into());
    let scaling = match kind.as_str() {
        "default" => match &params.mrope_section {
            Some(sections) => RopeScaling::MRope { sections: sections.clone(), interleaved: params.mrope_interleaved.unwrap_or(false) },
            None => RopeScaling::None,
        },
        "linear" => RopeScaling::Linear { factor: need(params.factor, "factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: need(params.factor, "factor")?,
            low_freq_factor: need(params.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(params.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: need_u32(params.original_max_position_embeddings, "original_max_position_embeddings")?,
        },
        "yarn" => RopeScaling::Yarn {
            factor: need(params.factor, "factor")?,
            original_max_position_embeddings: need_u32(params.original_max_position_embeddings, "original_max_position_embeddings")?,
            beta_fast: params.beta_fast.unwrap_or(32.0),
            beta_slow: params.beta_slow.unwrap_or(1.0),
            mscale: params.mscale.unwrap_or(1.0),
            mscale_all_dim: params.mscale_all_dim.unwrap_or(0.0),
        },
        other => return Err(bad("rope_type", format!("unsupported rope type `{other}` (supported: default, linear, llama3, yarn)"))),
    };
    Ok(Rope { theta, rotary_dim, scaling })
}
