//! `adapter_config.json`: only the fields lorac uses, each read on its own so an error names
//! the file and the field. Settings that change what the adapter computes beyond plain LoRA
//! (DoRA, extra trainable tokens, full replacement modules, biases, transposed weights...)
//! are refused here, before any tensor is read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::AdapterError;

pub const CONFIG_FILE: &str = "adapter_config.json";

/// PEFT's `target_modules`: a list of names, or one regex string (`"all-linear"` included).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

/// One `rank_pattern` / `alpha_pattern` key, compiled the way PEFT matches it: the key equals
/// the module name, or the module name ends with `.<key>` as a regex (`get_pattern_key`).
#[derive(Debug, Clone)]
struct PatternKey<T> {
    key: String,
    regex: Regex,
    value: T,
}

#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub file: PathBuf,
    pub r: u32,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// Informational: the tensors, not this list, decide what is loaded (PEFT only saves the
    /// modules it matched, `layers_to_transform` and `exclude_modules` applied).
    pub target_modules: Option<TargetModules>,
    pub layers_to_transform: Option<Value>,
    rank_pattern: Vec<PatternKey<u32>>,
    alpha_pattern: Vec<PatternKey<f64>>,
}

fn field<T: DeserializeOwned>(file: &Path, obj: &Map<String, Value>, name: &str) -> Result<Option<T>, AdapterError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| AdapterError::ConfigField {
            file: file.to_path_buf(),
            field: name.to_string(),
            message: e.to_string(),
        }),
    }
}

fn bad(file: &Path, field: &str, message: impl Into<String>) -> AdapterError {
    AdapterError::ConfigField { file: file.to_path_buf(), field: field.to_string(), message: message.into() }
}

fn unsupported(file: &Path, field: &'static str, setting: String, what: &'static str) -> AdapterError {
    AdapterError::Unsupported { file: file.to_path_buf(), field, setting, what }
}

fn patterns<T: DeserializeOwned + Clone>(file: &Path, obj: &Map<String, Value>, name: &str) -> Result<Vec<PatternKey<T>>, AdapterError> {
    let map: BTreeMap<String, T> = field(file, obj, name)?.unwrap_or_default();
    map.into_iter()
        .map(|(key, value)| {
            let regex = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
                .map_err(|e| bad(file, name, format!("key `{key}` is not a valid regular expression: {e}")))?;
            Ok(PatternKey { key, regex, value })
        })
        .collect()
}

/// PEFT takes an exact key first, else the first key whose regex matches. JSON object order
/// is not kept here, so when several keys match with different values the adapter is refused
/// rather than guessed.
fn lookup<T: Copy + PartialEq + std::fmt::Debug>(
    file: &Path,
    field_name: &str,
    keys: &[PatternKey<T>],
    module: &str,
) -> Result<Option<T>, AdapterError> {
    if let Some(k) = keys.iter().find(|k| k.key == module) {
        return Ok(Some(k.value));
    }
    let hits: Vec<&PatternKey<T>> = keys.iter().filter(|k| k.regex.is_match(module)).collect();
    match hits.as_slice() {
        [] => Ok(None),
        [first, rest @ ..] if rest.iter().all(|k| k.value == first.value) => Ok(Some(first.value)),
        _ => Err(bad(
            file,
            field_name,
            format!(
                "module `{module}` matches several keys with different values ({}); make the keys unambiguous",
                hits.iter().map(|k| format!("`{}`: {:?}", k.key, k.value)).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

impl AdapterConfig {
    pub fn read(dir: &Path) -> Result<AdapterConfig, AdapterError> {
        let file = dir.join(CONFIG_FILE);
        let bytes = std::fs::read(&file).map_err(|source| AdapterError::Io { file: file.clone(), source })?;
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|e| AdapterError::ConfigSyntax { file: file.clone(), message: e.to_string() })?;
        Self::from_json(file, &value)
    }

    pub fn from_json(file: PathBuf, value: &Value) -> Result<AdapterConfig, AdapterError> {
        let f = file.as_path();
        let obj =
            value.as_object().ok_or_else(|| AdapterError::ConfigSyntax { file: file.clone(), message: "not a JSON object".into() })?;

        if let Some(peft_type) = field::<String>(f, obj, "peft_type")?
            && peft_type != "LORA"
        {
            return Err(unsupported(f, "peft_type", format!("is {peft_type:?}"), "an adapter type other than LORA"));
        }
        if field::<bool>(f, obj, "use_dora")?.unwrap_or(false) {
            return Err(unsupported(f, "use_dora", "is true".into(), "DoRA (weight-decomposed LoRA)"));
        }
        if let Some(modules) = field::<Vec<String>>(f, obj, "modules_to_save")?
            && !modules.is_empty()
        {
            return Err(unsupported(
                f,
                "modules_to_save",
                format!("is {modules:?}"),
                "fully trained replacement modules (only LoRA deltas can share the base weights)",
            ));
        }
        if let Some(tokens) =
            obj.get("trainable_token_indices").filter(|v| !v.is_null() && *v != &Value::Object(Map::new()) && *v != &Value::Array(vec![]))
        {
            return Err(unsupported(
                f,
                "trainable_token_indices",
                format!("is set ({})", summarize(tokens)),
                "added or retrained token embeddings",
            ));
        }
        if let Some(bias) = field::<String>(f, obj, "bias")?
            && bias != "none"
        {
            return Err(unsupported(f, "bias", format!("is {bias:?}"), "trained biases (only `bias: \"none\"`)"));
        }
        if field::<bool>(f, obj, "lora_bias")?.unwrap_or(false) {
            return Err(unsupported(f, "lora_bias", "is true".into(), "a bias on lora_B"));
        }
        if field::<bool>(f, obj, "fan_in_fan_out")?.unwrap_or(false) {
            return Err(unsupported(f, "fan_in_fan_out", "is true".into(), "transposed (Conv1D-style) LoRA weights"));
        }
        if let Some(v) = obj.get("layer_replication").filter(|v| !v.is_null()) {
            return Err(unsupported(f, "layer_replication", format!("is set ({})", summarize(v)), "layer replication"));
        }
        if let Some(v) = obj.get("target_parameters").filter(|v| !v.is_null() && *v != &Value::Array(vec![])) {
            return Err(unsupported(f, "target_parameters", format!("is set ({})", summarize(v)), "LoRA on raw parameters"));
        }
        if let Some(v) = obj.get("alora_invocation_tokens").filter(|v| !v.is_null()) {
            return Err(unsupported(f, "alora_invocation_tokens", format!("is set ({})", summarize(v)), "activated LoRA (aLoRA)"));
        }
        if field::<bool>(f, obj, "use_qalora")?.unwrap_or(false) {
            return Err(unsupported(f, "use_qalora", "is true".into(), "QALoRA"));
        }

        let r: u32 = field(f, obj, "r")?.ok_or_else(|| bad(f, "r", "missing"))?;
        if r == 0 {
            return Err(bad(f, "r", "must be at least 1"));
        }
        let lora_alpha: f64 = field(f, obj, "lora_alpha")?.ok_or_else(|| bad(f, "lora_alpha", "missing"))?;
        if !lora_alpha.is_finite() {
            return Err(bad(f, "lora_alpha", "must be a finite number"));
        }
        let use_rslora = field::<bool>(f, obj, "use_rslora")?.unwrap_or(false);
        let target_modules = field::<TargetModules>(f, obj, "target_modules")?;
        let layers_to_transform = obj.get("layers_to_transform").filter(|v| !v.is_null()).cloned();
        let rank_pattern: Vec<PatternKey<u32>> = patterns(f, obj, "rank_pattern")?;
        if let Some(k) = rank_pattern.iter().find(|k| k.value == 0) {
            return Err(bad(f, "rank_pattern", format!("key `{}` gives rank 0", k.key)));
        }
        let alpha_pattern: Vec<PatternKey<f64>> = patterns(f, obj, "alpha_pattern")?;
        if let Some(k) = alpha_pattern.iter().find(|k| !k.value.is_finite()) {
            return Err(bad(f, "alpha_pattern", format!("key `{}` is not a finite number", k.key)));
        }
        Ok(AdapterConfig { file, r, lora_alpha, use_rslora, target_modules, layers_to_transform, rank_pattern, alpha_pattern })
    }

    /// The configured rank of one module (`model.layers.0.self_attn.q_proj`) and the field
    /// it comes from.
    pub fn rank_of(&self, module: &str) -> Result<(u32, String), AdapterError> {
        Ok(match lookup(&self.file, "rank_pattern", &self.rank_pattern, module)? {
            Some(r) => (r, "rank_pattern".to_string()),
            None => (self.r, "r".to_string()),
        })
    }

    /// PEFT's scaling of one module: `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`,
    /// with r and alpha from `rank_pattern` / `alpha_pattern` when a key matches.
    pub fn scale_of(&self, module: &str) -> Result<f64, AdapterError> {
        let (r, _) = self.rank_of(module)?;
        let alpha = lookup(&self.file, "alpha_pattern", &self.alpha_pattern, module)?.unwrap_or(self.lora_alpha);
        let r = f64::from(r);
        Ok(if self.use_rslora { alpha / r.sqrt() } else { alpha / r })
    }
}

fn summarize(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 { format!("{}…", s.chars().take(60).collect::<String>()) } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> Result<AdapterConfig, AdapterError> {
        AdapterConfig::from_json(PathBuf::from("x/adapter_config.json"), &serde_json::from_str(json).expect("test JSON"))
    }

    #[test]
    fn scales_follow_rslora_and_patterns() {
        let c =
            cfg(r#"{"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"layers\\.1\\.self_attn\\.q_proj": 2}}"#)
                .expect("valid");
        assert_eq!(c.rank_of("model.layers.0.self_attn.q_proj").expect("ok"), (4, "rank_pattern".into()));
        assert_eq!(c.rank_of("model.layers.0.self_attn.k_proj").expect("ok"), (8, "r".into()));
        assert_eq!(c.scale_of("model.layers.0.self_attn.q_proj").expect("ok"), 4.0);
        assert_eq!(c.scale_of("model.layers.1.self_attn.q_proj").expect("ok"), 0.5);
        assert_eq!(c.scale_of("model.layers.1.mlp.up_proj").expect("ok"), 2.0);
        // `q_proj` must not match `xq_proj`: PEFT anchors keys on a dot.
        assert_eq!(c.rank_of("model.layers.0.self_attn.xq_proj").expect("ok").0, 8);
        let rs = cfg(r#"{"r": 4, "lora_alpha": 8, "use_rslora": true, "target_modules": "all-linear"}"#).expect("valid");
        assert_eq!(rs.scale_of("a.b").expect("ok"), 4.0);
        assert_eq!(rs.target_modules, Some(TargetModules::Pattern("all-linear".into())));
    }

    #[test]
    fn ambiguous_patterns_and_bad_fields_are_named() {
        let c = cfg(r#"{"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4, "self_attn\\.q_proj": 2}}"#).expect("valid");
        let e = c.rank_of("model.layers.0.self_attn.q_proj").expect_err("ambiguous").to_string();
        assert!(e.contains("rank_pattern") && e.contains("several keys"), "{e}");
        let e = cfg(r#"{"r": "eight", "lora_alpha": 16}"#).expect_err("bad r").to_string();
        assert!(e.contains("x/adapter_config.json: field `r`"), "{e}");
        let e = cfg(r#"{"lora_alpha": 16}"#).expect_err("no r").to_string();
        assert!(e.contains("field `r`: missing"), "{e}");
        let e = cfg(r#"{"r": 8, "lora_alpha": 16, "bias": "all"}"#).expect_err("bias").to_string();
        assert!(e.contains("`bias`"), "{e}");
        let e = cfg(r#"{"r": 8, "lora_alpha": 16, "fan_in_fan_out": true}"#).expect_err("fan_in_fan_out").to_string();
        assert!(e.contains("fan_in_fan_out"), "{e}");
        let e = cfg(r#"{"r": 8, "lora_alpha": 16, "rank_pattern": {"(": 2}}"#).expect_err("regex").to_string();
        assert!(e.contains("rank_pattern") && e.contains("regular expression"), "{e}");
    }
}
