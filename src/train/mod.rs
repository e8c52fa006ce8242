//! `chimap train`: synthetic training data, the training loop with its optimiser and
//! checkpoints, and the log and loss plot of a run.

pub mod adam;
mod command;
pub mod config;
pub mod init;
pub mod labels;
pub mod plot;
pub mod synth;
pub mod trainer;
pub mod userdata;

pub use command::{run, TrainArgs};
