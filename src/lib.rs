//! chimap: quantitative susceptibility mapping from multi-echo gradient-echo phase.
//!
//! The modules are listed in the order data flows through a participant-level run:
//!
//! ```text
//! bids ─▶ io ─▶ preprocess ─▶ qc ─▶ inversion ─▶ derivatives ─▶ report
//!  discover   NIfTI   scale, unwrap,   local-field   TKD, …      Chimap, masks,  subject HTML,
//!  group      read/   echo fit, mask,  QC verdicts               fields, sidecars group level
//!             write   background
//! ```
//!
//! `register` moves the members of a multi-orientation set imaged as scanned (head turned
//! inside one grid) onto one head frame before a joint inversion.
//!
//! `physics` (dipole kernel, FFT, units, B0 direction) is shared by `preprocess`,
//! `inversion` and `simulate`; `pipeline` is the only module that knows the order of the
//! stages; `cli` turns arguments and the YAML config into `pipeline` settings.

// Voxel loops index several arrays with the same (i, j, k); iterator chains hide that.
#![allow(clippy::needless_range_loop)]

pub mod error;
pub mod volume;

pub mod bids;
pub mod cli;
pub mod derivatives;
pub mod evaluate;
pub mod inversion;
pub mod io;
pub mod nn;
pub mod physics;
pub mod pipeline;
pub mod preprocess;
pub mod qc;
pub mod register;
pub mod report;
pub mod simulate;
pub mod train;

pub use error::{Error, Result};
pub use volume::{Geometry, Mask, Volume};

/// Version recorded in every sidecar and in `dataset_description.json`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
