//! `chimap train`: synthetic training data, the training loop with its optimiser and
//! checkpoints, and the log and loss plot of a run.

pub mod adam;
pub mod config;
pub mod init;
pub mod synth;
pub mod trainer;
