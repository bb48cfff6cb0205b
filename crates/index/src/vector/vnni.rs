//! int8 dot products with AVX-512 VNNI (`vpdpbusd`: 64 unsigned-by-signed byte products summed
//! into 16 i32 lanes in one instruction, where AVX2 widens to i16 and multiplies pairwise).
//!
//! `vpdpbusd` takes one operand unsigned. A signed byte `a` flipped in its top bit reads as
//! the unsigned `a + 128`, so `sum((a + 128) * b) = sum(a * b) + 128 * sum(b)`: the products are
//! taken with one side flipped and `128 * sum(b)` taken off, which is exact for every pair of
//! i8 (a lane adds at most 4 * 255 * 128 per instruction: no i32 lane overflows below
//! ~16 million dimensions).
use std::arch::x86_64::*;

use super::avx2::prefetch_group;

/// Whether the CPU has AVX-512 F, BW and VNNI.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// The mask of the first `n` of 64 bytes (`n < 64`).
#[inline]
fn first(n: usize) -> __mmask64 {
    (1u64 << n) - 1
}

/// Two accumulators of `a` (flipped) by `b` and of `b` alone, 128 bytes a step, then a
/// masked tail (masked-out bytes read as zero in `b`, so they add nothing).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let flip = _mm512_set1_epi8(i8::MIN);
    let ones = _mm512_set1_epi8(1);
    let mut acc = [_mm512_setzero_si512(); 2];
    let mut sum = [_mm512_setzero_si512(); 2];
    let mut i = 0;
    while i + 128 <= n {
        for j in 0..2 {
            let x = _mm512_xor_si512(_mm512_loadu_si512(pa.add(i + 64 * j).cast()), flip);
            let y = _mm512_loadu_si512(pb.add(i + 64 * j).cast());
            acc[j] = _mm512_dpbusd_epi32(acc[j], x, y);
            sum[j] = _mm512_dpbusd_epi32(sum[j], ones, y);
        }
        i += 128;
    }
    while i < n {
        let m = if n - i >= 64 { u64::MAX } else { first(n - i) };
        let x = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, pa.add(i)), flip);
        let y = _mm512_maskz_loadu_epi8(m, pb.add(i));
        acc[0] = _mm512_dpbusd_epi32(acc[0], x, y);
        sum[0] = _mm512_dpbusd_epi32(sum[0], ones, y);
        i += 64;
    }
    let sum = _mm512_slli_epi32::<7>(_mm512_add_epi32(sum[0], sum[1]));
    _mm512_reduce_add_epi32(_mm512_sub_epi32(_mm512_add_epi32(acc[0], acc[1]), sum))
}

/// [`super::dot_i8_rows`] with the query as i8: the rows are the flipped side, so the
/// correction is the query's own sum, once for every row; four rows at a time share the
/// query's loads.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn dot_i8_rows(q: &[i8], rows: &[i8], out: &mut Vec<i32>) {
    let d = q.len();
    let count = rows.len() / d;
    let correction = 128 * q.iter().map(|&x| x as i32).sum::<i32>();
    let flip = _mm512_set1_epi8(i8::MIN);
    let pq = q.as_ptr();
    // the chunks of 64 bytes a row is read in, the last one masked to the row's end
    let masks: Vec<__mmask64> = (0..d)
        .step_by(64)
        .map(|i| if d - i >= 64 { u64::MAX } else { first(d - i) })
        .collect();
    let mut r = 0;
    while r + 4 <= count {
        prefetch_group(rows, r, d);
        let p: [*const i8; 4] = std::array::from_fn(|j| rows.as_ptr().add((r + j) * d));
        let mut acc = [_mm512_setzero_si512(); 4];
        for (c, &m) in masks.iter().enumerate() {
            let x = _mm512_maskz_loadu_epi8(m, pq.add(64 * c));
            for j in 0..4 {
                let y = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, p[j].add(64 * c)), flip);
                acc[j] = _mm512_dpbusd_epi32(acc[j], y, x);
            }
        }
        for a in acc {
            out.push(_mm512_reduce_add_epi32(a).wrapping_sub(correction));
        }
        r += 4;
    }
    while r < count {
        let p = rows.as_ptr().add(r * d);
        let mut acc = _mm512_setzero_si512();
        for (c, &m) in masks.iter().enumerate() {
            let x = _mm512_maskz_loadu_epi8(m, pq.add(64 * c));
            let y = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, p.add(64 * c)), flip);
            acc = _mm512_dpbusd_epi32(acc, y, x);
        }
        out.push(_mm512_reduce_add_epi32(acc).wrapping_sub(correction));
        r += 1;
    }
}
