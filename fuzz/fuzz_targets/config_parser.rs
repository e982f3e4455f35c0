//! Any bytes as config.json: parsing and describing must return a result, never panic; a
//! config that describes must also compile (or be refused) at tp 1 and 2.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cfg) = lorac_models::ConfigFile::from_bytes(Path::new("config.json"), data.to_vec()) else { return };
    let Ok(spec) = lorac_models::describe(&cfg) else { return };
    // Fuzzed configs can describe absurdly large models; keep the graph small enough to build.
    if spec.layers.len() > 64 {
        return;
    }
    for tp in [1, 2] {
        let opts = lorac_compiler::CompileOptions::new(tp, 8, 2, &["all"]).expect("valid options");
        let _ = lorac_compiler::compile_spec(&cfg, &spec, &opts, None);
    }
});
