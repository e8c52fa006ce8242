//! Normalisation, dropout and depthwise convolution layers for `[N, C, D, H, W]` tensors,
//! built from Candle tensor ops (so Candle differentiates them).

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNormConfig, Init, VarBuilder};

use crate::simulate::rng::Rng;
use std::sync::{Arc, Mutex};

/// Batch normalisation over N, D, H, W per channel; batch statistics in training, running
/// statistics in evaluation (`ModuleT`). Variables as in PyTorch: `weight`, `bias`,
/// `running_mean`, `running_var`.
#[derive(Clone, Debug)]
pub struct BatchNorm3d(candle_nn::BatchNorm);

impl BatchNorm3d {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        // PyTorch's defaults, so published weights behave the same.
        let cfg = BatchNormConfig {
            eps: 1e-5,
            momentum: 0.1,
            ..Default::default()
        };
        Ok(BatchNorm3d(candle_nn::batch_norm(channels, cfg, vb)?))
    }
}

impl BatchNorm3d {
    /// The evaluation-mode map as `x · scale + shift` per channel, for folding into the
    /// preceding convolution.
    pub fn scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let bn = &self.0;
        let inv = (bn.running_var().detach() + bn.eps())?.sqrt()?.recip()?;
        let (scale, beta) = match bn.weight_and_bias() {
            Some((w, b)) => ((w * inv)?, b.clone()),
            None => (inv.clone(), inv.zeros_like()?),
        };
        let shift = (beta - (bn.running_mean().detach() * &scale)?)?;
        Ok((scale, shift))
    }
}

impl ModuleT for BatchNorm3d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if x.rank() != 5 {
            candle_core::bail!(
                "batch-norm 3d: expected [N, C, D, H, W], got {:?}",
                x.dims()
            );
        }
        self.0.forward_t(x, train)
    }
}

/// Channel dropout: in training each (sample, channel) volume is zeroed with probability `p`
/// and the others scaled by `1/(1 − p)`; the identity in evaluation.
#[derive(Clone, Debug)]
pub struct Dropout3d {
    p: f32,
    rng: DropoutRng,
}

impl Dropout3d {
    /// Masks are drawn from `rng`, which a model's dropout layers share.
    pub fn new(p: f32, rng: DropoutRng) -> Self {
        assert!(
            (0.0..1.0).contains(&p),
            "dropout probability must be in [0, 1)"
        );
        Dropout3d { p, rng }
    }
}

impl ModuleT for Dropout3d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let (n, c) = (x.dim(0)?, x.dim(1)?);
        let scale = 1.0 / (1.0 - self.p);
        let keep: Vec<f32> = self
            .rng
            .uniforms(n * c)
            .into_iter()
            .map(|u| if u >= self.p { scale } else { 0.0 })
            .collect();
        x.broadcast_mul(&Tensor::from_vec(keep, (n, c, 1, 1, 1), x.device())?)
    }
}

/// The seeded generator of a model's dropout masks. Its state is a single `u64`, which a
/// training checkpoint stores so that a resumed run draws the same masks as an
/// uninterrupted one (Candle's own random tensors cannot be seeded on the CPU).
#[derive(Clone, Debug)]
pub struct DropoutRng(Arc<Mutex<Rng>>);

impl DropoutRng {
    pub fn new(seed: u64) -> Self {
        DropoutRng(Arc::new(Mutex::new(Rng::new(seed))))
    }

    pub fn state(&self) -> u64 {
        self.0.lock().expect("dropout rng lock").state()
    }

    pub fn set_state(&self, state: u64) {
        *self.0.lock().expect("dropout rng lock") = Rng::from_state(state);
    }

    fn uniforms(&self, n: usize) -> Vec<f32> {
        let mut rng = self.0.lock().expect("dropout rng lock");
        (0..n).map(|_| rng.uniform() as f32).collect()
    }
}

/// Layer normalisation over the channels of each voxel (the channels-first LayerNorm of
/// EGE-UNet's GHPA). Variables `weight` (init 1) and `bias` (init 0), `[C]`.
#[derive(Clone, Debug)]
pub struct ChannelNorm {
    weight: Tensor,
    bias: Tensor,
}

impl ChannelNorm {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(ChannelNorm {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
        })
    }
}

impl Module for ChannelNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(1)?;
        let y = xc.broadcast_div(&(var + 1e-6)?.sqrt()?)?;
        y.broadcast_mul(&self.weight.reshape((1, (), 1, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, (), 1, 1, 1))?)
    }
}

/// Depthwise 3D convolution (one `kd × kh × kw` filter per channel, odd sizes, "same"
/// padding) with bias. Variables `weight` `[C, 1, kd, kh, kw]` (the PyTorch layout of a
/// grouped conv) and `bias`. A `[1, k, k]` kernel on `[N, C, 1, H, W]` is a 2D depthwise conv.
///
/// Built as a sum of shifted views times per-channel weights: it only runs on the small
/// low-resolution features of GHPA, where a GEMM would not pay.
#[derive(Clone, Debug)]
pub struct DepthwiseConv3d {
    weight: Tensor,
    bias: Tensor,
    k: [usize; 3],
}

impl DepthwiseConv3d {
    pub fn new(channels: usize, k: [usize; 3], vb: VarBuilder) -> Result<Self> {
        if k.iter().any(|&k| k % 2 == 0) {
            candle_core::bail!("depthwise conv: odd kernel sizes only, got {k:?}");
        }
        let bound = 1.0 / ((k[0] * k[1] * k[2]) as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(DepthwiseConv3d {
            weight: vb.get_with_hints((channels, 1, k[0], k[1], k[2]), "weight", init)?,
            bias: vb.get_with_hints(channels, "bias", init)?,
            k,
        })
    }
}

impl Module for DepthwiseConv3d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [kd, kh, kw] = self.k;
        let [d, h, w] = [x.dim(2)?, x.dim(3)?, x.dim(4)?];
        let xp = x
            .pad_with_zeros(2, kd / 2, kd / 2)?
            .pad_with_zeros(3, kh / 2, kh / 2)?
            .pad_with_zeros(4, kw / 2, kw / 2)?;
        let taps = self.weight.flatten_from(1)?; // [C, kd·kh·kw]
        let mut acc = self
            .bias
            .reshape((1, (), 1, 1, 1))?
            .broadcast_as(x.shape())?;
        for t in 0..kd * kh * kw {
            let view = xp
                .narrow(2, t / (kh * kw), d)?
                .narrow(3, (t / kw) % kh, h)?;
            let view = view.narrow(4, t % kw, w)?;
            let wt = taps.narrow(1, t, 1)?.reshape((1, (), 1, 1, 1))?;
            acc = (acc + view.broadcast_mul(&wt)?)?;
        }
        Ok(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{random_tensor, values};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn channel_stats(v: &[f32], c: usize, per: usize, n: usize) -> Vec<(f64, f64)> {
        (0..c)
            .map(|ch| {
                let xs: Vec<f64> = (0..n)
                    .flat_map(|b| v[(b * c + ch) * per..][..per].iter().map(|&x| x as f64))
                    .collect();
                let m = xs.iter().sum::<f64>() / xs.len() as f64;
                let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
                (m, var)
            })
            .collect()
    }

    #[test]
    fn batch_norm_normalises_in_training_and_uses_running_stats_in_evaluation() {
        let vm = VarMap::new();
        let bn =
            BatchNorm3d::new(3, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let x = ((random_tensor((2, 3, 4, 3, 5), 1) * 4.0).unwrap() + 2.0).unwrap();
        let y = bn.forward_t(&x, true).unwrap();
        for (m, v) in channel_stats(&values(&y), 3, 60, 2) {
            assert!(
                m.abs() < 1e-5 && (v - 1.0).abs() < 1e-3,
                "mean {m}, var {v}"
            );
        }
        // Running mean moved 10 % of the way from 0 to the batch mean (≈ 2).
        let rm = values(
            &vm.data().lock().unwrap()["running_mean"]
                .as_tensor()
                .clone(),
        );
        let xm = channel_stats(&values(&x), 3, 60, 2);
        for (r, (m, _)) in rm.iter().zip(&xm) {
            assert!((*r as f64 - 0.1 * m).abs() < 1e-5);
        }
        // Evaluation: (x − running_mean) / sqrt(running_var + eps), per channel.
        let e = values(&bn.forward_t(&x, false).unwrap());
        let rv = values(&vm.data().lock().unwrap()["running_var"].as_tensor().clone());
        let xv = values(&x);
        for (i, (&got, &xi)) in e.iter().zip(&xv).enumerate() {
            let ch = (i / 60) % 3;
            let want = (xi - rm[ch]) / (rv[ch] + 1e-5).sqrt();
            assert!((got - want).abs() < 1e-5);
        }
        let (scale, shift) = bn.scale_shift().unwrap();
        let folded = x
            .broadcast_mul(&scale.reshape((1, 3, 1, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&shift.reshape((1, 3, 1, 1, 1)).unwrap())
            .unwrap();
        for (a, b) in values(&folded).iter().zip(&e) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn dropout3d_drops_whole_channels() {
        let x = (random_tensor((4, 8, 2, 3, 2), 2) + 1.0).unwrap();
        let d = Dropout3d::new(0.5, DropoutRng::new(3));
        assert_eq!(values(&d.forward_t(&x, false).unwrap()), values(&x));
        let y = values(&d.forward_t(&x, true).unwrap());
        let xv = values(&x);
        let mut dropped = 0;
        for ch in 0..32 {
            let (a, b) = (&y[ch * 12..][..12], &xv[ch * 12..][..12]);
            if a.iter().all(|&v| v == 0.0) {
                dropped += 1;
            } else {
                assert!(a.iter().zip(b).all(|(a, b)| (a - 2.0 * b).abs() < 1e-6));
            }
        }
        // 32 channels at p = 0.5: all kept or all dropped has probability 2^-31.
        assert!(dropped > 0 && dropped < 32);
        // The masks are a function of the generator's state: restoring it repeats them.
        let rng = DropoutRng::new(5);
        let d = Dropout3d::new(0.5, rng.clone());
        let state = rng.state();
        let first = values(&d.forward_t(&x, true).unwrap());
        let next = values(&d.forward_t(&x, true).unwrap());
        rng.set_state(state);
        assert_eq!(values(&d.forward_t(&x, true).unwrap()), first);
        assert_ne!(first, next, "the stream moves on");
    }

    #[test]
    fn channel_norm_normalises_each_voxel() {
        let vm = VarMap::new();
        let ln =
            ChannelNorm::new(4, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let x = (random_tensor((1, 4, 2, 2, 3), 3) * 5.0).unwrap();
        let y = values(&ln.forward(&x).unwrap());
        for v in 0..12 {
            let c: Vec<f64> = (0..4).map(|ch| y[ch * 12 + v] as f64).collect();
            let m = c.iter().sum::<f64>() / 4.0;
            let var = c.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 4.0;
            assert!(m.abs() < 1e-5 && (var - 1.0).abs() < 1e-3);
        }
    }

    #[test]
    fn depthwise_conv_matches_naive_loops() {
        let vm = VarMap::new();
        let (c, d, h, w) = (3, 4, 5, 3);
        let conv = DepthwiseConv3d::new(
            c,
            [3; 3],
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = random_tensor((1, c, d, h, w), 4);
        let y = values(&conv.forward(&x).unwrap());
        let wv = values(&vm.data().lock().unwrap()["weight"].as_tensor().clone());
        let bv = values(&vm.data().lock().unwrap()["bias"].as_tensor().clone());
        let xv = values(&x);
        for ch in 0..c {
            for z in 0..d as isize {
                for yy in 0..h as isize {
                    for xx in 0..w as isize {
                        let mut acc = bv[ch] as f64;
                        for t in 0..27isize {
                            let (zi, yi, xi) =
                                (z + t / 9 - 1, yy + (t / 3) % 3 - 1, xx + t % 3 - 1);
                            if (0..d as isize).contains(&zi)
                                && (0..h as isize).contains(&yi)
                                && (0..w as isize).contains(&xi)
                            {
                                let i =
                                    ((ch * d + zi as usize) * h + yi as usize) * w + xi as usize;
                                acc += xv[i] as f64 * wv[ch * 27 + t as usize] as f64;
                            }
                        }
                        let o = ((ch * d + z as usize) * h + yy as usize) * w + xx as usize;
                        assert!((y[o] as f64 - acc).abs() < 1e-5);
                    }
                }
            }
        }
    }
}
