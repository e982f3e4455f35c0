//! Per-rank LoRA shape tables and memory totals for every real config in the repo at
//! tp 1, 2, 4, 8 and 16 (all targets, S = 8, R = 16). Where a tp is invalid for a model the
//! snapshot holds the compile error instead, so the refusals are reviewed too.

mod common;

use lorac_compiler::{CompileOptions, compile};

#[test]
fn shape_tables_per_config_and_tp() {
    let mut configs: Vec<_> = std::fs::read_dir(common::configs()).unwrap().map(|e| e.unwrap().path()).collect();
    configs.sort();
    for config in configs {
        let stem = config.file_stem().unwrap().to_string_lossy().replace("__", "_").replace('.', "_");
        for tp in [1, 2, 4, 8, 16] {
            let opts = CompileOptions::new(tp, 16, 8, &["all"]).unwrap();
            let report = match compile(&config, &opts) {
                Ok(plan) => lorac::report::human(&plan),
                Err(e) => format!("error: {}", common::scrub(&e.to_string(), &[])),
            };
            common::settings().bind(|| insta::assert_snapshot!(format!("{stem}_tp{tp}"), report));
        }
    }
}
