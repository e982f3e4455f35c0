//! Property tests of the base-op kernels (`lorac_runtime::ops`) against their f64 references, on
//! random shapes (odd sizes, sizes off every tile multiple) and fresh random (never zero) data.
//! Write-only outputs are poisoned with NaN before each launch; in-place targets live inside
//! wider buffers whose other elements must come back bit-identical. Bodies are generic over
//! the cubecl runtime and stamped for wgpu (lavapipe in CI, f32) and, with
//! `--features cuda-tests`, for CUDA (f32 and bf16).

use cubecl::prelude::*;
use lorac_runtime::DeviceBuffer;
use lorac_runtime::ops::add::{launch_add, launch_add_inplace};
use lorac_runtime::ops::argmax::{launch_argmax, reference_argmax};
use lorac_runtime::ops::attention::{
    AttentionBatch, KvCacheShape, PagedKvCache, SeqSlice, launch_attention, launch_attention_split, launch_kv_write, reference_attention,
    split_partial_len,
};
use lorac_runtime::ops::gather::{launch_embedding_lookup, launch_gather_rows, reference_gather_rows};
use lorac_runtime::ops::matmul::{MatmulConfig, launch_matmul, launch_matmul_cubek, reference_matmul};
use lorac_runtime::ops::rms_norm::{
    launch_add_rms_norm, launch_rms_norm, launch_rms_norm_heads, reference_rms_norm, reference_rms_norm_row,
};
use lorac_runtime::ops::rope::{RopeParams, RopeScaling, launch_rope, reference_rope};
use lorac_runtime::ops::silu_mul::{launch_silu_mul, reference_silu_mul};
use lorac_runtime::ops::{HeadView, OpError};
use lorac_runtime::testing::{Rng, StorageElem, relative_error};

/// Norm-wise and element-wise comparison (the element-wise bound catches a single missed or
/// unwritten element that the norm would average away; NaN fails both).
fn check_close(what: &str, out: &[f64], reference: &[f64], tol: f64) {
    assert_eq!(out.len(), reference.len(), "{what}: length");
    if reference.is_empty() {
        return;
    }
    let rms = (reference.iter().map(|r| r * r).sum::<f64>() / reference.len() as f64).sqrt();
    for (i, (o, r)) in out.iter().zip(reference).enumerate() {
        assert!((o - r).abs() <= tol * (r.abs() + rms), "{what}: element {i}: got {o}, expected {r} (rms {rms})");
    }
    let err = relative_error(out.iter().copied().zip(reference.iter().copied()));
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

fn to_f64<F: StorageElem>(v: &[F]) -> Vec<f64> {
    v.iter().map(|x| x.as_f64()).collect()
}

fn nan_buffer<R: Runtime, F: StorageElem>(client: &ComputeClient<R>, len: usize) -> DeviceBuffer<F> {
    DeviceBuffer::upload(client, &vec![F::round_from(f64::NAN); len])
}

pub fn matmul<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    let configs = [None, Some(MatmulConfig::new(1)), Some(MatmulConfig::new(20)), Some(MatmulConfig::new(100))];
    // The automatic route on a model-like shape (tensor cores for half precision where present).
    {
        let rng = &mut Rng::new(999);
        let (m, n, k) = (40, 96, 128);
        let (x, x64) = rng.tensor::<F>(m * k, 1.0);
        let (w, w64) = rng.tensor::<F>(n * k, 1.0);
        let mut y = nan_buffer::<R, F>(client, m * n);
        launch_matmul(client, &DeviceBuffer::upload(client, &x), &DeviceBuffer::upload(client, &w), &mut y, m, n, k, None).unwrap();
        check_close("matmul auto 40x96x128", &to_f64(&y.read(client)), &reference_matmul(&x64, &w64, m, n, k), F::TOLERANCE);
    }
    for seed in 0..12u64 {
        let rng = &mut Rng::new(1000 + seed);
        let m = rng.pick(&[1, 2, 5, 8, 9, 17, 33, 64, 70]) as usize;
        let n = rng.range(1, 160) as usize;
        let k = rng.pick(&[1, 3, 16, 31, 64, 100, 257]) as usize;
        let config = configs[seed as usize % configs.len()];
        let what = format!("matmul seed {seed} m {m} n {n} k {k} {config:?}");
        let (x, x64) = rng.tensor::<F>(m * k, 1.0);
        let (w, w64) = rng.tensor::<F>(n * k, 1.0);
        let mut y = nan_buffer::<R, F>(client, m * n);
        launch_matmul(client, &DeviceBuffer::upload(client, &x), &DeviceBuffer::upload(client, &w), &mut y, m, n, k, config).unwrap();
        check_close(&what, &to_f64(&y.read(client)), &reference_matmul(&x64, &w64, m, n, k), F::TOLERANCE);
    }
    // Decode sizes past the GEMV range on model-like shapes (multiples of 8): half precision
    // takes the TMA tensor-core kernel where the device has it (up to DECODE_TMA_MAX_M), the
    // cyclic one or the tiled kernel elsewhere; the result must not depend on the route.
    for (i, m) in [9usize, 16, 24, 32].into_iter().enumerate() {
        let rng = &mut Rng::new(1150 + i as u64);
        let (n, k) = (96, 264);
        let (x, x64) = rng.tensor::<F>(m * k, 1.0);
        let (w, w64) = rng.tensor::<F>(n * k, 1.0);
        let mut y = nan_buffer::<R, F>(client, m * n);
        launch_matmul(client, &DeviceBuffer::upload(client, &x), &DeviceBuffer::upload(client, &w), &mut y, m, n, k, None).unwrap();
        check_close(
            &format!("matmul auto m {m} n {n} k {k}"),
            &to_f64(&y.read(client)),
            &reference_matmul(&x64, &w64, m, n, k),
            F::TOLERANCE,
        );
    }
    // Every decode size through the GEMV path (config None, m ≤ 8), vectorised and not.
    for m in 1..=8usize {
        let rng = &mut Rng::new(1100 + m as u64);
        let n = rng.range(1, 100) as usize;
        let k = rng.pick(&[4, 8, 100, 257, 512]) as usize;
        let what = format!("gemv m {m} n {n} k {k}");
        let (x, x64) = rng.tensor::<F>(m * k, 1.0);
        let (w, w64) = rng.tensor::<F>(n * k, 1.0);
        let mut y = nan_buffer::<R, F>(client, m * n);
        launch_matmul(client, &DeviceBuffer::upload(client, &x), &DeviceBuffer::upload(client, &w), &mut y, m, n, k, None).unwrap();
        check_close(&what, &to_f64(&y.read(client)), &reference_matmul(&x64, &w64, m, n, k), F::TOLERANCE);
    }
}

/// The cubek-matmul route with W as the column-major right-hand side: the portable strategies
/// everywhere, tensor cores where the device has them (refused, not launched, elsewhere).
pub fn matmul_cubek<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    use cubek_matmul::launch::Strategy;
    let shapes = [(1, 33, 64), (9, 70, 100), (70, 130, 257), (128, 64, 128)];
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        let rng = &mut Rng::new(1200 + i as u64);
        let (x, x64) = rng.tensor::<F>(m * k, 1.0);
        let (w, w64) = rng.tensor::<F>(n * k, 1.0);
        let reference = reference_matmul(&x64, &w64, m, n, k);
        let (dx, dw) = (DeviceBuffer::upload(client, &x), DeviceBuffer::upload(client, &w));
        let strategies = [
            ("naive", Strategy::Naive),
            ("simple_unit", Strategy::SimpleUnit(Default::default())),
            ("cmma", Strategy::SimpleCyclicCmma(Default::default())),
        ];
        for (name, strategy) in &strategies {
            // SimpleUnit is slow to compile on lavapipe: one shape only. Tensor cores only for
            // half precision (for f32 they would compute in tf32, as the auto route knows).
            if (*name == "simple_unit" && i != 2) || (*name == "cmma" && size_of::<F>() != 2) {
                continue;
            }
            let mut y = nan_buffer::<R, F>(client, m * n);
            match launch_matmul_cubek(client, &dx, &dw, &mut y, m, n, k, strategy) {
                Ok(()) => check_close(&format!("cubek {name} {m}x{n}x{k}"), &to_f64(&y.read(client)), &reference, F::TOLERANCE),
                Err(OpError::Unsupported(_)) if *name == "cmma" => {}
                Err(e) => panic!("cubek {name} {m}x{n}x{k}: {e}"),
            }
        }
    }
}

pub fn rms_norm<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..6u64 {
        let rng = &mut Rng::new(2000 + seed);
        let rows = rng.range(1, 20) as usize;
        let width = rng.pick(&[1, 7, 64, 100, 257, 1000]) as usize;
        let eps = rng.pick(&[1e-5, 1e-6]);
        let what = format!("rms_norm seed {seed} rows {rows} width {width}");
        let (x, x64) = rng.tensor::<F>(rows * width, 2.0);
        let (w, w64) = rng.tensor::<F>(width, 1.0);
        let mut y = nan_buffer::<R, F>(client, rows * width);
        launch_rms_norm(client, &DeviceBuffer::upload(client, &x), &DeviceBuffer::upload(client, &w), &mut y, rows, width, eps as f32)
            .unwrap();
        // The kernel rounds the normalised row before the weight (as HF): two roundings.
        check_close(&what, &to_f64(&y.read(client)), &reference_rms_norm(&x64, &w64, width, eps), 2.0 * F::TOLERANCE);

        // Fused residual add: h += delta, then the norm of the (rounded) new h.
        let (delta, delta64) = rng.tensor::<F>(rows * width, 1.0);
        let mut h = DeviceBuffer::upload(client, &x);
        let mut y = nan_buffer::<R, F>(client, rows * width);
        launch_add_rms_norm(
            client,
            &mut h,
            &DeviceBuffer::upload(client, &delta),
            &DeviceBuffer::upload(client, &w),
            &mut y,
            rows,
            width,
            eps as f32,
        )
        .unwrap();
        let sum: Vec<f64> = x64.iter().zip(&delta64).map(|(a, b)| a + b).collect();
        let h_out = to_f64(&h.read(client));
        check_close(&format!("add_rms_norm (h) {what}"), &h_out, &sum, F::TOLERANCE);
        // Normalised from the stored h (what the kernel and HF normalise).
        check_close(
            &format!("add_rms_norm (y) {what}"),
            &to_f64(&y.read(client)),
            &reference_rms_norm(&h_out, &w64, width, eps),
            2.0 * F::TOLERANCE,
        );
    }
}

/// Qwen3 q_norm / k_norm in place on the q and k heads of a fused qkv buffer.
pub fn rms_norm_heads<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..6u64 {
        let rng = &mut Rng::new(2100 + seed);
        let tokens = rng.range(1, 9) as usize;
        let kv = rng.range(1, 3);
        let hq = kv * rng.range(1, 4);
        let d = rng.pick(&[8, 64, 128, 36]);
        let total = hq + 2 * kv;
        let what = format!("rms_norm_heads seed {seed} tokens {tokens} hq {hq} kv {kv} d {d}");
        let (qkv, qkv64) = rng.tensor::<F>(tokens * (total * d) as usize, 1.5);
        let (wq, wq64) = rng.tensor::<F>(d as usize, 1.0);
        let (wk, wk64) = rng.tensor::<F>(d as usize, 1.0);
        let q_view = HeadView::slice(total, 0, hq, d);
        let k_view = HeadView::slice(total, hq, kv, d);
        let mut buf = DeviceBuffer::upload(client, &qkv);
        launch_rms_norm_heads(client, &mut buf, q_view, &DeviceBuffer::upload(client, &wq), tokens, 1e-6).unwrap();
        launch_rms_norm_heads(client, &mut buf, k_view, &DeviceBuffer::upload(client, &wk), tokens, 1e-6).unwrap();
        let got = to_f64(&buf.read(client));
        let mut reference = qkv64.clone();
        for (view, w) in [(q_view, &wq64), (k_view, &wk64)] {
            for t in 0..tokens {
                for h in 0..view.heads as usize {
                    let at = view.index(t, h, 0);
                    let normed = reference_rms_norm_row(&qkv64[at..at + d as usize], w, 1e-6);
                    reference[at..at + d as usize].copy_from_slice(&normed);
                }
            }
        }
        // v heads untouched, bit for bit.
        let v_view = HeadView::slice(total, hq + kv, kv, d);
        for t in 0..tokens {
            let at = v_view.index(t, 0, 0);
            let len = (kv * d) as usize;
            assert_eq!(&got[at..at + len], &qkv64[at..at + len], "{what}: v changed");
        }
        check_close(&what, &got, &reference, 2.0 * F::TOLERANCE);
    }
}

/// HF's llama3 `inv_freq` evaluated in f64 (the f32 host computation must agree to f32 precision).
fn llama3_inv_freq_f64(rotary_dim: u32, theta: f64, factor: f64, low: f64, high: f64, old: f64) -> Vec<f64> {
    (0..rotary_dim)
        .step_by(2)
        .map(|i| {
            let f = 1.0 / theta.powf(i as f64 / rotary_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < old / high {
                f
            } else if wavelen > old / low {
                f / factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}

pub fn rope_inv_freq() {
    // Llama 3.1 8B: theta 500000, head_dim 128, factor 8, low 1, high 4, original 8192.
    let scaling = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 };
    let params = RopeParams { head_dim: 128, rotary_dim: 128, theta: 500000.0, scaling, max_positions: 16 };
    params.check().unwrap();
    let inv = params.inv_freq();
    let exact = llama3_inv_freq_f64(128, 500000.0, 8.0, 1.0, 4.0, 8192.0);
    assert_eq!(inv.len(), 64);
    assert_eq!(inv[0], 1.0);
    let err = relative_error(inv.iter().map(|&v| v as f64).zip(exact.iter().copied()));
    assert!(err < 1e-6, "llama3 inv_freq off by {err:e}");
    // The three regimes all occur at this configuration.
    let default = RopeParams { scaling: RopeScaling::Default, ..params }.inv_freq();
    assert!(inv.iter().zip(&default).any(|(a, b)| a == b));
    assert!(inv.iter().zip(&default).any(|(a, b)| (a * 8.0 - b).abs() <= 1e-6 * b));
    assert!(inv.iter().zip(&default).any(|(a, b)| a < b && a * 8.0 > b * 1.0001));
    let table = params.cos_sin_table();
    assert_eq!(table.len(), 16 * 128);
    assert_eq!((table[0], table[64]), (1.0, 0.0));
    let rounded = params.cos_sin_table_bf16();
    assert!(rounded.iter().zip(&table).all(|(r, t)| (r - t).abs() <= t.abs() / 256.0 && half::bf16::from_f32(*r).to_f32() == *r));
    assert!((table[128] - 1f32.cos()).abs() < 1e-7 && (table[128 + 64] - 1f32.sin()).abs() < 1e-7);
    // Partial rotary: the frequencies follow rotary_dim, not head_dim.
    let partial = RopeParams { rotary_dim: 32, scaling: RopeScaling::Default, theta: 10000.0, ..params };
    assert_eq!(partial.inv_freq().len(), 16);
    assert!((partial.inv_freq()[1] as f64 - 10000f64.powf(-2.0 / 32.0)).abs() < 1e-7);
}

pub fn rope<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..8u64 {
        let rng = &mut Rng::new(3000 + seed);
        let tokens = rng.range(1, 12) as usize;
        let kv = rng.range(1, 3);
        let hq = kv * rng.range(1, 3);
        let d = rng.pick(&[8, 64, 128, 96]);
        let rotary_dim = if seed % 3 == 2 { (d / 2) & !1 } else { d };
        let scaling = if seed % 2 == 0 {
            RopeScaling::Default
        } else {
            RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64 }
        };
        let max_positions = rng.range(8, 400);
        let params = RopeParams { head_dim: d, rotary_dim, theta: rng.pick(&[10000.0, 500000.0, 1000000.0]), scaling, max_positions };
        let what = format!("rope seed {seed} tokens {tokens} hq {hq} kv {kv} {params:?}");
        // Positions anywhere in the table, plus one past it (left unrotated) now and then.
        let positions: Vec<i32> = (0..tokens)
            .map(|t| if t == 0 && seed % 4 == 3 { max_positions as i32 + 1 } else { rng.range(0, max_positions - 1) as i32 })
            .collect();
        let total = hq + 2 * kv;
        let (qkv, qkv64) = rng.tensor::<F>(tokens * (total * d) as usize, 1.0);
        let q_view = HeadView::slice(total, 0, hq, d);
        let k_view = HeadView::slice(total, hq, kv, d);
        let table = DeviceBuffer::upload(client, &params.cos_sin_table());
        let pos = DeviceBuffer::upload(client, &positions);
        let mut buf = DeviceBuffer::upload(client, &qkv);
        launch_rope(client, &mut buf, q_view, &pos, &table, &params, tokens).unwrap();
        launch_rope(client, &mut buf, k_view, &pos, &table, &params, tokens).unwrap();
        let got = to_f64(&buf.read(client));
        let mut reference = qkv64.clone();
        let inv = params.inv_freq();
        reference_rope(&mut reference, q_view, &positions, &inv, max_positions);
        reference_rope(&mut reference, k_view, &positions, &inv, max_positions);
        // Everything the rotation must not touch is bit-identical: v, dims past rotary_dim, and
        // tokens past the table.
        for t in 0..tokens {
            for h in 0..total as usize {
                let rotated = h < (hq + kv) as usize && (positions[t] as u32) < max_positions;
                let lo = if rotated { rotary_dim as usize } else { 0 };
                let at = t * (total * d) as usize + h * d as usize;
                assert_eq!(&got[at + lo..at + d as usize], &qkv64[at + lo..at + d as usize], "{what}: token {t} head {h} changed");
            }
        }
        check_close(&what, &got, &reference, 2.0 * F::TOLERANCE);
    }
}

pub fn silu_mul<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..4u64 {
        let rng = &mut Rng::new(4000 + seed);
        let tokens = rng.range(1, 17) as usize;
        let inter = rng.pick(&[1, 5, 64, 300, 1000]) as usize;
        let (gu, gu64) = rng.tensor::<F>(tokens * 2 * inter, 4.0);
        let mut out = nan_buffer::<R, F>(client, tokens * inter);
        launch_silu_mul(client, &DeviceBuffer::upload(client, &gu), &mut out, tokens, inter).unwrap();
        let what = format!("silu_mul seed {seed} tokens {tokens} inter {inter}");
        check_close(&what, &to_f64(&out.read(client)), &reference_silu_mul(&gu64, tokens, inter), 2.0 * F::TOLERANCE);
    }
}

pub fn add_and_gather<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..4u64 {
        let rng = &mut Rng::new(5000 + seed);
        let len = rng.pick(&[1, 255, 257, 1000, 4099]) as usize;
        let (a, a64) = rng.tensor::<F>(len, 1.0);
        let (b, b64) = rng.tensor::<F>(len, 1.0);
        let sum: Vec<f64> = a64.iter().zip(&b64).map(|(x, y)| x + y).collect();
        let (da, db) = (DeviceBuffer::upload(client, &a), DeviceBuffer::upload(client, &b));
        let mut out = nan_buffer::<R, F>(client, len);
        launch_add(client, &da, &db, &mut out).unwrap();
        check_close(&format!("add seed {seed} len {len}"), &to_f64(&out.read(client)), &sum, F::TOLERANCE);
        let mut y = DeviceBuffer::upload(client, &a);
        launch_add_inplace(client, &mut y, &db).unwrap();
        check_close(&format!("add_inplace seed {seed} len {len}"), &to_f64(&y.read(client)), &sum, F::TOLERANCE);

        // Embedding lookup (one id past the vocabulary gives a zero row) and row selection.
        let vocab = rng.range(1, 300) as usize;
        let hidden = rng.pick(&[1, 7, 128, 130]) as usize;
        let (table, table64) = rng.tensor::<F>(vocab * hidden, 1.0);
        let tokens = rng.range(1, 20) as usize;
        let ids: Vec<u32> = (0..tokens).map(|t| if t == 1 { vocab as u32 + seed as u32 } else { rng.range(0, vocab as u32 - 1) }).collect();
        let mut emb = nan_buffer::<R, F>(client, tokens * hidden);
        launch_embedding_lookup(
            client,
            &DeviceBuffer::upload(client, &table),
            &DeviceBuffer::upload(client, &ids),
            &mut emb,
            vocab,
            hidden,
        )
        .unwrap();
        let got = to_f64(&emb.read(client));
        assert_eq!(got, reference_gather_rows(&table64, &ids, vocab, hidden), "embedding seed {seed}");
        let picks: Vec<u32> = (0..rng.range(1, 5)).map(|_| rng.range(0, tokens as u32 - 1)).collect();
        let mut sel = nan_buffer::<R, F>(client, picks.len() * hidden);
        launch_gather_rows(client, &emb, &DeviceBuffer::upload(client, &picks), &mut sel, tokens, hidden).unwrap();
        assert_eq!(to_f64(&sel.read(client)), reference_gather_rows(&got, &picks, tokens, hidden), "gather seed {seed}");
    }
}

/// Mixed prefill / decode batches over shuffled pages: kernel A writes the new tokens' k/v from
/// the fused qkv buffer, kernel B attends; the cache is NaN wherever nothing was written, so a
/// read past a sequence's positions fails the check.
pub fn attention<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..10u64 {
        let rng = &mut Rng::new(6000 + seed);
        let kv = rng.range(1, 2);
        let hq = kv * rng.pick(&[1, 3, 4]);
        let d = [6, 8, 64, 80, 128][seed as usize % 5];
        let page_size = rng.pick(&[1, 4, 16]);
        let num_seqs = rng.range(1, 4) as usize;
        // (cached, new): decode steps (1 new), prefill chunks with or without a cached prefix.
        let lens: Vec<(u32, u32)> = (0..num_seqs)
            .map(|_| match rng.range(0, 2) {
                0 => (rng.range(0, 70), 1),
                1 => (0, rng.range(1, 24)),
                _ => (rng.range(1, 40), rng.range(2, 12)),
            })
            .collect();
        let pages_needed: Vec<u32> = lens.iter().map(|(c, n)| (c + n).div_ceil(page_size)).collect();
        let num_pages = pages_needed.iter().sum::<u32>() + rng.range(0, 3);
        let mut free: Vec<u32> = (0..num_pages).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.range(0, i as u32) as usize);
        }
        let max_pages = pages_needed.iter().copied().max().unwrap() + rng.range(0, 2);
        let seqs: Vec<SeqSlice> = lens
            .iter()
            .zip(&pages_needed)
            .map(|(&(cached, new_tokens), &np)| SeqSlice { pages: free.drain(..np as usize).collect(), cached, new_tokens })
            .collect();
        let shape = KvCacheShape { num_pages, page_size, kv_heads: kv, head_dim: d };
        let mut batch = AttentionBatch::new(&shape, max_pages, &seqs).unwrap();
        // Now and then a padding token (slot −1): attends like its sequence's first token, writes nothing.
        if seed % 3 == 1 {
            batch.slot_mapping.push(-1);
            batch.token_seq.push(0);
            batch.positions.push(0);
        }
        let tokens = batch.tokens();
        let what = format!("attention seed {seed} hq {hq} kv {kv} d {d} page {page_size} lens {lens:?} tokens {tokens}");

        // Full k/v of every sequence; the cached prefix goes into the cache up front.
        let row = (kv * d) as usize;
        let mut seq_k = Vec::new();
        let mut seq_v = Vec::new();
        let mut k_cache = vec![f64::NAN; shape.elements()];
        let mut v_cache = vec![f64::NAN; shape.elements()];
        for seq in &seqs {
            let len = (seq.cached + seq.new_tokens) as usize;
            let (k, v) = (rng.tensor::<F>(len * row, 1.0).1, rng.tensor::<F>(len * row, 1.0).1);
            for p in 0..seq.cached as usize {
                let slot = (seq.pages[p / page_size as usize] * page_size) as usize + p % page_size as usize;
                k_cache[slot * row..(slot + 1) * row].copy_from_slice(&k[p * row..(p + 1) * row]);
                v_cache[slot * row..(slot + 1) * row].copy_from_slice(&v[p * row..(p + 1) * row]);
            }
            seq_k.push(k);
            seq_v.push(v);
        }
        // The fused qkv buffer of the new tokens: q random, k/v from the sequences' rows.
        let total = hq + 2 * kv;
        let (q_view, k_view, v_view) =
            (HeadView::slice(total, 0, hq, d), HeadView::slice(total, hq, kv, d), HeadView::slice(total, hq + kv, kv, d));
        let (mut qkv64, mut q64) = (rng.tensor::<F>(tokens * (total * d) as usize, 1.0).1, vec![0.0; tokens * (hq * d) as usize]);
        for t in 0..tokens {
            let (s, p) = (batch.token_seq[t] as usize, batch.positions[t] as usize);
            for c in 0..row {
                // A padding token carries junk k/v that must not reach the cache.
                let junk = batch.slot_mapping[t] < 0;
                qkv64[k_view.index(t, 0, c)] = if junk { 99.0 } else { seq_k[s][p * row + c] };
                qkv64[v_view.index(t, 0, c)] = if junk { -99.0 } else { seq_v[s][p * row + c] };
            }
            for c in 0..(hq * d) as usize {
                q64[t * (hq * d) as usize + c] = qkv64[q_view.index(t, 0, c)];
            }
        }
        let qkv: Vec<F> = qkv64.iter().map(|&v| F::round_from(v)).collect();
        let to_f = |v: &[f64]| -> Vec<F> { v.iter().map(|&x| F::round_from(x)).collect() };
        let mut cache =
            PagedKvCache::new(shape, DeviceBuffer::upload(client, &to_f(&k_cache)), DeviceBuffer::upload(client, &to_f(&v_cache))).unwrap();
        let dev_batch = batch.upload(client);
        let qkv_buf = DeviceBuffer::upload(client, &qkv);
        launch_kv_write(client, &qkv_buf, k_view, &qkv_buf, v_view, &mut cache, &dev_batch, tokens).unwrap();
        let mut out = nan_buffer::<R, F>(client, tokens * (hq * d) as usize);
        let scale = 1.0 / (d as f64).sqrt();
        launch_attention(client, &qkv_buf, q_view, &cache, &dev_batch, &mut out, tokens, scale as f32).unwrap();

        // Kernel A: the new tokens' slots hold their k/v, every other slot is as it was.
        for (seq, (k, v)) in seqs.iter().zip(seq_k.iter().zip(&seq_v)) {
            for p in seq.cached as usize..(seq.cached + seq.new_tokens) as usize {
                let slot = (seq.pages[p / page_size as usize] * page_size) as usize + p % page_size as usize;
                k_cache[slot * row..(slot + 1) * row].copy_from_slice(&k[p * row..(p + 1) * row]);
                v_cache[slot * row..(slot + 1) * row].copy_from_slice(&v[p * row..(p + 1) * row]);
            }
        }
        let same = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| x == y || (x.is_nan() && y.is_nan()));
        assert!(same(&to_f64(&cache.k.read(client)), &k_cache), "{what}: k cache");
        assert!(same(&to_f64(&cache.v.read(client)), &v_cache), "{what}: v cache");

        let reference =
            reference_attention(&q64, &seq_k, &seq_v, &batch.token_seq, &batch.positions, hq as usize, kv as usize, d as usize, scale);
        check_close(&what, &to_f64(&out.read(client)), &reference, 10.0 * F::TOLERANCE);

        // Split over the sequence (chunks of one key, of a few, and more chunks than keys).
        let splits = rng.pick(&[2, 3, 7, 40]);
        let mut split_out = nan_buffer::<R, F>(client, tokens * (hq * d) as usize);
        let mut partial = DeviceBuffer::upload(client, &vec![f32::NAN; split_partial_len(tokens, hq, d, splits)]);
        launch_attention_split(client, &qkv_buf, q_view, &cache, &dev_batch, &mut split_out, tokens, scale as f32, &mut partial, splits)
            .unwrap();
        check_close(&format!("{what} split {splits}"), &to_f64(&split_out.read(client)), &reference, 10.0 * F::TOLERANCE);
    }
}

pub fn argmax<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    for seed in 0..4u64 {
        let rng = &mut Rng::new(7000 + seed);
        let rows = rng.range(1, 6) as usize;
        let vocab = rng.pick(&[1, 2, 255, 257, 1000, 5003]) as usize;
        let (mut logits, _) = rng.tensor::<F>(rows * vocab, 8.0);
        for r in 0..rows {
            // Ties resolve to the first index; NaN is never chosen.
            let (i, j) = (rng.range(0, vocab as u32 - 1) as usize, rng.range(0, vocab as u32 - 1) as usize);
            logits[r * vocab + i] = F::round_from(100.0);
            logits[r * vocab + j] = F::round_from(100.0);
            if vocab > 2 {
                logits[r * vocab + rng.range(0, vocab as u32 - 1) as usize] = F::round_from(f64::NAN);
            }
        }
        if seed == 0 {
            for v in &mut logits[..vocab] {
                *v = F::round_from(f64::NEG_INFINITY);
            }
        }
        let logits64 = to_f64(&logits);
        let mut out = DeviceBuffer::upload(client, &vec![-7i32; rows]);
        launch_argmax(client, &DeviceBuffer::upload(client, &logits), &mut out, rows, vocab).unwrap();
        assert_eq!(out.read(client), reference_argmax(&logits64, vocab), "argmax seed {seed} rows {rows} vocab {vocab}");
    }
}

/// Launches of more than 65535 cubes (the grid spills into a second dimension).
pub fn large_grids<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    let rng = &mut Rng::new(8000);
    // 65 600 blocks of 256 elements, plus a partial one.
    let len = 256 * 65_600 + 7;
    let (a, a64) = rng.tensor::<F>(len, 1.0);
    let (b, b64) = rng.tensor::<F>(len, 1.0);
    let mut y = DeviceBuffer::upload(client, &a);
    launch_add_inplace(client, &mut y, &DeviceBuffer::upload(client, &b)).unwrap();
    let sum: Vec<f64> = a64.iter().zip(&b64).map(|(x, y)| x + y).collect();
    check_close("add over a spilled grid", &to_f64(&y.read(client)), &sum, F::TOLERANCE);
    // 70 000 per-head rows.
    let (tokens, heads, d) = (35_000usize, 2u32, 4u32);
    let (x, x64) = rng.tensor::<F>(tokens * (heads * d) as usize, 1.0);
    let (w, w64) = rng.tensor::<F>(d as usize, 1.0);
    let mut buf = DeviceBuffer::upload(client, &x);
    launch_rms_norm_heads(client, &mut buf, HeadView::contiguous(heads, d), &DeviceBuffer::upload(client, &w), tokens, 1e-6).unwrap();
    check_close(
        "rms_norm_heads over a spilled grid",
        &to_f64(&buf.read(client)),
        &reference_rms_norm(&x64, &w64, d as usize, 1e-6),
        2.0 * F::TOLERANCE,
    );
}

/// Bad shapes are errors, never panics or out-of-bounds launches.
pub fn rejects_bad_input<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    let one = F::round_from(1.0);
    let buf = |n: usize| DeviceBuffer::upload(client, &vec![one; n]);
    let mut y = buf(6);
    assert_eq!(
        launch_matmul(client, &buf(5), &buf(6), &mut y, 2, 3, 2, None).unwrap_err(),
        OpError::BufferSize { name: "x", expected: 4, actual: 5 }
    );
    let bad_cfg = MatmulConfig { block_m: 8, block_n: 8, block_k: 8, thread_m: 3, thread_n: 1 };
    assert!(matches!(launch_matmul(client, &buf(4), &buf(6), &mut y, 2, 3, 2, Some(bad_cfg)), Err(OpError::Shape(_))));
    assert!(matches!(launch_rms_norm(client, &buf(6), &buf(3), &mut y, 2, 3, -1.0), Err(OpError::Shape(_))));
    assert!(matches!(launch_rms_norm(client, &buf(6), &buf(2), &mut y, 2, 3, 1e-6), Err(OpError::BufferSize { name: "weight", .. })));
    // A view reaching past its buffer, and heads overlapping the next token.
    let mut x = buf(20);
    assert!(matches!(
        launch_rms_norm_heads(client, &mut x, HeadView::slice(4, 2, 2, 3), &buf(3), 2, 1e-6),
        Err(OpError::BufferSize { .. })
    ));
    assert!(matches!(
        launch_rms_norm_heads(client, &mut x, HeadView { offset: 4, token_stride: 6, heads: 1, head_dim: 3 }, &buf(3), 2, 1e-6),
        Err(OpError::Shape(_))
    ));
    let params = RopeParams { head_dim: 4, rotary_dim: 3, theta: 10000.0, scaling: RopeScaling::Default, max_positions: 4 };
    let table = DeviceBuffer::upload(client, &[0.0f32; 12]);
    let pos = DeviceBuffer::upload(client, &[0i32; 2]);
    assert!(matches!(launch_rope(client, &mut x, HeadView::contiguous(2, 4), &pos, &table, &params, 2), Err(OpError::Shape(_))));
    let params = RopeParams { rotary_dim: 4, ..params };
    assert!(matches!(launch_rope(client, &mut x, HeadView::contiguous(2, 4), &pos, &table, &params, 2), Err(OpError::BufferSize { .. })));
    assert!(matches!(launch_silu_mul(client, &buf(6), &mut y, 2, 3), Err(OpError::BufferSize { name: "gate_up", .. })));
    assert!(matches!(launch_add_inplace(client, &mut y, &buf(5)), Err(OpError::BufferSize { .. })));
    let mut out = DeviceBuffer::upload(client, &[0i32; 2]);
    assert!(matches!(launch_argmax(client, &buf(6), &mut out, 3, 2), Err(OpError::BufferSize { .. })));
    assert!(matches!(launch_argmax(client, &buf(0), &mut out, 2, 0), Err(OpError::Shape(_))));

    let shape = KvCacheShape { num_pages: 2, page_size: 4, kv_heads: 2, head_dim: 4 };
    let seq = |pages: Vec<u32>, cached, new_tokens| SeqSlice { pages, cached, new_tokens };
    assert!(matches!(AttentionBatch::new(&shape, 2, &[seq(vec![0, 2], 0, 5)]), Err(OpError::Shape(_))));
    assert!(matches!(AttentionBatch::new(&shape, 2, &[seq(vec![0], 3, 2)]), Err(OpError::Shape(_))));
    assert!(matches!(AttentionBatch::new(&shape, 1, &[seq(vec![0, 1], 0, 5)]), Err(OpError::Shape(_))));
    let batch = AttentionBatch::new(&shape, 2, &[seq(vec![1, 0], 3, 2)]).unwrap();
    assert_eq!(batch.slot_mapping, vec![7, 0]);
    assert_eq!(batch.positions, vec![3, 4]);
    let dev = batch.upload(client);
    let cache = PagedKvCache::<F>::empty(client, shape).unwrap();
    let mut o = buf(2 * 3 * 4);
    // 3 q heads over 2 kv heads is not GQA.
    let qkv = buf(2 * 7 * 4);
    assert!(matches!(launch_attention(client, &qkv, HeadView::slice(7, 0, 3, 4), &cache, &dev, &mut o, 2, 0.5), Err(OpError::Shape(_))));
    assert!(PagedKvCache::new(shape, buf(3), buf(64)).is_err());

    // Device metadata the host cannot check (it is written by the executor): slots past the
    // cache, pages past the cache, positions past the block table, sequences past the table.
    // Nothing is read or written out of bounds: no write lands, and every output is finite.
    let batch = lorac_runtime::ops::attention::DeviceAttentionBatch {
        slot_mapping: DeviceBuffer::upload(client, &[8i32, 1000, -5, 3]),
        token_seq: DeviceBuffer::upload(client, &[0u32, 1, 0, 7]),
        positions: DeviceBuffer::upload(client, &[100i32, 2, -1, 0]),
        block_tables: DeviceBuffer::upload(client, &[0u32, 1, 9, 0]),
        max_pages_per_seq: 2,
    };
    let k0: Vec<F> = (0..shape.elements()).map(|i| F::round_from(((i % 7) as f64 - 3.0) / 4.0)).collect();
    let mut cache = PagedKvCache::new(shape, DeviceBuffer::upload(client, &k0), DeviceBuffer::upload(client, &k0)).unwrap();
    let qkv = buf(4 * 6 * 4);
    let (qv, kv, vv) = (HeadView::slice(6, 0, 2, 4), HeadView::slice(6, 2, 2, 4), HeadView::slice(6, 4, 2, 4));
    let mut written = cache.clone();
    launch_kv_write(client, &qkv, kv, &qkv, vv, &mut written, &batch, 4).unwrap();
    // Only token 3 (slot 3) is in range.
    let mut expect = to_f64(&k0);
    for c in 0..8 {
        expect[3 * 8 + c] = 1.0;
    }
    assert_eq!(to_f64(&written.k.read(client)), expect);
    cache = written;
    let mut o = nan_buffer::<R, F>(client, 4 * 2 * 4);
    launch_attention(client, &qkv, qv, &cache, &batch, &mut o, 4, 0.5).unwrap();
    let got = to_f64(&o.read(client));
    assert!(got.iter().all(|v| v.is_finite()), "malformed metadata: {got:?}");
    // Token 2 (negative position) and token 3 (sequence past the table) attend to nothing.
    assert!(got[16..].iter().all(|v| *v == 0.0), "{got:?}");
}

/// Mean microseconds per launch of `f` over `iters` back-to-back launches (after a warm-up).
fn time_us<R: Runtime>(client: &ComputeClient<R>, iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    cubecl::future::block_on(client.sync()).expect("device sync");
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    cubecl::future::block_on(client.sync()).expect("device sync");
    t0.elapsed().as_secs_f64() * 1e6 / iters as f64
}

/// Speed of every op at Llama-3.1-8B shapes (H 4096, 32/8 heads of 128, I 14336, V 128256) on
/// uninitialised buffers. Ignored by default; on the GPU:
/// `cargo test -p lorac-runtime --features cuda-tests --test ops -- --ignored --nocapture cuda_bf16::op_speed`
pub fn op_speed<R: Runtime, F: StorageElem>(client: &ComputeClient<R>) {
    let e = size_of::<F>() as f64;
    let (h, hq, hkv, d, inter, vocab) = (4096usize, 32u32, 8u32, 128u32, 14336usize, 128256usize);
    println!("# {} op speed (us per launch)", F::NAME);
    for &(m, n, k, name) in &[
        (1, 6144, h, "qkv"),
        (1, 2 * inter, h, "gate_up"),
        (1, h, inter, "down"),
        (1, vocab, h, "lm_head"),
        (8, 6144, h, "qkv"),
        (8, 2 * inter, h, "gate_up"),
        (512, 6144, h, "qkv"),
        (512, 2 * inter, h, "gate_up"),
        (512, h, inter, "down"),
        (2048, 2 * inter, h, "gate_up"),
    ] {
        let (x, w) = (DeviceBuffer::<F>::empty(client, m * k), DeviceBuffer::<F>::empty(client, n * k));
        let mut y = DeviceBuffer::<F>::empty(client, m * n);
        let us = time_us(client, 20, || launch_matmul(client, &x, &w, &mut y, m, n, k, None).unwrap());
        let gbs = (m * k + n * k + m * n) as f64 * e / us / 1e3;
        let tflops = 2.0 * (m * n * k) as f64 / us / 1e6;
        println!("matmul {name:8} m {m:5} n {n:6} k {k:5}: {us:9.1} us  {gbs:7.1} GB/s  {tflops:6.1} TFLOP/s");
    }
    let t = 2048usize;
    let (x, w) = (DeviceBuffer::<F>::empty(client, t * h), DeviceBuffer::<F>::empty(client, h));
    let mut y = DeviceBuffer::<F>::empty(client, t * h);
    let us = time_us(client, 50, || launch_rms_norm(client, &x, &w, &mut y, t, h, 1e-5).unwrap());
    println!("rms_norm T {t} H {h}: {us:.1} us  {:.1} GB/s", 2.0 * (t * h) as f64 * e / us / 1e3);
    let gu = DeviceBuffer::<F>::empty(client, t * 2 * inter);
    let mut act = DeviceBuffer::<F>::empty(client, t * inter);
    let us = time_us(client, 50, || launch_silu_mul(client, &gu, &mut act, t, inter).unwrap());
    println!("silu_mul T {t} I {inter}: {us:.1} us  {:.1} GB/s", 3.0 * (t * inter) as f64 * e / us / 1e3);
    let total = hq + 2 * hkv;
    let mut qkv = DeviceBuffer::<F>::empty(client, t * (total * d) as usize);
    let params = RopeParams { head_dim: d, rotary_dim: d, theta: 500000.0, scaling: RopeScaling::Default, max_positions: 8192 };
    let table = DeviceBuffer::upload(client, &params.cos_sin_table());
    let pos = DeviceBuffer::upload(client, &(0..t as i32).collect::<Vec<_>>());
    let q_view = HeadView::slice(total, 0, hq, d);
    let us = time_us(client, 50, || launch_rope(client, &mut qkv, q_view, &pos, &table, &params, t).unwrap());
    println!("rope q T {t}: {us:.1} us");
    let logits = DeviceBuffer::<F>::empty(client, 32 * vocab);
    let mut next = DeviceBuffer::<i32>::empty(client, 32);
    let us = time_us(client, 50, || launch_argmax(client, &logits, &mut next, 32, vocab).unwrap());
    println!("argmax 32 x {vocab}: {us:.1} us");
    // Attention: 32 decode sequences of 2048 cached tokens, then one 2048-token prefill.
    for (seqs, cached, new) in [(32u32, 2048u32, 1u32), (1, 0, 2048)] {
        let page_size = 16;
        let pages_per_seq = (cached + new).div_ceil(page_size);
        let shape = KvCacheShape { num_pages: seqs * pages_per_seq, page_size, kv_heads: hkv, head_dim: d };
        let slices: Vec<SeqSlice> = (0..seqs)
            .map(|s| SeqSlice { pages: (s * pages_per_seq..(s + 1) * pages_per_seq).collect(), cached, new_tokens: new })
            .collect();
        let batch = AttentionBatch::new(&shape, pages_per_seq, &slices).unwrap().upload(client);
        let tokens = (seqs * new) as usize;
        let mut cache = PagedKvCache::<F>::empty(client, shape).unwrap();
        let qkv = DeviceBuffer::upload(client, &vec![F::round_from(0.01); tokens * (total * d) as usize]);
        let mut out = DeviceBuffer::<F>::empty(client, tokens * (hq * d) as usize);
        let (k_view, v_view) = (HeadView::slice(total, hq, hkv, d), HeadView::slice(total, hq + hkv, hkv, d));
        let us_w = time_us(client, 20, || launch_kv_write(client, &qkv, k_view, &qkv, v_view, &mut cache, &batch, tokens).unwrap());
        let us = time_us(client, 5, || launch_attention(client, &qkv, q_view, &cache, &batch, &mut out, tokens, 0.088).unwrap());
        let kv_bytes = 2.0 * (seqs * (cached + new)) as f64 * (hkv * d) as f64 * e;
        println!(
            "attention {seqs} seqs cached {cached} new {new}: kv_write {us_w:.1} us, attention {us:.1} us ({:.1} GB/s of KV)",
            kv_bytes / us / 1e3
        );
    }
}

macro_rules! stamp_op_tests {
    ($module:ident, $runtime:ty, $elem:ty) => {
        mod $module {
            type Rt = $runtime;
            type E = $elem;
            fn client() -> cubecl::prelude::ComputeClient<Rt> {
                <Rt as cubecl::prelude::Runtime>::client(&Default::default())
            }
            #[test]
            fn matmul() {
                super::matmul::<Rt, E>(&client());
            }
            #[test]
            fn matmul_cubek() {
                super::matmul_cubek::<Rt, E>(&client());
            }
            #[test]
            fn rms_norm() {
                super::rms_norm::<Rt, E>(&client());
            }
            #[test]
            fn rms_norm_heads() {
                super::rms_norm_heads::<Rt, E>(&client());
            }
            #[test]
            fn rope() {
                super::rope::<Rt, E>(&client());
            }
            #[test]
            fn silu_mul() {
                super::silu_mul::<Rt, E>(&client());
            }
            #[test]
            fn add_and_gather() {
                super::add_and_gather::<Rt, E>(&client());
            }
            #[test]
            fn attention() {
                super::attention::<Rt, E>(&client());
            }
            #[test]
            fn argmax() {
                super::argmax::<Rt, E>(&client());
            }
            #[test]
            fn rejects_bad_input() {
                super::rejects_bad_input::<Rt, E>(&client());
            }
            #[test]
            fn large_grids() {
                super::large_grids::<Rt, E>(&client());
            }
            #[test]
            #[ignore = "GPU benchmark"]
            fn op_speed() {
                super::op_speed::<Rt, E>(&client());
            }
        }
    };
}

#[test]
fn rope_inv_freq_host() {
    rope_inv_freq();
}

// bf16 storage is not available through wgpu/lavapipe, so wgpu runs f32 only.
stamp_op_tests!(wgpu_f32, cubecl::wgpu::WgpuRuntime, f32);
#[cfg(feature = "cuda-tests")]
stamp_op_tests!(cuda_f32, cubecl::cuda::CudaRuntime, f32);
#[cfg(feature = "cuda-tests")]
stamp_op_tests!(cuda_bf16, cubecl::cuda::CudaRuntime, half::bf16);
