//! Brain-like training patches from a tissue segmentation (e.g. the shared MNI phantom's
//! `seg.nii.gz`): each sample redraws every label's χ, deforms the anatomy (rotation,
//! anisotropic scale, smooth warp) and adds a faint texture, so the network sees brain
//! contrasts and shapes without ever seeing one fixed map. The unmodified phantom stays a
//! validation case: no sample reproduces it (its χ values are redrawn per label).
//!
//! Labels outside the brain (bone, air, soft tissue) become the head around the brain, whose
//! field reaches the brain and is removed by chimap's own background removal, as for users.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::synth::random_rotation;
use crate::simulate::rng::Rng;
use crate::{Error, Result};

/// The `data.labels` section of the training config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelsConfig {
    /// Integer label image (any NIfTI integer or float type holding whole numbers).
    pub nifti: PathBuf,
    /// Fraction of training batches made from it.
    pub fraction: f64,
    /// χ range (ppm) per label, drawn uniformly for each sample. The defaults follow the
    /// QSM Challenge 2.0 numbering that the shared phantom uses.
    pub chi: BTreeMap<u32, [f64; 2]>,
    /// Labels outside the brain (head tissue, bone, air); all others, except 0, are brain.
    pub outside: Vec<u32>,
    /// χ (ppm) of label 0 and of labels missing from `chi` (0 usually is outside the head).
    pub unlabelled_ppm: f64,
    /// Probability that a sample ignores `chi` and draws each brain label's χ from the whole
    /// of `data.chi_range` (contrasts no brain has, so the network cannot memorise any).
    pub random_contrast_probability: f64,
    /// Largest rotation of the anatomy, degrees (about a random axis).
    pub rotation_deg: f64,
    /// Range of the per-axis scale of the anatomy.
    pub scale: [f64; 2],
    /// Largest displacement of the smooth warp, mm.
    pub warp_mm: f64,
    /// Amplitude of the smooth within-tissue texture, ppm.
    pub texture_ppm: f64,
}

impl Default for LabelsConfig {
    fn default() -> Self {
        let chi = [
            (1, [0.0, 0.12]),    // caudate
            (2, [0.06, 0.30]),   // globus pallidus
            (3, [0.0, 0.15]),    // putamen
            (4, [0.03, 0.20]),   // red nucleus
            (5, [0.05, 0.25]),   // dentate nucleus
            (6, [0.04, 0.25]),   // substantia nigra
            (7, [-0.03, 0.08]),  // thalamus
            (8, [-0.08, 0.0]),   // white matter
            (9, [-0.01, 0.07]),  // grey matter
            (10, [-0.03, 0.04]), // CSF
            (11, [0.1, 0.6]),    // veins
            (13, [-2.6, -1.4]),  // bone
            (14, [8.8, 9.6]),    // air
            (15, [-0.1, 0.1]),   // soft tissue
            (16, [-3.5, -0.5]),  // calcification
            (17, [0.4, 2.0]),    // microbleed
        ]
        .into_iter()
        .collect();
        LabelsConfig {
            nifti: PathBuf::new(),
            fraction: 0.5,
            chi,
            outside: vec![13, 14, 15],
            unlabelled_ppm: 9.2,
            random_contrast_probability: 0.2,
            rotation_deg: 20.0,
            scale: [0.85, 1.15],
            warp_mm: 3.0,
            texture_ppm: 0.015,
        }
    }
}

/// A label map in memory, with the brain voxels to centre patches on.
pub struct LabelSource {
    cfg: LabelsConfig,
    dims: [usize; 3],
    voxel_size: [f64; 3],
    labels: Vec<u32>,
    brain: Vec<usize>,
    /// Every label present, in order (index into the per-sample χ table).
    present: Vec<u32>,
}

/// One deformed patch: χ of the brain (zero outside it), χ of the head around it (zero
/// inside), and the brain mask.
pub struct LabelPatch {
    pub chi: Vec<f32>,
    pub outside: Vec<f32>,
    pub mask: Vec<bool>,
}

impl LabelSource {
    pub fn load(cfg: &LabelsConfig) -> Result<Self> {
        let path = &cfg.nifti;
        let bad = |m: String| Err(Error::Config(format!("training data labels: {m}")));
        if !(0.0..=1.0).contains(&cfg.fraction) {
            return bad(format!("fraction must be in [0, 1], got {}", cfg.fraction));
        }
        if cfg.scale[0] <= 0.0 || cfg.scale[0] > cfg.scale[1] || cfg.warp_mm < 0.0 {
            return bad("scale must be [min, max] > 0 and warp_mm ≥ 0".into());
        }
        if let Some((l, r)) = cfg.chi.iter().find(|(_, r)| r[0] > r[1]) {
            return bad(format!("label {l}'s χ range {r:?} is not [min, max]"));
        }
        let img = crate::io::read_image(path)?;
        if img.frames.len() != 1 {
            return Err(Error::input(path, "expected a 3D label image"));
        }
        let v = &img.frames[0];
        let mut labels = Vec::with_capacity(v.data.len());
        for &x in &v.data {
            if !(x.is_finite() && x >= 0.0 && x.fract() == 0.0) {
                return Err(Error::input(
                    path,
                    format!("holds {x}, not a label (labels are whole numbers ≥ 0)"),
                ));
            }
            labels.push(x as u32);
        }
        let is_brain = |l: u32| l != 0 && !cfg.outside.contains(&l);
        let brain: Vec<usize> = (0..labels.len()).filter(|&i| is_brain(labels[i])).collect();
        if brain.is_empty() {
            return Err(Error::input(
                path,
                format!(
                    "has no brain labels (every voxel is 0 or one of the outside labels {:?})",
                    cfg.outside
                ),
            ));
        }
        let mut present: Vec<u32> = labels.clone();
        present.sort_unstable();
        present.dedup();
        Ok(LabelSource {
            cfg: cfg.clone(),
            dims: v.dims,
            voxel_size: v.geometry.voxel_size,
            labels,
            brain,
            present,
        })
    }

    pub fn fraction(&self) -> f64 {
        self.cfg.fraction
    }

    /// χ per label for one sample.
    fn draw_chi(&self, chi_range: [f64; 2], rng: &mut Rng) -> BTreeMap<u32, f64> {
        let random = rng.uniform() < self.cfg.random_contrast_probability;
        self.present
            .iter()
            .map(|&l| {
                let brain = l != 0 && !self.cfg.outside.contains(&l);
                let value = match self.cfg.chi.get(&l) {
                    Some(_) if random && brain => rng.range(chi_range[0], chi_range[1]),
                    Some(r) if r[0] < r[1] => rng.range(r[0], r[1]),
                    Some(r) => r[0],
                    None => self.cfg.unlabelled_ppm,
                };
                (l, value)
            })
            .collect()
    }

    /// A `p`³ patch with voxel size `voxel_size` (mm), centred on a random brain voxel of the
    /// deformed anatomy.
    pub fn patch(
        &self,
        p: usize,
        voxel_size: [f64; 3],
        chi_range: [f64; 2],
        rng: &mut Rng,
    ) -> LabelPatch {
        let cfg = &self.cfg;
        let values = self.draw_chi(chi_range, rng);
        let centre_voxel = self.brain[(rng.next_u64() % self.brain.len() as u64) as usize];
        let [nx, ny, _] = self.dims;
        let centre = [
            (centre_voxel % nx) as f64 * self.voxel_size[0],
            ((centre_voxel / nx) % ny) as f64 * self.voxel_size[1],
            (centre_voxel / (nx * ny)) as f64 * self.voxel_size[2],
        ];
        // Patch offset (mm) → source offset: rotation about a random axis by at most
        // `rotation_deg` (a uniform rotation scaled down), then a per-axis scale.
        let angle = rng.range(0.0, cfg.rotation_deg).to_radians();
        let rotation = axis_angle(random_rotation(rng)[0], angle);
        let scale = [0, 1, 2].map(|_| rng.range(cfg.scale[0], cfg.scale[1]));
        let warp = Warp::random(
            rng,
            cfg.warp_mm,
            p as f64 * voxel_size[0].max(voxel_size[1]),
        );
        let texture = Warp::random(rng, 1.0, p as f64 * voxel_size[0]);
        let is_brain = |l: u32| l != 0 && !cfg.outside.contains(&l);
        let n = p * p * p;
        let mut out = LabelPatch {
            chi: vec![0.0; n],
            outside: vec![0.0; n],
            mask: vec![false; n],
        };
        for v in 0..n {
            let idx = [v % p, (v / p) % p, v / (p * p)];
            let d = [0, 1, 2].map(|a| (idx[a] as f64 - p as f64 / 2.0) * voxel_size[a]);
            let s = [0, 1, 2].map(|a| d[a] * scale[a]);
            let r = [0, 1, 2].map(|a| (0..3).map(|b| rotation[a][b] * s[b]).sum::<f64>());
            let u = warp.at(d);
            let src =
                [0, 1, 2].map(|a| ((centre[a] + r[a] + u[a]) / self.voxel_size[a]).round() as i64);
            let label = if (0..3).all(|a| src[a] >= 0 && (src[a] as usize) < self.dims[a]) {
                let [i, j, k] = src.map(|x| x as usize);
                self.labels[i + nx * (j + ny * k)]
            } else {
                0
            };
            let chi = values.get(&label).copied().unwrap_or(cfg.unlabelled_ppm);
            if is_brain(label) {
                out.mask[v] = true;
                out.chi[v] = (chi + cfg.texture_ppm * texture.at(d)[0]) as f32;
            } else {
                out.outside[v] = chi as f32;
            }
        }
        out
    }
}

/// A smooth random displacement (mm): per axis, a sum of a few low-frequency cosines.
struct Warp {
    /// Per output axis: (wave vector in cycles/mm, phase, amplitude).
    waves: [Vec<([f64; 3], f64, f64)>; 3],
}

impl Warp {
    fn random(rng: &mut Rng, amplitude: f64, extent_mm: f64) -> Warp {
        let mut axis = || {
            (0..3)
                .map(|_| {
                    let k = [0, 1, 2].map(|_| rng.range(-2.0, 2.0) / extent_mm.max(1.0));
                    (k, rng.range(0.0, 6.3), rng.range(0.0, amplitude / 3.0))
                })
                .collect()
        };
        Warp {
            waves: [axis(), axis(), axis()],
        }
    }

    fn at(&self, d: [f64; 3]) -> [f64; 3] {
        self.waves.each_ref().map(|waves| {
            waves
                .iter()
                .map(|(k, ph, a)| {
                    let x = k[0] * d[0] + k[1] * d[1] + k[2] * d[2];
                    a * (2.0 * std::f64::consts::PI * x + ph).cos()
                })
                .sum()
        })
    }
}

/// Rotation matrix about a unit `axis` by `angle` radians (Rodrigues).
fn axis_angle(axis: [f64; 3], angle: f64) -> [[f64; 3]; 3] {
    let (s, c) = angle.sin_cos();
    let [x, y, z] = axis;
    let t = 1.0 - c;
    [
        [t * x * x + c, t * x * y - s * z, t * x * z + s * y],
        [t * x * y + s * z, t * y * y + c, t * y * z - s * x],
        [t * x * z - s * y, t * y * z + s * x, t * z * z + c],
    ]
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::io::write_volume;
    use crate::{Geometry, Volume};
    use std::path::Path;

    /// A 40³ "head": a brain ball of two tissues (label 8 core, label 9 shell) inside a shell
    /// of bone (13) in air (14).
    pub(in crate::train) fn head(dir: &Path) -> PathBuf {
        let n = 40;
        let data: Vec<f32> = (0..n * n * n)
            .map(|v| {
                let c = [v % n, (v / n) % n, v / (n * n)].map(|i| i as f64 - 19.5);
                let r = (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt();
                match r {
                    r if r < 9.0 => 8.0,
                    r if r < 14.0 => 9.0,
                    r if r < 17.0 => 13.0,
                    _ => 14.0,
                }
            })
            .collect();
        let path = dir.join("seg.nii.gz");
        write_volume(
            &path,
            &Volume::new([n; 3], data, Geometry::from_voxel_size([1.0; 3])),
        )
        .unwrap();
        path
    }

    fn source(dir: &Path, tweak: impl FnOnce(&mut LabelsConfig)) -> LabelSource {
        let mut cfg = LabelsConfig {
            nifti: head(dir),
            ..LabelsConfig::default()
        };
        tweak(&mut cfg);
        LabelSource::load(&cfg).unwrap()
    }

    #[test]
    fn undeformed_patches_keep_the_labels_and_draw_chi_within_each_range() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path(), |c| {
            c.rotation_deg = 0.0;
            c.scale = [1.0, 1.0];
            c.warp_mm = 0.0;
            c.texture_ppm = 0.0;
            c.random_contrast_probability = 0.0;
        });
        for seed in 0..6 {
            let mut rng = Rng::new(seed);
            let patch = src.patch(24, [1.0; 3], [-0.2, 0.4], &mut rng);
            // Brain voxels hold one value per label, inside that label's range.
            let mut seen: Vec<f32> = patch
                .chi
                .iter()
                .zip(&patch.mask)
                .filter(|(_, &m)| m)
                .map(|(&c, _)| c)
                .collect();
            seen.sort_by(f32::total_cmp);
            seen.dedup();
            assert!(!seen.is_empty() && seen.len() <= 2, "{seen:?}");
            let in_range = |c: f32, r: [f64; 2]| (r[0]..=r[1]).contains(&(c as f64));
            assert!(seen
                .iter()
                .all(|&c| in_range(c, [-0.08, 0.0]) || in_range(c, [-0.01, 0.07])));
            // Outside values are bone or air only, and never overlap the brain.
            for ((&o, &c), &m) in patch.outside.iter().zip(&patch.chi).zip(&patch.mask) {
                if m {
                    assert_eq!(o, 0.0);
                } else {
                    assert_eq!(c, 0.0);
                    assert!(in_range(o, [-2.6, -1.4]) || in_range(o, [8.8, 9.6]), "{o}");
                }
            }
        }
    }

    #[test]
    fn deformation_changes_the_shape_but_keeps_it_brain_sized() {
        let dir = tempfile::tempdir().unwrap();
        let fixed = source(dir.path(), |c| {
            c.rotation_deg = 0.0;
            c.scale = [1.0, 1.0];
            c.warp_mm = 0.0;
        });
        let deformed = source(dir.path(), |c| {
            c.scale = [0.8, 1.2];
            c.warp_mm = 4.0;
        });
        let mut differs = 0;
        for seed in 0..8 {
            let a = fixed.patch(32, [1.0; 3], [-0.2, 0.4], &mut Rng::new(seed));
            let b = deformed.patch(32, [1.0; 3], [-0.2, 0.4], &mut Rng::new(seed));
            let count = |m: &[bool]| m.iter().filter(|&&x| x).count() as f64;
            let changed = a.mask.iter().zip(&b.mask).filter(|(x, y)| x != y).count();
            differs += (changed > 50) as usize;
            // Scale within 0.8..1.2 per axis keeps the volume within 0.5..1.75 of it.
            let ratio = count(&b.mask) / count(&a.mask).max(1.0);
            assert!((0.4..2.0).contains(&ratio), "brain volume ratio {ratio}");
        }
        assert!(
            differs >= 6,
            "deformation changed only {differs} of 8 masks"
        );
    }

    #[test]
    fn samples_never_repeat_the_phantom_chi() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path(), |_| ());
        let a = src.patch(16, [1.0; 3], [-0.2, 0.4], &mut Rng::new(1));
        let b = src.patch(16, [1.0; 3], [-0.2, 0.4], &mut Rng::new(2));
        assert_ne!(a.chi, b.chi);
    }

    #[test]
    fn rejects_non_label_images_and_bad_ranges_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chi.nii.gz");
        write_volume(
            &path,
            &Volume::new([8; 3], vec![0.05; 512], Geometry::from_voxel_size([1.0; 3])),
        )
        .unwrap();
        let cfg = LabelsConfig {
            nifti: path.clone(),
            ..LabelsConfig::default()
        };
        let err = LabelSource::load(&cfg).err().unwrap().to_string();
        assert!(
            err.contains("chi.nii.gz") && err.contains("not a label"),
            "{err}"
        );
        let mut cfg = LabelsConfig {
            nifti: head(dir.path()),
            ..LabelsConfig::default()
        };
        cfg.chi.insert(8, [0.1, -0.1]);
        let err = LabelSource::load(&cfg).err().unwrap().to_string();
        assert!(err.contains("label 8"), "{err}");
    }

    #[test]
    fn axis_angle_is_a_rotation_by_the_angle() {
        let r = axis_angle([0.0, 0.0, 1.0], std::f64::consts::FRAC_PI_2);
        let x = [1.0, 0.0, 0.0];
        let y: Vec<f64> = (0..3)
            .map(|a| (0..3).map(|b| r[a][b] * x[b]).sum())
            .collect();
        assert!((y[0]).abs() < 1e-12 && (y[1] - 1.0).abs() < 1e-12 && y[2].abs() < 1e-12);
    }
}
