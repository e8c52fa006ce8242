//! Thresholded k-space division (TKD; Shmueli et al., MRM 2009).
//!
//! χ = IFFT(F(k) / D̃(k)) where D̃ = D when |D| ≥ t and t·sign(D) otherwise, which bounds
//! the amplification near the magic-angle cone at the cost of underestimating χ there.
//! With several orientations the estimate is their least-squares combination in k-space:
//! Σ D̃ᵢ Fᵢ / Σ D̃ᵢ² (equal to the single-orientation formula for one).

use serde::{Deserialize, Serialize};

use super::{restrict, Method, Problem};

use crate::physics::fft::Fft3;
use crate::{Error, Result};

/// The `inversion.tkd` section of the configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Truncation threshold t on |D(k)| (dimensionless, 0 < t < 2/3).
    pub threshold: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config { threshold: 0.15 }
    }
}

pub struct Tkd {
    config: Config,
}

impl Tkd {
    pub fn new(config: Config) -> Self {
        Tkd { config }
    }
}

impl Method for Tkd {
    fn name(&self) -> &'static str {
        "tkd"
    }

    fn invert(&self, problem: &Problem) -> Result<Vec<f32>> {
        let t = self.config.threshold;
        if !(t > 0.0 && t < 2.0 / 3.0) {
            return Err(Error::Config(format!(
                "inversion.tkd.threshold must lie in (0, 2/3), got {t}"
            )));
        }
        problem.check("TKD")?;
        let t = t as f32;
        let fft = Fft3::new(problem.dims);
        let fields: Vec<&[f32]> = problem.orientations.iter().map(|o| o.field).collect();
        let kernels = problem.kernels();
        let kernels: Vec<&[f32]> = kernels.iter().map(Vec::as_slice).collect();
        let chi = crate::physics::dipole::tkd(&fft, &fields, &kernels, t);
        Ok(restrict(chi, problem.mask))
    }

    fn parameters(&self) -> serde_json::Value {
        serde_json::json!({ "threshold": self.config.threshold })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inversion::testing::{nrmse, phantom};
    use crate::inversion::Orientation;
    use crate::physics::DipoleOperator;

    #[test]
    fn tkd_recovers_a_known_object_and_the_threshold_trades_bias() {
        let dims = [48, 48, 48];
        let chi = phantom(dims);
        let b0 = [0.0, 0.2, 0.98];
        let field = DipoleOperator::new(dims, [1.0; 3], b0).forward(&chi);
        let mask = vec![true; chi.len()];
        let problem = Problem {
            dims,
            voxel_size: [1.0; 3],
            orientations: vec![Orientation { field: &field, b0 }],
            mask: &mask,
            weight: None,
            magnitude: None,
            total: None,
            csf: None,
        };
        let low = Tkd::new(Config { threshold: 0.05 })
            .invert(&problem)
            .unwrap();
        let high = Tkd::new(Config { threshold: 0.3 })
            .invert(&problem)
            .unwrap();
        let (e_low, e_high) = (nrmse(&low, &chi, &mask), nrmse(&high, &chi, &mask));
        // Noise-free data: a small threshold inverts almost exactly, a large one biases χ.
        assert!(e_low < 0.25, "t=0.05: {e_low}");
        assert!(
            e_high > e_low,
            "t=0.3 {e_high} should be worse than t=0.05 {e_low}"
        );
    }

    #[test]
    fn tkd_with_two_orientations_beats_one() {
        let dims = [48, 48, 48];
        let chi = phantom(dims);
        let (b1, b2) = ([0.0, 0.0, 1.0], [0.5, 0.0, 0.866]);
        let f1 = DipoleOperator::new(dims, [1.0; 3], b1).forward(&chi);
        let f2 = DipoleOperator::new(dims, [1.0; 3], b2).forward(&chi);
        let mask = vec![true; chi.len()];
        let one = Problem {
            dims,
            voxel_size: [1.0; 3],
            orientations: vec![Orientation { field: &f1, b0: b1 }],
            mask: &mask,
            weight: None,
            magnitude: None,
            total: None,
            csf: None,
        };
        let two = Problem {
            dims,
            voxel_size: [1.0; 3],
            orientations: vec![
                Orientation { field: &f1, b0: b1 },
                Orientation { field: &f2, b0: b2 },
            ],
            mask: &mask,
            weight: None,
            magnitude: None,
            total: None,
            csf: None,
        };
        let tkd = Tkd::new(Config { threshold: 0.2 });
        let e1 = nrmse(&tkd.invert(&one).unwrap(), &chi, &mask);
        let e2 = nrmse(&tkd.invert(&two).unwrap(), &chi, &mask);
        assert!(e2 < 0.7 * e1, "two orientations {e2} vs one {e1}");
    }

    #[test]
    fn invalid_threshold_is_a_config_error() {
        let dims = [4, 4, 4];
        let f = vec![0.0; 64];
        let mask = vec![true; 64];
        let p = Problem {
            dims,
            voxel_size: [1.0; 3],
            orientations: vec![Orientation {
                field: &f,
                b0: [0.0, 0.0, 1.0],
            }],
            mask: &mask,
            weight: None,
            magnitude: None,
            total: None,
            csf: None,
        };
        let err = Tkd::new(Config { threshold: 0.9 })
            .invert(&p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("inversion.tkd.threshold"), "{err}");
    }

    #[test]
    fn referencing_removes_the_region_mean_inside_the_mask() {
        let mut chi = vec![1.0, 2.0, 3.0, 10.0];
        let mask = vec![true, true, true, false];
        let reference = vec![true, true, false, false];
        let mean = crate::inversion::reference_to_mean(&mut chi, &mask, &reference);
        assert_eq!(mean, 1.5);
        assert_eq!(chi, vec![-0.5, 0.5, 1.5, 0.0]);
    }
}
