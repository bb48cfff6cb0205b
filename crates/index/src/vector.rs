//! Vectors and the distance the HNSW graph calls in its inner loop.
use serde::{Deserialize, Serialize};

/// Dot product: AVX2 + FMA when the CPU has them, else the portable loop.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { avx2::dot(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
mod vnni;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// How many rows ahead [`dot_i8_rows`] prefetches.
    const PREFETCH_ROWS: usize = 12;

    /// Asks for the cache lines of the four rows of `d` bytes that start `PREFETCH_ROWS` rows
    /// after row `r` of `rows`, those that lie inside it: the rows scored four side by side step
    /// through memory in strides the hardware prefetchers do not follow, and a cold scan would
    /// otherwise wait on every line. Shared by the AVX2 and AVX-512 row kernels.
    #[inline(always)]
    pub(super) fn prefetch_group(rows: &[i8], r: usize, d: usize) {
        let end = rows.as_ptr().wrapping_add(rows.len());
        let ahead = rows.as_ptr().wrapping_add((r + PREFETCH_ROWS) * d);
        let mut line = ahead;
        while line < end && line < ahead.wrapping_add(4 * d) {
            // SAFETY: a prefetch is a hint and never faults; SSE is part of x86_64's baseline
            unsafe { _mm_prefetch(line, _MM_HINT_T0) };
            line = line.wrapping_add(64);
        }
    }

    /// Whether the CPU has AVX2 and FMA (std caches the detection).
    #[inline]
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Four 8-lane FMA accumulators, then the tail.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(pa.add(i + 8 * j));
                let y = _mm256_loadu_ps(pb.add(i + 8 * j));
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            let x = _mm256_loadu_ps(pa.add(i));
            let y = _mm256_loadu_ps(pb.add(i));
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let hi = _mm256_extractf128_ps(s, 1);
        let lo = _mm256_castps256_ps128(s);
        let q = _mm_add_ps(hi, lo);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        let mut total = _mm_cvtss_f32(q);
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }

    /// Sign-extends 16 lanes at a time to i16 and multiplies pairwise into i32 lanes
    /// (127 * 127 * 2 fits an i16 pair sum in i32 with room to spare).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_si256();
        let mut acc1 = _mm256_setzero_si256();
        let mut i = 0;
        while i + 32 <= n {
            let x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pa.add(i) as *const __m128i));
            let y0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb.add(i) as *const __m128i));
            let x1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pa.add(i + 16) as *const __m128i));
            let y1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb.add(i + 16) as *const __m128i));
            acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(x0, y0));
            acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(x1, y1));
            i += 32;
        }
        let mut total = hsum_epi32(_mm256_add_epi32(acc0, acc1));
        while i < n {
            total += *pa.add(i) as i32 * *pb.add(i) as i32;
            i += 1;
        }
        total
    }

    /// The sum of the eight i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum_epi32(v: __m256i) -> i32 {
        let x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0b01_00_11_10));
        let x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0b10_11_00_01));
        _mm_cvtsi128_si32(x)
    }

    /// [`super::dot_i8_rows`]: the query already widened to i16, so a row costs one widening
    /// per 16 codes; four rows at a time share the query's loads.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_i8_rows(q: &[i16], rows: &[i8], out: &mut Vec<i32>) {
        let d = q.len();
        let count = rows.len() / d;
        let whole = d / 16 * 16;
        let pq = q.as_ptr();
        let tail = |row: *const i8| -> i32 {
            (whole..d)
                .map(|j| *row.add(j) as i32 * *pq.add(j) as i32)
                .sum()
        };
        let mut r = 0;
        while r + 4 <= count {
            prefetch_group(rows, r, d);
            let p: [*const i8; 4] = std::array::from_fn(|j| rows.as_ptr().add((r + j) * d));
            let mut acc = [_mm256_setzero_si256(); 4];
            let mut i = 0;
            while i < whole {
                let x = _mm256_loadu_si256(pq.add(i) as *const __m256i);
                for j in 0..4 {
                    let y = _mm256_cvtepi8_epi16(_mm_loadu_si128(p[j].add(i) as *const __m128i));
                    acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(x, y));
                }
                i += 16;
            }
            for j in 0..4 {
                out.push(hsum_epi32(acc[j]) + tail(p[j]));
            }
            r += 4;
        }
        while r < count {
            let p = rows.as_ptr().add(r * d);
            let mut acc = _mm256_setzero_si256();
            let mut i = 0;
            while i < whole {
                let x = _mm256_loadu_si256(pq.add(i) as *const __m256i);
                let y = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(i) as *const __m128i));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x, y));
                i += 16;
            }
            out.push(hsum_epi32(acc) + tail(p));
            r += 1;
        }
    }
}

/// Which int8 dot-product kernel this process uses: the best the CPU has, unless
/// `RAGFLEET_INT8_KERNEL` names a lower one (`avx2` or `portable`, to compare them in one
/// sitting); read once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    /// Plain loops.
    Portable,
    /// AVX2: bytes widened to i16 and multiplied pairwise.
    Avx2,
    /// AVX-512 VNNI: 64 byte products a instruction.
    Avx512Vnni,
}

impl Int8Kernel {
    /// Whether this CPU can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Int8Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Avx2 => avx2::available(),
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Avx512Vnni => avx2::available() && vnni::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Its name, as `RAGFLEET_INT8_KERNEL` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Int8Kernel::Portable => "portable",
            Int8Kernel::Avx2 => "avx2",
            Int8Kernel::Avx512Vnni => "avx512-vnni",
        }
    }

    /// The kernel named `name` (as [`Int8Kernel::name`] gives it).
    pub fn parse(name: &str) -> Option<Int8Kernel> {
        KERNELS.into_iter().find(|k| k.name() == name)
    }

    /// The kernels this CPU can run, best first.
    pub fn usable() -> Vec<Int8Kernel> {
        KERNELS
            .into_iter()
            .rev()
            .filter(|k| k.available())
            .collect()
    }
}

/// The kernel in use: 0 until chosen, else 1 + its place in [`KERNELS`].
static CHOSEN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Every kernel, worst first.
const KERNELS: [Int8Kernel; 3] = [
    Int8Kernel::Portable,
    Int8Kernel::Avx2,
    Int8Kernel::Avx512Vnni,
];

/// The int8 kernel in use (see [`Int8Kernel`]).
#[inline]
pub fn int8_kernel() -> Int8Kernel {
    match CHOSEN.load(std::sync::atomic::Ordering::Relaxed) {
        0 => choose_int8_kernel(),
        n => KERNELS[n as usize - 1],
    }
}

#[cold]
fn choose_int8_kernel() -> Int8Kernel {
    let usable = Int8Kernel::usable();
    let asked = std::env::var("RAGFLEET_INT8_KERNEL").ok();
    let k = match asked.as_deref().map(str::trim) {
        None | Some("") | Some("auto") => usable[0],
        Some(name) => match Int8Kernel::parse(name).filter(|k| k.available()) {
            Some(k) => k,
            None => {
                tracing::warn!(
                    asked = name,
                    using = usable[0].name(),
                    "RAGFLEET_INT8_KERNEL names no kernel this CPU runs (portable, avx2, avx512-vnni)"
                );
                usable[0]
            }
        },
    };
    set_int8_kernel(k);
    k
}

/// Makes `kernel` the one in use from now on (the benches compare them in one run); false,
/// changing nothing, when the CPU cannot run it.
pub fn set_int8_kernel(kernel: Int8Kernel) -> bool {
    if !kernel.available() {
        return false;
    }
    let n = KERNELS.iter().position(|k| *k == kernel).unwrap_or(0) as u8 + 1;
    CHOSEN.store(n, std::sync::atomic::Ordering::Relaxed);
    true
}

/// The dot product of a query (int8 codes widened to i16, `d` of them) with each of the
/// consecutive rows of `d` int8 codes in `rows`, appended to `out` in order (exact, in i32).
pub fn dot_i8_rows(q: &[i16], rows: &[i8], out: &mut Vec<i32>) {
    dot_i8_rows_with(int8_kernel(), q, rows, out)
}

/// [`dot_i8_rows`] by `kernel` (the portable loop when the CPU cannot run it).
pub fn dot_i8_rows_with(kernel: Int8Kernel, q: &[i16], rows: &[i8], out: &mut Vec<i32>) {
    if q.is_empty() {
        return;
    }
    out.reserve(rows.len() / q.len());
    #[cfg(target_arch = "x86_64")]
    {
        let narrow = || -> Option<Vec<i8>> { q.iter().map(|&x| i8::try_from(x).ok()).collect() };
        if kernel == Int8Kernel::Avx512Vnni && kernel.available() {
            if let Some(q8) = narrow() {
                // SAFETY: the CPU supports AVX-512 F, BW and VNNI (checked above); every read
                // is inside `q8` or a whole row of `rows` (the last part of each masked).
                return unsafe { vnni::dot_i8_rows(&q8, rows, out) };
            }
        }
        if kernel != Int8Kernel::Portable && avx2::available() {
            // SAFETY: the CPU supports AVX2 (checked above); every read is inside `q` or a
            // whole row of `rows`.
            return unsafe { avx2::dot_i8_rows(q, rows, out) };
        }
    }
    out.extend(rows.chunks_exact(q.len()).map(|r| {
        r.iter()
            .zip(q)
            .map(|(x, y)| *x as i32 * *y as i32)
            .sum::<i32>()
    }));
}

/// Dot product of two int8 vectors (exact, in i32) by the kernel in use.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    // SAFETY: `int8_kernel` only ever chooses a kernel the CPU runs.
    unsafe { dot_i8_unchecked(int8_kernel(), a, b) }
}

/// [`dot_i8`] by `kernel` (the portable loop when the CPU cannot run it).
pub fn dot_i8_with(kernel: Int8Kernel, a: &[i8], b: &[i8]) -> i32 {
    let kernel = if kernel.available() {
        kernel
    } else {
        Int8Kernel::Portable
    };
    // SAFETY: the CPU runs `kernel` (checked above).
    unsafe { dot_i8_unchecked(kernel, a, b) }
}

/// [`dot_i8`] by `kernel`, which the CPU must run.
#[inline]
unsafe fn dot_i8_unchecked(kernel: Int8Kernel, a: &[i8], b: &[i8]) -> i32 {
    match kernel {
        // SAFETY: the caller's: the CPU runs the kernel.
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx512Vnni => unsafe { vnni::dot_i8(a, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx2 => unsafe { avx2::dot_i8(a, b) },
        _ => dot_i8_portable(a, b),
    }
}

/// Dot product of two int8 vectors, the portable loop.
#[inline]
pub fn dot_i8_portable(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(x, y)| *x as i32 * *y as i32).sum()
}

/// Dot product, written with eight independent accumulators so that it vectorises.
#[inline]
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let chunks = n / 8;
    for i in 0..chunks {
        let x = &a[i * 8..i * 8 + 8];
        let y = &b[i * 8..i * 8 + 8];
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut tail = 0.0;
    for i in chunks * 8..n {
        tail += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Scales `v` to unit length in place; returns false for a zero or non-finite vector.
pub fn normalize(v: &mut [f32]) -> bool {
    let n = dot(v, v).sqrt();
    if !n.is_finite() || n == 0.0 {
        return false;
    }
    // already unit length (a copy from a peer replica): leave it bit for bit as it is, so that
    // replicas hold identical vectors
    if (n - 1.0).abs() <= 4.0 * f32::EPSILON {
        return true;
    }
    for x in v.iter_mut() {
        *x /= n;
    }
    true
}

/// A unit vector as an HNSW point; distance is `1 - dot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitVector(pub Vec<f32>);

impl instant_distance::Point for UnitVector {
    #[inline]
    fn distance(&self, other: &Self) -> f32 {
        (1.0 - dot(&self.0, &other.0)).max(0.0)
    }
}

/// Asks the cache for the lines of `len` bytes at `p` (a hint: it never faults, whatever the
/// address), so that their misses overlap with whatever comes before they are read.
#[inline]
pub(crate) fn prefetch_bytes(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let first = p as usize & !63;
        let last = (p as usize).wrapping_add(len.max(1) - 1) & !63;
        for line in (first..=last).step_by(64) {
            // SAFETY: prefetching is a hint; it never faults, whatever the address.
            unsafe {
                std::arch::x86_64::_mm_prefetch(line as *const i8, std::arch::x86_64::_MM_HINT_T0)
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_for_all_lengths() {
        for n in 0..100 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-5, "n={n}");
            assert!((dot_portable(&a, &b) - naive).abs() < 1e-5, "n={n}");
        }
    }

    /// Every kernel this CPU runs gives the exact dot product, for every length (the tails
    /// past 16, 64 and 128 bytes too) and the extreme values (-128 and 127 on either side).
    #[test]
    fn int8_dot_matches_naive_for_all_lengths_and_kernels() {
        let kernels = Int8Kernel::usable();
        assert!(kernels.contains(&Int8Kernel::Portable));
        assert!(kernels.contains(&int8_kernel()));
        for n in 0..300 {
            let a: Vec<i8> = (0..n)
                .map(|i: i32| (i * 37) % 256 - 128)
                .map(|x| x as i8)
                .collect();
            let b: Vec<i8> = (0..n)
                .map(|i: i32| (i * 11 + 5) % 256 - 128)
                .map(|x| x as i8)
                .collect();
            let naive: i32 = a.iter().zip(&b).map(|(x, y)| *x as i32 * *y as i32).sum();
            assert_eq!(dot_i8(&a, &b), naive, "n={n}");
            for &k in &kernels {
                assert_eq!(dot_i8_with(k, &a, &b), naive, "{k:?}, n={n}");
                assert_eq!(dot_i8_with(k, &b, &a), naive, "{k:?}, n={n}, swapped");
            }
        }
        for (x, y) in [(-128i8, -128i8), (-128, 127), (127, 127), (127, -128)] {
            let (a, b) = (vec![x; 384], vec![y; 384]);
            for &k in &kernels {
                assert_eq!(dot_i8_with(k, &a, &b), x as i32 * y as i32 * 384, "{k:?}");
            }
        }
    }

    /// One query against many rows gives each row's own dot product, by every kernel this CPU
    /// runs, for every length (the tails past 16 and 64 too) and row count (the rows past a
    /// multiple of four too); a query widened past i8 is still scored exactly.
    #[test]
    fn int8_rows_match_one_dot_each() {
        for &k in &Int8Kernel::usable() {
            for d in [1usize, 7, 16, 31, 64, 100, 384] {
                for count in [0usize, 1, 3, 4, 9, 21] {
                    let q: Vec<i8> = (0..d as i32)
                        .map(|i| ((i * 37) % 256 - 128) as i8)
                        .collect();
                    let rows: Vec<i8> = (0..(d * count) as i32)
                        .map(|i| ((i * 11 + 5) % 256 - 128) as i8)
                        .collect();
                    let wide: Vec<i16> = q.iter().map(|&x| x as i16).collect();
                    let mut out = vec![-1];
                    dot_i8_rows_with(k, &wide, &rows, &mut out);
                    let want: Vec<i32> = std::iter::once(-1)
                        .chain(rows.chunks_exact(d).map(|r| dot_i8_portable(&q, r)))
                        .collect();
                    assert_eq!(out, want, "{k:?}: d {d}, {count} rows");
                }
            }
            let wide = vec![300i16, -200, 5];
            let rows = [1i8, 2, 3, -4, 5, -6];
            let mut out = Vec::new();
            dot_i8_rows_with(k, &wide, &rows, &mut out);
            assert_eq!(out, vec![300 - 400 + 15, -1200 - 1000 - 30], "{k:?}");
        }
    }

    #[test]
    fn normalize_rejects_zero() {
        let mut z = vec![0.0; 4];
        assert!(!normalize(&mut z));
        let mut v = vec![3.0, 4.0];
        assert!(normalize(&mut v));
        assert!((dot(&v, &v) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn normalizing_a_unit_vector_again_keeps_every_bit() {
        for n in [3usize, 32, 384] {
            let mut v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() + 0.01).collect();
            assert!(normalize(&mut v));
            let once = v.clone();
            assert!(normalize(&mut v));
            assert_eq!(v, once, "n={n}");
        }
    }
}
