//! LBV: Laplacian boundary value background removal (Zhou et al. 2014).
//!
//! Inside the brain the background field is harmonic, and on the brain's surface the
//! measured field is mostly background (the local field of tissue falls off outside its
//! sources). So the background inside is estimated as the solution of Laplace's equation
//! with the total field as Dirichlet data on the mask's boundary layer (the mask voxels with
//! a face neighbour outside the mask or beyond the grid), solved by multigrid. The local field
//! is the difference on the remaining voxels; the boundary layer itself has no estimate, so
//! the output mask is the input mask without it (and without `peel` further layers, which
//! removes voxels whose estimate leans most on boundary values that carry local field).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::multigrid::{solve_dirichlet, Settings};
use super::LocalField;
use crate::{Error, Mask, Result, Volume};

/// LBV settings (YAML section `background.lbv`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LbvConfig {
    /// Stop when the relative residual of the discrete Laplace equation falls below this.
    /// Default 1e-6: each V-cycle gains about an order of magnitude, and at 1e-6 the
    /// remaining error is far below the local field (measured in the tests).
    pub tolerance: f64,
    /// At most this many V-cycles. Default 50.
    pub max_cycles: usize,
    /// Red-black Gauss-Seidel sweeps before and after each coarse correction. Default 2.
    pub smoothing: usize,
    /// Further one-voxel layers removed from the output mask. Default 0.
    pub peel: usize,
}

impl Default for LbvConfig {
    fn default() -> Self {
        LbvConfig {
            tolerance: 1e-6,
            max_cycles: 50,
            smoothing: 2,
            peel: 0,
        }
    }
}

/// The voxels of `mask` none of whose face neighbours is outside it or beyond the grid.
pub fn inner(mask: &[bool], dims: [usize; 3]) -> Mask {
    let [nx, ny, nz] = dims;
    (0..mask.len())
        .into_par_iter()
        .map(|idx| {
            let (i, j, k) = (idx % nx, (idx / nx) % ny, idx / (nx * ny));
            mask[idx]
                && i > 0
                && i + 1 < nx
                && j > 0
                && j + 1 < ny
                && k > 0
                && k + 1 < nz
                && mask[idx - 1]
                && mask[idx + 1]
                && mask[idx - nx]
                && mask[idx + nx]
                && mask[idx - nx * ny]
                && mask[idx + nx * ny]
        })
        .collect()
}

/// LBV: local field of `field` (any unit) inside `mask`, defined on the mask without its
/// boundary layer (and `peel` more layers).
pub fn lbv(field: &Volume, mask: &[bool], config: &LbvConfig) -> Result<LocalField> {
    let dims = field.dims;
    if mask.len() != field.len() {
        return Err(Error::Numerics("mask and field differ in size".into()));
    }
    if !(config.tolerance > 0.0 && config.max_cycles > 0 && config.smoothing > 0) {
        return Err(Error::Config(format!(
            "background.lbv: need tolerance > 0 ({}), max_cycles > 0 ({}) and smoothing > 0 ({})",
            config.tolerance, config.max_cycles, config.smoothing
        )));
    }
    let unknown = inner(mask, dims);
    let mut out_mask = unknown.clone();
    for _ in 0..config.peel {
        out_mask = inner(&out_mask, dims);
    }
    if !out_mask.iter().any(|&b| b) {
        return Err(Error::Numerics(format!(
            "empty mask after removing LBV's boundary layer and {} more: the brain mask is too thin",
            config.peel
        )));
    }
    let settings = Settings {
        tolerance: config.tolerance,
        max_cycles: config.max_cycles,
        smoothing: config.smoothing,
    };
    let sol = solve_dirichlet(
        dims,
        field.geometry.voxel_size,
        &unknown,
        &field.data,
        &settings,
    );
    let local: Vec<f32> = (0..field.len())
        .into_par_iter()
        .map(|i| {
            if out_mask[i] {
                field.data[i] - sol.values[i]
            } else {
                0.0
            }
        })
        .collect();
    Ok(LocalField {
        field: field.with_data(local),
        mask: out_mask,
        details: json!({
            "cycles": sol.cycles,
            "relative_residual": sol.relative_residual,
            "levels": sol.levels,
        }),
    })
}
