//! Vectors and the distance the HNSW graph calls in its inner loop.
use serde::{Deserialize, Serialize};

/// Dot product, written with eight independent accumulators so that it vectorises.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_for_all_lengths() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-5, "n={n}");
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
}
