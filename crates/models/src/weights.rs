//! Reading safetensors checkpoints into burn tensors.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use safetensors::{Dtype, SafeTensors};

use crate::ModelError;

/// Float tensors of a checkpoint, by name, on the host.
#[derive(Debug)]
pub struct Weights {
    path: PathBuf,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Weights {
    /// Loads every float tensor of a safetensors file (f32, f16 and bf16; integer tensors such
    /// as `position_ids` are skipped).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::format(path, e))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                _ => continue,
            };
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        Ok(Weights {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// Builds from named host tensors (for GGUF and tests).
    pub fn from_map(path: &Path, tensors: HashMap<String, (Vec<usize>, Vec<f32>)>) -> Self {
        Weights {
            path: path.to_path_buf(),
            tensors,
        }
    }

    /// The file the weights came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a tensor exists.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes and returns a tensor's host data, checking its shape.
    pub fn take_raw(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (s, v) = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if s != shape {
            return Err(ModelError::Shape {
                name: name.to_string(),
                got: s,
                expected: shape.to_vec(),
            });
        }
        Ok(v)
    }

    /// A tensor of rank `D` on `device`.
    pub fn take<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, ModelError> {
        let v = self.take_raw(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(v, shape), device))
    }

    /// A PyTorch `Linear` (weight [out, in], bias [out]) as (W^T [in, out], bias [1, out]).
    pub fn linear<B: Backend>(
        &mut self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Linear<B>, ModelError> {
        let w: Tensor<B, 2> = self.take(&format!("{prefix}.weight"), [out_dim, in_dim], device)?;
        let b = if bias {
            Some(
                self.take::<B, 1>(&format!("{prefix}.bias"), [out_dim], device)?
                    .reshape([1, out_dim]),
            )
        } else {
            None
        };
        Ok(Linear {
            weight_t: w.transpose(),
            bias: b,
        })
    }
}

/// A dense layer: `x W + b` with `W` stored transposed ([in, out]).
#[derive(Debug, Clone)]
pub struct Linear<B: Backend> {
    /// [in, out].
    pub weight_t: Tensor<B, 2>,
    /// [1, out].
    pub bias: Option<Tensor<B, 2>>,
}

impl<B: Backend> Linear<B> {
    /// Multiplies weight and bias by `factor` (folds a constant that follows the layer into it).
    pub fn scale(&mut self, factor: f64) {
        // scaled in the checkpoint's [out, in] layout and viewed transposed again: the matmul
        // is faster on that view than on a contiguous [in, out] copy (flex backend)
        self.weight_t = self
            .weight_t
            .clone()
            .transpose()
            .mul_scalar(factor)
            .transpose();
        self.bias = self.bias.take().map(|b| b.mul_scalar(factor));
    }

    /// Applies the layer to the last dimension of a rank-3 input.
    pub fn forward3(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let out = self.forward2(x.reshape([b * s, d]));
        let o = out.dims()[1];
        out.reshape([b, s, o])
    }

    /// Applies the layer to a rank-2 input. On a host backend a few rows (decode steps) take
    /// the small-batch kernel of [`crate::host`] and many rows are split across cores; other
    /// backends use burn's matmul.
    pub fn forward2(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = match crate::host::matmul(&x, &self.weight_t) {
            Some(y) => y,
            None => x.matmul(self.weight_t.clone()),
        };
        match &self.bias {
            Some(b) => y + b.clone(),
            None => y,
        }
    }
}

/// LayerNorm over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm<B: Backend> {
    /// Scale [1, 1, d].
    pub gamma: Tensor<B, 3>,
    /// Shift [1, 1, d].
    pub beta: Tensor<B, 3>,
    /// Epsilon.
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// Loads `{prefix}.weight` and `{prefix}.bias`.
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        d: usize,
        eps: f64,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let g: Tensor<B, 1> = w.take(&format!("{prefix}.weight"), [d], device)?;
        let b: Tensor<B, 1> = w.take(&format!("{prefix}.bias"), [d], device)?;
        Ok(LayerNorm {
            gamma: g.reshape([1, 1, d]),
            beta: b.reshape([1, 1, d]),
            eps,
        })
    }

    /// Normalises the last dimension.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let mean = x.clone().mean_dim(2);
        let centered = x - mean;
        let var = centered.clone().powf_scalar(2.0).mean_dim(2);
        centered / (var + self.eps).sqrt() * self.gamma.clone() + self.beta.clone()
    }
}
