//! COSMOS: calculation of susceptibility through multiple orientation sampling (Liu et al.,
//! MRM 2009).
//!
//! With the head at several orientations the dipole cones no longer coincide, so the
//! least-squares solution `χ(k) = Σᵢ Dᵢ Fᵢ / Σᵢ Dᵢ²` is well conditioned nearly everywhere
//! and needs no prior. Where the cones still meet (`Σᵢ Dᵢ² < t`) the denominator is held
//! at `t`, so noise there is amplified by at most `1/√t`.

use serde::{Deserialize, Serialize};

use super::{combined_spectrum, restrict, Method, Problem};
use crate::physics::fft::{multiply_real, Fft3};
use crate::{Error, Result};

/// The `inversion.cosmos` section of the configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Floor `t` on `Σᵢ Dᵢ(k)²` (dimensionless; one orientation on the cone has 0, far
    /// from it up to 4/9 each).
    pub threshold: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config { threshold: 0.01 }
    }
}

pub struct Cosmos {
    config: Config,
}

impl Cosmos {
    pub fn new(config: Config) -> Self {
        Cosmos { config }
    }
}

impl Method for Cosmos {
    fn name(&self) -> &'static str {
        "cosmos"
    }

    fn invert(&self, problem: &Problem) -> Result<Vec<f32>> {
        let t = self.config.threshold;
        if !(t > 0.0 && t.is_finite()) {
            return Err(Error::Config(format!(
                "inversion.cosmos.threshold must be positive, got {t}"
            )));
        }
        problem.check("COSMOS")?;
        if problem.orientations.len() < 2 {
            return Err(Error::Usage(
                "COSMOS needs local fields from at least two head orientations (three or more \
                 recommended); this acquisition has one. Choose another --method, or give a \
                 multi-orientation set (series differing only in acq-/run- with different B0 \
                 directions)"
                    .into(),
            ));
        }
        let fft = Fft3::new(problem.dims);
        let (mut spec, den) = combined_spectrum(problem, &fft, |d| d);
        let t = t as f32;
        // DC: Σ D² = 0 and the numerator is 0 too; χ's mean is set by referencing.
        let inv: Vec<f32> = den.iter().map(|&s| 1.0 / s.max(t)).collect();
        multiply_real(&mut spec, &inv);
        Ok(restrict(fft.inverse(&mut spec), problem.mask))
    }

    fn parameters(&self) -> serde_json::Value {
        serde_json::json!({ "threshold": self.config.threshold })
    }

    fn joint_orientations(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inversion::testing::{brain, fields, nrmse_demeaned, problem};

    /// Four orientations with tilts under 37°, like a head-rotation study: noise-free fields
    /// over the whole box are inverted almost exactly, and noisy masked ones much better than
    /// from fewer orientations.
    #[test]
    fn cosmos_inverts_four_orientations() {
        let dims = [48, 48, 48];
        let (chi, mask) = brain();
        let tilt = |ax: f64, ay: f64| {
            let (sx, sy) = (ax.to_radians().sin(), ay.to_radians().sin());
            let z = (1.0 - sx * sx - sy * sy).sqrt();
            [sx, sy, z]
        };
        let b0s = [
            tilt(0.0, 0.0),
            tilt(25.0, 0.0),
            tilt(0.0, 30.0),
            tilt(-20.0, -20.0),
        ];
        let all = vec![true; mask.len()];
        let clean = fields(&chi, &all, dims, &b0s, 0.0, 1);
        let p = problem(dims, &clean, &b0s, &all);
        let x = Cosmos::new(Config::default()).invert(&p).unwrap();
        let e = nrmse_demeaned(&x, &chi, &mask);
        assert!(e < 0.05, "noise-free COSMOS {e}");

        let noisy = fields(&chi, &mask, dims, &b0s, 0.004, 2);
        let e4 = nrmse_demeaned(
            &Cosmos::new(Config::default())
                .invert(&problem(dims, &noisy, &b0s, &mask))
                .unwrap(),
            &chi,
            &mask,
        );
        let e2 = nrmse_demeaned(
            &Cosmos::new(Config::default())
                .invert(&problem(dims, &noisy[..2], &b0s[..2], &mask))
                .unwrap(),
            &chi,
            &mask,
        );
        assert!(e4 < 0.3, "four orientations {e4}");
        assert!(e4 < e2, "four orientations {e4} vs two {e2}");
    }

    #[test]
    fn cosmos_refuses_a_single_orientation() {
        let dims = [8, 8, 8];
        let f = vec![vec![0.0f32; 512]];
        let mask = vec![true; 512];
        let err = Cosmos::new(Config::default())
            .invert(&problem(dims, &f, &[[0.0, 0.0, 1.0]], &mask))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least two head orientations"), "{err}");
    }
}
