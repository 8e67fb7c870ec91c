//! Property tests of the executor against an independent f64 reference.

use std::collections::BTreeMap;
use std::path::Path;

use pma_format::{Checkpoint, Dtype, FloatDtype, TensorSpec};
use pma_merge::{execute, ExecOptions, MergeConfig, MergeInput, MergePlan, NoProgress, Weights};
use proptest::prelude::*;

fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F64 => v
            .iter()
            .flat_map(|x| (*x as f64 * 1.000_000_1).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
        _ => unreachable!(),
    }
}

fn decode(dtype: Dtype, b: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f64())
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f64())
            .collect(),
        _ => unreachable!(),
    }
}

/// Nearest representable bf16 to x, ties to even, by brute force over neighbours.
fn nearest_bf16(x: f64) -> u16 {
    let c = half::bf16::from_f64(x).to_bits() as i32;
    let mut best = (f64::INFINITY, 0u16);
    for d in -2..=2 {
        let cand = (c + d) as u16;
        let v = half::bf16::from_bits(cand).to_f64();
        if !v.is_finite() {
            continue;
        }
        let err = (v - x).abs();
        if err < best.0 || (err == best.0 && cand % 2 == 0) {
            best = (err, cand);
        }
    }
    best.1
}

fn write(dir: &Path, dtype: Dtype, shape: &[u64], values: &[f32]) {
    std::fs::create_dir_all(dir).unwrap();
    let bytes = encode(dtype, values);
    let spec = TensorSpec {
        name: "t".into(),
        dtype,
        shape: shape.to_vec(),
    };
    pma_format::write_safetensors(
        &dir.join("model.safetensors"),
        &[(spec, &bytes)],
        &BTreeMap::new(),
    )
    .unwrap();
}

fn run(
    dirs: &[std::path::PathBuf],
    weights: Weights,
    out_dtype: FloatDtype,
    threads: usize,
    out: &Path,
) -> Vec<u8> {
    let inputs = dirs
        .iter()
        .map(|d| MergeInput {
            step: None,
            checkpoint: Checkpoint::open(d).unwrap().into(),
        })
        .collect();
    let config = MergeConfig {
        out_dtype: Some(out_dtype),
        ..Default::default()
    };
    let plan = MergePlan::build(inputs, weights, config).unwrap();
    execute(
        &plan,
        out,
        &ExecOptions {
            threads,
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap();
    let c = Checkpoint::open(out).unwrap();
    c.bytes(&c.tensors()[0]).to_vec()
}

fn dtype_strategy() -> impl Strategy<Value = Dtype> {
    prop_oneof![
        Just(Dtype::BF16),
        Just(Dtype::F16),
        Just(Dtype::F32),
        Just(Dtype::F64)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn matches_f64_reference_for_any_dtypes_weights_and_threads(
        n_elems in 1usize..3000,
        dtypes in proptest::collection::vec(dtype_strategy(), 1..5),
        seed in any::<u64>(),
        raw_weights in proptest::collection::vec(-1.0f64..2.0, 4),
    ) {
        let d = tempfile::tempdir().unwrap();
        let mut rng = seed;
        let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; (rng >> 11) as f32 / (1u64 << 53) as f32 * 8.0 - 4.0 };
        let mut dirs = Vec::new();
        let mut inputs_f64 = Vec::new();
        for (i, &dt) in dtypes.iter().enumerate() {
            let vals: Vec<f32> = (0..n_elems).map(|_| next()).collect();
            let dir = d.path().join(format!("c{i}"));
            write(&dir, dt, &[n_elems as u64], &vals);
            inputs_f64.push(decode(dt, &encode(dt, &vals)));
            dirs.push(dir);
        }
        let w: Vec<f64> = raw_weights[..dtypes.len()].to_vec();
        let reference: Vec<f64> = (0..n_elems)
            .map(|j| {
                let mut acc = 0.0f64;
                for (x, wi) in inputs_f64.iter().zip(&w) {
                    acc += wi * x[j];
                }
                acc
            })
            .collect();
        let f32_out = run(&dirs, Weights::explicit(w.clone(), false).unwrap(), FloatDtype::F32, 1, &d.path().join("o32"));
        let want32: Vec<u8> = reference.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect();
        prop_assert!(f32_out == want32);
        let bf_1 = run(&dirs, Weights::explicit(w.clone(), false).unwrap(), FloatDtype::BF16, 1, &d.path().join("b1"));
        let bf_3 = run(&dirs, Weights::explicit(w.clone(), false).unwrap(), FloatDtype::BF16, 3, &d.path().join("b3"));
        prop_assert!(bf_1 == bf_3, "thread count changed the bytes");
        let want_bf: Vec<u8> = reference.iter().flat_map(|v| nearest_bf16(*v).to_le_bytes()).collect();
        prop_assert!(bf_1 == want_bf);
    }

    #[test]
    fn weight_one_is_identity(n_elems in 1usize..2000, dt in dtype_strategy(), seed in any::<u32>()) {
        let d = tempfile::tempdir().unwrap();
        let vals: Vec<f32> = (0..n_elems).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) as f32 / 1e9) - 2.0).collect();
        let dir = d.path().join("c");
        write(&dir, dt, &[n_elems as u64], &vals);
        let out_dtype = match dt { Dtype::BF16 => FloatDtype::BF16, Dtype::F16 => FloatDtype::F16, Dtype::F32 => FloatDtype::F32, _ => FloatDtype::F64 };
        let got = run(std::slice::from_ref(&dir), Weights::sma(1).unwrap(), out_dtype, 2, &d.path().join("o"));
        // -0.0 would become +0.0 (0 + -0 = +0); the generator never produces -0.0.
        prop_assert!(got == encode(dt, &vals));
    }
}

/// Larger than one job, so the tensor is split across jobs and batches.
#[test]
fn multi_job_tensor_is_thread_invariant() {
    let d = tempfile::tempdir().unwrap();
    let n = (pma_merge::executor::JOB_ELEMS as usize) * 2 + 12345;
    let dirs: Vec<_> = (0..3)
        .map(|i| {
            let vals: Vec<f32> = (0..n)
                .map(|j| ((j * 31 + i * 7) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            let dir = d.path().join(format!("c{i}"));
            write(&dir, Dtype::BF16, &[n as u64], &vals);
            dir
        })
        .collect();
    let a = run(
        &dirs,
        Weights::ema(3, 0.3).unwrap(),
        FloatDtype::BF16,
        1,
        &d.path().join("a"),
    );
    let b = run(
        &dirs,
        Weights::ema(3, 0.3).unwrap(),
        FloatDtype::BF16,
        2,
        &d.path().join("b"),
    );
    let c = run(
        &dirs,
        Weights::ema(3, 0.3).unwrap(),
        FloatDtype::BF16,
        5,
        &d.path().join("c"),
    );
    assert!(a == b && b == c);
    assert_eq!(a.len(), n * 2);
}
