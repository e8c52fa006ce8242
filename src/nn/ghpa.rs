//! Group multi-axis Hadamard product attention (GHPA, from EGE-UNet, Ruan et al. 2023),
//! extended to 3D.
//!
//! Channel LayerNorm, then the channels split into four groups: three are multiplied by
//! learnable maps on the (x, y), (x, z) and (y, z) planes (each map: a small parameter grid
//! initialised to 1, bilinearly resized to the feature size, then depthwise conv, GELU,
//! 1×1 conv) and broadcast along the missing axis; the fourth goes through a depthwise 3³
//! conv. Concatenate, LayerNorm, depthwise 3³ conv, GELU, 1×1 conv.
//!
//! The maps are resized to whatever size the features have, so they are position-dependent
//! and their meaning changes between patch training and whole-volume inference; the training
//! issue has to check that this does not degrade whole-volume results.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::conv3d::Conv3d;
use super::layers::{ChannelNorm, DepthwiseConv3d};

/// `[out, n]` matrix of 1D linear interpolation from `n` samples to `out` samples with the
/// end points aligned (PyTorch's `align_corners = true`).
pub fn resize_matrix(out: usize, n: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![0.0f32; out * n];
    for i in 0..out {
        let pos = if out > 1 {
            i as f64 * (n - 1) as f64 / (out - 1) as f64
        } else {
            0.0
        };
        let lo = (pos.floor() as usize).min(n - 1);
        let frac = (pos - lo as f64) as f32;
        m[i * n + lo] += 1.0 - frac;
        if frac > 0.0 {
            m[i * n + lo + 1] += frac;
        }
    }
    Tensor::from_vec(m, (out, n), device)
}

/// One learnable plane map: `[G, S, S]` parameters → `[1, G, 1, A, B]`.
#[derive(Clone, Debug)]
struct PlaneMap {
    param: Tensor,
    dw: DepthwiseConv3d,
    pw: Conv3d,
}

impl PlaneMap {
    fn new(groups: usize, size: usize, vb: VarBuilder) -> Result<Self> {
        Ok(PlaneMap {
            param: vb.get_with_hints((groups, size, size), "param", Init::Const(1.0))?,
            dw: DepthwiseConv3d::new(groups, [1, 3, 3], vb.pp("dw"))?,
            pw: Conv3d::new(groups, groups, 1, true, vb.pp("pw"))?,
        })
    }

    fn map(&self, a: usize, b: usize) -> Result<Tensor> {
        let (g, s, _) = self.param.dims3()?;
        let dev = self.param.device();
        let ra = resize_matrix(a, s, dev)?;
        let rbt = resize_matrix(b, s, dev)?.t()?;
        let m = ra.broadcast_matmul(&self.param.broadcast_matmul(&rbt)?)?; // [G, A, B]
        let m = m.reshape((1, g, 1, a, b))?;
        self.pw.forward(&self.dw.forward(&m)?.gelu_erf()?)
    }
}

/// GHPA on `[N, C, D, H, W]`, C divisible by 4; output has the input's shape.
#[derive(Clone, Debug)]
pub struct Ghpa {
    norm1: ChannelNorm,
    xy: PlaneMap,
    xz: PlaneMap,
    yz: PlaneMap,
    dw: DepthwiseConv3d,
    norm2: ChannelNorm,
    out_dw: DepthwiseConv3d,
    out_pw: Conv3d,
}

impl Ghpa {
    /// `map_size`: side of the learnable plane grids (8 in EGE-UNet).
    pub fn new(channels: usize, map_size: usize, vb: VarBuilder) -> Result<Self> {
        if !channels.is_multiple_of(4) || channels == 0 {
            candle_core::bail!("GHPA: channels must be a positive multiple of 4, got {channels}");
        }
        let g = channels / 4;
        Ok(Ghpa {
            norm1: ChannelNorm::new(channels, vb.pp("norm1"))?,
            xy: PlaneMap::new(g, map_size, vb.pp("xy"))?,
            xz: PlaneMap::new(g, map_size, vb.pp("xz"))?,
            yz: PlaneMap::new(g, map_size, vb.pp("yz"))?,
            dw: DepthwiseConv3d::new(g, [3; 3], vb.pp("dw"))?,
            norm2: ChannelNorm::new(channels, vb.pp("norm2"))?,
            out_dw: DepthwiseConv3d::new(channels, [3; 3], vb.pp("out_dw"))?,
            out_pw: Conv3d::new(channels, channels, 1, true, vb.pp("out_pw"))?,
        })
    }
}

impl Module for Ghpa {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, d, h, w) = x.dims5()?;
        let x = self.norm1.forward(x)?;
        let parts = x.chunk(4, 1)?;
        let g = c / 4;
        // Tensor axes are (z, y, x) = (D, H, W): the (x, y) plane is (H, W), broadcast
        // along D; (x, z) is (D, W), broadcast along H; (y, z) is (D, H), along W.
        let xy = self.xy.map(h, w)?;
        let xz = self.xz.map(d, w)?.reshape((1, g, d, 1, w))?;
        let yz = self.yz.map(d, h)?.reshape((1, g, d, h, 1))?;
        let y = Tensor::cat(
            &[
                parts[0].broadcast_mul(&xy)?,
                parts[1].broadcast_mul(&xz)?,
                parts[2].broadcast_mul(&yz)?,
                self.dw.forward(&parts[3])?,
            ],
            1,
        )?;
        let y = self.norm2.forward(&y)?;
        self.out_pw
            .forward(&self.out_dw.forward(&y)?.gelu_erf()?)
            .and_then(|t| t.contiguous())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{random_tensor, values};
    use candle_core::{DType, D};
    use candle_nn::VarMap;

    #[test]
    fn resize_matrix_interpolates_linearly_with_aligned_corners() {
        let m = resize_matrix(7, 4, &Device::Cpu).unwrap();
        let src = Tensor::new(&[1.0f32, 3.0, 2.0, 5.0], &Device::Cpu).unwrap();
        let y = values(&m.matmul(&src.unsqueeze(1).unwrap()).unwrap());
        // Positions 0, 0.5, 1, ..., 3 of the source.
        let want = [1.0, 2.0, 3.0, 2.5, 2.0, 3.5, 5.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        // A constant stays constant (the maps start at 1).
        let rows = values(&m.sum(D::Minus1).unwrap());
        assert!(rows.iter().all(|r| (r - 1.0).abs() < 1e-6));
    }

    #[test]
    fn keeps_shape_and_trains_every_plane_map() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let ghpa = Ghpa::new(8, 4, vb.pp("g")).unwrap();
        let x = random_tensor((1, 8, 3, 5, 6), 1);
        let y = ghpa.forward(&x).unwrap();
        assert_eq!(y.dims(), x.dims());
        let r = random_tensor((1, 8, 3, 5, 6), 2);
        let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let data = vm.data().lock().unwrap();
        for plane in ["xy", "xz", "yz"] {
            let g = grads.get(&data[&format!("g.{plane}.param")]).unwrap();
            let g = values(g);
            assert!(
                g.iter().any(|v| v.abs() > 1e-6),
                "no gradient for the {plane} map"
            );
        }
        assert!(Ghpa::new(6, 4, vb.pp("bad")).is_err());
    }
}
