//! Forward simulation: a susceptibility phantom in, a raw multi-echo BIDS dataset and its
//! ground truth out.
//!
//! - [`phantom`]: the built-in procedural head or one read from NIfTI files.
//! - [`signal`]: field and complex multi-echo signal on an oversampled grid, k-space
//!   cropping to the output grid, phase offset and noise.
//! - [`dataset`]: the `chimap simulate` command: files, sidecars and the truth derivative.

pub mod dataset;
pub mod phantom;
pub mod rng;
pub mod signal;

pub use dataset::{run, write_raw, write_truth, Dtype, PhantomArgs, SimulateArgs};
pub use phantom::Phantom;
pub use signal::{simulate_series, simulate_series_fine, Series, SimParams, Truth};
