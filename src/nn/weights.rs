//! Model weights from safetensors files, with errors that name the file and the tensor.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::shipped::Shipped;
use crate::{Error, Result};

/// A weights file read into memory (models are small): a user's file or a shipped default.
pub struct Weights {
    /// What errors and sidecars call it: the path, or `weights/<name>.safetensors (embedded)`.
    pub label: PathBuf,
    bytes: Cow<'static, [u8]>,
    /// The shipped model these bytes are, when they are one.
    pub shipped: Option<&'static Shipped>,
}

impl Weights {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Weights {
            label: path.to_path_buf(),
            bytes: Cow::Owned(std::fs::read(path).map_err(|e| Error::io(path, e))?),
            shipped: None,
        })
    }

    pub fn embedded(s: &'static Shipped) -> Self {
        Weights {
            label: PathBuf::from(format!("{} (embedded)", s.file())),
            bytes: Cow::Borrowed(s.bytes),
            shipped: Some(s),
        }
    }

    /// The shipped model's name, or the file's stem.
    pub fn name(&self) -> String {
        match self.shipped {
            Some(s) => s.name.to_string(),
            None => self
                .label
                .file_stem()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
        }
    }

    pub fn sha256(&self) -> String {
        sha256_of(&self.bytes)
    }

    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        metadata_of_bytes(&self.label, &self.bytes)
    }

    /// Every tensor, on the CPU.
    pub fn tensors(&self) -> Result<HashMap<String, candle_core::Tensor>> {
        candle_core::safetensors::load_buffer(&self.bytes, &Device::Cpu).map_err(|e| {
            Error::input(
                &self.label,
                format!("not a readable safetensors file ({e})"),
            )
        })
    }

    /// Builds a model, turning a missing or mis-shaped tensor into an input error naming the
    /// file, the model and the tensor.
    pub fn build<M>(
        &self,
        model: &str,
        device: &Device,
        new: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
    ) -> Result<M> {
        let vb = VarBuilder::from_buffered_safetensors(self.bytes.to_vec(), DType::F32, device)
            .map_err(|e| {
                Error::input(
                    &self.label,
                    format!(
                        "not a readable safetensors file ({e}); pass the weights file of a \
                         chimap model"
                    ),
                )
            })?;
        new(vb).map_err(|e| {
            Error::input(
                &self.label,
                format!(
                    "does not hold {model} weights for this configuration: {e}; use a weights \
                     file trained for {model} with the same configuration"
                ),
            )
        })
    }
}

/// Builds a model from a weights file (see [`Weights::build`]).
pub fn build<M>(
    path: &Path,
    model: &str,
    device: &Device,
    new: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
) -> Result<M> {
    Weights::open(path)?.build(model, device, new)
}

/// The architecture `chimap train` recorded in a weights file's metadata (None for a file
/// without it); `label` names the file in the error.
pub fn architecture<C: serde::de::DeserializeOwned>(
    label: &Path,
    meta: &HashMap<String, String>,
) -> Result<Option<C>> {
    meta.get(MODEL_CONFIG_KEY)
        .map(|json| {
            serde_json::from_str(json).map_err(|e| {
                Error::input(
                    label,
                    format!("unreadable model configuration in the metadata: {e}"),
                )
            })
        })
        .transpose()
}

/// The SHA-256 of bytes as lowercase hex.
pub fn sha256_of(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How a weights file was trained, from the metadata `chimap train` writes (each part is
/// absent for files from elsewhere or from older versions).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Provenance {
    pub steps: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub wall_seconds: Option<f64>,
    /// The training configuration (YAML), with its data section.
    pub config: Option<String>,
    pub chimap_version: Option<String>,
    /// The trained U-net a LoopNet started as (`chimap train --grow-from`).
    pub grown_from: Option<String>,
}

impl Provenance {
    pub fn from_metadata(meta: &HashMap<String, String>) -> Self {
        let number = |k: &str| meta.get(k).and_then(|v| v.parse::<f64>().ok());
        Provenance {
            steps: meta.get(STEP_KEY).and_then(|v| v.parse().ok()),
            cpu_seconds: number(CPU_SECONDS_KEY),
            wall_seconds: number(WALL_SECONDS_KEY),
            config: meta.get(TRAIN_CONFIG_KEY).cloned(),
            chimap_version: meta.get(VERSION_KEY).cloned(),
            grown_from: meta.get(GROWN_FROM_KEY).cloned(),
        }
    }

    /// For a sidecar: steps, time, and the training data's configuration.
    pub fn to_json(&self) -> serde_json::Value {
        let config = self
            .config
            .as_deref()
            .and_then(|y| serde_yaml::from_str::<serde_json::Value>(y).ok());
        let hours = |s: f64| (s / 3.6).round() / 1000.0;
        serde_json::json!({
            "Steps": self.steps,
            "CpuHours": self.cpu_seconds.map(hours),
            "WallHours": self.wall_seconds.map(hours),
            "Data": config.as_ref().and_then(|c| c.get("data")).cloned(),
            "Seed": config.as_ref().and_then(|c| c.get("seed")).cloned(),
            "ChimapVersion": self.chimap_version,
            "GrownFrom": self.grown_from,
        })
    }
}

/// Metadata key naming the model a file holds (`lpcnn`, `loopnet`, `unet`).
pub const MODEL_KEY: &str = "chimap.model";
/// Metadata key holding the model's architecture configuration (JSON).
pub const MODEL_CONFIG_KEY: &str = "chimap.model_config";
/// Keys `chimap train` adds: the step, its configuration, the version, and the training time
/// so far (wall and CPU seconds, summed over resumed runs).
pub const STEP_KEY: &str = "chimap.train.step";
pub const TRAIN_CONFIG_KEY: &str = "chimap.train.config";
pub const VERSION_KEY: &str = "chimap.version";
pub const WALL_SECONDS_KEY: &str = "chimap.train.wall_seconds";
pub const CPU_SECONDS_KEY: &str = "chimap.train.cpu_seconds";
/// The U-net weights a LoopNet was grown from, with their step and sha256; the training time
/// keys then include the U-net's.
pub const GROWN_FROM_KEY: &str = "chimap.train.grown_from";

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
    let w = Weights::open(path)?;
    // Metadata first: its error says what file to pass.
    let meta = w.metadata()?;
    Ok((w.tensors()?, meta))
}

/// The metadata of a safetensors file (empty when it has none).
pub fn metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    metadata_of_bytes(path, &bytes)
}

/// The metadata of safetensors bytes; `path` names them in errors.
pub fn metadata_of_bytes(path: &Path, bytes: &[u8]) -> Result<HashMap<String, String>> {
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
        // FIPS 180-2, appendix B.1.
        assert_eq!(
            sha256_of(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
