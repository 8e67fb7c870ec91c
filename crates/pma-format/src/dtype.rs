//! The dtype table: element sizes, which dtypes pma can average, and the exact f64 codecs.
//!
//! Merging reads every float element as f64 and writes the result with ONE rounding to nearest,
//! ties to even. f64 → f32 is a single IEEE rounding. For f16 and bf16 a direct conversion is easy
//! to get subtly wrong (the `half` crate's `from_f64` truncates the low mantissa word before
//! rounding, which breaks ties), so we go through f32 with *round-to-odd*: a value rounded to odd
//! at 24 bits and then to nearest-even at 8 or 11 bits is the correctly rounded value, because the
//! odd sticky bit can never fake or hide a tie. This is exactly what
//! `shared/tools/reference_merge.py` does, so results agree bit for bit.

use safetensors::Dtype;
use serde::de::IntoDeserializer;
use serde::Deserialize;

/// Parses a safetensors dtype string (`"BF16"`, `"F32"`, ...). `None` if the spec has no such dtype.
pub fn parse_dtype(s: &str) -> Option<Dtype> {
    let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> = s.into_deserializer();
    Dtype::deserialize(de).ok()
}

/// The spec name of a dtype, as written in headers.
pub fn dtype_name(dtype: Dtype) -> String {
    // Dtype's Debug output is its spec name (`BF16`, `F8_E4M3`, ...).
    format!("{dtype:?}")
}

/// Storage bits per element.
pub fn dtype_bits(dtype: Dtype) -> u64 {
    dtype.bitsize() as u64
}

/// The float dtypes pma averages. Everything else is either copied (integers, BOOL) or rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FloatDtype {
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
    /// IEEE double.
    F64,
}

/// How a tensor of a given dtype takes part in a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeClass {
    /// Averaged in f64.
    Float(FloatDtype),
    /// Integers and BOOL: must be bit-identical across inputs, then copied.
    Exact,
    /// F8 variants, sub-byte floats, complex: no merge semantics we can stand behind.
    Unsupported,
}

/// Classifies a dtype for merging.
pub fn classify(dtype: Dtype) -> DtypeClass {
    match dtype {
        Dtype::BF16 => DtypeClass::Float(FloatDtype::BF16),
        Dtype::F16 => DtypeClass::Float(FloatDtype::F16),
        Dtype::F32 => DtypeClass::Float(FloatDtype::F32),
        Dtype::F64 => DtypeClass::Float(FloatDtype::F64),
        Dtype::BOOL
        | Dtype::U8
        | Dtype::I8
        | Dtype::I16
        | Dtype::U16
        | Dtype::I32
        | Dtype::U32
        | Dtype::I64
        | Dtype::U64 => DtypeClass::Exact,
        _ => DtypeClass::Unsupported,
    }
}

impl FloatDtype {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            FloatDtype::BF16 | FloatDtype::F16 => 2,
            FloatDtype::F32 => 4,
            FloatDtype::F64 => 8,
        }
    }

    /// The safetensors dtype.
    pub const fn dtype(self) -> Dtype {
        match self {
            FloatDtype::BF16 => Dtype::BF16,
            FloatDtype::F16 => Dtype::F16,
            FloatDtype::F32 => Dtype::F32,
            FloatDtype::F64 => Dtype::F64,
        }
    }

    /// Parses the user-facing spelling (`bf16`, `f16`, `f32`, `f64`, any case).
    pub fn parse(s: &str) -> Option<FloatDtype> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Some(FloatDtype::BF16),
            "f16" | "fp16" | "float16" => Some(FloatDtype::F16),
            "f32" | "fp32" | "float32" => Some(FloatDtype::F32),
            "f64" | "fp64" | "float64" => Some(FloatDtype::F64),
            _ => None,
        }
    }

    /// Lowercase user-facing name.
    pub const fn name(self) -> &'static str {
        match self {
            FloatDtype::BF16 => "bf16",
            FloatDtype::F16 => "f16",
            FloatDtype::F32 => "f32",
            FloatDtype::F64 => "f64",
        }
    }

    /// The `torch_dtype` string HF configs use.
    pub const fn torch_name(self) -> &'static str {
        match self {
            FloatDtype::BF16 => "bfloat16",
            FloatDtype::F16 => "float16",
            FloatDtype::F32 => "float32",
            FloatDtype::F64 => "float64",
        }
    }
}

/// Decodes little-endian elements of `dtype` from `bytes` and calls `f(index, value)` on each.
///
/// `bytes.len()` must be a multiple of the element size; a trailing partial element is ignored.
#[inline]
pub fn for_each_f64(dtype: FloatDtype, bytes: &[u8], mut f: impl FnMut(usize, f64)) {
    match dtype {
        FloatDtype::BF16 => {
            for (i, c) in bytes.chunks_exact(2).enumerate() {
                let bits = (u16::from_le_bytes([c[0], c[1]]) as u32) << 16;
                f(i, f32::from_bits(bits) as f64);
            }
        }
        FloatDtype::F16 => {
            for (i, c) in bytes.chunks_exact(2).enumerate() {
                f(
                    i,
                    half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64(),
                );
            }
        }
        FloatDtype::F32 => {
            for (i, c) in bytes.chunks_exact(4).enumerate() {
                f(i, f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64);
            }
        }
        FloatDtype::F64 => {
            for (i, c) in bytes.chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f(i, f64::from_le_bytes(b));
            }
        }
    }
}

/// `acc[i] += w * x[i]` for every element of `bytes` (no fused multiply-add: two roundings,
/// exactly as the reference does it).
#[inline]
pub fn accumulate(dtype: FloatDtype, bytes: &[u8], w: f64, acc: &mut [f64]) {
    // Separate loops per dtype so each is a tight, auto-vectorisable loop.
    match dtype {
        FloatDtype::BF16 => {
            for (a, c) in acc.iter_mut().zip(bytes.chunks_exact(2)) {
                let x = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64;
                *a += w * x;
            }
        }
        FloatDtype::F16 => {
            for (a, c) in acc.iter_mut().zip(bytes.chunks_exact(2)) {
                let x = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32() as f64;
                *a += w * x;
            }
        }
        FloatDtype::F32 => {
            for (a, c) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
                *a += w * f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
            }
        }
        FloatDtype::F64 => {
            for (a, c) in acc.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                *a += w * f64::from_le_bytes(b);
            }
        }
    }
}

/// Elements processed together by [`weighted_sum`]: one accumulator register group.
const LANES: usize = 8;

/// `acc[j] = Σ_i w_i · x_i[j]` over all inputs, in input order, starting from +0.0.
///
/// This is the merge's inner loop. Each group of [`LANES`] elements is summed across all inputs
/// in registers before it is stored, so the accumulator never round-trips through memory per
/// input. The order of operations per element is exactly `((0 + w_1 x_1) + w_2 x_2) + …` with
/// separate multiply and add, so the result is bit-identical to calling [`accumulate`] once per
/// input. On x86-64 with AVX2 the same code is compiled a second time with AVX2 enabled (no FMA:
/// Rust never contracts `a + w * x` into a fused multiply-add) and chosen at run time.
pub fn weighted_sum(srcs: &[(FloatDtype, &[u8])], weights: &[f64], acc: &mut [f64]) {
    debug_assert_eq!(srcs.len(), weights.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 support was just checked.
            unsafe { weighted_sum_avx2(srcs, weights, acc) };
            return;
        }
    }
    weighted_sum_generic(srcs, weights, acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn weighted_sum_avx2(srcs: &[(FloatDtype, &[u8])], weights: &[f64], acc: &mut [f64]) {
    weighted_sum_generic(srcs, weights, acc)
}

#[inline(always)]
fn weighted_sum_generic(srcs: &[(FloatDtype, &[u8])], weights: &[f64], acc: &mut [f64]) {
    // Members of one dtype (the usual case) take a loop with no per-member dtype dispatch, so
    // the decode, multiply and add of a register group are straight-line vector code.
    if let Some(&(first, _)) = srcs.first() {
        if srcs.iter().all(|&(dt, _)| dt == first) {
            match first {
                FloatDtype::BF16 => {
                    return weighted_sum_uniform::<2>(srcs, weights, acc, |e| {
                        f32::from_bits((u16::from_le_bytes(e) as u32) << 16) as f64
                    })
                }
                FloatDtype::F32 => {
                    return weighted_sum_uniform::<4>(srcs, weights, acc, |e| {
                        f32::from_le_bytes(e) as f64
                    })
                }
                FloatDtype::F64 => {
                    return weighted_sum_uniform::<8>(srcs, weights, acc, f64::from_le_bytes)
                }
                // f16 decodes through `half`'s scalar conversion either way.
                FloatDtype::F16 => {}
            }
        }
    }
    weighted_sum_mixed(srcs, weights, acc);
}

/// Elements per register group of [`weighted_sum_uniform`]: eight AVX2 registers of f64. Each
/// register's adds form one dependency chain across the members, so eight chains (not four)
/// keep the adder busy while the next member's group is decoded (10-20% faster on a W8 block).
const UNIFORM_LANES: usize = 32;

/// [`weighted_sum`] for members that all have one dtype of `SZ` bytes, decoded by `decode`.
/// Same order of operations per element as [`weighted_sum_mixed`].
#[inline(always)]
fn weighted_sum_uniform<const SZ: usize>(
    srcs: &[(FloatDtype, &[u8])],
    weights: &[f64],
    acc: &mut [f64],
    decode: impl Fn([u8; SZ]) -> f64,
) {
    let n = acc.len();
    let full = n - n % UNIFORM_LANES;
    for (g, out) in acc[..full].chunks_exact_mut(UNIFORM_LANES).enumerate() {
        let start = g * UNIFORM_LANES * SZ;
        let mut lanes = [0.0f64; UNIFORM_LANES];
        for (&(_, bytes), &w) in srcs.iter().zip(weights) {
            let group = &bytes[start..start + UNIFORM_LANES * SZ];
            for (lane, e) in lanes.iter_mut().zip(group.chunks_exact(SZ)) {
                *lane += w * decode(e.try_into().expect("chunks_exact gives SZ bytes"));
            }
        }
        out.copy_from_slice(&lanes);
    }
    if full < n {
        acc[full..].fill(0.0);
        for (&(dt, bytes), &w) in srcs.iter().zip(weights) {
            accumulate(dt, &bytes[full * SZ..n * SZ], w, &mut acc[full..]);
        }
    }
}

#[inline(always)]
fn weighted_sum_mixed(srcs: &[(FloatDtype, &[u8])], weights: &[f64], acc: &mut [f64]) {
    let n = acc.len();
    let full = n - n % LANES;
    let mut j = 0;
    while j < full {
        let mut lanes = [0.0f64; LANES];
        for (&(dt, bytes), &w) in srcs.iter().zip(weights) {
            let x = load_lanes(dt, bytes, j);
            for k in 0..LANES {
                lanes[k] += w * x[k];
            }
        }
        acc[j..j + LANES].copy_from_slice(&lanes);
        j += LANES;
    }
    if full < n {
        acc[full..].fill(0.0);
        for (&(dt, bytes), &w) in srcs.iter().zip(weights) {
            let sz = dt.size_bytes();
            accumulate(dt, &bytes[full * sz..n * sz], w, &mut acc[full..]);
        }
    }
}

#[inline(always)]
fn load_lanes(dt: FloatDtype, bytes: &[u8], j: usize) -> [f64; LANES] {
    let mut x = [0.0f64; LANES];
    match dt {
        FloatDtype::BF16 => {
            let b: &[u8; 2 * LANES] = bytes[2 * j..2 * j + 2 * LANES]
                .try_into()
                .expect("slice has 2*LANES bytes");
            for k in 0..LANES {
                let bits = (u16::from_le_bytes([b[2 * k], b[2 * k + 1]]) as u32) << 16;
                x[k] = f32::from_bits(bits) as f64;
            }
        }
        FloatDtype::F16 => {
            let b: &[u8; 2 * LANES] = bytes[2 * j..2 * j + 2 * LANES]
                .try_into()
                .expect("slice has 2*LANES bytes");
            for k in 0..LANES {
                x[k] = half::f16::from_bits(u16::from_le_bytes([b[2 * k], b[2 * k + 1]])).to_f32()
                    as f64;
            }
        }
        FloatDtype::F32 => {
            let b: &[u8; 4 * LANES] = bytes[4 * j..4 * j + 4 * LANES]
                .try_into()
                .expect("slice has 4*LANES bytes");
            for k in 0..LANES {
                x[k] =
                    f32::from_le_bytes([b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]]) as f64;
            }
        }
        FloatDtype::F64 => {
            let b: &[u8; 8 * LANES] = bytes[8 * j..8 * j + 8 * LANES]
                .try_into()
                .expect("slice has 8*LANES bytes");
            for k in 0..LANES {
                let mut e = [0u8; 8];
                e.copy_from_slice(&b[8 * k..8 * k + 8]);
                x[k] = f64::from_le_bytes(e);
            }
        }
    }
    x
}

/// Counts NaN and ±Inf elements.
pub fn count_nonfinite(dtype: FloatDtype, bytes: &[u8]) -> u64 {
    match dtype {
        // Exponent all ones ⇔ non-finite; checking bits avoids a float conversion per element.
        FloatDtype::BF16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80)
            .count() as u64,
        FloatDtype::F16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00)
            .count() as u64,
        FloatDtype::F32 => bytes
            .chunks_exact(4)
            .filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7F80_0000 == 0x7F80_0000)
            .count() as u64,
        FloatDtype::F64 => bytes
            .chunks_exact(8)
            .filter(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b) & 0x7FF0_0000_0000_0000 == 0x7FF0_0000_0000_0000
            })
            .count() as u64,
    }
}

/// f64 → f32 rounded to odd: truncate toward zero, then set the last bit if anything was lost.
///
/// Written without branches so the encoders vectorise. NaN stays NaN (its mantissa is non-zero
/// either way); overflow saturates to f32::MAX with the sticky bit, which then rounds to ±Inf in
/// bf16/f16 exactly as a direct rounding would.
#[inline(always)]
pub fn f64_to_f32_round_odd(x: f64) -> f32 {
    let f = x as f32;
    let back = f as f64;
    let inexact = (back != x) as u32;
    // `as` rounded to nearest; step one ulp back toward zero if it went away from zero.
    let away = (back.abs() > x.abs()) as u32;
    f32::from_bits((f.to_bits() - away) | inexact)
}

/// f32 → bf16 bits, round to nearest even; NaN becomes the canonical quiet NaN 0x7FC0.
#[inline(always)]
pub fn f32_to_bf16_bits(f: f32) -> u16 {
    let u = f.to_bits();
    let r = ((u >> 16) & 1) + 0x7FFF;
    let rounded = (u.wrapping_add(r) >> 16) as u16;
    // No finite or infinite input carries out of bit 31 (0x7F7FFFFF + 0x7FFF < 2^31 for
    // magnitudes, and the sign bit rides along), so only NaN needs the select.
    if f.is_nan() {
        0x7FC0
    } else {
        rounded
    }
}

/// f64 → bf16 bits rounded to nearest even straight from the f64 bits, and whether that was
/// valid: `x` is ±0 or its magnitude is in [2^-126, 2^128) (bf16's normal range; rounding may
/// still carry up to ±Inf, which is then the right answer). Branch-free, so it vectorises.
/// Equal to `f32_to_bf16_bits(f64_to_f32_round_odd(x))` wherever it is valid: one rounding of
/// the exact value either way.
#[inline(always)]
fn f64_to_bf16_bits_normal(x: f64) -> (u16, bool) {
    // Biased f64 exponents of bf16's smallest normal (2^-126) and of 2^128.
    const MIN_EXP: u64 = 1023 - 126;
    const END_EXP: u64 = 1023 + 128;
    let u = x.to_bits();
    let sign = ((u >> 48) as u16) & 0x8000;
    let mag = u & 0x7FFF_FFFF_FFFF_FFFF;
    let in_range = mag.wrapping_sub(MIN_EXP << 52) < ((END_EXP - MIN_EXP) << 52);
    // Keep 7 of 52 mantissa bits: add just under half an ulp, plus one if the kept lsb is odd.
    let rounded = mag + ((1u64 << 44) - 1) + ((mag >> 45) & 1);
    // Exponent and mantissa, rebiased from f64's 1023 to bf16's 127; a carry out of the
    // mantissa bumps the exponent, up to 0x7F80 (Inf) at the top.
    let body = ((rounded >> 45).wrapping_sub((1023 - 127) << 7)) as u16;
    // Zero keeps only its sign (select by mask, not a branch, so the loop stays vectorised).
    let nonzero = ((mag != 0) as u16).wrapping_neg();
    (sign | (body & nonzero), in_range | (mag == 0))
}

/// Encodes `values` into `out` as `dtype` with one round-to-nearest-even, and returns whether
/// every value was finite (so callers need no second pass to detect NaN/Inf).
/// `out.len()` must be `values.len() * dtype.size_bytes()`.
pub fn encode_f64(dtype: FloatDtype, values: &[f64], out: &mut [u8]) -> bool {
    debug_assert_eq!(out.len(), values.len() * dtype.size_bytes());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 support was just checked.
            return unsafe { encode_f64_avx2(dtype, values, out) };
        }
    }
    encode_f64_generic(dtype, values, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_f64_avx2(dtype: FloatDtype, values: &[f64], out: &mut [u8]) -> bool {
    encode_f64_generic(dtype, values, out)
}

#[inline(always)]
fn encode_f64_generic(dtype: FloatDtype, values: &[f64], out: &mut [u8]) -> bool {
    let mut finite = true;
    match dtype {
        FloatDtype::BF16 => {
            // Values that are all zero or in bf16's normal range (a merge's usual block) round
            // straight from the f64 bits, in one vectorised pass; if any is not (subnormal,
            // overflowing, NaN/Inf), the general path below redoes the block.
            let mut fast = true;
            for (o, &x) in out.chunks_exact_mut(2).zip(values) {
                let (b, ok) = f64_to_bf16_bits_normal(x);
                fast &= ok;
                o.copy_from_slice(&b.to_le_bytes());
            }
            if fast {
                return true;
            }
            for (o, &v) in out.chunks_exact_mut(2).zip(values) {
                finite &= v.is_finite();
                o.copy_from_slice(&f32_to_bf16_bits(f64_to_f32_round_odd(v)).to_le_bytes());
            }
        }
        FloatDtype::F16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(values) {
                finite &= v.is_finite();
                let h = half::f16::from_f32(f64_to_f32_round_odd(v));
                o.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        FloatDtype::F32 => {
            for (o, &v) in out.chunks_exact_mut(4).zip(values) {
                finite &= v.is_finite();
                o.copy_from_slice(&(v as f32).to_le_bytes());
            }
        }
        FloatDtype::F64 => {
            for (o, &v) in out.chunks_exact_mut(8).zip(values) {
                finite &= v.is_finite();
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    finite
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Exact reference: the nearest-even bf16 to `x`, found by comparing neighbours in f64.
    fn bf16_nearest_even(x: f64) -> u16 {
        let lo = half::bf16::from_f32(x as f32); // some nearby candidate
        let mut best = lo.to_bits();
        let mut best_err = f64::INFINITY;
        for d in -2i32..=2 {
            let cand = (lo.to_bits() as i32 + d) as u16;
            let v = half::bf16::from_bits(cand).to_f64();
            if !v.is_finite() {
                continue;
            }
            let err = (v - x).abs();
            if err < best_err || (err == best_err && cand % 2 == 0) {
                best = cand;
                best_err = err;
            }
        }
        best
    }

    #[test]
    fn bf16_tie_with_sticky_bits_below_f32_rounds_up() {
        // 1 + 2^-8 is exactly halfway between two bf16 values; adding 2^-40 makes it just
        // above the tie. Truncating the low 32 bits (as half's from_f64 does) would miss it.
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        let bits = f32_to_bf16_bits(f64_to_f32_round_odd(x));
        assert_eq!(bits, half::bf16::from_f64(1.0 + 2f64.powi(-7)).to_bits());
        assert_eq!(bits, bf16_nearest_even(x));
    }

    #[test]
    fn parse_dtype_names() {
        assert_eq!(parse_dtype("BF16"), Some(Dtype::BF16));
        assert_eq!(parse_dtype("F8_E4M3"), Some(Dtype::F8_E4M3));
        assert_eq!(parse_dtype("Q4"), None);
        assert_eq!(dtype_name(Dtype::F8_E4M3), "F8_E4M3");
    }

    proptest! {
        #[test]
        fn bf16_encode_is_nearest_even(x in -1e30f64..1e30f64) {
            let bits = f32_to_bf16_bits(f64_to_f32_round_odd(x));
            prop_assert_eq!(bits, bf16_nearest_even(x));
        }

        #[test]
        fn f16_encode_matches_f32_path_when_exact_in_f32(x in -6.0e4f32..6.0e4f32) {
            // For values exactly representable in f32, round-to-odd is the identity.
            let mut out = [0u8; 2];
            encode_f64(FloatDtype::F16, &[x as f64], &mut out);
            prop_assert_eq!(u16::from_le_bytes(out), half::f16::from_f32(x).to_bits());
        }

        #[test]
        fn weighted_sum_equals_sequential_accumulate(
            n in 0usize..40,
            seed in any::<u64>(),
            w in proptest::collection::vec(-3.0f64..3.0, 1..5),
        ) {
            let kinds = [FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32, FloatDtype::F64];
            let mut state = seed | 1;
            let inputs: Vec<(FloatDtype, Vec<u8>)> = (0..w.len()).map(|i| {
                let dt = kinds[(seed as usize + i) % 4];
                let bytes = (0..n * dt.size_bytes()).map(|_| {
                    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                    // Keep exponents moderate so values stay finite.
                    (state as u8) & 0x3F
                }).collect();
                (dt, bytes)
            }).collect();
            let srcs: Vec<(FloatDtype, &[u8])> = inputs.iter().map(|(d, b)| (*d, b.as_slice())).collect();
            let mut fused = vec![1.0; n];
            weighted_sum(&srcs, &w, &mut fused);
            let mut seq = vec![0.0; n];
            for ((dt, b), wi) in srcs.iter().zip(&w) {
                accumulate(*dt, b, *wi, &mut seq);
            }
            let fb: Vec<u64> = fused.iter().map(|v| v.to_bits()).collect();
            let sb: Vec<u64> = seq.iter().map(|v| v.to_bits()).collect();
            prop_assert_eq!(fb, sb);
        }

        #[test]
        fn uniform_kernel_equals_scalar_on_any_bits(
            n in 0usize..80,
            skew in 0usize..8,
            kind in 0usize..4,
            bits in proptest::collection::vec(any::<u64>(), 1..10),
            w in proptest::collection::vec(-3.0f64..3.0, 1..10),
        ) {
            // Members of one dtype take the vector kernel; arbitrary bit patterns cover NaN,
            // ±Inf, subnormals and ±0, and a slice starting `skew` bytes into its buffer is
            // unaligned. It must give the scalar `acc += w * x`, member by member.
            let dt = [FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32, FloatDtype::F64][kind];
            let k = bits.len().min(w.len());
            let sz = dt.size_bytes();
            let buffers: Vec<Vec<u8>> = (0..k)
                .map(|i| {
                    let mut state = bits[i] | 1;
                    (0..skew + n * sz)
                        .map(|_| {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            state as u8
                        })
                        .collect()
                })
                .collect();
            let srcs: Vec<(FloatDtype, &[u8])> =
                buffers.iter().map(|b| (dt, &b[skew..])).collect();
            let mut fused = vec![1.0; n];
            weighted_sum(&srcs, &w[..k], &mut fused);
            let mut seq = vec![0.0; n];
            for ((dt, b), wi) in srcs.iter().zip(&w) {
                accumulate(*dt, b, *wi, &mut seq);
            }
            for (i, (f, s)) in fused.iter().zip(&seq).enumerate() {
                // x86 takes a NaN result's payload from one operand, and LLVM may commute an
                // add, so only NaN-ness is compared (every encoder canonicalises NaN for bf16).
                if f.is_nan() || s.is_nan() {
                    prop_assert!(f.is_nan() && s.is_nan(), "element {}: {} vs {}", i, f, s);
                } else {
                    prop_assert_eq!(f.to_bits(), s.to_bits(), "element {}", i);
                }
            }
        }

        #[test]
        fn bf16_encoder_matches_the_general_path_on_any_bits(
            raw in proptest::collection::vec(any::<u64>(), 0..40),
            scale in 0usize..4,
        ) {
            // Arbitrary bits (NaN, Inf, subnormals, huge), values near bf16's normal range's
            // edges, and plain weights-like values: the encoder's fast groups and its general
            // path must agree with the per-element reference, and so must the finite flag.
            let values: Vec<f64> = raw
                .iter()
                .map(|&b| match scale {
                    0 => f64::from_bits(b),
                    1 => (b as i64 as f64) * 2f64.powi(-63 - 126),
                    2 => (b as i64 as f64) * 2f64.powi(-63 + 128),
                    _ => (b as i64 as f64) * 2f64.powi(-70),
                })
                .collect();
            let mut out = vec![0u8; 2 * values.len()];
            let finite = encode_f64(FloatDtype::BF16, &values, &mut out);
            for (i, &v) in values.iter().enumerate() {
                let want = f32_to_bf16_bits(f64_to_f32_round_odd(v));
                prop_assert_eq!(u16::from_le_bytes([out[2 * i], out[2 * i + 1]]), want, "{}", v);
            }
            prop_assert_eq!(finite, values.iter().all(|v| v.is_finite()));
        }

        #[test]
        fn bf16_fast_rounding_is_nearest_even_where_valid(x in -1e38f64..1e38f64) {
            let (bits, valid) = f64_to_bf16_bits_normal(x);
            if valid {
                prop_assert_eq!(bits, bf16_nearest_even(x));
                prop_assert_eq!(bits, f32_to_bf16_bits(f64_to_f32_round_odd(x)));
            }
        }

        #[test]
        fn roundtrip_is_identity(bits in any::<u16>()) {
            let v = half::bf16::from_bits(bits);
            prop_assume!(v.is_finite());
            let mut acc = [0.0f64];
            accumulate(FloatDtype::BF16, &bits.to_le_bytes(), 1.0, &mut acc);
            let mut out = [0u8; 2];
            encode_f64(FloatDtype::BF16, &acc, &mut out);
            // -0.0 + 0.0 accumulates to +0.0, exactly as the reference's zero-initialised sum.
            let expect = if bits == 0x8000 { 0 } else { bits };
            prop_assert_eq!(u16::from_le_bytes(out), expect);
        }
    }
}
