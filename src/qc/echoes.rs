//! Echo consistency: does every echo follow its neighbours in time?
//!
//! Between consecutive echoes the phase advances by 2π f ΔTE, a field that varies smoothly
//! in space, so the phase difference Δ = ∠(S₂ S₁*) is locally coherent: the mean of e^{iΔ}
//! over a voxel and its six neighbours has a modulus near 1. An echo replaced by noise, from
//! another series or moved between echoes makes its two differences incoherent (≈ 0.3 for
//! random phase). The check reports the least coherent pair's median over the brain mask.
//! It reads the measured (wrapped) phase only, so it does not depend on unwrapping.

use super::{Check, Config};
use crate::preprocess::util::quantile;
use crate::Volume;

/// Median local coherence of the phase difference of each pair of consecutive echoes
/// (n, n+1) over the interior of `mask`.
pub fn pair_coherence(phases: &[Volume], mask: &[bool]) -> Vec<f64> {
    phases
        .windows(2)
        .map(|w| {
            let dims = w[0].dims;
            let (re, im): (Vec<f32>, Vec<f32>) = w[1]
                .data
                .iter()
                .zip(&w[0].data)
                .map(|(&b, &a)| ((b - a).cos(), (b - a).sin()))
                .unzip();
            let [nx, ny, nz] = dims;
            let (sy, sz) = (nx, nx * ny);
            let mut coh = Vec::new();
            for k in 1..nz.saturating_sub(1) {
                for j in 1..ny.saturating_sub(1) {
                    for i in 1..nx.saturating_sub(1) {
                        let c = i + j * sy + k * sz;
                        if !mask[c] {
                            continue;
                        }
                        let nb = [c, c - 1, c + 1, c - sy, c + sy, c - sz, c + sz];
                        let (sr, si) = nb
                            .iter()
                            .fold((0.0f32, 0.0f32), |(r, m), &n| (r + re[n], m + im[n]));
                        coh.push((sr * sr + si * si).sqrt() / nb.len() as f32);
                    }
                }
            }
            quantile(&coh, None, 0.5).map_or(f64::NAN, |v| v as f64)
        })
        .collect()
}

/// The check from the pairs' coherences; `None` with a single echo.
pub fn consistency(coherence: &[f64], config: &Config) -> Option<Check> {
    let (worst, &value) = coherence
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))?;
    Some(Check::new(
        "echo_consistency",
        value,
        config.echo_consistency,
        format!(
            "echoes {} and {} have the least coherent phase difference, {value:.2} (1: smooth, \
             about 0.3: random; every pair: {})",
            worst + 1,
            worst + 2,
            coherence
                .iter()
                .map(|m| format!("{m:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::Verdict;
    use super::*;
    use crate::preprocess::util::wrap;
    use crate::Geometry;

    /// Wrapped echoes of a smooth field with a little noise; echo `bad` (if any) replaced by
    /// uniform random phase.
    fn echoes(bad: Option<usize>) -> Vec<Volume> {
        let dims = [16, 16, 12];
        let n = 16 * 16 * 12;
        let g = Geometry::from_voxel_size([1.0; 3]);
        let noise = |i: usize, s: u64| {
            let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ s;
            x ^= x >> 29;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        [0.004f32, 0.008, 0.012, 0.016]
            .iter()
            .enumerate()
            .map(|(e, &t)| {
                let d = (0..n)
                    .map(|i| {
                        if bad == Some(e) {
                            return std::f32::consts::TAU * noise(i, 7 + e as u64);
                        }
                        let x = (i % 16) as f32;
                        let field = 15.0 * x + 0.5 * x * x; // Hz, several wraps
                        wrap(std::f32::consts::TAU * field * t + 0.1 * noise(i, e as u64) + 0.7)
                    })
                    .collect();
                Volume::new(dims, d, g.clone())
            })
            .collect()
    }

    #[test]
    fn coherent_echoes_pass_and_a_noise_echo_fails_naming_its_pairs() {
        let config = Config::default();
        let mask = vec![true; 16 * 16 * 12];
        let c = consistency(&pair_coherence(&echoes(None), &mask), &config).unwrap();
        assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
        assert!(c.value > 0.95, "{c:?}");
        let coh = pair_coherence(&echoes(Some(2)), &mask);
        assert!(coh[0] > 0.95 && coh[1] < 0.5 && coh[2] < 0.5, "{coh:?}");
        let c = consistency(&coh, &config).unwrap();
        assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
        assert!(c.message.contains("echoes 2 and 3") || c.message.contains("echoes 3 and 4"));
        assert!(consistency(&[], &config).is_none());
    }
}
