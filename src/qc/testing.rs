//! A small synthetic acquisition for the checks' tests: an ellipsoidal brain in a larger head,
//! susceptibility blobs and their local field by the dipole operator.

use super::Inputs;
use crate::physics::{units, DipoleOperator};
use crate::preprocess;
use crate::{Geometry, Mask, Volume};

pub struct Scene {
    pub brain: Mask,
    /// The brain mask less a one-voxel rim (as background removal leaves it).
    pub mask: Mask,
    pub magnitude: Volume,
    pub local: Volume,
    pub echo_times: Vec<f64>,
    pub b0_tesla: f64,
    pub centre: usize,
}

/// A deterministic pseudo-random number in [−0.5, 0.5).
fn hash_noise(i: usize, seed: u64) -> f32 {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

impl Scene {
    pub fn new() -> Scene {
        let dims = [40, 40, 32];
        let vox = [2.0, 2.0, 2.0];
        let geometry = Geometry::from_voxel_size(vox);
        let n = dims.iter().product();
        let centre_of = [20.0, 20.0, 16.0];
        let ellipsoid = |r: [f64; 3]| -> Mask {
            (0..n)
                .map(|c| {
                    let x = [c % 40, (c / 40) % 40, c / 1600];
                    (0..3)
                        .map(|a| ((x[a] as f64 - centre_of[a]) / r[a]).powi(2))
                        .sum::<f64>()
                        <= 1.0
                })
                .collect()
        };
        let head = ellipsoid([18.0, 18.0, 14.0]);
        let brain = ellipsoid([13.0, 15.0, 11.0]);
        let mask = preprocess::erode(&brain, dims, vox, 2.0);
        let mut chi = vec![0.0f32; n];
        let blobs = [
            ([14.0, 18.0, 14.0], 3.0, 0.1),
            ([26.0, 20.0, 17.0], 2.5, -0.08),
            ([20.0, 28.0, 12.0], 2.0, 0.15),
            ([19.0, 12.0, 20.0], 3.5, 0.05),
        ];
        for c in 0..n {
            let x = [c % 40, (c / 40) % 40, c / 1600].map(|v| v as f64);
            for (p, r, v) in blobs {
                let d2: f64 = (0..3).map(|a| (x[a] - p[a]).powi(2)).sum();
                if d2 <= r * r {
                    chi[c] += v;
                }
            }
            if brain[c] {
                chi[c] += 0.01 * hash_noise(c, 3);
            }
        }
        let b0 = [0.0, 0.0, 1.0];
        let op = DipoleOperator::new(dims, vox, b0);
        let field = op.forward(&chi);
        let local_data: Vec<f32> = field
            .iter()
            .zip(&mask)
            .enumerate()
            .map(|(c, (&f, &m))| if m { f + 0.002 * hash_noise(c, 5) } else { 0.0 })
            .collect();
        let magnitude = Volume::new(
            dims,
            head.iter().map(|&h| if h { 1.0 } else { 0.0 }).collect(),
            geometry.clone(),
        );
        let echo_times = vec![0.004, 0.008, 0.012, 0.016];
        let b0_tesla = 3.0;
        let local = Volume::new(dims, local_data, geometry);
        Scene {
            brain,
            mask,
            magnitude,
            local,
            echo_times,
            b0_tesla,
            centre: 20 + 20 * 40 + 16 * 1600,
        }
    }

    pub fn inputs<'a>(&'a self, local: &'a Volume) -> Inputs<'a> {
        Inputs {
            local_ppm: local,
            mask: &self.mask,
            brain_mask: Some(&self.brain),
            total_hz: None,
            magnitude: Some(&self.magnitude),
            echo_coherence: None,
            echo_times: &self.echo_times,
            echo_grid_mismatch_mm: Some(0.0),
            b0_direction: [0.0, 0.0, 1.0],
            b0_tesla: Some(self.b0_tesla),
        }
    }

    /// The local field with a 2π wrap at echo time `te` (a step of 1/te Hz) over a block.
    pub fn with_wrap_patch(&self, te: f64) -> Volume {
        let step = (1.0 / te / units::hz_per_ppm(self.b0_tesla)) as f32;
        let mut v = self.local.clone();
        for c in 0..v.len() {
            let x = [c % 40, (c / 40) % 40, c / 1600];
            if (16..24).contains(&x[0]) && (12..22).contains(&x[1]) && (12..20).contains(&x[2]) {
                v.data[c] += step;
            }
        }
        v
    }

    /// The local field plus a linear or quadratic background with three times its RMS.
    pub fn with_background(&self, quadratic: bool) -> Volume {
        let sel: Vec<f64> = self
            .local
            .data
            .iter()
            .zip(&self.mask)
            .filter(|(_, &m)| m)
            .map(|(&v, _)| v as f64)
            .collect();
        let rms = (sel.iter().map(|v| v * v).sum::<f64>() / sel.len() as f64).sqrt() as f32;
        let bg: Vec<f32> = (0..self.local.len())
            .map(|c| {
                let x = (c % 40) as f32 / 13.0 - 20.0 / 13.0;
                let z = (c / 1600) as f32 / 11.0 - 16.0 / 11.0;
                match (self.mask[c], quadratic) {
                    (false, _) => 0.0,
                    (true, true) => x * x - z * z,
                    (true, false) => x + 0.5 * z,
                }
            })
            .collect();
        let bg_rms = (bg.iter().map(|v| v * v).sum::<f32>() / sel.len() as f32).sqrt();
        let mut v = self.local.clone();
        v.data
            .iter_mut()
            .zip(&bg)
            .for_each(|(f, b)| *f += 3.0 * rms / bg_rms * b);
        v
    }
}
