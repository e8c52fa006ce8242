//! The training configuration (`--config train.yaml`): every key has a default sized for a
//! small CPU run; `chimap train --print-default-config` prints them all.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::synth::DataConfig;
use crate::nn::{loopnet, lpcnn};
use crate::{Error, Result};

/// Which network `chimap train --model` trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// LP-CNN: learned proximal gradient descent over 1..N orientations.
    Lpcnn,
    /// LoopNet: the looped U-net with GHPA (one orientation).
    Loopnet,
    /// The plain 3D U-net baseline (one orientation).
    Unet,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Lpcnn => "lpcnn",
            ModelKind::Loopnet => "loopnet",
            ModelKind::Unet => "unet",
        }
    }

    pub fn parse(s: &str) -> Option<ModelKind> {
        [ModelKind::Lpcnn, ModelKind::Loopnet, ModelKind::Unet]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Adam with PyTorch's coupled (L2) weight decay, as LP-CNN's code uses it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// L2 penalty added to the gradient (`weight_decay · θ`).
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Step schedule: the learning rate is multiplied by `gamma` every `every_epochs` epochs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    pub gamma: f64,
    pub every_epochs: usize,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            gamma: 0.8,
            every_epochs: 25,
        }
    }
}

/// Architectures of the three models; only the one being trained is used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    pub lpcnn: lpcnn::Config,
    pub loopnet: loopnet::Config,
    pub unet: loopnet::Config,
}

impl Default for ModelsConfig {
    /// Reduced from the papers so that a CPU run finishes in minutes.
    fn default() -> Self {
        ModelsConfig {
            lpcnn: lpcnn::Config {
                channels: 16,
                blocks: 2,
                dropout: 0.0,
                ..lpcnn::Config::default()
            },
            loopnet: loopnet::Config {
                channels: vec![8, 16, 32, 64],
                ghpa_map_size: 4,
                ..loopnet::Config::default()
            },
            unet: loopnet::Config {
                channels: vec![8, 16, 32, 64],
                ..loopnet::Config::unet()
            },
        }
    }
}

/// Everything a training run depends on, apart from the model choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Seeds the initial weights and every training and validation batch.
    pub seed: u64,
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub batch_size: usize,
    /// Validation batches (of `batch_size`) scored after every epoch.
    pub validation_batches: usize,
    pub optimizer: AdamConfig,
    pub schedule: ScheduleConfig,
    /// Training batches whose targets give LP-CNN's z-score statistics.
    pub normalisation_batches: usize,
    /// What the loss compares inside the mask.
    pub loss: Loss,
    pub data: DataConfig,
    pub model: ModelsConfig,
}

/// The training loss, inside each sample's mask.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// Mean squared error against the target χ (the papers' loss).
    #[default]
    Mse,
    /// The same after removing each sample's mean error in its mask. A local field does not
    /// determine χ's mean over the mask (users reference it, and the scores are demeaned),
    /// so the plain MSE spends the network on guessing that offset from the training prior.
    Demeaned,
    /// Each sample's demeaned squared error over its demeaned target's energy (the square
    /// of the demeaned NRMSE that scores a map), averaged over the batch: every sample
    /// counts alike, where in an MSE the high-contrast ones (strong sources) dominate.
    Nrmse,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 1,
            epochs: 10,
            steps_per_epoch: 50,
            batch_size: 2,
            validation_batches: 4,
            optimizer: AdamConfig::default(),
            schedule: ScheduleConfig::default(),
            normalisation_batches: 8,
            loss: Loss::Mse,
            data: DataConfig::default(),
            model: ModelsConfig::default(),
        }
    }
}

impl TrainConfig {
    /// Reads a YAML file over the defaults.
    pub fn from_file(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_yaml(&text).map_err(|e| match e {
            Error::Config(msg) => {
                Error::input(path, format!("invalid training configuration: {msg}"))
            }
            other => other,
        })
    }

    /// Parses YAML over the defaults; an empty document gives the defaults.
    pub fn from_yaml(text: &str) -> Result<TrainConfig> {
        let cfg: TrainConfig = if text.trim().is_empty() {
            TrainConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| {
                Error::Config(format!(
                    "{e} (see `chimap train --print-default-config` for every key)"
                ))
            })?
        };
        cfg.check()?;
        Ok(cfg)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("the configuration always serialises")
    }

    fn check(&self) -> Result<()> {
        if self.epochs == 0 || self.steps_per_epoch == 0 || self.batch_size == 0 {
            return Err(Error::Config(
                "epochs, steps_per_epoch and batch_size must be at least 1".into(),
            ));
        }
        if self.schedule.every_epochs == 0
            || self.schedule.gamma.is_nan()
            || self.schedule.gamma <= 0.0
        {
            return Err(Error::Config(
                "schedule.every_epochs must be at least 1 and schedule.gamma positive".into(),
            ));
        }
        let o = &self.optimizer;
        if !(o.lr > 0.0 && (0.0..1.0).contains(&o.beta1) && (0.0..1.0).contains(&o.beta2)) {
            return Err(Error::Config(
                "optimizer: lr must be positive and beta1, beta2 in [0, 1)".into(),
            ));
        }
        Ok(())
    }

    /// Learning rate in `epoch` (0-based) under the step schedule.
    pub fn learning_rate(&self, epoch: usize) -> f64 {
        let drops = (epoch / self.schedule.every_epochs) as i32;
        self.optimizer.lr * self.schedule.gamma.powi(drops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_round_trips_and_unknown_keys_are_errors() {
        let text = TrainConfig::default().to_yaml();
        assert_eq!(
            TrainConfig::from_yaml(&text).unwrap(),
            TrainConfig::default()
        );
        let cfg = TrainConfig::from_yaml("epochs: 3\ndata:\n  patch: 16\n").unwrap();
        assert_eq!((cfg.epochs, cfg.data.patch), (3, 16));
        let err = TrainConfig::from_yaml("epoch: 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("epoch") && err.contains("print-default-config"),
            "{err}"
        );
        assert!(TrainConfig::from_yaml("model:\n  lpcnn:\n    chanels: 4\n").is_err());
        assert!(TrainConfig::from_yaml("batch_size: 0\n").is_err());
    }

    #[test]
    fn step_schedule_multiplies_by_gamma_every_k_epochs() {
        let cfg = TrainConfig::from_yaml(
            "optimizer:\n  lr: 0.01\nschedule:\n  gamma: 0.5\n  every_epochs: 2\n",
        )
        .unwrap();
        let lrs: Vec<f64> = (0..5).map(|e| cfg.learning_rate(e)).collect();
        assert_eq!(lrs, vec![0.01, 0.01, 0.005, 0.005, 0.0025]);
    }

    /// The paper-size configurations shipped in `weights/` stay valid as the keys evolve.
    #[test]
    fn shipped_configurations_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                TrainConfig::from_file(&path).unwrap();
                seen += 1;
            }
        }
        assert!(seen >= 2, "{seen} configurations in {}", dir.display());
        let paper = TrainConfig::from_file(&dir.join("lpcnn-paper.yaml")).unwrap();
        assert_eq!(paper.model.lpcnn, lpcnn::Config::default());
    }
}
