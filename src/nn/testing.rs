//! Seeded random tensors for the tests of the learned models.

use candle_core::{Device, Shape, Tensor};

/// `n` reproducible values, uniform in [-0.5, 0.5).
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    crate::simulate::rng::centred_noise(n, seed)
}

/// A CPU f32 tensor of the given shape filled by [`random`].
pub fn random_tensor(shape: impl Into<Shape>, seed: u64) -> Tensor {
    let shape: Shape = shape.into();
    Tensor::from_vec(random(shape.elem_count(), seed), shape, &Device::Cpu).unwrap()
}

/// Flattened values of a tensor.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}
