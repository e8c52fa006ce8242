//! Model weights from safetensors files, with errors that name the file and the tensor.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// A `VarBuilder` over the tensors of a safetensors file (read whole; models are small).
pub fn load(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    VarBuilder::from_buffered_safetensors(bytes, DType::F32, device).map_err(|e| {
        Error::input(
            path,
            format!(
                "not a readable safetensors file ({e}); pass the weights file of a chimap model"
            ),
        )
    })
}

/// Builds a model from a weights file, turning a missing or mis-shaped tensor into an input
/// error naming the file, the model and the tensor.
pub fn build<M>(
    path: &Path,
    model: &str,
    device: &Device,
    new: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
) -> Result<M> {
    let vb = load(path, device)?;
    new(vb).map_err(|e| {
        Error::input(
            path,
            format!(
                "does not hold {model} weights for this configuration: {e}; use a weights file \
                 trained for {model} with the same configuration"
            ),
        )
    })
}
