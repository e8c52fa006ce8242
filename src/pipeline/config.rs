//! The complete configuration of a run: what `chimap config --default` prints and what a
//! `--config FILE.yaml` may override (any subset; unknown keys are errors).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{bids, inversion, preprocess, qc, register, Error, Result};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// B0 field strength in tesla, used only for inputs whose sidecars lack
    /// `MagneticFieldStrength`.
    pub field_strength: Option<f64>,
    /// From raw phase to the local field.
    pub preprocess: preprocess::Config,
    /// Which series of a session may form a multi-orientation set.
    pub orientation_set: bids::OrientationRule,
    /// Aligning the orientations of an as-scanned set to its first.
    pub registration: register::Options,
    /// From the local field to χ.
    pub inversion: inversion::Config,
    /// Limits of the local-field checks run before inversion.
    pub qc: qc::Config,
}

impl Config {
    /// Reads a YAML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_yaml(&text).map_err(|e| match e {
            Error::Config(msg) => Error::input(path, format!("invalid configuration: {msg}")),
            other => other,
        })
    }

    /// Parses YAML over the defaults; an empty document gives the defaults.
    pub fn from_yaml(text: &str) -> Result<Config> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let config: Config = serde_yaml::from_str(text).map_err(|e| {
            Error::Config(format!("{e} (see `chimap config --default` for every key)"))
        })?;
        config.registration.check()?;
        Ok(config)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("the configuration always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_round_trips_through_yaml() {
        let text = Config::default().to_yaml();
        let back = Config::from_yaml(&text).unwrap();
        assert_eq!(back.to_yaml(), text);
        assert!(
            text.contains("inversion:") && text.contains("threshold:"),
            "{text}"
        );
    }

    #[test]
    fn a_subset_overrides_only_what_it_names() {
        let c = Config::from_yaml("inversion:\n  tkd:\n    threshold: 0.2\nfield_strength: 7\n")
            .unwrap();
        assert_eq!(c.inversion.tkd.threshold, 0.2);
        assert_eq!(c.field_strength, Some(7.0));
        assert_eq!(c.inversion.method, inversion::MethodName::Tkd);
    }

    #[test]
    fn registration_similarity_is_chosen_in_the_config_and_checked() {
        let c = Config::from_yaml("registration:\n  similarity: mutual-information\n").unwrap();
        assert_eq!(
            c.registration.similarity,
            register::Similarity::MutualInformation
        );
        assert_eq!(c.registration.levels, register::Options::default().levels);
        let err = Config::from_yaml("registration:\n  bins: 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("registration.bins"), "{err}");
        let err = Config::from_yaml("registration:\n  similarity: mi\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mutual-information"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let err = Config::from_yaml("inversion:\n  tkd:\n    treshold: 0.2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("treshold"), "{err}");
        let err = Config::from_yaml("nonsense: 1\n").unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
    }

    #[test]
    fn config_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.yaml");
        std::fs::write(&p, "inversion: [1, 2\n").unwrap();
        let err = Config::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("bad.yaml"), "{err}");
    }
}
