//! 2× max pooling and 2× nearest-neighbour upsampling of `[N, C, D, H, W]` tensors.
//!
//! Max pooling is a custom op on the CPU (Candle's reductions over an 8-D view would copy and
//! keep a mask of every tie); its gradient goes to the first maximum of each 2×2×2 cell, as in
//! PyTorch. Other devices (CUDA) take those reductions, [`max_pool2_by_reduction`], whose
//! gradient is shared by tied maxima: the same for real-valued data.
//! Upsampling is a broadcast, so Candle differentiates it (the gradient sums each cell).

use super::contiguous_f32;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn dims5(dims: &[usize], what: &str) -> Result<[usize; 5]> {
    match dims {
        &[n, c, d, h, w] => Ok([n, c, d, h, w]),
        _ => candle_core::bail!("{what}: expected [N, C, D, H, W], got {dims:?}"),
    }
}

/// Index (within one `[D, H, W]` volume) of the first maximum of the 2×2×2 cell whose
/// output voxel is `(z, y, x)`.
fn argmax_cell(v: &[f32], [h, w]: [usize; 2], (z, y, x): (usize, usize, usize)) -> usize {
    let mut best = (2 * z * h + 2 * y) * w + 2 * x;
    for t in 1..8 {
        let i = ((2 * z + t / 4) * h + 2 * y + (t / 2) % 2) * w + 2 * x + t % 2;
        // `>` keeps the first of equal values; NaN propagates like in PyTorch.
        if v[i] > v[best] || v[i].is_nan() && !v[best].is_nan() {
            best = i;
        }
    }
    best
}

struct MaxPool2;

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "max-pool-3d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let [n, c, d, h, w] = dims5(l.dims(), "max-pool")?;
        let x = contiguous_f32(s, l, "max-pool: input")?;
        let (od, oh, ow) = (d / 2, h / 2, w / 2);
        let mut out = vec![0.0f32; n * c * od * oh * ow];
        out.par_chunks_mut(od * oh * ow)
            .zip(x.par_chunks(d * h * w))
            .for_each(|(o, v)| {
                for z in 0..od {
                    for y in 0..oh {
                        for xx in 0..ow {
                            o[(z * oh + y) * ow + xx] = v[argmax_cell(v, [h, w], (z, y, xx))];
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, od, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &MaxPool2Grad)?,
        ))
    }
}

/// `(x, dy) ↦ dx` of [`MaxPool2`].
struct MaxPool2Grad;

impl CustomOp2 for MaxPool2Grad {
    fn name(&self) -> &'static str {
        "max-pool-3d-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [n, c, d, h, w] = dims5(l1.dims(), "max-pool")?;
        let x = contiguous_f32(s1, l1, "max-pool: input")?;
        let dy = contiguous_f32(s2, l2, "max-pool: output gradient")?;
        let (od, oh, ow) = (d / 2, h / 2, w / 2);
        let mut dx = vec![0.0f32; x.len()];
        dx.par_chunks_mut(d * h * w)
            .zip(x.par_chunks(d * h * w))
            .zip(dy.par_chunks(od * oh * ow))
            .for_each(|((g, v), dy)| {
                for z in 0..od {
                    for y in 0..oh {
                        for xx in 0..ow {
                            g[argmax_cell(v, [h, w], (z, y, xx))] = dy[(z * oh + y) * ow + xx];
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from((n, c, d, h, w))))
    }
}

/// 2×2×2 max pooling; D, H and W must be even (pad to the network's stride first).
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let [_, _, d, h, w] = dims5(x.dims(), "max-pool")?;
    if d % 2 + h % 2 + w % 2 != 0 || x.dtype() != DType::F32 {
        candle_core::bail!("max-pool: needs even f32 dims, got {:?}", x.dims());
    }
    if !x.device().is_cpu() {
        return max_pool2_by_reduction(x);
    }
    x.contiguous()?.apply_op1(MaxPool2)
}

/// 2×2×2 max pooling from Candle's max reductions over a `[N, C, D/2, 2, H/2, 2, W/2, 2]`
/// view: runs and differentiates on every device.
pub fn max_pool2_by_reduction(x: &Tensor) -> Result<Tensor> {
    let [n, c, d, h, w] = dims5(x.dims(), "max-pool")?;
    x.reshape(vec![n, c, d / 2, 2, h / 2, 2, w / 2, 2])?
        .max(7)?
        .max(5)?
        .max(3)
}

/// 2× nearest-neighbour upsampling along D, H and W.
pub fn upsample2(x: &Tensor) -> Result<Tensor> {
    let [n, c, d, h, w] = dims5(x.dims(), "upsample")?;
    x.reshape(vec![n, c, d, 1, h, 1, w, 1])?
        .broadcast_as(vec![n, c, d, 2, h, 2, w, 2])?
        .reshape((n, c, 2 * d, 2 * h, 2 * w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{random_tensor, values};
    use candle_core::Var;

    #[test]
    fn max_pool_and_its_gradient_match_naive_loops() {
        let (n, c, d, h, w) = (2, 3, 4, 6, 2);
        let x = Var::from_tensor(&random_tensor((n, c, d, h, w), 1)).unwrap();
        let r = random_tensor((n, c, d / 2, h / 2, w / 2), 2);
        let y = max_pool2(&x).unwrap();
        let loss = (&y * &r).unwrap().sum_all().unwrap();
        let g = values(loss.backward().unwrap().get(&x).unwrap());
        let (xv, yv, rv) = (values(&x), values(&y), values(&r));
        let mut want_g = vec![0.0f32; xv.len()];
        for p in 0..n * c {
            for z in 0..d / 2 {
                for yy in 0..h / 2 {
                    for xx in 0..w / 2 {
                        let (mut best, mut at) = (f32::NEG_INFINITY, 0);
                        for a in 0..2 {
                            for b in 0..2 {
                                for e in 0..2 {
                                    let i = ((p * d + 2 * z + a) * h + 2 * yy + b) * w + 2 * xx + e;
                                    if xv[i] > best {
                                        (best, at) = (xv[i], i);
                                    }
                                }
                            }
                        }
                        let o = ((p * d / 2 + z) * h / 2 + yy) * w / 2 + xx;
                        assert_eq!(yv[o], best);
                        want_g[at] = rv[o];
                    }
                }
            }
        }
        assert_eq!(g, want_g);
    }

    /// The reduction version (the CUDA path) against the CPU op: same values and gradients.
    #[test]
    fn reduction_pooling_matches_the_cpu_op() {
        let x = Var::from_tensor(&random_tensor((2, 3, 6, 4, 8), 5)).unwrap();
        let r = random_tensor((2, 3, 3, 2, 4), 6);
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let y = f(x.as_tensor()).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (values(&y), values(g.get(&x).unwrap()))
        };
        let (y0, g0) = run(&max_pool2);
        let (y1, g1) = run(&max_pool2_by_reduction);
        assert_eq!(y0, y1);
        assert_eq!(g0, g1);
    }

    #[test]
    fn max_pool_rejects_odd_sizes() {
        assert!(max_pool2(&random_tensor((1, 1, 4, 3, 4), 1)).is_err());
    }

    #[test]
    fn upsample_and_its_gradient_match_naive_loops() {
        let (n, c, d, h, w) = (1, 2, 2, 3, 4);
        let x = Var::from_tensor(&random_tensor((n, c, d, h, w), 3)).unwrap();
        let r = random_tensor((n, c, 2 * d, 2 * h, 2 * w), 4);
        let y = upsample2(&x).unwrap();
        assert_eq!(y.dims(), &[n, c, 2 * d, 2 * h, 2 * w]);
        let loss = (&y * &r).unwrap().sum_all().unwrap();
        let g = values(loss.backward().unwrap().get(&x).unwrap());
        let (xv, yv, rv) = (values(&x), values(&y), values(&r));
        let mut want_g = vec![0.0f32; xv.len()];
        for p in 0..n * c {
            for z in 0..2 * d {
                for yy in 0..2 * h {
                    for xx in 0..2 * w {
                        let src = ((p * d + z / 2) * h + yy / 2) * w + xx / 2;
                        let o = ((p * 2 * d + z) * 2 * h + yy) * 2 * w + xx;
                        assert_eq!(yv[o], xv[src]);
                        want_g[src] += rv[o];
                    }
                }
            }
        }
        for (a, b) in g.iter().zip(&want_g) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
