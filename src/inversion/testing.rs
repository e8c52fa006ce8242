//! Test fixtures shared by the solvers' tests: one phantom, one error measure, one way to
//! simulate a noisy local field, so the methods are compared on the same footing.

use super::{Orientation, Problem};
use crate::physics::DipoleOperator;
use crate::simulate::rng::Rng;

/// Two ellipsoids of different χ (ppm) in a box (centred at 24, fits 48³).
pub fn phantom(dims: [usize; 3]) -> Vec<f32> {
    let mut chi = vec![0.0f32; dims.iter().product()];
    for k in 0..dims[2] {
        for j in 0..dims[1] {
            for i in 0..dims[0] {
                let p = [i as f64 - 24.0, j as f64 - 24.0, k as f64 - 24.0];
                let e1 = (p[0] / 10.0).powi(2) + (p[1] / 6.0).powi(2) + (p[2] / 8.0).powi(2);
                let e2 = ((p[0] - 4.0) / 3.0).powi(2)
                    + (p[1] / 3.0).powi(2)
                    + ((p[2] + 2.0) / 5.0).powi(2);
                let v = if e2 < 1.0 {
                    0.2
                } else if e1 < 1.0 {
                    -0.05
                } else {
                    0.0
                };
                chi[i + dims[0] * (j + dims[1] * k)] = v;
            }
        }
    }
    chi
}

/// A piecewise-constant "brain" in a 48³ box at 1 mm: an ellipsoidal mask (semi-axes 18, 16,
/// 14) holding a grey/white-like background and five structures of −0.1…+0.3 ppm, including
/// a thin vein-like rod along x. Returns (χ, mask).
pub fn brain() -> (Vec<f32>, Vec<bool>) {
    let n = 48;
    let mut chi = vec![0.0f32; n * n * n];
    let mut mask = vec![false; n * n * n];
    let structures: [([f64; 3], [f64; 3], f32); 5] = [
        ([30.0, 26.0, 24.0], [4.0, 3.0, 3.0], 0.15),
        ([17.0, 24.0, 26.0], [3.0, 4.0, 3.0], 0.3),
        ([24.0, 15.0, 20.0], [5.0, 2.5, 2.5], -0.1),
        ([22.0, 32.0, 28.0], [2.5, 2.5, 4.0], 0.08),
        ([24.0, 20.0, 31.0], [9.0, 1.2, 1.2], 0.25),
    ];
    for k in 0..n {
        for j in 0..n {
            for i in 0..n {
                let p = [i as f64, j as f64, k as f64];
                let r = ((p[0] - 23.5) / 18.0).powi(2)
                    + ((p[1] - 23.5) / 16.0).powi(2)
                    + ((p[2] - 23.5) / 14.0).powi(2);
                let idx = i + n * (j + n * k);
                if r < 1.0 {
                    mask[idx] = true;
                    chi[idx] = if (p[2] - 23.5).abs() < 6.0 {
                        0.02
                    } else {
                        -0.02
                    };
                    for (c, a, v) in &structures {
                        let e: f64 = (0..3).map(|d| ((p[d] - c[d]) / a[d]).powi(2)).sum();
                        if e < 1.0 {
                            chi[idx] = *v;
                        }
                    }
                }
            }
        }
    }
    (chi, mask)
}

/// Local fields (ppm) of `chi` for each B0 direction, zero outside `mask`, with Gaussian
/// noise of standard deviation `sigma` ppm inside.
pub fn fields(
    chi: &[f32],
    mask: &[bool],
    dims: [usize; 3],
    b0s: &[[f64; 3]],
    sigma: f32,
    seed: u64,
) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    b0s.iter()
        .map(|&b| {
            let mut f = DipoleOperator::new(dims, [1.0; 3], b).forward(chi);
            for (v, &m) in f.iter_mut().zip(mask) {
                *v = if m {
                    *v + sigma * rng.normal() as f32
                } else {
                    0.0
                };
            }
            f
        })
        .collect()
}

/// A problem on a 1 mm grid over the given fields.
pub fn problem<'a>(
    dims: [usize; 3],
    fields: &'a [Vec<f32>],
    b0s: &[[f64; 3]],
    mask: &'a crate::Mask,
) -> Problem<'a> {
    Problem {
        dims,
        voxel_size: [1.0; 3],
        orientations: fields
            .iter()
            .zip(b0s)
            .map(|(f, &b0)| Orientation { field: f, b0 })
            .collect(),
        mask,
        weight: None,
        magnitude: None,
        total: None,
        csf: None,
    }
}

/// Relative L2 error inside `mask` as a fraction, after removing the means (χ is referenced
/// to a region, so a constant offset is not an error).
pub fn nrmse_demeaned(got: &[f32], want: &[f32], mask: &[bool]) -> f64 {
    crate::evaluate::nrmse_demeaned(got, want, mask) / 100.0
}

/// Relative L2 error inside `mask`, offsets included.
pub fn nrmse(a: &[f32], b: &[f32], mask: &[bool]) -> f64 {
    let (mut e, mut n) = (0.0, 0.0);
    for ((&x, &y), &m) in a.iter().zip(b).zip(mask) {
        if m {
            e += (x as f64 - y as f64).powi(2);
            n += (y as f64).powi(2);
        }
    }
    (e / n).sqrt()
}

/// Prints each method's error on the test brain (one orientation, noise 0.004 ppm) for a
/// parameter sweep; run with `--ignored --nocapture` when tuning.
#[test]
#[ignore]
fn sweep() {
    use super::Method;
    let dims = [48, 48, 48];
    let (chi, mask) = brain();
    let b0 = [[0.0, 0.26, 0.966]];
    let f = fields(&chi, &mask, dims, &b0, 0.004, 3);
    let p = problem(dims, &f, &b0, &mask);
    let e = |m: &dyn Method| nrmse_demeaned(&m.invert(&p).unwrap(), &chi, &mask);
    println!("tkd {:.3}", e(&super::tkd::Tkd::new(Default::default())));
    println!(
        "ilsqr {:.3}",
        e(&super::ilsqr::Ilsqr::new(Default::default()))
    );
    for lambda in [0.005, 0.01, 0.02, 0.05, 0.1] {
        let m = super::cfl2::Cfl2::new(super::cfl2::Config { lambda });
        println!("cfl2 {lambda} {:.3}", e(&m));
    }
    for lambda in [3e-4, 1e-3] {
        for rho_tv in [30.0, 100.0, 300.0] {
            for max_iterations in [30, 60, 100, 200] {
                let m = super::tv::TvAdmm::new(super::tv::Config {
                    lambda: super::lambda::Lambda::Value(lambda),
                    rho_tv,
                    max_iterations,
                    ..Default::default()
                });
                let err = e(&m);
                let it = m.parameters()["iterations_run"].clone();
                println!("tv {lambda} rho {rho_tv} max {max_iterations}: {err:.3} ({it})");
            }
        }
    }
}
