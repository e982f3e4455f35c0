//! Any bytes as plan.bin: decoding returns a plan or an error, never panics, and a decoded
//! plan passes its own consistency check and re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(plan) = lorac_plan::decode(data) {
        plan.check_consistency().expect("decode checks consistency");
        assert_eq!(lorac_plan::decode(&lorac_plan::encode(&plan)).as_ref(), Ok(&plan));
    }
});
