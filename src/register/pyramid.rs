//! Gaussian pyramid: each level is the one below smoothed (σ = 1 voxel) and subsampled by 2
//! along each axis that stays at least `MIN_DIM` voxels long. Coarse levels see the head's
//! shape and converge from large rotations; fine levels give the precision.

use rayon::prelude::*;

use super::resample::Grid;

/// An axis is not halved below this length.
const MIN_DIM: usize = 12;

#[derive(Clone, Debug)]
pub struct Level {
    pub data: Vec<f32>,
    pub grid: Grid,
}

/// Levels from fine (index 0) to coarse. Level 0 is lightly smoothed (σ = ½ voxel) so its
/// trilinear gradient is less noisy.
pub fn build(data: &[f32], grid: &Grid, levels: usize) -> Vec<Level> {
    let mut out = vec![Level {
        data: smooth(data, grid.dims, 0.5),
        grid: grid.clone(),
    }];
    while out.len() < levels.max(1) {
        let last = out.last().expect("level 0 exists");
        match downsample(&smooth(&last.data, last.grid.dims, 1.0), &last.grid) {
            Some(next) => out.push(next),
            None => break,
        }
    }
    out
}

/// Every second voxel along the axes that are long enough; `None` if no axis is.
fn downsample(data: &[f32], grid: &Grid) -> Option<Level> {
    let step: [usize; 3] = grid.dims.map(|n| if n / 2 >= MIN_DIM { 2 } else { 1 });
    if step == [1, 1, 1] {
        return None;
    }
    let dims = [0, 1, 2].map(|a| grid.dims[a].div_ceil(step[a]));
    let [nx, ny, _] = grid.dims;
    let mut out = vec![0.0f32; dims.iter().product()];
    out.par_chunks_mut(dims[0] * dims[1])
        .enumerate()
        .for_each(|(k, slab)| {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    let src = i * step[0] + nx * (j * step[1] + ny * (k * step[2]));
                    slab[i + dims[0] * j] = data[src];
                }
            }
        });
    // Voxel v of the new grid is voxel step·v of the old: scale the affine's columns.
    let mut linear = grid.linear;
    let mut inverse = grid.inverse;
    for r in 0..3 {
        for c in 0..3 {
            linear[r][c] *= step[c] as f64;
            inverse[c][r] /= step[c] as f64;
        }
    }
    Some(Level {
        data: out,
        grid: Grid {
            dims,
            linear,
            offset: grid.offset,
            inverse,
        },
    })
}

/// Separable Gaussian of `sigma` voxels; the volume's edge value continues outside.
pub fn smooth(data: &[f32], dims: [usize; 3], sigma: f64) -> Vec<f32> {
    if sigma <= 0.0 {
        return data.to_vec();
    }
    let h = (3.0 * sigma).ceil() as isize;
    let mut k: Vec<f32> = (-h..=h)
        .map(|x| (-(x * x) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    let mut a = data.to_vec();
    let mut b = vec![0.0f32; data.len()];
    for axis in 0..3 {
        pass(&a, &mut b, dims, axis, &k);
        std::mem::swap(&mut a, &mut b);
    }
    a
}

fn pass(input: &[f32], out: &mut [f32], dims: [usize; 3], axis: usize, k: &[f32]) {
    let [nx, ny, nz] = dims;
    let h = (k.len() / 2) as isize;
    let (n, stride) = match axis {
        0 => (nx, 1),
        1 => (ny, nx),
        _ => (nz, nx * ny),
    };
    out.par_chunks_mut(nx).enumerate().for_each(|(row, o)| {
        let (j, kz) = (row % ny, row / ny);
        for (i, v) in o.iter_mut().enumerate() {
            let here = [i, j, kz][axis] as isize;
            let base = i + nx * (j + ny * kz) - here as usize * stride;
            let mut acc = 0.0f32;
            for (t, &w) in k.iter().enumerate() {
                let p = (here + t as isize - h).clamp(0, n as isize - 1) as usize;
                acc += w * input[base + p * stride];
            }
            *v = acc;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Geometry;

    #[test]
    fn levels_halve_the_grid_and_keep_world_positions() {
        let dims = [48, 30, 20];
        let mut g = Geometry::from_voxel_size([1.0, 1.5, 2.0]);
        g.affine[0][3] = -10.0;
        let grid = Grid::new(dims, &g).unwrap();
        let data = vec![1.0f32; 48 * 30 * 20];
        let levels = build(&data, &grid, 3);
        assert_eq!(levels.len(), 3);
        // 20 / 2 < 12: z is never halved; 15 / 2 < 12: y only once.
        assert_eq!(levels[1].grid.dims, [24, 15, 20]);
        assert_eq!(levels[2].grid.dims, [12, 15, 20]);
        // Voxel (3, 2, 1) of level 1 is voxel (6, 4, 1) of level 0, in the world too.
        let w1 = levels[1].grid.to_world([3.0, 2.0, 1.0]);
        let w0 = grid.to_world([6.0, 4.0, 1.0]);
        assert!(w1.iter().zip(&w0).all(|(a, b)| (a - b).abs() < 1e-12));
        let v = levels[2]
            .grid
            .to_voxel(levels[2].grid.to_world([1.0, 2.0, 3.0]));
        assert!((v[0] - 1.0).abs() < 1e-12 && (v[2] - 3.0).abs() < 1e-12);
        // Smoothing keeps a constant constant.
        assert!(levels[2].data.iter().all(|&v| (v - 1.0).abs() < 1e-5));
    }
}
