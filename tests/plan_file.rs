//! plan.bin round-trips, and every kind of damaged file is refused with its own message.

mod common;

use lorac_compiler::{CompileOptions, compile};
use lorac_plan::{FORMAT_VERSION, decode, encode};

/// The plan records where it was compiled from; pin that so byte counts in the snapshot do not
/// depend on where the repository is checked out.
fn deepseek_plan() -> lorac_plan::Plan {
    let opts = CompileOptions::new(8, 16, 8, &["all"]).unwrap();
    let mut plan = compile(&common::configs().join("deepseek-ai__DeepSeek-V3.json"), &opts).unwrap();
    plan.source.model_dir = "models/configs".into();
    plan
}

/// Rewrites the checksum so a payload edit reaches the decoder.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(&bytes[52..]);
    bytes[20..52].copy_from_slice(&digest);
    bytes
}

#[test]
fn round_trip_is_exact_and_small() {
    let plan = deepseek_plan();
    let bytes = encode(&plan);
    assert_eq!(decode(&bytes).unwrap(), plan);
    // Experts stay one node per layer: the whole DeepSeek-V3 tp 8 plan is well under 2 MB.
    assert!(bytes.len() < 2 << 20, "plan.bin is {} bytes", bytes.len());
}

#[test]
fn damaged_plans_are_refused() {
    let good = encode(&deepseek_plan());
    let mut wrong_version = good.clone();
    wrong_version[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let mut flipped = good.clone();
    let middle = good.len() / 2;
    flipped[middle] ^= 0x40;
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"extra");
    let mut garbage_payload = good[..52].to_vec();
    garbage_payload.extend(std::iter::repeat_n(0xff, 64));
    garbage_payload[12..20].copy_from_slice(&64u64.to_le_bytes());
    let mut inconsistent = deepseek_plan();
    inconsistent.ranks.pop();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty file", Vec::new()),
        ("cut inside the magic", good[..4].to_vec()),
        ("cut inside the header", good[..30].to_vec()),
        ("foreign file", br#"{"model_type": "llama"}"#.repeat(4)),
        ("wrong format version", wrong_version),
        ("truncated payload", good[..good.len() - 100].to_vec()),
        ("trailing bytes", trailing),
        ("one flipped bit", flipped),
        ("undecodable payload", reseal(garbage_payload)),
        ("inconsistent plan", encode(&inconsistent)),
    ];
    let report: String = cases.into_iter().map(|(name, bytes)| format!("## {name}\n{}\n", decode(&bytes).expect_err(name))).collect();
    common::settings().bind(|| insta::assert_snapshot!("plan_decode_errors", report));
}

/// Mutated plans (random bytes overwritten, checksum resealed so the decoder itself is
/// exercised) are either refused or decode to a plan that passes its own checks; none panics.
#[test]
fn mutated_plans_never_panic() {
    let good = encode(&deepseek_plan());
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..300 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 8 {
            let at = 52 + (next() as usize) % (bytes.len() - 52);
            bytes[at] = next() as u8;
        }
        if let Ok(plan) = decode(&reseal(bytes)) {
            plan.check_consistency().unwrap();
        }
    }
}

#[test]
fn plan_refuses_another_models_config() {
    let opts = CompileOptions::new(1, 8, 4, &["all"]).unwrap();
    let plan = compile(&common::tiny("llama"), &opts).unwrap();
    let own = std::fs::read(common::tiny("llama").join("config.json")).unwrap();
    plan.check_config(&own).unwrap();
    let other = std::fs::read(common::tiny("qwen3").join("config.json")).unwrap();
    let err = plan.check_config(&other).unwrap_err().to_string();
    assert!(err.starts_with("plan was compiled from another config.json"), "{err}");
}
