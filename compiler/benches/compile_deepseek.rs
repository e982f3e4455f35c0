//! Compiling DeepSeek-V3 (61 layers, 256 experts) with every LoRA target at tp 8 and writing
//! plan.bin: the goal is under 100 ms on a 2-core machine, and a plan of a few MB at most.
//! Run with `cargo bench -p lorac-compiler`.

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use lorac_compiler::{CompileOptions, compile};

fn deepseek_all_targets_tp8(c: &mut Criterion) {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/configs/deepseek-ai__DeepSeek-V3.json");
    let out = std::env::temp_dir().join(format!("lorac-bench-{}.bin", std::process::id()));
    let opts = CompileOptions::new(8, 16, 8, &["all"]).expect("valid options");
    let bytes = lorac_plan::encode(&compile(&config, &opts).expect("DeepSeek-V3 compiles"));
    eprintln!("plan.bin: {} bytes", bytes.len());
    c.bench_function("compile DeepSeek-V3 all targets tp8 + write plan.bin", |b| {
        b.iter(|| {
            let plan = compile(&config, &opts).expect("DeepSeek-V3 compiles");
            std::fs::write(&out, lorac_plan::encode(&plan)).expect("plan written");
        })
    });
    std::fs::remove_file(&out).ok();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = deepseek_all_targets_tp8
}
criterion_main!(benches);
