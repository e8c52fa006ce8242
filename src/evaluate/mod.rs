//! Quality metrics against a reference χ map, as used by the QSM reconstruction challenges,
//! and the `chimap evaluate` command that applies them to NIfTI files.
//!
//! - [`metrics`]: the metrics on in-memory arrays (no files).
//! - [`filter`]: the small 3D filters they need (Gaussian window, Laplacian of Gaussian).
//! - [`command`]: reading and checking the inputs, the printed table and the JSON.

pub mod command;
pub mod filter;
pub mod metrics;

pub use command::{run, EvaluateArgs};
pub use metrics::{nrmse_demeaned, score, Scores};
