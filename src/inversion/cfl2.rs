//! Closed-form L2 inversion with gradient regularisation (CFL2; Bilgic et al., MRM 2014).
//!
//! Minimises `Σᵢ ‖Dᵢχ − fᵢ‖² + λ‖∇χ‖²`, which is diagonal in k-space:
//! `χ(k) = Σᵢ Dᵢ Fᵢ / (Σᵢ Dᵢ² + λ|G(k)|²)` with `|G|²` the spectrum of the forward-difference
//! gradient ([`Gradient`]). One FFT per orientation and one inverse: TKD's cost, with the
//! cone filled by smoothness instead of a hard threshold.

use serde::{Deserialize, Serialize};

use super::{combined_spectrum, restrict, Method, Problem};
use crate::physics::fft::{multiply_real, Fft3};
use crate::physics::gradient::Gradient;
use crate::{Error, Result};

/// The `inversion.cfl2` section of the configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Regularisation weight λ on ‖∇χ‖² (mm², since |G|² is in 1/mm²). The default was
    /// chosen on the simulated MNI head (README, Quality).
    pub lambda: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config { lambda: 0.02 }
    }
}

pub struct Cfl2 {
    config: Config,
}

impl Cfl2 {
    pub fn new(config: Config) -> Self {
        Cfl2 { config }
    }
}

impl Method for Cfl2 {
    fn name(&self) -> &'static str {
        "cfl2"
    }

    fn invert(&self, problem: &Problem) -> Result<Vec<f32>> {
        let lambda = self.config.lambda;
        if !(lambda > 0.0 && lambda.is_finite()) {
            return Err(Error::Config(format!(
                "inversion.cfl2.lambda must be positive, got {lambda}"
            )));
        }
        problem.check("CFL2")?;
        let fft = Fft3::new(problem.dims);
        let (mut spec, den) = combined_spectrum(problem, &fft, |d| d);
        let g2 = Gradient::new(problem.dims, problem.voxel_size).energy_kernel(problem.voxel_size);
        let lambda = lambda as f32;
        // Only DC has a zero denominator; χ's mean is set by referencing, so 0 there.
        let inv: Vec<f32> = den
            .iter()
            .zip(&g2)
            .map(|(&d, &g)| {
                let s = d + lambda * g;
                if s > 0.0 {
                    1.0 / s
                } else {
                    0.0
                }
            })
            .collect();
        multiply_real(&mut spec, &inv);
        Ok(restrict(fft.inverse(&mut spec), problem.mask))
    }

    fn parameters(&self) -> serde_json::Value {
        serde_json::json!({ "lambda": self.config.lambda })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inversion::testing::{brain, fields, nrmse_demeaned, problem};
    use crate::inversion::tkd::{self, Tkd};
    use crate::physics::DipoleOperator;

    /// The closed form is the minimiser: its gradient of the objective vanishes, checked in
    /// real space with the real-space gradient operator.
    #[test]
    fn cfl2_solves_its_normal_equations() {
        let dims = [48, 48, 48];
        let (chi, mask) = brain();
        let b0 = [[0.1, 0.0, 0.995]];
        let f = fields(&chi, &vec![true; mask.len()], dims, &b0, 0.0, 1);
        let all = vec![true; mask.len()];
        let p = problem(dims, &f, &b0, &all);
        let lambda = 0.05;
        let x = Cfl2::new(Config { lambda }).invert(&p).unwrap();
        let op = DipoleOperator::new(dims, [1.0; 3], b0[0]);
        let grad = Gradient::new(dims, [1.0; 3]);
        // Dᵀ(Dx − f) + λ∇ᵀ∇x = 0.
        let r: Vec<f32> = op
            .forward(&x)
            .iter()
            .zip(&f[0])
            .map(|(a, b)| a - b)
            .collect();
        let data = op.adjoint(&r);
        let reg = grad.adjoint(&grad.forward(&x));
        let res: f64 = data
            .iter()
            .zip(&reg)
            .map(|(&a, &b)| (a as f64 + lambda * b as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let scale: f64 = op
            .adjoint(&f[0])
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        // f32 FFTs: agreement to ~1e-4 relative.
        assert!(
            res < 1e-3 * scale,
            "normal-equation residual {res} vs {scale}"
        );
    }

    #[test]
    fn cfl2_beats_tkd_on_a_noisy_brain() {
        let dims = [48, 48, 48];
        let (chi, mask) = brain();
        let b0 = [[0.0, 0.26, 0.966]];
        let f = fields(&chi, &mask, dims, &b0, 0.004, 2);
        let p = problem(dims, &f, &b0, &mask);
        let e_cfl2 = nrmse_demeaned(
            &Cfl2::new(Config::default()).invert(&p).unwrap(),
            &chi,
            &mask,
        );
        let e_tkd = nrmse_demeaned(
            &Tkd::new(tkd::Config::default()).invert(&p).unwrap(),
            &chi,
            &mask,
        );
        assert!(e_cfl2 < e_tkd, "CFL2 {e_cfl2} vs TKD {e_tkd}");
    }
}
