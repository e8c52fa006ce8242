//! Preprocessing (work in progress).

pub mod background;
pub mod echo_fit;
pub mod mask;
pub mod scale;
pub mod unwrap;
pub mod util;
pub mod voids;

use serde::{Deserialize, Serialize};

/// The `preprocess` section of the configuration: one subsection per stage.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How raw phase values become radians.
    pub phase: scale::ScaleConfig,
    /// Laplacian phase unwrapping.
    pub unwrap: unwrap::UnwrapConfig,
    /// Receive-phase offset removal and the multi-echo field fit.
    pub echo_fit: echo_fit::EchoFitConfig,
    /// Brain mask from the magnitude.
    pub mask: mask::MaskConfig,
    /// Detection and in-painting of voxels whose signal was lost.
    pub voids: voids::VoidConfig,
    /// V-SHARP background field removal.
    pub background: background::BackgroundConfig,
}
