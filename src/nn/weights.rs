//! Model weights from safetensors files, with errors that name the file and the tensor.

use std::collections::HashMap;
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

/// The SHA-256 of a file as lowercase hex (weights files are tens of MB at most).
pub fn sha256_hex(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Metadata key naming the model a file holds (`lpcnn`, `loopnet`, `unet`).
pub const MODEL_KEY: &str = "chimap.model";
/// Metadata key holding the model's architecture configuration (JSON).
pub const MODEL_CONFIG_KEY: &str = "chimap.model_config";

/// Writes named tensors and string metadata as one safetensors file, atomically.
pub fn save(
    path: &Path,
    tensors: Vec<(String, candle_core::Tensor)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes = safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| Error::Numerics(format!("{}: cannot serialise: {e}", path.display())))?;
    crate::io::write_atomic(path, &bytes)
}

/// Every tensor of a safetensors file and its metadata (empty when it has none).
pub fn read(
    path: &Path,
) -> Result<(
    HashMap<String, candle_core::Tensor>,
    HashMap<String, String>,
)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let meta = metadata_of(path, &bytes)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::input(path, format!("not a readable safetensors file ({e})")))?;
    Ok((tensors, meta))
}

/// The metadata of a safetensors file (empty when it has none).
pub fn metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    metadata_of(path, &bytes)
}

fn metadata_of(path: &Path, bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        Error::input(
            path,
            format!(
                "not a readable safetensors file ({e}); pass the weights file of a chimap model"
            ),
        )
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_standard_test_vector() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        // FIPS 180-2, appendix B.1.
        assert_eq!(
            sha256_hex(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
