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
#[inline]
pub fn f64_to_f32_round_odd(x: f64) -> f32 {
    let f = x as f32;
    let back = f as f64;
    if back == x || x.is_nan() {
        return f;
    }
    // `as` rounded to nearest; step back toward zero if it went away from zero.
    let mut bits = f.to_bits();
    if back.abs() > x.abs() {
        bits -= 1; // magnitude down by one ulp (sign bit untouched since |f| > 0)
    }
    f32::from_bits(bits | 1)
}

/// f32 → bf16 bits, round to nearest even; NaN becomes the canonical quiet NaN 0x7FC0.
#[inline]
pub fn f32_to_bf16_bits(f: f32) -> u16 {
    if f.is_nan() {
        return 0x7FC0;
    }
    let u = f.to_bits();
    let r = ((u >> 16) & 1) + 0x7FFF;
    ((u as u64 + r as u64) >> 16) as u16
}

/// Encodes `values` into `out` as `dtype` with one round-to-nearest-even.
/// `out.len()` must be `values.len() * dtype.size_bytes()`.
#[inline]
pub fn encode_f64(dtype: FloatDtype, values: &[f64], out: &mut [u8]) {
    debug_assert_eq!(out.len(), values.len() * dtype.size_bytes());
    match dtype {
        FloatDtype::BF16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&f32_to_bf16_bits(f64_to_f32_round_odd(v)).to_le_bytes());
            }
        }
        FloatDtype::F16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(values) {
                let h = half::f16::from_f32(f64_to_f32_round_odd(v));
                o.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        FloatDtype::F32 => {
            for (o, &v) in out.chunks_exact_mut(4).zip(values) {
                o.copy_from_slice(&(v as f32).to_le_bytes());
            }
        }
        FloatDtype::F64 => {
            for (o, &v) in out.chunks_exact_mut(8).zip(values) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
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
