//! Backend choices. Library code is generic; binaries use [`Cpu`] (or [`Gpu`] with `cuda`).

/// The default CPU backend (burn's flex backend, measured fastest here: see the README).
pub type Cpu = burn::backend::Flex;
/// The ndarray CPU backend, for comparison in benchmarks.
pub type CpuNdArray = burn::backend::NdArray;
/// The CUDA backend.
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;
