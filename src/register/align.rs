//! Coarse-to-fine rigid registration: the parts every similarity shares (where similarity is
//! measured, the starting guess, the pyramid, the warp and its Jacobian), with the similarity
//! and its optimiser chosen by [`Similarity`].

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::pyramid::{self, Level};
use super::resample::{sample_with_gradient, Grid};
use super::rigid::{cross, mul_vec, sub, Rigid};
use super::{mi, ncc};
use crate::{Error, Result, Volume};

/// Smoothing (voxels) of the reference mask that sets where similarity is measured.
const DOMAIN_WIDENING: f64 = 1.5;

/// What registration maximises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Similarity {
    /// Normalised cross-correlation: images of one contrast whose intensities agree up to a
    /// linear map (the orientations of one protocol), optimised by Levenberg–Marquardt.
    #[default]
    Ncc,
    /// Mattes mutual information: any one-to-one or many-to-one relation between the
    /// intensities (receive-coil shading that moves with the head, other contrasts),
    /// optimised by BFGS. Slower and less precise than NCC where NCC applies.
    MutualInformation,
}

impl Similarity {
    pub fn name(self) -> &'static str {
        match self {
            Similarity::Ncc => "ncc",
            Similarity::MutualInformation => "mutual-information",
        }
    }
}

/// How registration measures and how hard it tries: the `registration` section of the
/// configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// `ncc` (one contrast) or `mutual-information`.
    pub similarity: Similarity,
    /// Pyramid levels (each halves the grid).
    pub levels: usize,
    /// Optimiser iterations per level at most.
    pub max_iterations: usize,
    /// At most this many fixed voxels per level (a regular subset beyond that).
    pub max_samples: usize,
    /// Intensity bins per image for mutual information.
    pub bins: usize,
    /// Start here instead of from the centres of mass.
    #[serde(skip)]
    pub initial: Option<Rigid>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            similarity: Similarity::Ncc,
            levels: 3,
            max_iterations: 60,
            max_samples: 200_000,
            bins: mi::DEFAULT_BINS,
            initial: None,
        }
    }
}

impl Options {
    /// Rejects settings that cannot work, naming the key.
    pub fn check(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(Error::Config(format!("registration.{key} {why}")));
        if !(1..=8).contains(&self.levels) {
            return bad("levels", "must be 1 to 8");
        }
        if self.max_iterations == 0 {
            return bad("max_iterations", "must be at least 1");
        }
        if self.max_samples < 1000 {
            return bad("max_samples", "must be at least 1000");
        }
        if !(mi::MIN_BINS..=256).contains(&self.bins) {
            return bad("bins", &format!("must be {} to 256", mi::MIN_BINS));
        }
        Ok(())
    }
}

/// The result: `transform` maps reference world points to moving world points.
#[derive(Clone, Debug)]
pub struct Registration {
    pub transform: Rigid,
    pub similarity: Similarity,
    /// NCC over the reference's (dilated) brain at full resolution, before (images aligned
    /// by the initial guess) and after, whatever was optimised (the QC check reads it).
    pub ncc_before: f64,
    pub ncc_after: f64,
    /// Mutual information (nats) at full resolution before and after, when optimised.
    pub mi_before: Option<f64>,
    pub mi_after: Option<f64>,
    pub iterations: usize,
    pub seconds: f64,
}

/// A fixed sample: world position (mm) and intensity.
pub(super) type Sample = ([f64; 3], f32);

/// Registers `moving` to `fixed` (magnitudes, unmasked; the pipeline gives first echoes).
/// Similarity is measured over the fixed brain mask widened by a few voxels; the rotation
/// centre is the centre of that mask, and the moving mask's centre gives the starting shift.
pub fn register(
    fixed: &Volume,
    fixed_mask: &[bool],
    moving: &Volume,
    moving_mask: &[bool],
    options: &Options,
) -> Result<Registration> {
    options.check()?;
    let start = Instant::now();
    let fgrid = Grid::new(fixed.dims, &fixed.geometry)?;
    let mgrid = Grid::new(moving.dims, &moving.geometry)?;
    let fdata = finite(&fixed.data);
    let mdata = finite(&moving.data);
    let fc = centroid(fixed_mask, &fgrid).ok_or_else(|| {
        Error::Numerics("the reference brain mask is empty: nothing to register to".into())
    })?;
    let mc = centroid(moving_mask, &mgrid).ok_or_else(|| {
        Error::Numerics("the moving brain mask is empty: nothing to register".into())
    })?;
    let mut t = options.initial.clone().unwrap_or(Rigid {
        translation: sub(mc, fc),
        ..Rigid::identity(fc)
    });
    let fmask_f = domain(fixed_mask, fixed.dims);
    let fixed_levels = pyramid::build(&fdata, &fgrid, options.levels);
    let domain_levels = pyramid::build(&fmask_f, &fgrid, options.levels);
    let moving_levels = pyramid::build(&mdata, &mgrid, options.levels);
    let finest = samples(&fixed_levels[0], &domain_levels[0], options.max_samples);
    let mi_at = |t: &Rigid| {
        (options.similarity == Similarity::MutualInformation)
            .then(|| mi::value(&finest, &moving_levels[0], t, options.bins))
            .flatten()
    };
    let ncc_before = ncc::ncc(&ncc::evaluate(&finest, &moving_levels[0], &t));
    let mi_before = mi_at(&t);
    let mut iterations = 0;
    for l in (0..fixed_levels.len().min(moving_levels.len())).rev() {
        let s = if l == 0 {
            finest.clone()
        } else {
            samples(&fixed_levels[l], &domain_levels[l], options.max_samples)
        };
        let (next, its) = match options.similarity {
            Similarity::Ncc => ncc::optimise(&s, &moving_levels[l], t, options.max_iterations),
            Similarity::MutualInformation => mi::optimise(
                &s,
                &moving_levels[l],
                t,
                options.max_iterations,
                options.bins,
            ),
        };
        t = next;
        iterations += its;
    }
    let ncc_after = ncc::ncc(&ncc::evaluate(&finest, &moving_levels[0], &t));
    let mi_after = mi_at(&t);
    let lost = match options.similarity {
        Similarity::Ncc => !ncc_after.is_finite(),
        Similarity::MutualInformation => mi_after.is_none(),
    };
    if lost {
        return Err(Error::Numerics(format!(
            "registration lost the overlap between the images ({} undefined)",
            options.similarity.name()
        )));
    }
    Ok(Registration {
        transform: t,
        similarity: options.similarity,
        ncc_before,
        ncc_after,
        mi_before,
        mi_after,
        iterations,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The NCC that [`register`] reports as `ncc_after`, for a transform found earlier (a
/// reused transform file): the same samples of the fixed image, the moving image warped by
/// `t`. `None` when the transform leaves too little overlap to define it.
pub fn similarity(
    fixed: &Volume,
    fixed_mask: &[bool],
    moving: &Volume,
    t: &Rigid,
    max_samples: usize,
) -> Result<Option<f64>> {
    let fgrid = Grid::new(fixed.dims, &fixed.geometry)?;
    let mgrid = Grid::new(moving.dims, &moving.geometry)?;
    let fixed_level = pyramid::build(&finite(&fixed.data), &fgrid, 1).swap_remove(0);
    let domain_level = pyramid::build(&domain(fixed_mask, fixed.dims), &fgrid, 1).swap_remove(0);
    let moving_level = pyramid::build(&finite(&moving.data), &mgrid, 1).swap_remove(0);
    let s = samples(&fixed_level, &domain_level, max_samples);
    let r = ncc::ncc(&ncc::evaluate(&s, &moving_level, t));
    Ok(r.is_finite().then_some(r))
}

/// The moving image at `T(y)` and its derivative with respect to the six parameters of
/// [`Rigid::updated`] (rotation vector, then shift), or `None` outside the moving grid.
#[inline]
pub(super) fn warped(moving: &Level, t: &Rigid, y: [f64; 3]) -> Option<(f64, [f64; 6])> {
    let grid = &moving.grid;
    let q = mul_vec(&t.rotation, sub(y, t.centre));
    let x = [0, 1, 2].map(|a| q[a] + t.centre[a] + t.translation[a]);
    let (mv, gv) = sample_with_gradient(&moving.data, grid.dims, grid.to_voxel(x))?;
    // World gradient = (voxel→world)^-ᵀ · voxel gradient.
    let inv = grid.inverse;
    let g = [0, 1, 2].map(|c| (0..3).map(|r| inv[r][c] * gv[r]).sum::<f64>());
    // d x / d ω = ω × q, so d m / d ω = q × g; d m / d t = g.
    let qg = cross(q, g);
    Some((mv, [qg[0], qg[1], qg[2], g[0], g[1], g[2]]))
}

/// Non-finite voxels (a damaged file) set to 0: they would poison every sum.
fn finite(data: &[f32]) -> Vec<f32> {
    data.iter()
        .map(|&x| if x.is_finite() { x } else { 0.0 })
        .collect()
}

/// The fixed brain mask, widened by a few voxels so that its edge, where much of the
/// contrast is, takes part; the moving image is used whole, so no hard mask edge enters.
fn domain(fixed_mask: &[bool], dims: [usize; 3]) -> Vec<f32> {
    let m: Vec<f32> = fixed_mask.iter().map(|&b| b as u8 as f32).collect();
    pyramid::smooth(&m, dims, DOMAIN_WIDENING)
}

/// Centre of a mask in world coordinates.
fn centroid(mask: &[bool], grid: &Grid) -> Option<[f64; 3]> {
    let [nx, ny, _] = grid.dims;
    let (mut s, mut n) = ([0.0f64; 3], 0usize);
    for (idx, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let v = [idx % nx, (idx / nx) % ny, idx / (nx * ny)];
        (0..3).for_each(|a| s[a] += v[a] as f64);
        n += 1;
    }
    (n > 0).then(|| grid.to_world(s.map(|x| x / n as f64)))
}

/// World position and value of the fixed voxels near the brain (where the smoothed mask is
/// non-negligible, so the brain's edge counts), thinned to at most `max`.
fn samples(fixed: &Level, domain: &Level, max: usize) -> Vec<Sample> {
    let [nx, ny, _] = fixed.grid.dims;
    let idx: Vec<usize> = (0..domain.data.len())
        .filter(|&i| domain.data[i] > 0.01)
        .collect();
    let stride = idx.len().div_ceil(max.max(1)).max(1);
    idx.iter()
        .step_by(stride)
        .map(|&i| {
            let v = [
                (i % nx) as f64,
                ((i / nx) % ny) as f64,
                (i / (nx * ny)) as f64,
            ];
            (fixed.grid.to_world(v), fixed.data[i])
        })
        .collect()
}
