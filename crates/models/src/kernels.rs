//! CPU kernels for the steps of a BERT layer that burn's CPU backend runs slowest: the attention
//! core (scores, padding mask, softmax, weighted values) and GELU.
//!
//! Measured on the 2-core development machine (a 256-token batch of 8, one layer): burn's
//! softmax over the `[batch, heads, seq, seq]` scores took 19 ms and GELU over the
//! `[batch, seq, 1536]` activations 9.5 ms, against 4 ms for a whole 384x384 projection: both
//! call the scalar `expf` / `erff` of the C library an element at a time, and the softmax is a
//! chain of broadcast element-wise passes over a 25 MB tensor. Here the attention runs one
//! (sequence, head) pair at a time on a score tile that stays in cache, reading the heads
//! straight out of the `[batch, seq, hidden]` projections (no transposed copies), over each
//! sequence's real tokens only (padding costs nothing); `exp` and `erf` are polynomials the
//! compiler vectorises (AVX2 and FMA when the CPU has them, chosen at run time).
//!
//! Used for burn's flex backend only (see [`crate::host::is_flex`]); every other backend
//! (CUDA, ndarray) keeps burn's tensor operations, which the parity test holds these kernels
//! to.
use std::cell::RefCell;

use burn::prelude::*;
use burn::tensor::TensorData;

/// The data of a float tensor as f32 (a move, not a copy, for a flex f32 tensor nothing else
/// holds).
fn take_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("data converted to f32 reads as f32")
}

fn put_f32<B: Backend, const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// GELU (the exact, erf form) of every element.
pub(crate) fn gelu<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    let shape = t.dims();
    let device = t.device();
    let mut x = take_f32(t);
    simd::gelu(&mut x);
    put_f32(x, shape, &device)
}

/// Multi-head attention over `[b, s, h]` query, key and value projections (the query already
/// scaled by `1/sqrt(head dim)`): `softmax(q kᵀ) v` per head, each sequence's first
/// `lengths[i]` tokens attending to each other. Returns `[b, s, h]`; a padded position's row
/// is zero (nothing reads it: pooling and the later layers' attention skip padding, and the
/// rest of a layer works on each position alone).
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    lengths: &[usize],
    heads: usize,
) -> Tensor<B, 3> {
    let [b, s, h] = q.dims();
    let device = q.device();
    let (q, k, v) = (take_f32(q), take_f32(k), take_f32(v));
    let mut out = vec![0f32; b * s * h];
    attention_f32(&q, &k, &v, &mut out, [b, s, h], lengths, heads);
    put_f32(out, [b, s, h], &device)
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// [`attention`] on slices: `[b, s, h]` row-major each.
pub(crate) fn attention_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    [b, s, h]: [usize; 3],
    lengths: &[usize],
    heads: usize,
) {
    let hd = h / heads;
    assert!(hd * heads == h && q.len() == b * s * h && k.len() == q.len() && v.len() == q.len());
    assert!(out.len() == q.len() && lengths.len() == b);
    // the output pointer crosses to the pool's threads; each (sequence, head) pair writes its
    // own disjoint columns of its own rows
    let out_ptr = SendPtr(out.as_mut_ptr());
    let pairs = b * heads;
    let run = |pair: usize| {
        let (seq, head) = (pair / heads, pair % heads);
        let len = lengths[seq].clamp(1, s);
        let base = seq * s * h + head * hd;
        SCORES.with(|cell| {
            let mut scores = cell.borrow_mut();
            scores.resize(len * len, 0.0);
            // SAFETY (both products): every pointer stays inside its slice: rows `0..len`
            // (len <= s) of sequence `seq`, columns `head*hd .. head*hd + hd` (< h), strides as
            // laid out above; `scores` holds len*len; pairs write disjoint parts of `out`.
            unsafe {
                // scores[i][j] = q_i . k_j (k read transposed: row stride 1, column stride h)
                product(
                    [len, len, hd],
                    (scores.as_mut_ptr(), len),
                    (q.as_ptr().add(base), 1, h),
                    (k.as_ptr().add(base), h, 1),
                );
            }
            for row in scores.chunks_exact_mut(len) {
                simd::softmax(row);
            }
            let out_ptr = &out_ptr;
            // SAFETY: as for the scores above
            unsafe {
                // out_i = sum_j p_ij v_j
                product(
                    [len, hd, len],
                    (out_ptr.0.add(base), h),
                    (scores.as_ptr(), 1, len),
                    (v.as_ptr().add(base), 1, h),
                );
            }
        });
    };
    use rayon::prelude::*;
    if rayon::current_num_threads() > 1 && pairs > 1 {
        (0..pairs).into_par_iter().for_each(run);
    } else {
        (0..pairs).for_each(run);
    }
}

/// `dst = lhs rhs` for `[m, n, k]` on one thread: `dst` row-major with row stride `dst.1`;
/// `lhs` and `rhs` as (pointer, column stride, row stride).
///
/// # Safety
/// Every element the strides reach must be inside its allocation, and `dst` not read or
/// written elsewhere meanwhile.
unsafe fn product(
    [m, n, k]: [usize; 3],
    dst: (*mut f32, usize),
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
) {
    // SAFETY: the caller's promise
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            1,
            dst.1 as isize,
            false,
            lhs.0,
            lhs.1 as isize,
            lhs.2 as isize,
            rhs.0,
            rhs.1 as isize,
            rhs.2 as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

struct SendPtr(*mut f32);
// SAFETY: the pointer is only written through at disjoint places by the pairs (see above).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Element-wise math the compiler vectorises: a generic body compiled twice, once for AVX2 +
/// FMA (used when the CPU has them) and once for the baseline.
mod simd {
    macro_rules! dispatch {
        ($name:ident, $body:ident, ($($arg:ident : $ty:ty),*)) => {
            pub(crate) fn $name($($arg: $ty),*) {
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                        #[target_feature(enable = "avx2,fma")]
                        unsafe fn fast($($arg: $ty),*) {
                            $body($($arg),*)
                        }
                        // SAFETY: the CPU has AVX2 and FMA (checked just above)
                        return unsafe { fast($($arg),*) };
                    }
                }
                $body($($arg),*)
            }
        };
    }

    dispatch!(softmax, softmax_body, (row: &mut [f32]));
    dispatch!(gelu, gelu_body, (x: &mut [f32]));

    /// e^x for x <= 0 to within a few ulp (Cephes' expf: 2^n times a degree-5 polynomial on
    /// [-ln2/2, ln2/2]); inputs below -87 give ~1e-38.
    #[inline(always)]
    fn exp(x: f32) -> f32 {
        let x = x.clamp(-87.0, 88.0);
        // round to nearest by adding and subtracting 1.5 * 2^23
        let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
        let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let p = 1.987_569_1e-4_f32;
        let p = p.mul_add(r, 1.398_199_9e-3);
        let p = p.mul_add(r, 8.333_452e-3);
        let p = p.mul_add(r, 4.166_579_6e-2);
        let p = p.mul_add(r, 0.166_666_66);
        let p = p.mul_add(r, 0.5);
        let p = (p * r).mul_add(r, r) + 1.0;
        p * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }

    #[inline(always)]
    fn softmax_body(row: &mut [f32]) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = exp(*x - max);
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }

    /// erf to within 1.5e-7 (Abramowitz and Stegun 7.1.26), ~5e-7 after f32 rounding: as an
    /// error in GELU's `1 + erf` it is a few f32 roundings.
    #[inline(always)]
    fn erf(x: f32) -> f32 {
        let a = x.abs();
        let t = 1.0 / 0.327_591_1_f32.mul_add(a, 1.0);
        let p = 1.061_405_4_f32;
        let p = p.mul_add(t, -1.453_152_1);
        let p = p.mul_add(t, 1.421_413_8);
        let p = p.mul_add(t, -0.284_496_74);
        let p = p.mul_add(t, 0.254_829_6);
        let y = 1.0 - p * t * exp(-a * a);
        y.copysign(x)
    }

    #[inline(always)]
    fn gelu_body(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn exp_and_gelu_agree_with_float64() {
            let mut worst_exp = 0f64;
            for i in 0..200_000 {
                let x = -87.0 + i as f32 * (87.0 / 200_000.0);
                let want = (x as f64).exp();
                worst_exp = worst_exp.max(((super::exp(x) as f64 - want) / want).abs());
            }
            assert!(worst_exp < 4e-7, "exp: worst relative error {worst_exp}");
            // GELU through both compiled bodies (the dispatched one and the baseline)
            let xs: Vec<f32> = (0..200_001)
                .map(|i| -12.0 + i as f32 * (24.0 / 200_000.0))
                .collect();
            for f in [super::gelu as fn(&mut [f32]), super::gelu_body] {
                let mut got = xs.clone();
                f(&mut got);
                let mut worst = 0f64;
                for (&x, &g) in xs.iter().zip(&got) {
                    let x = x as f64;
                    let want = 0.5 * x * (1.0 + erf64(x * std::f64::consts::FRAC_1_SQRT_2));
                    // within a few f32 roundings of the value, scaled by |x| (GELU's slope)
                    worst = worst.max((g as f64 - want).abs() / x.abs().max(1.0));
                }
                assert!(worst < 6e-7, "gelu: worst error {worst}");
            }
            // softmax: sums to one, order kept, matches float64
            let mut row: Vec<f32> = (0..300)
                .map(|i| ((i * 37) % 101) as f32 * 0.2 - 9.0)
                .collect();
            let orig = row.clone();
            super::softmax(&mut row);
            let m = orig
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let z: f64 = orig.iter().map(|&x| (x as f64 - m).exp()).sum();
            for (&x, &p) in orig.iter().zip(&row) {
                let want = (x as f64 - m).exp() / z;
                assert!(
                    (p as f64 - want).abs() <= 1e-6 * want + 1e-12,
                    "softmax {p} vs {want}"
                );
            }
        }

        /// erf by its Taylor series (|x| < 3) or continued fraction tail, in f64.
        fn erf64(x: f64) -> f64 {
            let a = x.abs();
            let y = if a < 3.0 {
                let (mut term, mut sum, mut n) = (a, a, 0.0);
                while term.abs() > 1e-17 {
                    n += 1.0;
                    term *= -a * a / n;
                    sum += term / (2.0 * n + 1.0);
                }
                sum * 2.0 / std::f64::consts::PI.sqrt()
            } else {
                // erfc by Lentz's continued fraction
                let mut f = a;
                for k in (1..60).rev() {
                    f = a + (k as f64 / 2.0) / f;
                }
                1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
            };
            y.copysign(x)
        }
    }
}
