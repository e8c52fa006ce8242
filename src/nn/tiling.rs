//! Whole-volume inference of the CNN parts in overlapping tiles, bounded by a memory budget.
//!
//! Each tile's outer `margin` voxels (where the network saw zero padding instead of the
//! neighbouring data) get zero weight, except at the volume's own border; the next `blend`
//! voxels ramp up smoothly (raised cosine) so neighbouring tiles cross-fade. Results are the
//! weighted mean over tiles. For a translation-equivariant network whose receptive-field
//! radius is at most `margin` (LP-CNN's prox: convolutions only), every voxel that gets weight
//! is computed exactly as in the whole volume, so tiling changes nothing beyond rounding.

use candle_core::{Result, Tensor};

/// How to cut a volume into tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// Tile size `[D, H, W]` (clipped to the volume).
    pub tile: [usize; 3],
    /// Voxels at each inner tile edge that get no weight.
    pub margin: usize,
    /// Width of the cross-fade after the margin.
    pub blend: usize,
}

impl Tiling {
    /// The largest cube tile (a multiple of `stride`) whose activations fit `max_bytes` at
    /// `bytes_per_voxel`; `None` when the whole volume fits and tiling is not needed.
    pub fn for_budget(
        dims: [usize; 3],
        bytes_per_voxel: usize,
        max_bytes: usize,
        margin: usize,
        stride: usize,
    ) -> Option<Tiling> {
        let voxels: usize = dims.iter().product();
        if voxels * bytes_per_voxel <= max_bytes {
            return None;
        }
        let side = ((max_bytes / bytes_per_voxel.max(1)) as f64).cbrt() as usize;
        let blend = (margin / 2).max(2);
        // A tile must leave room for at least one voxel of step besides margins and blend.
        let side = (side / stride * stride).max((2 * margin + blend + 1).div_ceil(stride) * stride);
        Some(Tiling {
            tile: [side; 3],
            margin,
            blend,
        })
    }
}

/// Tile starts along one axis of length `len`.
fn starts(len: usize, tile: usize, margin: usize, blend: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let step = tile.saturating_sub(2 * margin + blend).max(1);
    let mut s: Vec<usize> = (0..)
        .map(|k| k * step)
        .take_while(|&a| a + tile < len)
        .collect();
    s.push(len - tile);
    s
}

/// Weight of local index `i` in a tile starting at `start` of size `tile` along an axis of
/// length `len`.
fn weight(i: usize, start: usize, tile: usize, len: usize, margin: usize, blend: usize) -> f32 {
    let ramp = |j: usize| -> f32 {
        // j counts from the first weighted voxel; raised cosine over `blend` voxels.
        if j >= blend {
            1.0
        } else {
            let t = (j as f32 + 0.5) / blend as f32;
            0.5 - 0.5 * (std::f32::consts::PI * t).cos()
        }
    };
    let mut w = 1.0;
    if start > 0 {
        if i < margin {
            return 0.0;
        }
        w *= ramp(i - margin);
    }
    if start + tile < len {
        if i + margin >= tile {
            return 0.0;
        }
        w *= ramp(tile - margin - 1 - i);
    }
    w
}

/// `f` applied to `x` (`[N, C, D, H, W]`) tile by tile and blended; `f` may change the
/// channel count but must keep N, D, H and W.
pub fn apply_tiled(
    x: &Tensor,
    tiling: &Tiling,
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (n, _, d, h, w) = x.dims5()?;
    let dims = [d, h, w];
    let tile: [usize; 3] = std::array::from_fn(|a| tiling.tile[a].min(dims[a]));
    let (m, b) = (tiling.margin, tiling.blend);
    let st: Vec<Vec<usize>> = (0..3).map(|a| starts(dims[a], tile[a], m, b)).collect();
    let mut acc: Vec<f32> = Vec::new();
    let mut wsum = vec![0.0f32; d * h * w];
    let mut cout = 0;
    for &z0 in &st[0] {
        for &y0 in &st[1] {
            for &x0 in &st[2] {
                let part = x
                    .narrow(2, z0, tile[0])?
                    .narrow(3, y0, tile[1])?
                    .narrow(4, x0, tile[2])?;
                let out = f(&part)?;
                let (on, oc, od, oh, ow) = out.dims5()?;
                if (on, od, oh, ow) != (n, tile[0], tile[1], tile[2]) {
                    candle_core::bail!("tiled inference: the network changed the tile's size");
                }
                if acc.is_empty() {
                    cout = oc;
                    acc = vec![0.0; n * cout * d * h * w];
                }
                let v = out.flatten_all()?.to_vec1::<f32>()?;
                let wz: Vec<f32> = (0..tile[0])
                    .map(|i| weight(i, z0, tile[0], d, m, b))
                    .collect();
                let wy: Vec<f32> = (0..tile[1])
                    .map(|i| weight(i, y0, tile[1], h, m, b))
                    .collect();
                let wx: Vec<f32> = (0..tile[2])
                    .map(|i| weight(i, x0, tile[2], w, m, b))
                    .collect();
                for (k, &a) in wz.iter().enumerate() {
                    for (j, &bb) in wy.iter().enumerate() {
                        for (i, &c) in wx.iter().enumerate() {
                            let wt = a * bb * c;
                            if wt == 0.0 {
                                continue;
                            }
                            let g = ((z0 + k) * h + y0 + j) * w + x0 + i;
                            wsum[g] += wt;
                            let l = (k * tile[1] + j) * tile[2] + i;
                            for p in 0..n * cout {
                                acc[p * d * h * w + g] += wt * v[p * od * oh * ow + l];
                            }
                        }
                    }
                }
            }
        }
    }
    for p in 0..n * cout {
        for (a, &s) in acc[p * d * h * w..][..d * h * w].iter_mut().zip(&wsum) {
            *a /= s;
        }
    }
    Tensor::from_vec(acc, (n, cout, d, h, w), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::conv3d::Conv3d;
    use crate::nn::testing::{random_tensor, values};
    use candle_core::{DType, Device, Module};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn weights_cover_every_voxel_and_vanish_in_inner_margins() {
        for (len, tile, m, b) in [(30, 12, 3, 2), (17, 8, 2, 2), (8, 8, 3, 2), (40, 16, 4, 3)] {
            let s = starts(len, tile, m, b);
            let mut total = vec![0.0f32; len];
            for &a in &s {
                assert!(a + tile <= len);
                for i in 0..tile {
                    let wt = weight(i, a, tile, len, m, b);
                    let inner = (a > 0 && i < m) || (a + tile < len && i + m >= tile);
                    assert!(!inner || wt == 0.0);
                    total[a + i] += wt;
                }
            }
            assert!(total.iter().all(|&t| t > 0.0), "{len} {tile}: {total:?}");
        }
    }

    #[test]
    fn tiled_convolutions_match_the_whole_volume() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        // Two 3³ convolutions: receptive-field radius 2.
        let c1 = Conv3d::new(2, 3, 3, true, vb.pp("a")).unwrap();
        let c2 = Conv3d::new(3, 1, 3, true, vb.pp("b")).unwrap();
        let f = |x: &Tensor| c2.forward(&c1.forward(x)?.relu()?);
        let x = random_tensor((1, 2, 13, 10, 17), 1);
        let whole = values(&f(&x).unwrap());
        let tiling = Tiling {
            tile: [8, 6, 9],
            margin: 2,
            blend: 2,
        };
        let tiled = values(&apply_tiled(&x, &tiling, &f).unwrap());
        for (a, b) in tiled.iter().zip(&whole) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn budget_picks_whole_volume_or_a_fitting_tile() {
        assert_eq!(Tiling::for_budget([64; 3], 512, 1 << 30, 17, 1), None);
        let t = Tiling::for_budget([200, 230, 190], 512, 1 << 30, 17, 8).unwrap();
        assert!(t.tile[0].is_multiple_of(8) && t.tile[0].pow(3) * 512 <= 1 << 30);
        assert!(t.tile[0] > 2 * t.margin + t.blend);
    }
}
