//! Training data without real data: synthetic susceptibility patches in the spirit of
//! DeepQSM (random ellipsoids, cuboids, tubes over a smooth texture, occasional strong
//! sources), or patches cut from a χ NIfTI; local fields made with the project's one
//! [`DipoleOperator`] for random B0 directions, plus noise at 3 T / 7 T-like levels.
//!
//! Every batch is a pure function of `(seed, stream, index)`: the generator keeps no state,
//! so resuming training only needs the batch counter, and the result does not depend on
//! threads.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::labels::{LabelSource, LabelsConfig};
use super::userdata::{DerivativesConfig, UserData};
use crate::physics::units::GAMMA_BAR_HZ_PER_T;
use crate::physics::DipoleOperator;
use crate::simulate::rng::Rng;
use crate::volume::crop_at;
use crate::{Error, Result};

/// How training patches are made (the `data` section of the training config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Side of the cubic patches, voxels.
    pub patch: usize,
    /// Voxel size of synthetic patches, mm.
    pub voxel_size: [f64; 3],
    /// Each batch draws 1..=`orientations` B0 directions (1 for single-orientation models).
    pub orientations: usize,
    /// Largest tilt of B0 from the z axis, degrees (uniform on the spherical cap).
    pub max_tilt_deg: f64,
    /// Number of shapes per patch, [min, max].
    pub shapes: [usize; 2],
    /// Susceptibility range of shapes and texture, ppm.
    pub chi_range: [f64; 2],
    /// Probability that a patch holds one strong source (bleed or calcification-like).
    pub strong_source_probability: f64,
    /// |χ| range of strong sources, ppm (positive or negative with equal odds).
    pub strong_source_range: [f64; 2],
    /// Probability that the brain mask is an ellipsoid inside the patch rather than all of it.
    pub partial_mask_probability: f64,
    /// Probability that a sample whose mask does not fill the patch gets its field the way
    /// users' fields are made: a total field from the brain plus head-like sources outside
    /// the mask (air, bone, tissue), passed through chimap's own background removal
    /// (`preprocess::background` with its defaults). The network then learns to undo the
    /// residual background and the harmonic part that removal loses; the target stays χ.
    pub background_probability: f64,
    /// Field strengths (T) drawn with equal odds; the noise scales as 1/B0.
    pub field_strengths: Vec<f64>,
    /// Phase SNR range of the combined echoes; field noise is 1/(SNR·2π·γ̄·B0·TE) ppm.
    pub snr: [f64; 2],
    /// Effective echo time of the combined echoes, s.
    pub echo_time: f64,
    /// A χ NIfTI (ppm, e.g. `chimap simulate`'s ground truth) to cut patches from.
    pub chi_nifti: Option<PathBuf>,
    /// Its brain mask (default: the non-zero voxels of the χ map).
    pub mask_nifti: Option<PathBuf>,
    /// Fraction of batches cut from `chi_nifti` (when given).
    pub nifti_fraction: f64,
    /// A BIDS derivative dataset of local fields with reference χ maps to train on (mixed
    /// with synthetic batches by its `fraction`); its held-out subjects validate.
    pub derivatives: Option<DerivativesConfig>,
    /// A tissue segmentation to make brain-like patches from, with per-label χ redrawn and
    /// the anatomy deformed for every sample (see [`LabelsConfig`]).
    pub labels: Option<LabelsConfig>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            patch: 32,
            voxel_size: [1.0; 3],
            orientations: 1,
            max_tilt_deg: 35.0,
            shapes: [8, 24],
            chi_range: [-0.2, 0.4],
            strong_source_probability: 0.1,
            strong_source_range: [0.5, 1.5],
            partial_mask_probability: 0.5,
            background_probability: 0.7,
            field_strengths: vec![3.0, 7.0],
            snr: [30.0, 150.0],
            echo_time: 0.02,
            chi_nifti: None,
            mask_nifti: None,
            nifti_fraction: 0.5,
            derivatives: None,
            labels: None,
        }
    }
}

/// One batch on one grid with one set of B0 directions (the learned data term shares them).
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Patch dims `[nx, ny, nz]` and voxel size (mm), physics order.
    pub dims: [usize; 3],
    pub voxel_size: [f64; 3],
    /// Unit B0 directions in the voxel frame.
    pub b0: Vec<[f64; 3]>,
    /// Samples in the batch.
    pub n: usize,
    /// χ (ppm) of each sample, zero outside its mask: `n` volumes, x fastest.
    pub chi: Vec<f32>,
    /// 0/1 masks, `n` volumes.
    pub mask: Vec<f32>,
    /// Local fields (ppm) with noise, zero outside the mask: `n × b0.len()` volumes, sample
    /// major (the `[N, B, D, H, W]` tensor layout).
    pub fields: Vec<f32>,
}

impl Batch {
    pub fn voxels(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A χ map and its mask to cut patches from.
struct Source {
    dims: [usize; 3],
    voxel_size: [f64; 3],
    chi: Vec<f32>,
    mask: Vec<bool>,
}

/// Which sequence of batches: training and validation draw from unrelated streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Train = 1,
    Validation = 2,
}

/// The batch generator.
pub struct Synth {
    cfg: DataConfig,
    seed: u64,
    source: Option<Source>,
    user: Option<UserData>,
    labels: Option<LabelSource>,
}

impl Synth {
    /// Reads `chi_nifti` (and its mask) when given; checks the configuration.
    pub fn new(cfg: &DataConfig, seed: u64) -> Result<Self> {
        check(cfg)?;
        let source = match &cfg.chi_nifti {
            Some(path) => Some(read_source(path, cfg.mask_nifti.as_deref(), cfg.patch)?),
            None => None,
        };
        let user = match &cfg.derivatives {
            Some(d) => Some(UserData::load(d, cfg.patch)?),
            None => None,
        };
        let labels = match &cfg.labels {
            Some(l) => Some(LabelSource::load(l)?),
            None => None,
        };
        Ok(Synth {
            cfg: cfg.clone(),
            seed,
            source,
            user,
            labels,
        })
    }

    pub fn config(&self) -> &DataConfig {
        &self.cfg
    }

    /// Batch `index` of `stream` with `n` samples: the same arguments give the same batch.
    pub fn batch(&self, stream: Stream, index: u64, n: usize) -> Batch {
        let mut rng = Rng::derived(self.seed, &[stream as u64, index]);
        let cfg = &self.cfg;
        if let (Some(user), Some(d)) = (&self.user, &cfg.derivatives) {
            // Validation is on the held-out subjects when there are any.
            let from_user = match stream {
                Stream::Validation => user.has_validation(),
                Stream::Train => rng.uniform() < d.fraction,
            };
            if from_user {
                return user.batch(stream == Stream::Validation, &mut rng, n, cfg.orientations);
            }
        }
        let from_labels = self
            .labels
            .as_ref()
            .is_some_and(|l| rng.uniform() < l.fraction());
        let from_file = !from_labels && self.source.is_some() && rng.uniform() < cfg.nifti_fraction;
        let voxel_size = match (&self.source, from_file) {
            (Some(s), true) => s.voxel_size,
            _ => cfg.voxel_size,
        };
        let count = 1 + (rng.next_u64() % cfg.orientations as u64) as usize;
        let b0: Vec<[f64; 3]> = (0..count)
            .map(|_| random_direction(&mut rng, cfg.max_tilt_deg))
            .collect();
        let p = cfg.patch;
        let dims = [p; 3];
        let ops: Vec<DipoleOperator> = b0
            .iter()
            .map(|&b| DipoleOperator::new(dims, voxel_size, b))
            .collect();
        let seeds: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
        let samples: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = seeds
            .par_iter()
            .map(|&s| {
                let mut r = Rng::new(s);
                // The head around the brain: from the segmentation where there is one,
                // else head-like shapes drawn when needed.
                let (chi, mask, head) = match (&self.labels, &self.source) {
                    (Some(l), _) if from_labels => {
                        let patch = l.patch(p, voxel_size, cfg.chi_range, &mut r);
                        (patch.chi, patch.mask, Some(patch.outside))
                    }
                    (_, Some(src)) if from_file => {
                        let (c, m) = cut_patch(src, p, &mut r);
                        (c, m, None)
                    }
                    _ => {
                        let (c, m) = synthetic_patch(cfg, &mut r);
                        (c, m, None)
                    }
                };
                let partial = mask.iter().any(|&m| !m);
                let fields = if partial && r.uniform() < cfg.background_probability {
                    let outside = head.unwrap_or_else(|| background_sources(&mask, p, &mut r));
                    fields_after_background_removal(&chi, &mask, &outside, &ops, cfg, &mut r)
                } else {
                    fields_of(&chi, &mask, &ops, cfg, &mut r)
                };
                let mask = mask.iter().map(|&m| m as u8 as f32).collect();
                (chi, mask, fields)
            })
            .collect();
        let mut batch = Batch {
            dims,
            voxel_size,
            b0,
            n,
            chi: Vec::new(),
            mask: Vec::new(),
            fields: Vec::new(),
        };
        for (c, m, f) in samples {
            batch.chi.extend(c);
            batch.mask.extend(m);
            batch.fields.extend(f);
        }
        batch
    }
}

fn check(cfg: &DataConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Config(format!("training data: {m}")));
    if cfg.patch < 8 {
        return bad(format!(
            "patch must be at least 8 voxels, got {}",
            cfg.patch
        ));
    }
    if cfg.orientations == 0 {
        return bad("orientations must be at least 1".into());
    }
    if cfg.shapes[0] > cfg.shapes[1] || cfg.chi_range[0] >= cfg.chi_range[1] {
        return bad("shapes and chi_range must be [min, max] with min < max".into());
    }
    if cfg.field_strengths.is_empty() || cfg.field_strengths.iter().any(|&t| t <= 0.0) {
        return bad("field_strengths must list positive tesla values".into());
    }
    if !(cfg.snr[0] > 0.0 && cfg.snr[0] <= cfg.snr[1] && cfg.echo_time > 0.0) {
        return bad("snr must be [min, max] > 0 and echo_time positive".into());
    }
    if cfg.voxel_size.iter().any(|&v| v <= 0.0) || !(0.0..90.0).contains(&cfg.max_tilt_deg) {
        return bad("voxel_size must be positive and max_tilt_deg in [0, 90)".into());
    }
    Ok(())
}

/// A unit vector uniform on the cap within `max_tilt` degrees of z.
pub fn random_direction(rng: &mut Rng, max_tilt_deg: f64) -> [f64; 3] {
    let cos_max = max_tilt_deg.to_radians().cos();
    let c = rng.range(cos_max, 1.0);
    let s = (1.0 - c * c).max(0.0).sqrt();
    let phi = rng.range(0.0, 2.0 * std::f64::consts::PI);
    [s * phi.cos(), s * phi.sin(), c]
}

/// Field noise σ in ppm for a phase SNR, field strength and echo time.
pub fn field_noise_ppm(snr: f64, b0_tesla: f64, echo_time: f64) -> f64 {
    1e6 / (snr * 2.0 * std::f64::consts::PI * GAMMA_BAR_HZ_PER_T * b0_tesla * echo_time)
}

/// Field noise σ (ppm) of one sample: a random field strength and a log-uniform SNR (the
/// noise level spans its range evenly on a ratio scale).
fn draw_noise(cfg: &DataConfig, rng: &mut Rng) -> f64 {
    let t = cfg.field_strengths[(rng.next_u64() % cfg.field_strengths.len() as u64) as usize];
    let snr = (rng.range(cfg.snr[0].ln(), cfg.snr[1].ln())).exp();
    field_noise_ppm(snr, t, cfg.echo_time)
}

/// `g(field)` inside the mask, zero outside, voxel by voxel in order (so a noise draw in `g`
/// follows the voxel order).
fn inside_mask(field: &[f32], mask: &[bool], mut g: impl FnMut(f32) -> f32) -> Vec<f32> {
    field
        .iter()
        .zip(mask)
        .map(|(&v, &m)| if m { g(v) } else { 0.0 })
        .collect()
}

/// `M · (D_b (M χ) + noise)` for each direction.
fn fields_of(
    chi: &[f32],
    mask: &[bool],
    ops: &[DipoleOperator],
    cfg: &DataConfig,
    rng: &mut Rng,
) -> Vec<f32> {
    let sigma = draw_noise(cfg, rng);
    let mut out = Vec::with_capacity(chi.len() * ops.len());
    for op in ops {
        out.extend(inside_mask(&op.forward(chi), mask, |v| {
            v + (sigma * rng.normal()) as f32
        }));
    }
    out
}

/// Relative susceptibility (ppm, against tissue ≈ water) of air and of cortical bone.
const AIR_PPM: f64 = 9.4;
const BONE_PPM: f64 = -2.0;

/// χ outside the mask as around a brain: soft tissue of a random level, and a few large
/// regions of air (sinuses, outside the head) or bone; zero inside the mask.
fn background_sources(mask: &[bool], p: usize, rng: &mut Rng) -> Vec<f32> {
    let mut chi = vec![rng.range(-0.1, 0.1); p * p * p];
    for _ in 0..1 + rng.next_u64() % 3 {
        let shape = Shape::random(rng, 0.1, 0.35);
        let value = if rng.uniform() < 0.5 {
            AIR_PPM
        } else {
            BONE_PPM
        };
        paint(&mut chi, p, &shape, |_| value);
    }
    chi.iter()
        .zip(mask)
        .map(|(&c, &m)| if m { 0.0 } else { c as f32 })
        .collect()
}

/// Local fields made as the pipeline makes them: the total field of the brain's χ and of
/// the head around it (`outside`, zero in the mask), with noise, measured inside the mask, then chimap's background
/// removal. Falls back to the exact local field if removal fails (e.g. a sliver of mask).
fn fields_after_background_removal(
    chi: &[f32],
    mask: &[bool],
    outside: &[f32],
    ops: &[DipoleOperator],
    cfg: &DataConfig,
    rng: &mut Rng,
) -> Vec<f32> {
    let total_chi: Vec<f32> = chi.iter().zip(outside).map(|(a, b)| a + b).collect();
    let sigma = draw_noise(cfg, rng);
    let settings = crate::preprocess::background::BackgroundConfig::default();
    let mut out = Vec::with_capacity(chi.len() * ops.len());
    for op in ops {
        let total = inside_mask(&op.forward(&total_chi), mask, |v| {
            v + (sigma * rng.normal()) as f32
        });
        let field = crate::Volume::new(
            op.dims(),
            total,
            crate::volume::Geometry::from_voxel_size(op.voxel_size()),
        );
        let local = crate::preprocess::background::remove_background(
            &field,
            mask,
            op.b0(),
            None,
            &settings,
        );
        match local {
            Ok(l) => out.extend(
                l.field
                    .data
                    .iter()
                    .zip(&l.mask)
                    .zip(mask)
                    .map(|((&v, &k), &m)| if k && m && v.is_finite() { v } else { 0.0 }),
            ),
            Err(_) => out.extend(inside_mask(&op.forward(chi), mask, |v| v)),
        }
    }
    out
}

/// A synthetic χ patch and its mask; χ is zero outside the mask.
fn synthetic_patch(cfg: &DataConfig, rng: &mut Rng) -> (Vec<f32>, Vec<bool>) {
    let p = cfg.patch;
    let n = p * p * p;
    let [lo, hi] = cfg.chi_range;
    let pos = |v: usize| -> [f64; 3] {
        let (i, j, k) = (v % p, (v / p) % p, v / (p * p));
        [
            i as f64 / p as f64,
            j as f64 / p as f64,
            k as f64 / p as f64,
        ]
    };
    // Smooth texture: a few low-frequency plane waves around a random baseline.
    let base = rng.range(lo * 0.25, hi * 0.25);
    let waves: Vec<([f64; 3], f64, f64)> = (0..4)
        .map(|_| {
            let k = [0, 1, 2].map(|_| rng.range(-3.0, 3.0));
            (k, rng.range(0.0, 6.3), rng.range(0.0, 0.03))
        })
        .collect();
    let mut chi: Vec<f64> = (0..n)
        .map(|v| {
            let r = pos(v);
            let t: f64 = waves
                .iter()
                .map(|(k, ph, a)| a * (2.0 * std::f64::consts::PI * dot(k, &r) + ph).cos())
                .sum();
            base + t
        })
        .collect();
    let count =
        cfg.shapes[0] + (rng.next_u64() % (cfg.shapes[1] - cfg.shapes[0] + 1) as u64) as usize;
    for _ in 0..count {
        let shape = Shape::random(rng, 0.04, 0.3);
        let value = rng.range(lo, hi);
        // Either a uniform region or a smooth ramp across it (a tissue gradient).
        let slope = if rng.uniform() < 0.3 {
            rng.range(-0.1, 0.1)
        } else {
            0.0
        };
        paint(&mut chi, p, &shape, |r| value + slope * (r[0] - 0.5));
    }
    for c in chi.iter_mut() {
        *c = c.clamp(lo, hi);
    }
    if rng.uniform() < cfg.strong_source_probability {
        let shape = Shape::random(rng, 0.02, 0.08);
        let [a, b] = cfg.strong_source_range;
        let m = rng.range(a, b);
        let value = if rng.uniform() < 0.5 { m } else { -m };
        paint(&mut chi, p, &shape, |_| value);
    }
    let mask: Vec<bool> = if rng.uniform() < cfg.partial_mask_probability {
        let centre = [0, 1, 2].map(|_| rng.range(0.4, 0.6));
        let radii = [0, 1, 2].map(|_| rng.range(0.3, 0.5));
        (0..n)
            .map(|v| {
                let r = pos(v);
                (0..3)
                    .map(|a| ((r[a] - centre[a]) / radii[a]).powi(2))
                    .sum::<f64>()
                    <= 1.0
            })
            .collect()
    } else {
        vec![true; n]
    };
    let chi = chi
        .iter()
        .zip(&mask)
        .map(|(&c, &m)| if m { c as f32 } else { 0.0 })
        .collect();
    (chi, mask)
}

/// Paints `value(r)` (with r the relative position) into the voxels inside `shape`: shapes
/// replace what lies below them rather than add, as tissue boundaries do.
fn paint(chi: &mut [f64], p: usize, shape: &Shape, value: impl Fn([f64; 3]) -> f64) {
    for (v, c) in chi.iter_mut().enumerate() {
        let r = [
            (v % p) as f64 / p as f64,
            ((v / p) % p) as f64 / p as f64,
            (v / (p * p)) as f64 / p as f64,
        ];
        if shape.contains(r) {
            *c = value(r);
        }
    }
}

/// A shape in relative patch coordinates [0, 1)³.
#[derive(Clone, Debug)]
enum Shape {
    /// Centre, semi-axes along a rotated frame.
    Ellipsoid([f64; 3], [f64; 3], [[f64; 3]; 3]),
    /// Centre, half-sides along a rotated frame.
    Cuboid([f64; 3], [f64; 3], [[f64; 3]; 3]),
    /// Segment from a to b with a radius (vessel-like).
    Tube([f64; 3], [f64; 3], f64),
}

impl Shape {
    fn random(rng: &mut Rng, min: f64, max: f64) -> Shape {
        let centre = [0, 1, 2].map(|_| rng.range(0.0, 1.0));
        let size = [0, 1, 2].map(|_| rng.range(min, max));
        let frame = random_rotation(rng);
        match rng.next_u64() % 3 {
            0 => Shape::Ellipsoid(centre, size, frame),
            1 => Shape::Cuboid(centre, size.map(|s| 0.8 * s), frame),
            _ => {
                let d = random_direction(rng, 89.0);
                let half = rng.range(0.2, 0.6);
                let a = [0, 1, 2].map(|i| centre[i] - half * d[i]);
                let b = [0, 1, 2].map(|i| centre[i] + half * d[i]);
                Shape::Tube(a, b, rng.range(0.01, 0.04).max(min * 0.5))
            }
        }
    }

    fn contains(&self, r: [f64; 3]) -> bool {
        match self {
            Shape::Ellipsoid(c, s, f) => {
                let d = [r[0] - c[0], r[1] - c[1], r[2] - c[2]];
                (0..3).map(|a| (dot(&f[a], &d) / s[a]).powi(2)).sum::<f64>() <= 1.0
            }
            Shape::Cuboid(c, s, f) => {
                let d = [r[0] - c[0], r[1] - c[1], r[2] - c[2]];
                (0..3).all(|a| dot(&f[a], &d).abs() <= s[a])
            }
            Shape::Tube(a, b, radius) => {
                let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
                let ar = [r[0] - a[0], r[1] - a[1], r[2] - a[2]];
                let t = (dot(&ab, &ar) / dot(&ab, &ab)).clamp(0.0, 1.0);
                let q = [0, 1, 2].map(|i| ar[i] - t * ab[i]);
                dot(&q, &q) <= radius * radius
            }
        }
    }
}

fn dot(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Rows of a random rotation (Gram–Schmidt on Gaussian vectors).
pub(super) fn random_rotation(rng: &mut Rng) -> [[f64; 3]; 3] {
    let g = |rng: &mut Rng| [rng.normal(), rng.normal(), rng.normal()];
    let norm = |v: [f64; 3]| {
        let n = dot(&v, &v).sqrt().max(1e-12);
        v.map(|x| x / n)
    };
    let a = norm(g(rng));
    let b = g(rng);
    let b = norm([0, 1, 2].map(|i| b[i] - dot(&a, &b) * a[i]));
    let c = [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ];
    [a, b, c]
}

fn read_source(chi: &Path, mask: Option<&Path>, patch: usize) -> Result<Source> {
    let read = |p: &Path| -> Result<crate::Volume> {
        let img = crate::io::read_image(p)?;
        if img.frames.len() != 1 {
            return Err(Error::input(p, "expected a 3D image"));
        }
        Ok(img.frames.into_iter().next().expect("one frame"))
    };
    let v = read(chi)?;
    let mask = match mask {
        Some(m) => {
            let mv = read(m)?;
            if mv.dims != v.dims {
                return Err(Error::input(
                    m,
                    format!(
                        "grid {:?} differs from {}'s {:?}; pass the mask of that χ map",
                        mv.dims,
                        chi.display(),
                        v.dims
                    ),
                ));
            }
            mv.data.iter().map(|&x| x > 0.5).collect()
        }
        None => v.data.iter().map(|&x| x != 0.0 && x.is_finite()).collect(),
    };
    if v.dims.iter().any(|&d| d < patch) {
        return Err(Error::input(
            chi,
            format!(
                "grid {:?} is smaller than the {patch}³ training patch; lower data.patch",
                v.dims
            ),
        ));
    }
    let chi_data = v
        .data
        .iter()
        .map(|&x| if x.is_finite() { x } else { 0.0 })
        .collect();
    Ok(Source {
        dims: v.dims,
        voxel_size: v.geometry.voxel_size,
        chi: chi_data,
        mask,
    })
}

/// A random patch holding more than 1/8 brain (LP-CNN's rule), else the best of the tries.
fn cut_patch(src: &Source, p: usize, rng: &mut Rng) -> (Vec<f32>, Vec<bool>) {
    let mut best: Option<(usize, Vec<bool>, [usize; 3])> = None;
    for _ in 0..20 {
        let o = [0, 1, 2].map(|a| (rng.next_u64() % (src.dims[a] - p + 1) as u64) as usize);
        let mask = crop_at(&src.mask, src.dims, o, [p; 3]);
        let inside = mask.iter().filter(|&&m| m).count();
        let enough = inside * 8 > p * p * p;
        if best.as_ref().is_none_or(|(b, _, _)| inside > *b) {
            best = Some((inside, mask, o));
        }
        if enough {
            break;
        }
    }
    let (_, mask, o) = best.expect("at least one try");
    let chi = crop_at(&src.chi, src.dims, o, [p; 3])
        .into_iter()
        .zip(&mask)
        .map(|(c, &m)| if m { c } else { 0.0 })
        .collect();
    (chi, mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::write_volume;
    use crate::{Geometry, Volume};

    fn small() -> DataConfig {
        DataConfig {
            patch: 16,
            orientations: 3,
            ..DataConfig::default()
        }
    }

    /// Fields made through background removal: head-like sources outside the mask give a
    /// total field far from the local one, and chimap's removal brings it most of the way
    /// back (what remains is what the network must learn to undo).
    #[test]
    fn background_removal_fields_are_near_the_local_field() {
        let cfg = DataConfig {
            patch: 32,
            snr: [1e6, 1e6],
            partial_mask_probability: 1.0,
            ..DataConfig::default()
        };
        let b0 = [0.0, 0.2588, 0.9659];
        let ops = [DipoleOperator::new([32; 3], [1.0; 3], b0)];
        let (mut removed_err, mut total_err) = (0.0, 0.0);
        for seed in 0..4 {
            let mut rng = Rng::new(seed);
            let (chi, mask) = synthetic_patch(&cfg, &mut rng);
            assert!(mask.iter().any(|&m| !m) && mask.iter().any(|&m| m));
            let local = ops[0].forward(&chi);
            let mut r = Rng::new(100 + seed);
            let outside = background_sources(&mask, 32, &mut r);
            let removed =
                fields_after_background_removal(&chi, &mask, &outside, &ops, &cfg, &mut r);
            let background = ops[0].forward(&outside);
            let inside = |f: &dyn Fn(usize) -> f32| -> f64 {
                (0..chi.len())
                    .filter(|&v| mask[v])
                    .map(|v| (f(v) as f64).powi(2))
                    .sum()
            };
            removed_err += inside(&|v| removed[v] - local[v]);
            total_err += inside(&|v| background[v]);
            assert!(removed.iter().zip(&mask).all(|(&f, &m)| m || f == 0.0));
            assert!(removed.iter().all(|f| f.is_finite()));
        }
        let ratio = (removed_err / total_err).sqrt();
        eprintln!("background left after removal: {ratio:.3}");
        assert!(ratio < 0.2, "background left after removal: {ratio}");
    }

    /// The same through a segmented head: its bone and air put a background field into the
    /// brain several times the brain's own, and removal takes most of it away.
    #[test]
    fn label_batches_carry_the_head_through_background_removal() {
        let dir = tempfile::tempdir().unwrap();
        let labels = super::super::labels::LabelsConfig {
            nifti: super::super::labels::tests::head(dir.path()),
            fraction: 1.0,
            ..Default::default()
        };
        let source = LabelSource::load(&labels).unwrap();
        let cfg = DataConfig {
            patch: 32,
            snr: [1e6, 1e6],
            labels: Some(labels),
            ..DataConfig::default()
        };
        let ops = [DipoleOperator::new(
            [32; 3],
            [1.0; 3],
            [0.0, 0.2588, 0.9659],
        )];
        let (mut removed_err, mut total_err) = (0.0, 0.0);
        for seed in 0..3 {
            let mut rng = Rng::new(seed);
            let patch = source.patch(32, [1.0; 3], cfg.chi_range, &mut rng);
            let (chi, mask) = (&patch.chi, &patch.mask);
            assert!(mask.iter().any(|&m| !m) && mask.iter().any(|&m| m));
            let local = ops[0].forward(chi);
            let background = ops[0].forward(&patch.outside);
            let removed =
                fields_after_background_removal(chi, mask, &patch.outside, &ops, &cfg, &mut rng);
            for v in (0..chi.len()).filter(|&v| mask[v]) {
                removed_err += ((removed[v] - local[v]) as f64).powi(2);
                total_err += (background[v] as f64).powi(2);
            }
        }
        let ratio = (removed_err / total_err).sqrt();
        eprintln!("head's field left after removal: {ratio:.3}");
        assert!(ratio < 0.3, "head's field left after removal: {ratio}");
    }

    #[test]
    fn batches_are_a_function_of_seed_stream_and_index() {
        let a = Synth::new(&small(), 7).unwrap();
        let b = Synth::new(&small(), 7).unwrap();
        assert_eq!(a.batch(Stream::Train, 3, 2), b.batch(Stream::Train, 3, 2));
        // Another index, stream or seed gives another batch.
        let x = a.batch(Stream::Train, 3, 2);
        assert_ne!(x.chi, a.batch(Stream::Train, 4, 2).chi);
        assert_ne!(x.chi, a.batch(Stream::Validation, 3, 2).chi);
        assert_ne!(
            x.chi,
            Synth::new(&small(), 8)
                .unwrap()
                .batch(Stream::Train, 3, 2)
                .chi
        );
    }

    #[test]
    fn fields_follow_the_dipole_model_within_the_noise() {
        let cfg = DataConfig {
            snr: [1e9, 1e9],
            background_probability: 0.0,
            ..small()
        };
        let s = Synth::new(&cfg, 1).unwrap();
        for index in 0..4 {
            let b = s.batch(Stream::Train, index, 2);
            let nv = b.voxels();
            assert_eq!(b.fields.len(), b.n * b.b0.len() * nv);
            for i in 0..b.n {
                let chi = &b.chi[i * nv..][..nv];
                let mask = &b.mask[i * nv..][..nv];
                for (o, dir) in b.b0.iter().enumerate() {
                    // An independent kernel from the physics module, applied by its own FFT.
                    let want = DipoleOperator::new(b.dims, b.voxel_size, *dir).forward(chi);
                    let got = &b.fields[(i * b.b0.len() + o) * nv..][..nv];
                    for v in 0..nv {
                        let w = if mask[v] == 1.0 { want[v] } else { 0.0 };
                        assert!((got[v] - w).abs() < 1e-5, "{} vs {w}", got[v]);
                    }
                }
            }
        }
    }

    #[test]
    fn noise_has_the_configured_level() {
        let cfg = DataConfig {
            snr: [50.0, 50.0],
            field_strengths: vec![3.0],
            partial_mask_probability: 0.0,
            orientations: 1,
            ..small()
        };
        let s = Synth::new(&cfg, 2).unwrap();
        let b = s.batch(Stream::Train, 0, 4);
        let nv = b.voxels();
        let mut e2 = 0.0;
        for i in 0..b.n {
            let want =
                DipoleOperator::new(b.dims, b.voxel_size, b.b0[0]).forward(&b.chi[i * nv..][..nv]);
            e2 += want
                .iter()
                .zip(&b.fields[i * nv..][..nv])
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
        }
        let sigma = (e2 / (b.n * nv) as f64).sqrt();
        let want = field_noise_ppm(50.0, 3.0, 0.02);
        assert!((sigma / want - 1.0).abs() < 0.03, "{sigma} vs {want}");
        // About 1.2 ppb at 3 T for SNR 50 and 20 ms; halved when B0 doubles.
        assert!((want - 1.25e-3).abs() < 1e-4, "{want}");
        assert!((field_noise_ppm(50.0, 6.0, 0.02) * 2.0 - want).abs() < 1e-12);
    }

    #[test]
    fn chi_spans_the_configured_range_and_strong_sources_exceed_it() {
        let cfg = DataConfig {
            strong_source_probability: 0.0,
            ..small()
        };
        let s = Synth::new(&cfg, 3).unwrap();
        let (mut lo, mut hi) = (f32::MAX, f32::MIN);
        for index in 0..8 {
            let b = s.batch(Stream::Train, index, 2);
            for (&c, &m) in b.chi.iter().zip(&b.mask) {
                if m == 1.0 {
                    lo = lo.min(c);
                    hi = hi.max(c);
                } else {
                    assert_eq!(c, 0.0);
                }
            }
            // Directions within the tilt limit, unit length; 1..=3 of them.
            assert!((1..=3).contains(&b.b0.len()));
            for d in &b.b0 {
                assert!((dot(d, d) - 1.0).abs() < 1e-12);
                assert!(d[2] >= 35f64.to_radians().cos() - 1e-12);
            }
        }
        assert!(lo >= -0.2 && hi <= 0.4, "{lo}..{hi}");
        assert!(
            lo < -0.1 && hi > 0.3,
            "{lo}..{hi}: the range is not covered"
        );
        let strong = DataConfig {
            strong_source_probability: 1.0,
            ..small()
        };
        let s = Synth::new(&strong, 3).unwrap();
        let b = s.batch(Stream::Train, 0, 4);
        assert!(b.chi.iter().any(|c| c.abs() >= 0.5));
    }

    #[test]
    fn direction_draws_fill_the_cap() {
        let mut rng = Rng::new(4);
        let tilts: Vec<f64> = (0..2000)
            .map(|_| random_direction(&mut rng, 35.0)[2].acos().to_degrees())
            .collect();
        assert!(tilts.iter().all(|&t| t <= 35.0 + 1e-9));
        assert!(tilts.iter().any(|&t| t > 33.0));
        // Uniform on the cap: half the area lies beyond the median cosine.
        let c = 35f64.to_radians().cos();
        let median_tilt = ((1.0 + c) / 2.0).acos().to_degrees();
        let beyond = tilts.iter().filter(|&&t| t > median_tilt).count();
        assert!((900..1100).contains(&beyond), "{beyond}");
    }

    #[test]
    fn patches_come_from_a_nifti_with_enough_brain() {
        let dir = tempfile::tempdir().unwrap();
        let dims = [24, 20, 18];
        let n = dims.iter().product();
        // χ = x index · 0.01 inside a slab, zero elsewhere.
        let data: Vec<f32> = (0..n)
            .map(|v| {
                let (i, k) = (v % 24, v / (24 * 20));
                if (4..14).contains(&k) {
                    0.01 * i as f32 + 0.005
                } else {
                    0.0
                }
            })
            .collect();
        let path = dir.path().join("chi.nii.gz");
        let geom = Geometry::from_voxel_size([1.0, 1.0, 2.0]);
        write_volume(&path, &Volume::new(dims, data.clone(), geom)).unwrap();
        let cfg = DataConfig {
            chi_nifti: Some(path.clone()),
            nifti_fraction: 1.0,
            ..small()
        };
        let s = Synth::new(&cfg, 5).unwrap();
        let b = s.batch(Stream::Train, 0, 3);
        assert_eq!(b.voxel_size, [1.0, 1.0, 2.0]);
        let nv = b.voxels();
        for i in 0..3 {
            let m = &b.mask[i * nv..][..nv];
            assert!(m.iter().sum::<f32>() * 8.0 > nv as f32);
            // Each row along x is a contiguous run of the source: steps of 0.01.
            let c = &b.chi[i * nv..][..nv];
            for v in 0..nv - 1 {
                if v % 16 != 15 && m[v] == 1.0 {
                    assert!((c[v + 1] - c[v] - 0.01).abs() < 1e-5);
                }
            }
        }
        // A patch larger than the map is a clear error naming the file.
        let too_big = DataConfig { patch: 32, ..cfg };
        let err = Synth::new(&too_big, 5).err().unwrap().to_string();
        assert!(err.contains("chi.nii.gz") && err.contains("patch"), "{err}");
    }
}
