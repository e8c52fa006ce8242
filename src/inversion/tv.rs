//! Total-variation regularised inversion solved by ADMM (Bilgic et al., MRM 2014; with the
//! data term split off as in Milovic et al., MRM 2018, so a per-voxel weight costs nothing).
//!
//! Minimises `½ Σᵢ ‖W(Dᵢχ − fᵢ)‖² + λ‖∇χ‖₁` (isotropic TV) with the splits `z = ∇χ` and
//! `sᵢ = Dᵢχ`. Every sub-problem has a closed form:
//! - χ: `(ρ₁|G|² + ρ₂ Σᵢ Dᵢ²) χ = ρ₁ ∇ᵀ(z + u) + ρ₂ Σᵢ Dᵢ(sᵢ + vᵢ)`, diagonal in k-space;
//! - z: shrinkage of `∇χ − u` by `λ/ρ₁`, voxel by voxel;
//! - sᵢ: `(W² fᵢ + ρ₂(Dᵢχ − vᵢ)) / (W² + ρ₂)`, voxel by voxel;
//!
//! then the scaled duals `u += z − ∇χ`, `vᵢ += sᵢ − Dᵢχ`. W is zero outside the mask, so the
//! field there is never trusted and TV alone extends χ across the boundary. One iteration
//! costs one forward and one inverse FFT per orientation plus one of each for χ.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::lambda::{self, Choice, Lambda, Point, Scan};
use super::{restrict, Method, Problem};
use crate::physics::fft::{Fft3, C32};
use crate::physics::gradient::Gradient;
use crate::{Error, Result};

/// The `inversion.tv` section of the configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TV weight λ (ppm·mm: the data term is in ppm², ‖∇χ‖₁ in ppm/mm per voxel), or
    /// `auto`: the L-curve corner over `lambda_scan`.
    pub lambda: Lambda,
    /// The λ values that `lambda: auto` tries.
    pub lambda_scan: Scan,
    /// Penalty ρ₁ on `z = ∇χ`, as a multiple of λ.
    pub rho_tv: f64,
    /// Penalty ρ₂ on `sᵢ = Dᵢχ` (relative to a unit data weight).
    pub rho_data: f64,
    /// Stop when the relative change of χ in one iteration falls below this.
    pub tolerance: f64,
    /// Iteration limit.
    pub max_iterations: usize,
}

/// TV's default λ (ppm·mm), also the default of SS-TV and of the learned methods' TV starts.
pub const DEFAULT_LAMBDA: f64 = 3e-4;

impl Default for Config {
    fn default() -> Self {
        Config {
            lambda: Lambda::Value(DEFAULT_LAMBDA),
            lambda_scan: Scan::default(),
            rho_tv: 100.0,
            rho_data: 1.0,
            tolerance: 1e-3,
            max_iterations: 100,
        }
    }
}

pub struct TvAdmm {
    config: Config,
    /// Iterations of the last solve, for the sidecar.
    iterations: std::sync::atomic::AtomicUsize,
    /// How `auto` chose λ in the last solve (λ and the scan), for the sidecar.
    chosen: std::sync::Mutex<Option<Choice>>,
    /// The config section users set these values in, for messages.
    section: &'static str,
}

impl TvAdmm {
    pub fn new(config: Config) -> Self {
        TvAdmm::in_section(config, "inversion.tv")
    }

    /// A solver configured under `section` (TFI's `inversion.tfi.admm`), which messages name.
    pub(super) fn in_section(config: Config, section: &'static str) -> Self {
        TvAdmm {
            config,
            iterations: Default::default(),
            chosen: Default::default(),
            section,
        }
    }

    fn validate(&self) -> Result<()> {
        let c = &self.config;
        let positive = |v: f64| v > 0.0 && v.is_finite();
        match c.lambda.value() {
            Some(l) if !positive(l) => {
                return Err(Error::Config(format!(
                    "{}.lambda must be positive or auto, got {l}",
                    self.section
                )))
            }
            None => c.lambda_scan.validate(self.section)?,
            Some(_) => {}
        }
        if !(positive(c.rho_tv) && positive(c.rho_data)) {
            return Err(Error::Config(format!(
                "{}: rho_tv ({}) and rho_data ({}) must be positive",
                self.section, c.rho_tv, c.rho_data
            )));
        }
        if !(positive(c.tolerance) && c.max_iterations > 0) {
            return Err(Error::Config(format!(
                "{}: tolerance must be positive and max_iterations at least 1",
                self.section
            )));
        }
        Ok(())
    }

    /// χ over the whole grid, outside the mask too (TFI's background sources), with the
    /// iterations recorded for the sidecar.
    pub(super) fn invert_unrestricted(&self, problem: &Problem) -> Result<Vec<f32>> {
        let (chi, iterations) = self.solve(problem)?;
        tracing::debug!(iterations, "TV-ADMM finished");
        self.iterations
            .store(iterations, std::sync::atomic::Ordering::Relaxed);
        Ok(chi)
    }

    /// Runs ADMM (after the L-curve scan for `auto`) and returns χ (whole grid) and the
    /// number of iterations used.
    fn solve(&self, problem: &Problem) -> Result<(Vec<f32>, usize)> {
        self.validate()?;
        problem.check("TV-ADMM")?;
        let c = &self.config;
        let lambda = match c.lambda.value() {
            Some(l) => l,
            None => {
                let choice = Choice::from_scan(self.l_curve(problem)?, "TV-ADMM", self.section);
                let l = choice.lambda;
                *self.chosen.lock().unwrap_or_else(|e| e.into_inner()) = Some(choice);
                l
            }
        };
        self.solve_with(problem, lambda, c.max_iterations)
    }

    /// The L-curve points of the configured scan: ‖W(Dχ − f)‖₂ (W normalised as in the
    /// solve) and ‖∇χ‖₁ of each λ's map.
    fn l_curve(&self, problem: &Problem) -> Result<Vec<Point>> {
        let scan = &self.config.lambda_scan;
        let w2 = problem.squared_unit_weight("TV-ADMM")?;
        let grad = Gradient::new(problem.dims, problem.voxel_size);
        let mut points = Vec::new();
        for l in scan.values() {
            let (chi, _) = self.solve_with(problem, l, scan.max_iterations)?;
            let mut residual = 0.0f64;
            for (i, o) in problem.orientations.iter().enumerate() {
                let d = problem.operator(i).forward(&chi);
                residual += d
                    .par_iter()
                    .zip(o.field)
                    .zip(&w2)
                    .map(|((&d, &f), &w)| (w * (d - f) * (d - f)) as f64)
                    .sum::<f64>();
            }
            points.push(Point {
                lambda: l,
                residual: residual.sqrt(),
                regulariser: total_variation(&grad, &chi, None),
            });
        }
        Ok(points)
    }

    /// ADMM with a given λ and iteration limit: one data term per orientation.
    fn solve_with(
        &self,
        problem: &Problem,
        lambda: f64,
        max_iterations: usize,
    ) -> Result<(Vec<f32>, usize)> {
        let c = &self.config;
        let kernels = problem.kernels();
        let w2 = problem.squared_unit_weight("TV-ADMM")?;
        let terms: Vec<DataTerm> = problem
            .orientations
            .iter()
            .zip(&kernels)
            .map(|(o, k)| DataTerm {
                kernel: k,
                target: o.field,
                weight2: &w2,
            })
            .collect();
        let settings = Settings {
            lambda,
            rho_tv: c.rho_tv * lambda,
            rho_data: c.rho_data,
            tolerance: c.tolerance,
            max_iterations,
            tv_weight: None,
        };
        Ok(admm(problem.dims, problem.voxel_size, &terms, &settings))
    }
}

/// One data term `½‖W(Kχ − b)‖²` of [`admm`]: K diagonal in k-space.
pub(super) struct DataTerm<'a> {
    /// K on the half spectrum of the grid.
    pub kernel: &'a [f32],
    /// b on the grid.
    pub target: &'a [f32],
    /// W² on the grid; zero where b is not data.
    pub weight2: &'a [f32],
}

/// λ, the ADMM penalties and the stopping rule of one [`admm`] solve.
pub(super) struct Settings<'a> {
    pub lambda: f64,
    /// ρ₁ on `z = ∇χ`.
    pub rho_tv: f64,
    /// ρ₂ on every `sᵢ = Kᵢχ`.
    pub rho_data: f64,
    pub tolerance: f64,
    pub max_iterations: usize,
    /// Per-voxel weight of ‖∇χ‖₁ (MEDI's edge mask M_G: 0 where the anatomy has an edge);
    /// `None` = 1 everywhere.
    pub tv_weight: Option<&'a [f32]>,
}

/// `‖M∇χ‖₁` (isotropic), M a per-voxel weight or 1: the regulariser of the L-curves.
pub(super) fn total_variation(grad: &Gradient, chi: &[f32], weight: Option<&[f32]>) -> f64 {
    let g = grad.forward(chi);
    (0..chi.len())
        .into_par_iter()
        .map(|i| {
            let m = ((g[0][i].powi(2) + g[1][i].powi(2) + g[2][i].powi(2)) as f64).sqrt();
            m * weight.map_or(1.0, |w| w[i] as f64)
        })
        .sum()
}

/// Minimises `Σᵢ ½‖Wᵢ(Kᵢχ − bᵢ)‖² + λ‖M∇χ‖₁` (M = `tv_weight`, 1 by default) over the
/// whole grid by ADMM (see the module comment, with `Dᵢ` generalised to any real kernel
/// `Kᵢ`); returns χ and the iterations run.
pub(super) fn admm(
    dims: [usize; 3],
    voxel_size: [f64; 3],
    terms: &[DataTerm],
    settings: &Settings,
) -> (Vec<f32>, usize) {
    let n: usize = dims.iter().product();
    let fft = Fft3::new(dims);
    let grad = Gradient::new(dims, voxel_size);
    let rho1 = settings.rho_tv as f32;
    let lambda = settings.lambda as f32;
    let rho2 = settings.rho_data as f32;

    let g2 = grad.energy_kernel(voxel_size);
    let mut inv_den: Vec<f32> = g2.iter().map(|&g| rho1 * g).collect();
    for t in terms {
        inv_den
            .iter_mut()
            .zip(t.kernel)
            .for_each(|(s, &d)| *s += rho2 * d * d);
    }
    inv_den
        .iter_mut()
        .for_each(|s| *s = if *s > 0.0 { 1.0 / *s } else { 0.0 });

    // Only the sums the χ-update needs are kept besides the duals: q = ρ₁(z + u) and
    // rᵢ = ρ₂(sᵢ + vᵢ), refreshed in the passes that update z and sᵢ, so z and sᵢ never
    // need arrays of their own.
    let mut chi = vec![0.0f32; n];
    let mut u = [vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]];
    let mut q = u.clone();
    let mut v: Vec<Vec<f32>> = vec![vec![0.0f32; n]; terms.len()];
    let mut r: Vec<Vec<f32>> = vec![vec![0.0f32; n]; terms.len()];
    let mut kchi: Vec<Vec<f32>> = vec![vec![0.0f32; n]; terms.len()];
    // Buffers reused across iterations (fresh ones would fault in new pages each time).
    // `previous` first holds ∇ᵀq, then, once swapped with `chi`, the last iterate.
    let mut previous = vec![0.0f32; n];
    let mut rhs = vec![C32::default(); fft.spectrum_len()];
    let mut spec = rhs.clone();
    let last = terms.len() - 1;

    let mut iterations = 0;
    for it in 1..=settings.max_iterations {
        iterations = it;
        // χ-update in k-space: the right-hand side, divided by the diagonal in the pass
        // that adds the last term.
        grad.adjoint_into(&q, &mut previous);
        fft.forward_into(&previous, &mut rhs);
        for (i, (r, t)) in r.iter().zip(terms).enumerate() {
            fft.forward_into(r, &mut spec);
            let divide = i == last;
            rhs.par_chunks_mut(4096)
                .zip(spec.par_chunks(4096))
                .zip(t.kernel.par_chunks(4096))
                .zip(inv_den.par_chunks(4096))
                .for_each(|(((a, b), k), d)| {
                    for (((a, b), &k), &d) in a.iter_mut().zip(b).zip(k).zip(d) {
                        *a += b * k;
                        if divide {
                            *a *= d;
                        }
                    }
                });
        }
        for (d, t) in kchi.iter_mut().zip(terms) {
            spec.par_iter_mut()
                .zip(&rhs)
                .zip(t.kernel)
                .for_each(|((s, a), &k)| *s = a * k);
            fft.inverse_into(&mut spec, d);
        }
        std::mem::swap(&mut chi, &mut previous);
        fft.inverse_into(&mut rhs, &mut chi);

        // z-update: isotropic shrinkage of ∇χ − u; u += z − ∇χ; q = ρ₁(z + u). The
        // gradient is used where it is computed, slab by slab, never stored; the change
        // of χ for the stopping test is summed in the same pass.
        let t = lambda / rho1;
        let slab = dims[0] * dims[1];
        let [ux, uy, uz] = &mut u;
        let [qx, qy, qz] = &mut q;
        let (change, norm) = ux
            .par_chunks_mut(slab)
            .zip(uy.par_chunks_mut(slab))
            .zip(uz.par_chunks_mut(slab))
            .zip(
                qx.par_chunks_mut(slab)
                    .zip(qy.par_chunks_mut(slab))
                    .zip(qz.par_chunks_mut(slab)),
            )
            .enumerate()
            .map(|(k, (((ux, uy), uz), ((qx, qy), qz)))| {
                let (new, old) = (&chi[k * slab..], &previous[k * slab..]);
                let (mut change, mut norm) = (0.0f64, 0.0f64);
                grad.for_each_in_slab(&chi, k, |o, g| {
                    change += ((new[o] - old[o]) as f64).powi(2);
                    norm += (new[o] as f64).powi(2);
                    let p = [g[0] - ux[o], g[1] - uy[o], g[2] - uz[o]];
                    let m = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt();
                    let t = settings
                        .tv_weight
                        .as_ref()
                        .map_or(t, |w| t * w[k * slab + o]);
                    let f = if m > t { 1.0 - t / m } else { 0.0 };
                    for (a, (u, q)) in [
                        (&mut ux[o], &mut qx[o]),
                        (&mut uy[o], &mut qy[o]),
                        (&mut uz[o], &mut qz[o]),
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        let z = f * p[a];
                        *u += z - g[a];
                        *q = rho1 * (z + *u);
                    }
                });
                (change, norm)
            })
            .reduce(|| (0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1));

        // s-update (weighted data term), its dual, and r = ρ₂(s + v).
        for (i, t) in terms.iter().enumerate() {
            v[i].par_iter_mut()
                .zip(r[i].par_iter_mut())
                .zip(&kchi[i])
                .zip(t.target)
                .zip(t.weight2)
                .for_each(|((((v, r), &dx), &f), &w)| {
                    let s = (w * f + rho2 * (dx - *v)) / (w + rho2);
                    *v += s - dx;
                    *r = rho2 * (s + *v);
                });
        }

        if norm > 0.0 && (change / norm).sqrt() < settings.tolerance {
            break;
        }
    }
    (chi, iterations)
}

impl Method for TvAdmm {
    fn check_config(&self) -> Result<()> {
        self.validate()
    }

    fn name(&self) -> &'static str {
        "tv"
    }

    fn invert(&self, problem: &Problem) -> Result<Vec<f32>> {
        Ok(restrict(self.invert_unrestricted(problem)?, problem.mask))
    }

    fn parameters(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.config).expect("the config is plain data");
        v["iterations_run"] =
            serde_json::json!(self.iterations.load(std::sync::atomic::Ordering::Relaxed));
        lambda::record(
            &mut v,
            self.config.lambda,
            self.chosen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref(),
            "L-curve corner (maximum curvature of log ‖W(Dχ − f)‖₂ against log ‖∇χ‖₁)",
        );
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inversion::testing::{brain, fields, nrmse_demeaned, problem};
    use crate::inversion::tkd::{self, Tkd};
    use crate::physics::DipoleOperator;

    fn objective(
        chi: &[f32],
        f: &[f32],
        w: &[bool],
        op: &DipoleOperator,
        grad: &Gradient,
        lambda: f64,
    ) -> f64 {
        let d = op.forward(chi);
        let data: f64 = d
            .iter()
            .zip(f)
            .zip(w)
            .filter(|(_, &m)| m)
            .map(|((&a, &b), _)| ((a - b) as f64).powi(2))
            .sum();
        let g = grad.forward(chi);
        let tv: f64 = (0..chi.len())
            .map(|i| ((g[0][i].powi(2) + g[1][i].powi(2) + g[2][i].powi(2)) as f64).sqrt())
            .sum();
        0.5 * data + lambda * tv
    }

    #[test]
    fn tv_admm_beats_tkd_and_lowers_its_objective_below_tkds() {
        let dims = [48, 48, 48];
        let (chi, mask) = brain();
        let b0 = [[0.0, 0.26, 0.966]];
        let f = fields(&chi, &mask, dims, &b0, 0.004, 3);
        let p = problem(dims, &f, &b0, &mask);
        let tv = TvAdmm::new(Config::default());
        let (x, iterations) = tv.solve(&p).unwrap();
        let x_tkd = Tkd::new(tkd::Config::default()).invert(&p).unwrap();
        let e_tv = nrmse_demeaned(&x, &chi, &mask);
        let e_tkd = nrmse_demeaned(&x_tkd, &chi, &mask);
        assert!(
            e_tv < 0.8 * e_tkd,
            "TV {e_tv} vs TKD {e_tkd} ({iterations} iterations)"
        );
        // ADMM minimises the stated objective: it ends below the TKD map's value (TKD
        // extended by zero outside the mask) and below the truth's (which pays for noise).
        let op = DipoleOperator::new(dims, [1.0; 3], b0[0]);
        let grad = Gradient::new(dims, [1.0; 3]);
        let lambda = Config::default().lambda.value().unwrap();
        let j_tv = objective(&x, &f[0], &mask, &op, &grad, lambda);
        let j_tkd = objective(&x_tkd, &f[0], &mask, &op, &grad, lambda);
        let j_true = objective(&chi, &f[0], &mask, &op, &grad, lambda);
        assert!(
            j_tv < j_tkd && j_tv < j_true,
            "J: tv {j_tv}, tkd {j_tkd}, truth {j_true}"
        );
    }

    #[test]
    fn a_zero_weight_region_is_ignored() {
        // Corrupt the field in a slab and give it zero weight: the result must match the
        // run on clean data with the same weight, since W = 0 voxels never enter.
        let dims = [48, 48, 48];
        let (chi, mask) = brain();
        let b0 = [[0.0, 0.0, 1.0]];
        let clean = fields(&chi, &mask, dims, &b0, 0.002, 4);
        let mut bad = clean.clone();
        let mut weight = vec![1.0f32; mask.len()];
        for k in 20..24 {
            for i in 0..48 * 48 {
                bad[0][i + 48 * 48 * k] += 5.0;
                weight[i + 48 * 48 * k] = 0.0;
            }
        }
        let cfg = Config {
            max_iterations: 30,
            ..Config::default()
        };
        let mut p_clean = problem(dims, &clean, &b0, &mask);
        p_clean.weight = Some(&weight);
        let mut p_bad = problem(dims, &bad, &b0, &mask);
        p_bad.weight = Some(&weight);
        let a = TvAdmm::new(cfg.clone()).invert(&p_clean).unwrap();
        let b = TvAdmm::new(cfg).invert(&p_bad).unwrap();
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "max difference {diff}");
    }

    #[test]
    fn invalid_parameters_are_config_errors() {
        let dims = [8, 8, 8];
        let f = vec![vec![0.0f32; 512]];
        let mask = vec![true; 512];
        let p = problem(dims, &f, &[[0.0, 0.0, 1.0]], &mask);
        let err = TvAdmm::new(Config {
            lambda: Lambda::Value(-1.0),
            ..Config::default()
        })
        .invert(&p)
        .unwrap_err()
        .to_string();
        assert!(err.contains("inversion.tv"), "{err}");
    }

    #[test]
    fn auto_lambda_picks_a_scanned_value_near_the_best_and_records_it() {
        let dims = [48, 48, 48];
        let (chi, mask) = brain();
        let b0 = [[0.0, 0.26, 0.966]];
        let f = fields(&chi, &mask, dims, &b0, 0.004, 3);
        let p = problem(dims, &f, &b0, &mask);
        let cfg = Config {
            lambda: Lambda::AUTO,
            ..Config::default()
        };
        let tv = TvAdmm::new(cfg.clone());
        let x = tv.invert(&p).unwrap();
        let params = tv.parameters();
        let chosen = params["lambda"].as_f64().unwrap();
        let scan = cfg.lambda_scan.values();
        assert!(
            scan.iter().any(|&l| (l - chosen).abs() < 1e-12 * l),
            "{chosen}"
        );
        assert!(params["lambda_selection"]["scan"].as_array().unwrap().len() == scan.len());
        // Every scanned λ solved to the end: the chosen one's error must be within 25 % of
        // the best of the scan.
        let errors: Vec<f64> = scan
            .iter()
            .map(|&l| {
                let m = TvAdmm::new(Config {
                    lambda: Lambda::Value(l),
                    ..Config::default()
                });
                nrmse_demeaned(&m.invert(&p).unwrap(), &chi, &mask)
            })
            .collect();
        let best = errors.iter().cloned().fold(f64::INFINITY, f64::min);
        let e = nrmse_demeaned(&x, &chi, &mask);
        assert!(
            e <= 1.25 * best,
            "auto λ {chosen}: {e}; scan {scan:?}: {errors:?}"
        );
        let fixed = TvAdmm::new(Config::default());
        assert_eq!(fixed.parameters()["lambda_selection"]["method"], "fixed");
    }

    #[test]
    fn old_configs_with_a_number_still_parse() {
        let c: Config = serde_yaml::from_str("lambda: 0.001\nmax_iterations: 50").unwrap();
        assert_eq!(c.lambda, Lambda::Value(1e-3));
        let c: Config = serde_yaml::from_str("lambda: auto\nlambda_scan: {count: 5}").unwrap();
        assert_eq!((c.lambda, c.lambda_scan.count), (Lambda::AUTO, 5));
    }
}
