//! Reading config.json: tolerant of the non-JSON tokens real configs contain, strict about
//! the fields a frontend needs, and always naming the file and field that is wrong.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ModelError;

/// A parsed config.json and where it came from.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// The raw bytes, kept so the plan can fingerprint exactly what it was compiled from.
    pub bytes: Vec<u8>,
    pub root: Value,
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Read { path: path.to_path_buf(), source })?;
        Self::from_bytes(path, bytes)
    }

    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self, ModelError> {
        let text = String::from_utf8_lossy(&bytes);
        let root: Value = serde_json::from_str(&replace_non_finite(&text)).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        if !root.is_object() {
            return Err(ModelError::field(path, "<root>", "expected a JSON object"));
        }
        Ok(ConfigFile { path: path.to_path_buf(), bytes, root })
    }

    pub fn model_type(&self) -> Result<&str, ModelError> {
        match self.root.get("model_type") {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(ModelError::field(&self.path, "model_type", format!("expected a string, found {other}"))),
            None => Err(ModelError::field(&self.path, "model_type", "missing")),
        }
    }

    /// Deserialises the whole config (or the object under `nested`, e.g. Qwen3.5's
    /// `text_config`) into a frontend's typed struct. Errors name the field path.
    pub fn parse<T: DeserializeOwned>(&self, nested: Option<&str>) -> Result<T, ModelError> {
        let (value, prefix) = match nested {
            Some(key) => match self.root.get(key) {
                Some(v @ Value::Object(_)) => (v, format!("{key}.")),
                Some(_) => return Err(ModelError::field(&self.path, key, "expected an object")),
                None => return Err(ModelError::field(&self.path, key, "missing")),
            },
            None => (&self.root, String::new()),
        };
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // A missing field is reported at its parent; pull the name out of serde's message.
            let field = match (path.as_str(), inner.strip_prefix("missing field `")) {
                (".", Some(rest)) => rest.trim_end_matches('`').to_string(),
                (".", None) => "<root>".to_string(),
                (p, _) => p.to_string(),
            };
            let message = if inner.starts_with("missing field") { "missing".to_string() } else { inner };
            ModelError::field(&self.path, format!("{prefix}{field}"), message)
        })
    }
}

/// Replaces the bare `Infinity`, `-Infinity` and `NaN` tokens Python's json writes (Nemotron's
/// `time_step_limit`) with `null`, leaving string contents untouched.
pub fn replace_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("Infinity") && !text.contains("NaN") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let token = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t));
        match (c, token) {
            ('"', _) => {
                in_string = true;
                out.push(c);
                rest = &rest[1..];
            }
            (_, Some(t)) => {
                out.push_str("null");
                rest = &rest[t.len()..];
            }
            _ => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_infinity_and_nan_parse_and_strings_survive() {
        let text = r#"{"a": [0.0, Infinity], "b": -Infinity, "c": NaN, "d": "NaN \"Infinity\""}"#;
        let v: Value = serde_json::from_str(&replace_non_finite(text)).unwrap();
        assert_eq!(v["a"][1], Value::Null);
        assert_eq!(v["b"], Value::Null);
        assert_eq!(v["c"], Value::Null);
        assert_eq!(v["d"], Value::String("NaN \"Infinity\"".into()));
    }
}
