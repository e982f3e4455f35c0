//! plan.bin container: `MAGIC | format version (u32 LE) | payload length (u64 LE) |
//! SHA-256 of payload | payload (postcard)`. Every way a file can be wrong — foreign, another
//! version, truncated, corrupted, undecodable, internally inconsistent — is its own error.

use sha2::{Digest, Sha256};

use crate::plan::Plan;

pub const MAGIC: [u8; 8] = *b"LORACPLN";
pub const FORMAT_VERSION: u32 = 3;
const HEADER_LEN: usize = 8 + 4 + 8 + 32;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanFormatError {
    #[error("plan file is {len} bytes, shorter than the {HEADER_LEN}-byte header (empty or cut off)")]
    TooShort { len: usize },
    #[error("not a lorac plan (magic bytes are {found:02x?}, expected \"LORACPLN\")")]
    ForeignFile { found: Vec<u8> },
    #[error("plan format version {found} is not supported by this lorac (it reads version {FORMAT_VERSION}); recompile the plan")]
    WrongVersion { found: u32 },
    #[error("plan is truncated: header announces {expected} payload bytes, file has {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("plan has {extra} unexpected trailing bytes after the payload")]
    TrailingBytes { extra: u64 },
    #[error("plan is corrupted: payload checksum does not match")]
    ChecksumMismatch,
    #[error("plan payload cannot be decoded: {0}")]
    Decode(String),
    #[error("plan is inconsistent: {0}")]
    Inconsistent(String),
    #[error(
        "plan was compiled from another config.json (plan records sha256 {expected}, the model directory has {found}); recompile the plan for this model"
    )]
    ModelMismatch { expected: String, found: String },
}

pub fn encode(plan: &Plan) -> Vec<u8> {
    let payload = postcard::to_allocvec(plan).expect("plan types always serialise");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    out
}

pub fn decode(bytes: &[u8]) -> Result<Plan, PlanFormatError> {
    // A prefix of the magic (an empty or cut-off plan) is "too short", anything else foreign.
    if !bytes.starts_with(&MAGIC) && !MAGIC.starts_with(bytes) {
        return Err(PlanFormatError::ForeignFile { found: bytes.iter().take(MAGIC.len()).copied().collect() });
    }
    if bytes.len() < HEADER_LEN {
        return Err(PlanFormatError::TooShort { len: bytes.len() });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(PlanFormatError::WrongVersion { found: version });
    }
    let expected = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let found = (bytes.len() - HEADER_LEN) as u64;
    if found < expected {
        return Err(PlanFormatError::Truncated { expected, found });
    }
    if found > expected {
        return Err(PlanFormatError::TrailingBytes { extra: found - expected });
    }
    let payload = &bytes[HEADER_LEN..];
    if Sha256::digest(payload).as_slice() != &bytes[20..52] {
        return Err(PlanFormatError::ChecksumMismatch);
    }
    let plan: Plan = postcard::from_bytes(payload).map_err(|e| PlanFormatError::Decode(e.to_string()))?;
    plan.check_consistency().map_err(PlanFormatError::Inconsistent)?;
    Ok(plan)
}

/// SHA-256 of a config file's bytes, the fingerprint a plan records.
pub fn fingerprint(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Plan {
    /// Refuses to serve this plan over a model whose config.json is not the one it was
    /// compiled from.
    pub fn check_config(&self, config_bytes: &[u8]) -> Result<(), PlanFormatError> {
        let found = fingerprint(config_bytes);
        if found != self.source.config_sha256 {
            return Err(PlanFormatError::ModelMismatch { expected: hex(&self.source.config_sha256), found: hex(&found) });
        }
        Ok(())
    }

    /// Cross-references a decoded plan: every id it holds points inside its tables and the
    /// ranks are numbered 0..tp. (Layouts check themselves while decoding.)
    pub fn check_consistency(&self) -> Result<(), String> {
        if self.ranks.len() != self.parallel.tp as usize {
            return Err(format!("{} rank entries for tp {}", self.ranks.len(), self.parallel.tp));
        }
        for (i, r) in self.ranks.iter().enumerate() {
            if r.rank as usize != i {
                return Err(format!("rank entry {i} is numbered {}", r.rank));
            }
        }
        let buffers = self.ranks.first().map_or(0, |r| r.lora_buffers.len());
        if self.ranks.iter().any(|r| r.lora_buffers.len() != buffers) {
            return Err("ranks hold different numbers of LoRA buffers".into());
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if let Some(k) = node.kernel
                && k.0 as usize >= self.kernels.len()
            {
                return Err(format!("node {i} names kernel {} of {}", k.0, self.kernels.len()));
            }
            if let Some(v) = node.inputs.iter().chain(&node.outputs).find(|v| v.0 as usize >= self.values.len()) {
                return Err(format!("node {i} names value {} of {}", v.0, self.values.len()));
            }
            if let Some(b) = node.lora_buffer
                && b as usize >= buffers
            {
                return Err(format!("node {i} names LoRA buffer {b} of {buffers}"));
            }
        }
        Ok(())
    }
}
