//! Residual background: how much of the local field a low-order polynomial explains.
//!
//! Background removal leaves a field made of the brain's own dipoles, which vary on the scale
//! of the structures; a field from outside the brain left behind is smooth over the whole
//! mask. The energy fraction ‖P f‖²/‖f‖² of the least-squares polynomial P f (order 2 by
//! default, coordinates scaled to [−1, 1] over the mask) is near 1 when a background remains.

use super::{Check, Config, Inputs};

/// Exponents (a, b, c) of the monomials x^a y^b z^c with a + b + c ≤ order.
fn monomials(order: usize) -> Vec<[i32; 3]> {
    let mut m = Vec::new();
    for total in 0..=order as i32 {
        for a in (0..=total).rev() {
            for b in (0..=total - a).rev() {
                m.push([a, b, total - a - b]);
            }
        }
    }
    m
}

/// Fraction of ‖f‖² (over `mask`) explained by the least-squares polynomial of `order`;
/// `None` for an empty mask or a zero field.
pub fn polynomial_energy_fraction(
    f: &[f32],
    mask: &[bool],
    dims: [usize; 3],
    order: usize,
) -> Option<f64> {
    let terms = monomials(order.min(3));
    let p = terms.len();
    // Bounding box of the mask, to scale coordinates to [−1, 1] (conditioning).
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    let [nx, ny, _] = dims;
    let coords = |c: usize| [c % nx, (c / nx) % ny, c / (nx * ny)];
    for (c, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let x = coords(c);
        for a in 0..3 {
            lo[a] = lo[a].min(x[a]);
            hi[a] = hi[a].max(x[a]);
        }
    }
    if lo[0] == usize::MAX {
        return None;
    }
    let scaled = |c: usize| {
        let x = coords(c);
        let mut s = [0.0f64; 3];
        for a in 0..3 {
            let half = ((hi[a] - lo[a]) as f64 / 2.0).max(0.5);
            s[a] = (x[a] as f64 - (lo[a] + hi[a]) as f64 / 2.0) / half;
        }
        s
    };
    let basis = |s: [f64; 3], row: &mut [f64]| {
        for (r, e) in row.iter_mut().zip(&terms) {
            *r = s[0].powi(e[0]) * s[1].powi(e[1]) * s[2].powi(e[2]);
        }
    };
    // Normal equations AᵀA c = Aᵀf, accumulated in f64.
    let mut ata = vec![0.0f64; p * p];
    let mut atf = vec![0.0f64; p];
    let mut energy = 0.0f64;
    let mut row = vec![0.0f64; p];
    for (c, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        basis(scaled(c), &mut row);
        let v = f[c] as f64;
        energy += v * v;
        for i in 0..p {
            atf[i] += row[i] * v;
            for j in 0..p {
                ata[i * p + j] += row[i] * row[j];
            }
        }
    }
    if energy <= 0.0 {
        return None;
    }
    let coef = solve(ata, atf.clone())?;
    // ‖P f‖² = cᵀ Aᵀf for the least-squares solution c.
    let explained: f64 = coef.iter().zip(&atf).map(|(a, b)| a * b).sum();
    Some((explained / energy).clamp(0.0, 1.0))
}

/// Solves the small dense system `a x = b` by Gaussian elimination with partial pivoting;
/// `None` when it is singular (a mask too thin for the polynomial).
fn solve(mut a: Vec<f64>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for col in 0..n {
        let piv =
            (col..n).max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))?;
        if a[piv * n + col].abs() <= 1e-12 * scale {
            return None;
        }
        if piv != col {
            for k in 0..n {
                a.swap(piv * n + k, col * n + k);
            }
            b.swap(piv, col);
        }
        for r in col + 1..n {
            let f = a[r * n + col] / a[col * n + col];
            for k in col..n {
                a[r * n + k] -= f * a[col * n + k];
            }
            b[r] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|k| a[r * n + k] * x[k]).sum();
        x[r] = (b[r] - s) / a[r * n + r];
    }
    Some(x)
}

/// The residual-background check.
pub fn residual_background(inputs: &Inputs, config: &Config) -> Check {
    let v = inputs.local_ppm;
    let order = config.background_order;
    match polynomial_energy_fraction(&v.data, inputs.mask, v.dims, order) {
        Some(fraction) => Check::new(
            "residual_background",
            fraction,
            config.residual_background,
            format!(
                "a polynomial of order {order} explains {:.1} % of the local field's energy in \
                 the mask (near 100 %: a background field was not removed)",
                100.0 * fraction
            ),
        ),
        None => Check::new(
            "residual_background",
            0.0,
            config.residual_background,
            "the local field is zero in the mask or the mask is too thin to fit".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Scene;
    use super::super::Verdict;
    use super::*;

    #[test]
    fn monomial_counts_match_the_binomial() {
        assert_eq!(monomials(0).len(), 1);
        assert_eq!(monomials(1).len(), 4);
        assert_eq!(monomials(2).len(), 10);
        assert_eq!(monomials(3).len(), 20);
    }

    #[test]
    fn a_polynomial_is_fully_explained_and_the_fraction_matches_a_direct_projection() {
        let dims = [10, 9, 8];
        let n = 720;
        let mask: Vec<bool> = (0..n).map(|c| c % 7 != 0).collect();
        let poly: Vec<f32> = (0..n)
            .map(|c| {
                let (x, y, z) = ((c % 10) as f32, ((c / 10) % 9) as f32, (c / 90) as f32);
                1.0 + 0.3 * x - 0.2 * y * z + 0.05 * x * x
            })
            .collect();
        let f = polynomial_energy_fraction(&poly, &mask, dims, 2).unwrap();
        assert!((f - 1.0).abs() < 1e-9, "{f}");
        // An order-2 polynomial is not explained by order 1.
        assert!(polynomial_energy_fraction(&poly, &mask, dims, 1).unwrap() < 1.0 - 1e-6);
        // Order 0: the projection is the mean, so the fraction is n·mean²/Σf².
        let noise: Vec<f32> = (0..n)
            .map(|c| ((c * 7919 % 113) as f32 / 113.0) - 0.3)
            .collect();
        let sel: Vec<f64> = noise
            .iter()
            .zip(&mask)
            .filter(|(_, &m)| m)
            .map(|(&v, _)| v as f64)
            .collect();
        let mean = sel.iter().sum::<f64>() / sel.len() as f64;
        let want = sel.len() as f64 * mean * mean / sel.iter().map(|v| v * v).sum::<f64>();
        let got = polynomial_energy_fraction(&noise, &mask, dims, 0).unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn clean_local_field_passes_and_an_added_background_fails() {
        let s = Scene::new();
        let config = Config::default();
        let c = residual_background(&s.inputs(&s.local), &config);
        assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
        for quadratic in [false, true] {
            let bg = s.with_background(quadratic);
            let c = residual_background(&s.inputs(&bg), &config);
            assert_eq!(c.verdict, Verdict::Fail, "quadratic {quadratic}: {c:?}");
        }
    }
}
