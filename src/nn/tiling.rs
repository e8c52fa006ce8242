//! Whole-volume inference of the CNN parts in overlapping tiles, bounded by a memory budget.
//!
//! Each tile's outer `margin` voxels (where the network saw zero padding instead of the
//! neighbouring data) get zero weight, except at the volume's own border; the next `blend`
//! voxels ramp up smoothly (raised cosine) so neighbouring tiles cross-fade. Results are the
//! weighted mean over tiles. For a translation-equivariant network whose receptive-field
//! radius is at most `margin` (LP-CNN's prox: convolutions only), every voxel that gets weight
//! is computed exactly as in the whole volume, so tiling changes nothing beyond rounding.

use candle_core::{Result, Tensor};

use crate::volume::crop_at;

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
    /// The tile (a multiple of `stride` along each axis, or the whole axis) whose activations
    /// fit `max_bytes` at `bytes_per_voxel` and that computes the fewest voxels in all,
    /// overlaps included; `None` when the whole volume fits and tiling is not needed.
    ///
    /// Tiles overlap by `2·margin + blend` voxels per cut, so large cubes waste much: on a
    /// 200×230×190 head with a 17-voxel margin and room for 184³, cubes compute 5.7× the
    /// volume, while two 200×136×190 slabs compute 1.18× (the test below).
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
        let stride = stride.max(1);
        let blend = (margin / 2).max(2);
        let overlap = 2 * margin + blend;
        // A tile must leave room for at least one voxel of step besides margins and blend.
        let min_side = (overlap + 1).div_ceil(stride) * stride;
        let max_voxels = max_bytes / bytes_per_voxel.max(1);
        // Per axis, for each number of tiles, the shortest tile that covers the axis with it:
        // (tile length, tiles actually cut).
        let options = |len: usize| -> Vec<(usize, usize)> {
            let mut out: Vec<(usize, usize)> = Vec::new();
            for n in 1..=len {
                let t = (len + (n - 1) * overlap).div_ceil(n);
                let t = (t.div_ceil(stride) * stride).max(min_side).min(len);
                if out.last().is_none_or(|&(last, _)| t < last) {
                    out.push((t, starts(len, t, margin, blend).len()));
                }
                if t <= min_side {
                    break;
                }
            }
            out
        };
        let per_axis = dims.map(options);
        let mut best: Option<(usize, usize, [usize; 3])> = None;
        for &(tz, nz) in &per_axis[0] {
            for &(ty, ny) in &per_axis[1] {
                for &(tx, nx) in &per_axis[2] {
                    if tz * ty * tx > max_voxels {
                        continue;
                    }
                    let key = (nz * ny * nx * tz * ty * tx, nz * ny * nx, [tz, ty, tx]);
                    if best.is_none_or(|b| (key.0, key.1) < (b.0, b.1)) {
                        best = Some(key);
                    }
                }
            }
        }
        // Nothing fits: the smallest tiles that still make progress.
        let tile = best.map_or(dims.map(|n| min_side.min(n)), |b| b.2);
        Some(Tiling {
            tile,
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
///
/// `needed` (`D·H·W` flags, x fastest) marks the voxels whose output is used (e.g. a brain
/// mask that the result is multiplied by): tiles that give weight to none of them are not
/// computed, and voxels no computed tile covers come out as 0. In a whole-head volume the
/// brain fills about half of the tiles.
pub fn apply_tiled(
    x: &Tensor,
    tiling: &Tiling,
    needed: Option<&[bool]>,
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (n, _, d, h, w) = x.dims5()?;
    let dims = [d, h, w];
    let tile: [usize; 3] = std::array::from_fn(|a| tiling.tile[a].min(dims[a]));
    let (m, b) = (tiling.margin, tiling.blend);
    let st: Vec<Vec<usize>> = (0..3).map(|a| starts(dims[a], tile[a], m, b)).collect();
    let mut acc: Vec<f32> = Vec::new();
    if needed.is_some_and(|k| k.len() != d * h * w) {
        candle_core::bail!("tiled inference: the needed-voxel flags do not match the volume");
    }
    let mut wsum = vec![0.0f32; d * h * w];
    let mut cout = 0;
    for &z0 in &st[0] {
        for &y0 in &st[1] {
            for &x0 in &st[2] {
                let weights = |a: usize, start: usize, len: usize| -> Vec<f32> {
                    (0..tile[a])
                        .map(|i| weight(i, start, tile[a], len, m, b))
                        .collect()
                };
                let (wz, wy, wx) = (weights(0, z0, d), weights(1, y0, h), weights(2, x0, w));
                if let Some(k) = needed {
                    let used = (0..tile[0]).filter(|&i| wz[i] > 0.0).any(|i| {
                        (0..tile[1]).filter(|&j| wy[j] > 0.0).any(|j| {
                            let row = ((z0 + i) * h + y0 + j) * w + x0;
                            (0..tile[2]).any(|l| wx[l] > 0.0 && k[row + l])
                        })
                    });
                    if !used {
                        continue;
                    }
                }
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
    if acc.is_empty() {
        // Nothing needed: the output's channel count is that of `f` on one small tile.
        let probe = f(&x.narrow(2, 0, 1)?.narrow(3, 0, 1)?.narrow(4, 0, 1)?)?;
        return Tensor::zeros((n, probe.dim(1)?, d, h, w), x.dtype(), x.device());
    }
    for p in 0..n * cout {
        for (a, &s) in acc[p * d * h * w..][..d * h * w].iter_mut().zip(&wsum) {
            *a = if s > 0.0 { *a / s } else { 0.0 };
        }
    }
    Tensor::from_vec(acc, (n, cout, d, h, w), x.device())
}

/// Where a network runs at inference: over `region` (`[start, end)` per axis of
/// `[D, H, W]`), whole or in tiles, with the flags of the region's voxels whose output is
/// used (x fastest).
#[derive(Clone, Debug)]
pub struct Plan {
    pub region: [(usize, usize); 3],
    pub tiling: Option<Tiling>,
    pub needed: Vec<bool>,
}

impl Plan {
    /// The whole volume `dims` in the given tiles.
    pub fn tiled(needed: Vec<bool>, dims: [usize; 3], tiling: Tiling) -> Plan {
        Plan {
            region: dims.map(|n| (0, n)),
            tiling: Some(tiling),
            needed,
        }
    }

    /// Over the bounding box of the `needed` voxels grown by `radius` (clipped to `dims`),
    /// in tiles with margin `radius` when the box does not fit `max_bytes` at
    /// `bytes_per_voxel`; `None` when no voxel is needed.
    pub fn within_budget(
        needed: &[bool],
        dims: [usize; 3],
        radius: usize,
        bytes_per_voxel: usize,
        max_bytes: usize,
        stride: usize,
    ) -> Option<Plan> {
        let [_, h, w] = dims;
        let mut lo = [usize::MAX; 3];
        let mut hi = [0usize; 3];
        for (i, _) in needed.iter().enumerate().filter(|(_, &k)| k) {
            let p = [i / (h * w), (i / w) % h, i % w];
            for a in 0..3 {
                lo[a] = lo[a].min(p[a]);
                hi[a] = hi[a].max(p[a]);
            }
        }
        if lo[0] == usize::MAX {
            return None;
        }
        let region: [(usize, usize); 3] = std::array::from_fn(|a| {
            (
                lo[a].saturating_sub(radius),
                (hi[a] + radius + 1).min(dims[a]),
            )
        });
        let sub = region.map(|(a, b)| b - a);
        // `crop_at` takes x-fastest grids in (x, y, z) order; ours are (D, H, W).
        let inside = crop_at(
            needed,
            [w, h, dims[0]],
            [region[2].0, region[1].0, region[0].0],
            [sub[2], sub[1], sub[0]],
        );
        Some(Plan {
            region,
            tiling: Tiling::for_budget(sub, bytes_per_voxel, max_bytes, radius, stride),
            needed: inside,
        })
    }

    /// `f` applied over the plan's region of `x` (`[N, C, D, H, W]`); zero outside it.
    pub fn apply(&self, x: &Tensor, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (_, _, d, h, w) = x.dims5()?;
        let [(z0, z1), (y0, y1), (x0, x1)] = self.region;
        let part = x
            .narrow(2, z0, z1 - z0)?
            .narrow(3, y0, y1 - y0)?
            .narrow(4, x0, x1 - x0)?;
        let out = match &self.tiling {
            Some(t) => apply_tiled(&part, t, Some(&self.needed), f)?,
            None => f(&part)?,
        };
        out.pad_with_zeros(2, z0, d - z1)?
            .pad_with_zeros(3, y0, h - y1)?
            .pad_with_zeros(4, x0, w - x1)
    }
}

/// Voxels inside the mask `[N, 1, D, H, W]` of any batch item (`D·H·W` flags, x fastest).
pub fn needed_voxels(mask: &Tensor) -> Result<Vec<bool>> {
    let any = mask.ne(0f32)?.max_keepdim(0)?.flatten_all()?;
    let flags = any.to_dtype(candle_core::DType::U8)?.to_vec1::<u8>()?;
    Ok(flags.iter().map(|&f| f != 0).collect())
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
        let tiled = values(&apply_tiled(&x, &tiling, None, &f).unwrap());
        for (a, b) in tiled.iter().zip(&whole) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn tiles_without_needed_voxels_are_skipped_and_the_needed_ones_are_exact() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let conv = Conv3d::new(2, 3, 3, true, vb.pp("c")).unwrap();
        let calls = std::cell::Cell::new(0);
        let f = |t: &Tensor| {
            calls.set(calls.get() + 1);
            conv.forward(t)
        };
        let (d, h, w) = (16, 16, 16);
        let x = random_tensor((1, 2, d, h, w), 4);
        let whole = values(&f(&x).unwrap());
        let tiling = Tiling {
            tile: [8, 8, 8],
            margin: 1,
            blend: 2,
        };
        calls.set(0);
        apply_tiled(&x, &tiling, None, &f).unwrap();
        let all = calls.get();
        // A small ball in one corner.
        let needed: Vec<bool> = (0..d * h * w)
            .map(|v| {
                let (i, j, k) = (v % w, (v / w) % h, v / (w * h));
                (i as f32 - 3.0).powi(2) + (j as f32 - 3.0).powi(2) + (k as f32 - 3.0).powi(2) < 6.0
            })
            .collect();
        calls.set(0);
        let tiled = values(&apply_tiled(&x, &tiling, Some(&needed), &f).unwrap());
        assert!(calls.get() < all, "{} of {all} tiles computed", calls.get());
        let n = d * h * w;
        for c in 0..3 {
            for v in (0..n).filter(|&v| needed[v]) {
                let (a, b) = (tiled[c * n + v], whole[c * n + v]);
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        // Nothing needed: zeros with the output's channel count, no tile computed.
        let none = apply_tiled(&x, &tiling, Some(&vec![false; n]), &f).unwrap();
        assert_eq!(none.dims5().unwrap(), (1, 3, d, h, w));
        assert!(values(&none).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn budget_picks_whole_volume_or_a_fitting_tile() {
        assert_eq!(Tiling::for_budget([64; 3], 512, 1 << 30, 17, 1), None);
        let dims = [200, 230, 190];
        let work = |t: &Tiling| -> usize {
            (0..3)
                .map(|a| starts(dims[a], t.tile[a], t.margin, t.blend).len() * t.tile[a])
                .product()
        };
        let volume: usize = dims.iter().product();
        for (budget, stride) in [(1usize << 30, 8), (3 << 30, 1), (256 << 20, 1)] {
            let t = Tiling::for_budget(dims, 512, budget, 17, stride).unwrap();
            assert!(t.tile.iter().product::<usize>() * 512 <= budget, "{t:?}");
            for a in 0..3 {
                assert!(
                    t.tile[a].is_multiple_of(stride) || t.tile[a] == dims[a],
                    "{t:?}"
                );
                assert!(t.tile[a] > 2 * t.margin + t.blend, "{t:?}");
            }
            // No cube that fits does less work.
            let side = ((budget / 512) as f64).cbrt() as usize / stride * stride;
            let cube = Tiling {
                tile: [side; 3],
                ..t
            };
            assert!(
                work(&t) <= work(&cube),
                "{t:?}: {} vs cube {}",
                work(&t),
                work(&cube)
            );
            eprintln!(
                "{budget} B: {t:?}, {:.2}× the volume",
                work(&t) as f64 / volume as f64
            );
        }
        // 3 GiB at 512 B per voxel: two slabs, about 1.2× the volume instead of 5.7×.
        let t = Tiling::for_budget(dims, 512, 3 << 30, 17, 1).unwrap();
        assert!(work(&t) * 10 < volume * 13, "{t:?}");
        // A budget below the smallest useful tile still gives tiles that make progress.
        let t = Tiling::for_budget(dims, 512, 1 << 10, 17, 1).unwrap();
        assert_eq!(t.tile, [2 * 17 + 8 + 1; 3]);
    }
}
