//! Quality metrics against a reference χ map, as used by the QSM challenges.

/// Demeaned NRMSE in percent: `100·‖(x − x̄) − (r − r̄)‖ / ‖r − r̄‖` over `region`, the means
/// taken over `region`. χ maps are defined up to a constant, so both are demeaned first.
pub fn nrmse_demeaned(x: &[f32], reference: &[f32], region: &[bool]) -> f64 {
    let mean = |v: &[f32]| {
        let (s, n) = v
            .iter()
            .zip(region)
            .filter(|(_, &m)| m)
            .fold((0.0, 0usize), |(s, n), (&a, _)| (s + a as f64, n + 1));
        if n == 0 {
            0.0
        } else {
            s / n as f64
        }
    };
    let (mx, mr) = (mean(x), mean(reference));
    let (mut err, mut norm) = (0.0, 0.0);
    for ((&a, &b), &m) in x.iter().zip(reference).zip(region) {
        if m {
            err += ((a as f64 - mx) - (b as f64 - mr)).powi(2);
            norm += (b as f64 - mr).powi(2);
        }
    }
    100.0 * (err / norm).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nrmse_is_zero_for_an_offset_copy_and_matches_a_hand_computation() {
        let r = [1.0, 2.0, 3.0, 100.0];
        let region = [true, true, true, false];
        assert!(nrmse_demeaned(&[11.0, 12.0, 13.0, 0.0], &r, &region).abs() < 1e-9);
        // r − r̄ = (−1, 0, 1); x = (1, 2, 4) → x − x̄ = (−4/3, −1/3, 5/3);
        // error = (−1/3, −1/3, 2/3): ‖e‖² = 6/9, ‖r − r̄‖² = 2 → 100·√(1/3).
        let got = nrmse_demeaned(&[1.0, 2.0, 4.0, 0.0], &r, &region);
        assert!((got - 100.0 * (1.0f64 / 3.0).sqrt()).abs() < 1e-9, "{got}");
        // A zero map scores 100 %.
        assert!((nrmse_demeaned(&[0.0; 4], &r, &region) - 100.0).abs() < 1e-9);
    }
}
