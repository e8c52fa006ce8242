//! `chimap train`: synthetic training data, the training loop with its optimiser and
//! checkpoints, and the log and loss plot of a run.

pub mod synth;
