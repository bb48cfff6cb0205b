//! A small-batch matmul for weights held in host memory (burn's Flex backend): `x W^T` for a
//! few rows of `x`, streaming each weight row once for all rows.
//!
//! A decode step multiplies 1-8 rows by every weight matrix of the model. burn-flex's gemm
//! handles such calls row block by row block and runs small ones on one core: on the 2-core
//! machine a 4 x 576 by 576 x 49152 product took 19.5 ms against 6.1 ms for one row, while the
//! weights (113 MB) stream from memory in ~4 ms. This kernel reads each weight row once, keeps
//! the rows of `x` in L1 and splits the output columns across the rayon pool. Each output
//! element is summed in the same order whatever the number of rows, so a stream's logits do not
//! depend on how many other streams share its decode step.
//!
//! It runs only where the backend's tensors are Flex tensors (recognised by type at run time,
//! so model code stays generic); elsewhere, or for more rows, burn's matmul runs.
use std::any::Any;

use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::TensorData;

/// Most rows the kernel takes; longer inputs (prefill) go to burn's gemm.
pub(crate) const MAX_ROWS: usize = 8;

/// Weights (n x k) below which the small-batch product runs on the calling thread alone.
const PARALLEL_MIN_WEIGHTS: usize = 1 << 18;

/// `x w_t` (`w_t` [k, n], a transposed view of the checkpoint's [n, k] weight) on a host
/// backend: a few rows take [`matmul_rows`], many rows [`matmul_split`]. `None` when the tensors
/// are not Flex host tensors (the caller then uses burn's matmul).
pub(crate) fn matmul<B: Backend>(x: &Tensor<B, 2>, w_t: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    if x.dims()[0] <= MAX_ROWS {
        matmul_rows(x, &w_t.clone().transpose())
    } else {
        matmul_split(x, w_t)
    }
}

/// Whether `B` is burn's flex CPU backend (host tensors), known from the type alone: the BERT
/// forward pass picks the crate's CPU kernels ([`crate::kernels`]) by it.
pub(crate) fn is_flex<B: Backend>() -> bool {
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<burn::backend::Flex>()
}

/// The Flex tensor behind `t` (a shared handle to the same storage), if the backend is Flex.
fn flex<B: Backend>(t: &Tensor<B, 2>) -> Option<FlexTensor> {
    let p = t.clone().into_primitive().tensor();
    (&p as &dyn Any).downcast_ref::<FlexTensor>().cloned()
}

/// `x W^T` for `x` [m, k] (m <= [`MAX_ROWS`]) and `w_out_in` [n, k] (the checkpoint's
/// layout), or `None` when the tensors are not f32 host (Flex) tensors or the weight is not
/// contiguous.
fn matmul_rows<B: Backend>(x: &Tensor<B, 2>, w_out_in: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let [m, k] = x.dims();
    let [n, wk] = w_out_in.dims();
    if m == 0 || m > MAX_ROWS || wk != k {
        return None;
    }
    let wf = flex(w_out_in)?;
    let w = wf.as_slice::<f32>()?;
    let xf = flex(x)?.to_contiguous();
    let out_t = columns(xf.as_slice::<f32>()?, m, k, w, n);
    // out_t is [n, m]; the result is [m, n]
    let mut out = vec![0f32; m * n];
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
    Some(Tensor::from_data(TensorData::new(out, [m, n]), &x.device()))
}

/// Rows per part below which a product is not split.
const SPLIT_MIN_ROWS: usize = 32;

/// One single-thread rayon pool per core: a matmul part run inside one of them gets gemm's
/// sequential path, so parts on different pools do not contend for the same workers.
static PART_POOLS: std::sync::LazyLock<Vec<rayon::ThreadPool>> = std::sync::LazyLock::new(|| {
    (0..crate::lanes::cpu_lanes())
        .filter_map(|i| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(move |_| format!("matmul-part-{i}"))
                .build()
                .ok()
        })
        .collect()
});

/// `x w_t` for many rows of a host (Flex) tensor: the rows split into one part per core, each
/// part multiplied by single-threaded gemm on its own pool, the parts concatenated. burn-flex's
/// gemm scales poorly across cores inside one call (527x576x1536 on 2 cores: 69-76 GFLOP/s in
/// one call, 134-151 in two parts this way). `None` when the input is not a Flex tensor or too
/// short to split.
fn matmul_split<B: Backend>(x: &Tensor<B, 2>, w_t: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let [m, k] = x.dims();
    let pools = &*PART_POOLS;
    if pools.len() < 2 || m < 2 * SPLIT_MIN_ROWS {
        return None;
    }
    flex(x)?;
    let parts = pools.len().min(m / SPLIT_MIN_ROWS);
    let per = m.div_ceil(parts);
    let part = |p: usize| {
        let rows = p * per..((p + 1) * per).min(m);
        let (x, w_t) = (x.clone(), w_t.clone());
        pools[p].install(move || x.slice([rows, 0..k]).matmul(w_t))
    };
    let outs: Vec<Tensor<B, 2>> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..parts).map(|p| s.spawn(move || part(p))).collect();
        let mut outs = vec![part(0)];
        outs.extend(handles.into_iter().map(|h| h.join().expect("matmul part")));
        outs
    });
    Some(Tensor::cat(outs, 0))
}

/// `out_t[j * m + i] = dot(x_i, w_j)` for every weight row `j`, columns split across rayon.
fn columns(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    let threads = rayon::current_num_threads();
    if threads <= 1 || n * k < PARALLEL_MIN_WEIGHTS {
        dot_rows(x, m, k, w, &mut out_t);
        return out_t;
    }
    let per = n.div_ceil(threads * 4).max(16);
    use rayon::prelude::*;
    out_t
        .par_chunks_mut(per * m)
        .enumerate()
        .for_each(|(c, out)| {
            let j0 = c * per;
            let rows = out.len() / m;
            dot_rows(x, m, k, &w[j0 * k..(j0 + rows) * k], out);
        });
    out_t
}

/// `out[j * m + i] = dot(x_i, w_j)` for the weight rows in `w`.
fn dot_rows(x: &[f32], m: usize, k: usize, w: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if *AVX2_FMA {
        macro_rules! go {
            ($($m:literal)*) => {
                match m {
                    $($m => {
                        // SAFETY: avx2 and fma were detected on this CPU
                        unsafe { avx2::dot_rows::<$m>(x, k, w, out) };
                        return;
                    })*
                    _ => {}
                }
            };
        }
        go!(1 2 3 4 5 6 7 8);
    }
    portable_dot_rows(x, m, k, w, out);
}

#[cfg(target_arch = "x86_64")]
static AVX2_FMA: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
});

/// The same sums without SIMD intrinsics (8 lanes of partial sums, added pairwise as the AVX2
/// path does, but unfused), for other CPUs.
fn portable_dot_rows(x: &[f32], m: usize, k: usize, w: &[f32], out: &mut [f32]) {
    let full = k / 8 * 8;
    for (j, wr) in w.chunks_exact(k).enumerate() {
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            let mut acc = [0f32; 8];
            for c in (0..full).step_by(8) {
                for l in 0..8 {
                    acc[l] += xr[c + l] * wr[c + l];
                }
            }
            let mut v = reduce8(acc);
            for c in full..k {
                v += xr[c] * wr[c];
            }
            out[j * m + i] = v;
        }
    }
}

/// Sum of 8 partial sums in the order of the AVX2 reduction.
fn reduce8(a: [f32; 8]) -> f32 {
    let s = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (s[0] + s[1]) + (s[2] + s[3])
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `out[j * M + i] = dot(x_i, w_j)`; `x` is [M, k], `w` holds whole rows of length `k`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows<const M: usize>(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
        debug_assert!(x.len() >= M * k && out.len() >= w.len() / k * M);
        let full = k / 8 * 8;
        for (j, wr) in w.chunks_exact(k).enumerate() {
            let mut acc = [_mm256_setzero_ps(); M];
            let mut c = 0;
            while c < full {
                let wv = _mm256_loadu_ps(wr.as_ptr().add(c));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i * k + c)), wv, *a);
                }
                c += 8;
            }
            for (i, a) in acc.iter().enumerate() {
                // s = [a0+a4, a1+a5, a2+a6, a3+a7], then (s0 + s1) + (s2 + s3)
                let s = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps(*a, 1));
                let t = _mm_add_ps(s, _mm_movehdup_ps(s));
                let mut v = _mm_cvtss_f32(_mm_add_ss(t, _mm_movehl_ps(t, t)));
                for cc in full..k {
                    v += x[i * k + cc] * wr[cc];
                }
                out[j * M + i] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn rows_times_host_weights_match_a_float64_product_and_burns_matmul() {
        type B = burn::backend::Flex;
        let dev = Default::default();
        // k not a multiple of 8, and n large enough for the parallel split
        for (k, n) in [(13usize, 5usize), (576, 1536), (100, 3000)] {
            let w = data(n * k, 7);
            let wt = Tensor::<B, 2>::from_data(TensorData::new(w.clone(), [n, k]), &dev);
            for m in 1..=MAX_ROWS {
                let x = data(m * k, m as u32);
                let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [m, k]), &dev);
                let got: Vec<f32> = matmul_rows(&xt, &wt)
                    .expect("flex tensors take the host path")
                    .into_data()
                    .to_vec()
                    .unwrap();
                let want = reference(&x, m, k, &w, n);
                let burn: Vec<f32> = xt
                    .clone()
                    .matmul(wt.clone().transpose())
                    .into_data()
                    .to_vec()
                    .unwrap();
                for ((g, r), b) in got.iter().zip(&want).zip(&burn) {
                    let tol = 1e-5 * (k as f64).sqrt() * 4.0;
                    assert!(
                        (*g as f64 - r).abs() <= tol,
                        "k {k} n {n} m {m}: {g} vs {r}"
                    );
                    assert!((g - b).abs() as f64 <= 2.0 * tol, "{g} vs burn {b}");
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_other_rows() {
        let (k, n) = (333usize, 700usize);
        let w = data(n * k, 3);
        let x8 = data(8 * k, 9);
        let mut alone = Vec::new();
        for i in 0..8 {
            alone.push(columns(&x8[i * k..(i + 1) * k], 1, k, &w, n));
        }
        for m in 1..=8 {
            let out_t = columns(&x8[..m * k], m, k, &w, n);
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(
                        out_t[j * m + i].to_bits(),
                        alone[i][j].to_bits(),
                        "m {m} row {i} col {j}"
                    );
                }
            }
        }
        // the portable path (other CPUs) gives the same sums up to rounding
        let mut portable = vec![0f32; n * 3];
        portable_dot_rows(&x8[..3 * k], 3, k, &w, &mut portable);
        for (p, s) in portable.iter().zip(columns(&x8[..3 * k], 3, k, &w, n)) {
            assert!((p - s).abs() <= 1e-4, "{p} vs {s}");
        }
    }

    #[test]
    fn many_rows_split_across_cores_give_burns_product() {
        type B = burn::backend::Flex;
        let dev = Default::default();
        let (k, n) = (96usize, 200usize);
        let w = Tensor::<B, 2>::from_data(TensorData::new(data(n * k, 4), [n, k]), &dev);
        for m in [63usize, 64, 65, 300] {
            let x = Tensor::<B, 2>::from_data(TensorData::new(data(m * k, 8), [m, k]), &dev);
            let want: Vec<f32> = x
                .clone()
                .matmul(w.clone().transpose())
                .into_data()
                .to_vec()
                .unwrap();
            match matmul_split(&x, &w.clone().transpose()) {
                Some(got) => {
                    assert_eq!(got.dims(), [m, n]);
                    let got: Vec<f32> = got.into_data().to_vec().unwrap();
                    for (g, b) in got.iter().zip(&want) {
                        assert!((g - b).abs() < 1e-4, "m {m}: {g} vs {b}");
                    }
                }
                None => assert!(m < 2 * SPLIT_MIN_ROWS || PART_POOLS.len() < 2),
            }
        }
    }

    #[test]
    fn other_shapes_and_strided_inputs_are_handled_or_declined() {
        type B = burn::backend::Flex;
        let dev = Default::default();
        let w = Tensor::<B, 2>::from_data(TensorData::new(data(40, 1), [4, 10]), &dev);
        let too_many = Tensor::<B, 2>::from_data(TensorData::new(data(90, 2), [9, 10]), &dev);
        assert!(matmul_rows(&too_many, &w).is_none());
        let wrong_k = Tensor::<B, 2>::from_data(TensorData::new(data(9, 2), [1, 9]), &dev);
        assert!(matmul_rows(&wrong_k, &w).is_none());
        // a transposed (strided) input is made contiguous first
        let xt = Tensor::<B, 2>::from_data(TensorData::new(data(20, 5), [10, 2]), &dev).transpose();
        let got: Vec<f32> = matmul_rows(&xt, &w).unwrap().into_data().to_vec().unwrap();
        let want: Vec<f32> = xt.matmul(w.transpose()).into_data().to_vec().unwrap();
        for (g, b) in got.iter().zip(&want) {
            assert!((g - b).abs() < 1e-4);
        }
    }
}
