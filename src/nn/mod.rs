//! Learned inversion on Candle: 3D layers, the dipole operator as a differentiable op, and
//! the LP-CNN, LoopNet and U-net models. Knows tensors and physics, nothing about BIDS.
//!
//! Layout, fixed once for the whole module: activations are `[N, C, D, H, W]` row-major f32.
//! A project volume (`Vec<f32>`, x fastest, dims `[nx, ny, nz]`) maps to a tensor of shape
//! `[nz, ny, nx]` *without moving data*: `D = z`, `H = y`, `W = x`. So the physics module's
//! dims are the reverse of a tensor's last three dims (see [`tensor_dims`]).
//!
//! Candle (0.11) has no 3D convolution, pooling, upsampling or FFT; [`conv3d`], [`pool`] and
//! [`dipole`] add them as custom ops with backward passes. On CUDA (`--features cuda`,
//! [`device`]) the convolution and the pooling are composed from Candle's own ops, which
//! Candle differentiates, and the dipole ops run on cuFFT.

pub mod conv3d;
pub mod device;
pub mod dipole;
#[cfg(feature = "cuda")]
mod dipole_cuda;
pub mod ghpa;
pub mod layers;
pub mod loopnet;
pub mod lpcnn;
pub mod pool;
pub mod shipped;
pub mod tiling;
pub mod weights;

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
#[cfg(test)]
pub(crate) mod testing;

pub use conv3d::{conv3d, Conv3d};

/// The f32 data of a custom op's CPU operand, which must be contiguous; `what` names the
/// operand in the error (`"conv3d: weight"`).
pub(crate) fn contiguous_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Tensor dims `[D, H, W]` of a volume with physics dims `[nx, ny, nz]`.
pub fn tensor_dims(dims: [usize; 3]) -> [usize; 3] {
    [dims[2], dims[1], dims[0]]
}

/// The mean of `x` `[N, 1, D, H, W]` over each sample's 0/1 mask, `[N, 1, 1, 1, 1]` (0 for
/// an empty mask).
pub fn masked_mean(
    x: &candle_core::Tensor,
    mask: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let count = mask.sum_keepdim((2, 3, 4))?.clamp(1.0, f64::INFINITY)?;
    (x * mask)?.sum_keepdim((2, 3, 4))?.div(&count)
}
