//! LoopNet (Chen et al., ISMRM 2024) and, with `loops = 1, ghpa = false`, the plain 3D U-net
//! baseline.
//!
//! A U-net whose extracting (encoder) and expanding (decoder) paths are shared by `T` loops.
//! In loop `t` the expanding-path features of loop `t − 1` at each level are concatenated to
//! the extracting path's input at the same level (the reverse connection; zeros in the first
//! loop, so every loop runs the same weights). Each loop's output is a 1×1 conv of its last
//! expanding features plus the input (the final skip). Optionally (IR2QSM) a 1×1 conv fuses
//! the loops' outputs. GHPA ([`super::ghpa`]) is added residually after the conv blocks of
//! the deeper levels.
//!
//! Levels: conv blocks are two [conv 3³ (no bias), BN, ReLU]; down is 2× max pooling; up is
//! 2× nearest upsampling then a 1×1 conv to the level's channels, concatenated with the skip.
//! Inputs of any size are zero-padded at the far end to a multiple of `2^(levels − 1)` and the
//! outputs cropped back.
//!
//! The input is the local field (the papers'), or with `start: tv` chimap's TV-ADMM map of it,
//! which the final skip then carries and the network corrects; the output conv starts at zero
//! there, so an untrained network is TV. This is LP-CNN's TV warm start
//! ([`super::lpcnn::WarmStart`]) brought to the U-nets: trained from the field they scored
//! > 100 % on the MNI head at CPU budgets.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::conv3d::Conv3d;
use super::dipole::DipoleSet;
use super::ghpa::Ghpa;
use super::layers::BatchNorm3d;
use super::pool::{max_pool2, upsample2};
use super::tiling::{needed_voxels, Plan};

/// Architecture of LoopNet / the U-net baseline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Channels per level, full resolution first.
    pub channels: Vec<usize>,
    /// Loops `T` sharing the weights.
    pub loops: usize,
    /// GHPA after the conv blocks of levels `ghpa_from_level..`.
    pub ghpa: bool,
    pub ghpa_from_level: usize,
    /// Side of GHPA's learnable plane grids.
    pub ghpa_map_size: usize,
    /// Fuse the loops' outputs with a 1×1 conv (IR2QSM) instead of returning the last loop's.
    pub fuse: bool,
    /// Training only: supervise every loop's output `t = 1..T` with weight `0.5^(T−t)`
    /// (IR2QSM's deep supervision), plus the fused output when `fuse` is on.
    pub deep_supervision: bool,
    /// What the network sees and refines: the local field, or TV-ADMM's map of it.
    pub start: Start,
    /// λ of the TV-ADMM start (ppm·mm, as `inversion.tv.lambda`).
    pub start_lambda: f64,
    /// One set of batch norms per loop (the convolutions stay shared). The loops see
    /// different statistics (the first loop's reverse connections are zeros), so norms
    /// shared across loops keep running statistics that fit no loop, and the evaluation
    /// mode of a trained LoopNet drifts from its training mode. Absent from weights and
    /// configurations written before it existed, which shared them: hence `false` when
    /// absent, while [`Config::default`] turns it on.
    #[serde(default)]
    pub norm_per_loop: bool,
}

/// The network's input, which the final skip adds to its output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    #[default]
    Field,
    Tv,
}

impl Default for Config {
    /// LoopNet as described: 4 levels of 16-32-64-128 channels, GHPA. `T = 3` is our
    /// choice (the abstract does not fix it here); fusion and deep supervision off (a short
    /// equal-budget comparison in `weights/README.md` did not favour them).
    fn default() -> Self {
        Config {
            channels: vec![16, 32, 64, 128],
            loops: 3,
            ghpa: true,
            ghpa_from_level: 2,
            ghpa_map_size: 8,
            fuse: false,
            deep_supervision: false,
            start: Start::Field,
            start_lambda: crate::inversion::tv::DEFAULT_LAMBDA,
            norm_per_loop: true,
        }
    }
}

impl Config {
    /// The plain U-net baseline: one loop, no GHPA.
    pub fn unet() -> Self {
        Config {
            loops: 1,
            ghpa: false,
            ..Config::default()
        }
    }

    /// Loss weights of the loops' outputs under deep supervision: `0.5^(T−t)`, so the last
    /// loop counts most.
    pub fn loop_weights(&self) -> Vec<f64> {
        (1..=self.loops)
            .map(|t| 0.5f64.powi((self.loops - t) as i32))
            .collect()
    }

    /// Sizes must be multiples of this (inputs are padded to it).
    pub fn stride(&self) -> usize {
        1 << (self.channels.len() - 1)
    }

    /// Sets of batch norms in each conv block: one per loop, or one shared.
    fn norm_sets(&self) -> usize {
        if self.norm_per_loop {
            self.loops
        } else {
            1
        }
    }
}

/// Two [conv 3³, BN, ReLU], then optionally `x + GHPA(x)`; with `norms > 1` sets of batch
/// norms, loop `t` uses set `t` (the last set for later loops).
#[derive(Clone, Debug)]
struct Block {
    c1: Conv3d,
    b1: Vec<BatchNorm3d>,
    c2: Conv3d,
    b2: Vec<BatchNorm3d>,
    ghpa: Option<Ghpa>,
}

impl Block {
    fn new(
        cin: usize,
        cout: usize,
        ghpa: Option<usize>,
        norms: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        // One set keeps the names of weights written before per-loop norms.
        let bn = |name: &str| -> Result<Vec<BatchNorm3d>> {
            if norms == 1 {
                return Ok(vec![BatchNorm3d::new(cout, vb.pp(name))?]);
            }
            (0..norms)
                .map(|t| BatchNorm3d::new(cout, vb.pp(name).pp(t)))
                .collect()
        };
        Ok(Block {
            c1: Conv3d::new(cin, cout, 3, false, vb.pp("conv1"))?,
            b1: bn("bn1")?,
            c2: Conv3d::new(cout, cout, 3, false, vb.pp("conv2"))?,
            b2: bn("bn2")?,
            ghpa: ghpa
                .map(|s| Ghpa::new(cout, s, vb.pp("ghpa")))
                .transpose()?,
        })
    }

    /// The block in loop `t` (from 0). An input with fewer channels than the block takes
    /// stands for one whose missing (last) channels are zeros.
    fn forward_t(&self, x: &Tensor, train: bool, t: usize) -> Result<Tensor> {
        let b1 = &self.b1[t.min(self.b1.len() - 1)];
        let b2 = &self.b2[t.min(self.b2.len() - 1)];
        let c1 = self.c1.leading(x.dim(1)?)?;
        let h = if train {
            let h = b1.forward_t(&c1.forward(x)?, train)?.relu()?;
            b2.forward_t(&self.c2.forward(&h)?, train)?.relu()?
        } else {
            // Inference: batch norms folded into the convolutions, ReLU fused.
            let (s1, t1) = b1.scale_shift()?;
            let (s2, t2) = b2.scale_shift()?;
            let h = c1.forward_affine_act(x, &s1, &t1, true)?;
            self.c2.forward_affine_act(&h, &s2, &t2, true)?
        };
        match &self.ghpa {
            Some(g) => h.clone() + g.forward(&h)?,
            None => Ok(h),
        }
    }
}

/// Outputs of one forward pass, cropped to the input's size.
pub struct Output {
    /// Each loop's χ `[N, 1, D, H, W]`, in loop order (for deep supervision).
    pub loops: Vec<Tensor>,
    /// The network's χ: the fused loops, or the last loop's output.
    pub chi: Tensor,
}

/// LoopNet / U-net.
#[derive(Clone, Debug)]
pub struct LoopNet {
    cfg: Config,
    enc: Vec<Block>,
    up: Vec<Conv3d>,
    dec: Vec<Block>,
    head: Conv3d,
    fuse: Option<Conv3d>,
}

impl LoopNet {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let c = &cfg.channels;
        let levels = c.len();
        if levels < 2 || cfg.loops == 0 || c.contains(&0) {
            candle_core::bail!("LoopNet needs at least two levels and one loop, got {cfg:?}");
        }
        let ghpa = |l: usize| (cfg.ghpa && l >= cfg.ghpa_from_level).then_some(cfg.ghpa_map_size);
        let feedback = |l: usize| {
            if cfg.loops > 1 && l + 1 < levels {
                c[l]
            } else {
                0
            }
        };
        let mut enc = Vec::new();
        for l in 0..levels {
            let cin = if l == 0 { 1 } else { c[l - 1] } + feedback(l);
            enc.push(Block::new(
                cin,
                c[l],
                ghpa(l),
                cfg.norm_sets(),
                vb.pp(format!("enc.{l}")),
            )?);
        }
        let mut up = Vec::new();
        let mut dec = Vec::new();
        for l in 0..levels - 1 {
            up.push(Conv3d::new(
                c[l + 1],
                c[l],
                1,
                true,
                vb.pp(format!("up.{l}")),
            )?);
            dec.push(Block::new(
                2 * c[l],
                c[l],
                ghpa(l),
                cfg.norm_sets(),
                vb.pp(format!("dec.{l}")),
            )?);
        }
        Ok(LoopNet {
            cfg: cfg.clone(),
            enc,
            up,
            dec,
            head: match cfg.start {
                Start::Field => Conv3d::new(c[0], 1, 1, true, vb.pp("head"))?,
                // Zero: an untrained network returns its TV start.
                Start::Tv => Conv3d::zeroed(c[0], 1, 1, true, vb.pp("head"))?,
            },
            fuse: (cfg.fuse && cfg.loops > 1)
                .then(|| Conv3d::new(cfg.loops, 1, 1, true, vb.pp("fuse")))
                .transpose()?,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The network's input from local fields `[N, 1, D, H, W]` (ppm), one orientation each
    /// (`ops` holds one), and their 0/1 masks: the field, or TV-ADMM's map inside the mask.
    /// Data only: no gradient flows through it.
    pub fn input(&self, fields: &Tensor, ops: &DipoleSet, mask: &Tensor) -> Result<Tensor> {
        match self.cfg.start {
            Start::Field => Ok(fields.clone()),
            Start::Tv => ops.tv(fields, mask, self.cfg.start_lambda),
        }
    }

    /// Approximate memory of inference per input voxel: about 25 full-resolution f32
    /// tensors of the first level's width alive at once (measured: 13.3 GiB peak on a
    /// 200×230×190 volume with the default 16-32-64-128 channels, 3 loops and GHPA, 1.6 kB
    /// per voxel).
    pub fn bytes_per_voxel(&self) -> usize {
        4 * 25 * self.cfg.channels[0]
    }

    /// Margin of the crop and of tiles at inference: two of the coarsest level's voxels.
    pub fn inference_margin(&self) -> usize {
        2 * self.cfg.stride()
    }

    /// χ `[N, 1, D, H, W]`, zero outside `mask`, from a local field with the activations
    /// bounded by `max_bytes`: the network runs over the mask's bounding box grown by
    /// [`Self::inference_margin`], in overlapping blended tiles when that does not fit.
    /// A U-net sees farther than the margin, so unlike LP-CNN's prox the crop and the tiles
    /// change the result a little near their edges; it is trained on patches, which it
    /// sees the same way (the field is zero outside the mask).
    pub fn infer(&self, x: &Tensor, mask: &Tensor, max_bytes: usize) -> Result<Tensor> {
        let (n, _, d, h, w) = x.dims5()?;
        let plan = Plan::within_budget(
            &needed_voxels(mask)?,
            [d, h, w],
            self.inference_margin(),
            self.bytes_per_voxel(),
            max_bytes,
            self.cfg.stride(),
        );
        let Some(plan) = plan else {
            return Tensor::zeros((n, 1, d, h, w), x.dtype(), x.device());
        };
        let net = |t: &Tensor| Ok(self.forward_t(t, false)?.chi);
        plan.apply(x, &net)?.broadcast_mul(mask)
    }

    /// χ from a local field `[N, 1, D, H, W]` (any size; padded internally).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Output> {
        let (_, _, d, h, w) = x.dims5()?;
        let s = self.cfg.stride();
        let mut xp = x.clone();
        for (axis, len) in [(2, d), (3, h), (4, w)] {
            let extra = len.div_ceil(s) * s - len;
            if extra > 0 {
                xp = xp.pad_with_zeros(axis, 0, extra)?;
            }
        }
        let levels = self.cfg.channels.len();
        let mut feedback: Vec<Option<Tensor>> = vec![None; levels - 1];
        let mut outs = Vec::with_capacity(self.cfg.loops);
        for t in 0..self.cfg.loops {
            let mut skips = Vec::with_capacity(levels - 1);
            let mut f = xp.clone();
            for l in 0..levels {
                if l > 0 {
                    f = max_pool2(&f)?;
                }
                // The first loop's reverse connections are zeros: its blocks skip them
                // (about a tenth of a 2-loop LoopNet's convolution FLOPs).
                if let Some(fb) = feedback.get(l).and_then(Option::as_ref) {
                    f = Tensor::cat(&[&f, fb], 1)?;
                }
                f = self.enc[l].forward_t(&f, train, t)?;
                if l + 1 < levels {
                    skips.push(f.clone());
                }
            }
            for l in (0..levels - 1).rev() {
                let u = self.up[l].forward(&upsample2(&f)?)?;
                f = self.dec[l].forward_t(&Tensor::cat(&[&u, &skips[l]], 1)?, train, t)?;
                feedback[l] = Some(f.clone());
            }
            outs.push((self.head.forward(&f)? + &xp)?);
        }
        let chi = match &self.fuse {
            Some(fuse) => fuse.forward(&Tensor::cat(&outs, 1)?)?,
            None => outs.last().expect("at least one loop").clone(),
        };
        let crop = |t: &Tensor| -> Result<Tensor> {
            t.narrow(2, 0, d)?
                .narrow(3, 0, h)?
                .narrow(4, 0, w)?
                .contiguous()
        };
        Ok(Output {
            loops: outs.iter().map(crop).collect::<Result<_>>()?,
            chi: crop(&chi)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{random_tensor, values};
    use candle_core::{DType, Device};
    use candle_nn::{Optimizer, VarMap};

    fn tiny(loops: usize, ghpa: bool) -> Config {
        Config {
            channels: vec![4, 4, 8, 8],
            loops,
            ghpa,
            ghpa_map_size: 4,
            ..Config::default()
        }
    }

    fn build(cfg: &Config) -> (VarMap, LoopNet) {
        let vm = VarMap::new();
        let net =
            LoopNet::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        (vm, net)
    }

    /// With `start: tv` the input is TV-ADMM's map inside the mask, and an untrained
    /// network returns it unchanged (LoopNet and the U-net alike); with the field as the
    /// start, the input is the field.
    #[test]
    fn a_tv_start_feeds_tv_and_starts_as_tv() {
        let ops = DipoleSet::new([16; 3], [1.0; 3], &[[0.0, 0.3, 0.954]]);
        let field = random_tensor((1, 1, 16, 16, 16), 4);
        let mask = Tensor::ones((1, 1, 16, 16, 16), DType::F32, &Device::Cpu).unwrap();
        for cfg in [
            tiny(2, true),
            Config {
                channels: vec![4, 8],
                ..Config::unet()
            },
        ] {
            let (_, plain) = build(&cfg);
            let same = plain.input(&field, &ops, &mask).unwrap();
            assert_eq!(values(&same), values(&field));
            let (_, net) = build(&Config {
                start: Start::Tv,
                ..cfg
            });
            let x = net.input(&field, &ops, &mask).unwrap();
            let tv = ops.tv(&field, &mask, net.config().start_lambda).unwrap();
            assert_eq!(values(&x), values(&tv));
            assert_ne!(values(&x), values(&field));
            let out = net.forward_t(&x, false).unwrap().chi;
            assert_eq!(values(&out), values(&x));
        }
    }

    fn parameters(vm: &VarMap) -> usize {
        vm.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    #[test]
    fn output_has_the_input_shape_for_any_size() {
        for (loops, ghpa) in [(1, false), (2, true)] {
            let (_, net) = build(&tiny(loops, ghpa));
            for dims in [(8, 16, 8), (5, 7, 9)] {
                let x = random_tensor((1, 1, dims.0, dims.1, dims.2), 1);
                let out = net.forward_t(&x, false).unwrap();
                assert_eq!(out.chi.dims(), x.dims());
                assert_eq!(out.loops.len(), loops);
                assert!(values(&out.chi).iter().all(|v| v.is_finite()));
            }
        }
    }

    #[test]
    fn inference_under_a_budget_crops_to_the_mask_and_tiles() {
        let (_, net) = build(&tiny(2, true));
        let (d, h, w) = (48, 40, 72);
        // A field that is zero outside a ball, as a local field is outside the brain.
        let ball: Vec<f32> = (0..d * h * w)
            .map(|v| {
                let (x, y, z) = ((v % w) as f32, ((v / w) % h) as f32, (v / (w * h)) as f32);
                ((x - 36.0).powi(2) + (y - 20.0).powi(2) + (z - 24.0).powi(2) < 64.0) as u8 as f32
            })
            .collect();
        let mask = Tensor::from_vec(ball, (1, 1, d, h, w), &Device::Cpu).unwrap();
        let x = (random_tensor((1, 1, d, h, w), 7) * &mask).unwrap();
        let whole = values(&(net.forward_t(&x, false).unwrap().chi * &mask).unwrap());
        let inside: Vec<bool> = values(&mask).iter().map(|&m| m > 0.0).collect();
        let xs = values(&x);
        let rms = |v: &[f32]| {
            let n = inside.iter().filter(|&&k| k).count() as f32;
            (v.iter()
                .zip(&inside)
                .filter(|(_, &k)| k)
                .map(|(a, _)| a * a)
                .sum::<f32>()
                / n)
                .sqrt()
        };
        let per_voxel = net.bytes_per_voxel();
        // Room for the whole volume: the crop alone (x 12..61 of 72); then a budget that
        // forces tiles of 48 voxels (the smallest useful: margins 2 × 16 and a blend of 8).
        for budget in [per_voxel * d * h * w, per_voxel * 48 * 40 * 48] {
            let got = values(&net.infer(&x, &mask, budget).unwrap());
            assert!(got
                .iter()
                .zip(&inside)
                .all(|(v, &k)| v.is_finite() && (k || *v == 0.0)));
            let diff: Vec<f32> = got.iter().zip(&whole).map(|(a, b)| a - b).collect();
            // Relative to the network's own part (the final skip adds the input itself).
            let own: Vec<f32> = whole.iter().zip(&xs).map(|(a, b)| a - b).collect();
            let rel = rms(&diff) / rms(&own);
            eprintln!("budget {budget}: relative difference to the whole volume {rel:.2e}");
            assert!(rel < 0.05, "budget {budget}: {rel}");
        }
        // With a mask that fills the volume and room for it, nothing changes.
        let full = mask.ones_like().unwrap();
        let got = values(&net.infer(&x, &full, per_voxel * d * h * w).unwrap());
        assert_eq!(got, values(&net.forward_t(&x, false).unwrap().chi));
    }

    #[test]
    fn loops_share_weights() {
        let shared = |loops| {
            parameters(
                &build(&Config {
                    norm_per_loop: false,
                    ..tiny(loops, true)
                })
                .0,
            )
        };
        assert_eq!(shared(2), shared(5));
        // The reverse connections add input channels once, not per loop.
        assert!(shared(1) < shared(2));
        // Per-loop norms add one set of norms per loop, and nothing else.
        let count = |loops| parameters(&build(&tiny(loops, true)).0);
        let per_set = count(3) - count(2);
        assert!(per_set > 0);
        assert_eq!(count(5) - count(2), 3 * per_set);
        assert_eq!(count(2) - shared(2), per_set);
        // The published sizes: the U-net baseline is a few hundred thousand parameters.
        let unet = parameters(&build(&Config::unet()).0);
        assert!((100_000..2_000_000).contains(&unet), "{unet}");
    }

    /// Per-loop norms let the evaluation mode match the training mode: after the running
    /// statistics have settled on one batch, evaluating that batch gives what training mode
    /// gives. Norms shared by the loops settle on a mix of the loops' statistics and do not.
    #[test]
    fn per_loop_norms_make_evaluation_match_training() {
        // Two levels and 16³: every norm sees ≥ 1 024 samples, so the unbiased running
        // variance is within 0.1 % of the batch's.
        let x = random_tensor((2, 1, 16, 16, 16), 5);
        let gap = |norm_per_loop: bool| {
            let (_, net) = build(&Config {
                channels: vec![4, 8],
                norm_per_loop,
                ..tiny(3, false)
            });
            // Momentum 0.1 from running variances of 1: 300 passes to settle on channels
            // whose variance is far below 1.
            let mut train = Vec::new();
            for _ in 0..300 {
                train = values(&net.forward_t(&x, true).unwrap().chi);
            }
            let eval = values(&net.forward_t(&x, false).unwrap().chi);
            let xs = values(&x);
            let d: f32 = train.iter().zip(&eval).map(|(a, b)| (a - b).powi(2)).sum();
            // Relative to the network's own part (the final skip adds the input).
            let own: f32 = train.iter().zip(&xs).map(|(a, b)| (a - b).powi(2)).sum();
            (d / own).sqrt()
        };
        let (per_loop, shared) = (gap(true), gap(false));
        eprintln!("evaluation against training mode: per loop {per_loop:.1e}, shared {shared:.1e}");
        assert!(per_loop < 0.02, "{per_loop}");
        assert!(shared > 10.0 * per_loop, "{shared} vs {per_loop}");
    }

    /// Configurations and weights written before per-loop norms shared them.
    #[test]
    fn an_absent_norm_per_loop_means_shared() {
        let old: Config = serde_json::from_str(r#"{"loops": 2}"#).unwrap();
        assert!(!old.norm_per_loop);
        assert_eq!(old.channels, Config::default().channels);
        assert!(Config::default().norm_per_loop);
    }

    /// The first loop skips its zero reverse connections: the weights that read them do
    /// not change its output, and do change the next loop's.
    #[test]
    fn the_first_loop_does_not_read_the_reverse_weights() {
        let (vm, net) = build(&tiny(2, false));
        let x = random_tensor((1, 1, 8, 8, 8), 2);
        let before = net.forward_t(&x, false).unwrap();
        {
            let data = vm.data().lock().unwrap();
            let w = &data["enc.0.conv1.weight"];
            // enc.0 reads the field (channel 0), then the reverse connection (1..).
            let (cout, cin) = (w.dim(0).unwrap(), w.dim(1).unwrap());
            let field = w.narrow(1, 0, 1).unwrap();
            let other = random_tensor((cout, cin - 1, 3, 3, 3), 9);
            w.set(&Tensor::cat(&[&field, &other], 1).unwrap()).unwrap();
        }
        let after = net.forward_t(&x, false).unwrap();
        assert_eq!(values(&before.loops[0]), values(&after.loops[0]));
        assert_ne!(values(&before.loops[1]), values(&after.loops[1]));
    }

    #[test]
    fn later_loops_see_the_earlier_loops() {
        let (_, net) = build(&tiny(3, false));
        let x = random_tensor((1, 1, 8, 8, 8), 2);
        let out = net.forward_t(&x, false).unwrap();
        // Same weights, same input: the loops differ only through the reverse connections.
        assert_ne!(values(&out.loops[0]), values(&out.loops[1]));
    }

    #[test]
    fn adam_steps_reduce_the_loss() {
        for cfg in [tiny(2, true), tiny(1, false)] {
            let (vm, net) = build(&cfg);
            let x = random_tensor((2, 1, 8, 8, 8), 3);
            // A target the network can move towards: a scaled, shifted copy of the input.
            let target = ((&x * 0.5).unwrap() + 0.1).unwrap();
            let params = candle_nn::ParamsAdamW {
                lr: 1e-2,
                weight_decay: 0.0,
                ..Default::default()
            };
            let mut opt = candle_nn::AdamW::new(vm.all_vars(), params).unwrap();
            let loss = |net: &LoopNet| -> Tensor {
                let y = net.forward_t(&x, true).unwrap().chi;
                (y - &target).unwrap().sqr().unwrap().mean_all().unwrap()
            };
            let first = loss(&net).to_scalar::<f32>().unwrap();
            for _ in 0..8 {
                opt.backward_step(&loss(&net)).unwrap();
            }
            let last = loss(&net).to_scalar::<f32>().unwrap();
            assert!(last < 0.7 * first, "{cfg:?}: loss {first} -> {last}");
        }
    }
}
