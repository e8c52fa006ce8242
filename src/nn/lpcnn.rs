//! LP-CNN (Lai, Aggarwal, van Zijl, Li and Sulam, MICCAI 2020): a learned proximal gradient
//! descent for multi-orientation dipole inversion.
//!
//! `x₀ = M · TKD(y)` (or TV-ADMM, below), then for `k = 1..K`: `x ← M · prox(M · (x − α/N Σᵢ Dᵢᵀ (Dᵢ x − yᵢ)))`,
//! with `M` the brain mask, `N` the number of orientations, one prox network shared by all
//! iterations, and one learned step `α`.
//!
//! Two choices differ from the paper, both for robustness on CPU-scale training:
//! - **Stable for any N by construction.** The data term is the *mean* over orientations, so
//!   its Lipschitz constant is at most max D² = 4/9 whatever N, and `α = α_max · sigmoid(a)`
//!   stays below the stability limit `α_max = 2 / (4/9) = 4.5` (the paper sums, so an α
//!   learned on 1–3 orientations diverges on 4 or more).
//! - **Warm start and residual prox.** `x₀` is the project's TKD of all orientations (not
//!   `α Σ Dᵢᵀ yᵢ`), and the prox is `v + σ · net((v − μ)/σ)` with the net's last layer
//!   initialised to zero: an untrained model is TKD plus K gradient steps, and training only
//!   has to learn the correction (streaking, the cone), which a small network and a short
//!   CPU run can do. With `warm_start: tv`, `x₀` is chimap's TV-ADMM instead: the shipped
//!   model's, whose small prox then only corrects what TV gets wrong (`weights/lpcnn-default.md`).
//!
//! μ, σ are the statistics of the training targets, stored with the weights (`norm.mean`,
//! `norm.std`). The same weights serve 1..N orientations.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::conv3d::Conv3d;
use super::dipole::DipoleSet;
use super::layers::{BatchNorm3d, Dropout3d, DropoutRng};
use super::masked_mean;
use super::tiling::{needed_voxels, Plan, Tiling};

/// Architecture of LP-CNN; the default is the published one (≈ 446 k parameters).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Unrolled proximal-gradient iterations.
    pub iterations: usize,
    /// Feature channels of the prox network.
    pub channels: usize,
    /// Residual blocks of the prox network.
    pub blocks: usize,
    /// Channel-dropout probability inside each residual block (training only).
    pub dropout: f32,
    /// Initial value of the learned step α, in (0, [`ALPHA_MAX`]).
    pub alpha_init: f64,
    /// TKD threshold of the warm start `x₀` (dimensionless, in (0, 2/3)).
    pub warm_start_threshold: f64,
    /// Which classic solution `x₀` is: TKD (the default) or TV-ADMM.
    pub warm_start: WarmStart,
    /// λ of the TV-ADMM warm start (ppm·mm, as `inversion.tv.lambda`).
    pub warm_start_lambda: f64,
    /// Remove the prox correction's mean over each volume's mask. The field does not fix
    /// χ's mean, so a correction trained on patches would otherwise learn patch-wide
    /// offsets from their content, which on a head become tissue-dependent biases.
    pub zero_mean_correction: bool,
    /// Clip the prox's normalised input to ±this many training σ (`None`: no clip). Strong
    /// sources (calcifications at −2 ppm are ≈ 20 σ) lie far outside what a small network
    /// saw in training, and a ReLU network extrapolates linearly there; clipped, the residual
    /// path carries them and the correction stays in its trained range.
    pub prox_input_limit: Option<f64>,
}

/// The classic solution LP-CNN starts from. TV-ADMM costs a TV solve per volume (on the CPU,
/// in training too) but leaves the prox far less to correct than TKD's streaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmStart {
    #[default]
    Tkd,
    Tv,
}

/// The stability limit of the gradient step: 2 / max_k mean_i Dᵢ(k)², with D² ≤ 4/9.
pub const ALPHA_MAX: f64 = 4.5;

impl Default for Config {
    fn default() -> Self {
        Config {
            iterations: 3,
            channels: 32,
            blocks: 8,
            dropout: 0.5,
            alpha_init: 4.0,
            warm_start_threshold: 0.15,
            warm_start: WarmStart::Tkd,
            warm_start_lambda: crate::inversion::tv::DEFAULT_LAMBDA,
            zero_mean_correction: false,
            prox_input_limit: None,
        }
    }
}

/// `[conv 3³, BN, ReLU, dropout3d, conv 3³, BN] + skip, ReLU`.
#[derive(Clone, Debug)]
struct ResBlock {
    conv1: Conv3d,
    bn1: BatchNorm3d,
    drop: Dropout3d,
    conv2: Conv3d,
    bn2: BatchNorm3d,
}

impl ResBlock {
    fn new(c: usize, dropout: f32, rng: &DropoutRng, vb: VarBuilder) -> Result<Self> {
        Ok(ResBlock {
            conv1: Conv3d::new(c, c, 3, false, vb.pp("conv1"))?,
            bn1: BatchNorm3d::new(c, vb.pp("bn1"))?,
            drop: Dropout3d::new(dropout, rng.clone()),
            conv2: Conv3d::new(c, c, 3, false, vb.pp("conv2"))?,
            bn2: BatchNorm3d::new(c, vb.pp("bn2"))?,
        })
    }
}

impl ModuleT for ResBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            // Inference: batch norms folded into the convolutions, bias and ReLU fused.
            let (s1, t1) = self.bn1.scale_shift()?;
            let (s2, t2) = self.bn2.scale_shift()?;
            let h = self.conv1.forward_affine_act(x, &s1, &t1, true)?;
            let h = self.conv2.forward_affine_act(&h, &s2, &t2, false)?;
            return (h + x)?.relu();
        }
        let h = self.bn1.forward_t(&self.conv1.forward(x)?, train)?.relu()?;
        let h = self.drop.forward_t(&h, train)?;
        let h = self.bn2.forward_t(&self.conv2.forward(&h)?, train)?;
        (h + x)?.relu()
    }
}

/// The prox network's correction: conv 1→C (3³, no bias) + ReLU, residual blocks, then
/// 1×1×1 convs C→C + ReLU, C→C + ReLU, C→1 (the last one zero-initialised).
#[derive(Clone, Debug)]
pub struct Prox {
    conv_in: Conv3d,
    blocks: Vec<ResBlock>,
    head: [Conv3d; 3],
}

impl Prox {
    /// The blocks' dropout layers draw their masks from `rng`.
    pub fn new(cfg: &Config, rng: &DropoutRng, vb: VarBuilder) -> Result<Self> {
        let c = cfg.channels;
        let blocks = (0..cfg.blocks)
            .map(|i| ResBlock::new(c, cfg.dropout, rng, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<_>>()?;
        let vh = vb.pp("head");
        Ok(Prox {
            conv_in: Conv3d::new(1, c, 3, false, vb.pp("conv_in"))?,
            blocks,
            head: [
                Conv3d::new(c, c, 1, true, vh.pp("0"))?,
                Conv3d::new(c, c, 1, true, vh.pp("1"))?,
                // Zero: an untrained prox is the identity (see the module's notes).
                Conv3d::zeroed(c, 1, 1, true, vh.pp("2"))?,
            ],
        })
    }
}

impl ModuleT for Prox {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = relu_conv(&self.conv_in, x, train)?;
        for b in &self.blocks {
            h = b.forward_t(&h, train)?;
        }
        let h = relu_conv(&self.head[0], &h, train)?;
        let h = relu_conv(&self.head[1], &h, train)?;
        self.head[2].forward(&h)
    }
}

/// `relu(conv(x))`, fused into one pass at inference.
fn relu_conv(conv: &Conv3d, x: &Tensor, train: bool) -> Result<Tensor> {
    if train {
        return conv.forward(x)?.relu();
    }
    let c = conv.weight().dim(0)?;
    let ones = Tensor::ones(c, x.dtype(), x.device())?;
    conv.forward_affine_act(x, &ones, &ones.zeros_like()?, true)
}

/// LP-CNN: the unrolled iterations around one shared [`Prox`].
#[derive(Clone, Debug)]
pub struct LpCnn {
    cfg: Config,
    prox: Prox,
    dropout_rng: DropoutRng,
    /// `a` of `α = α_max · sigmoid(a)`.
    alpha_logit: Tensor,
    mean: Tensor,
    std: Tensor,
}

impl LpCnn {
    /// Variables: `alpha_logit` `[1]`, `norm.mean` and `norm.std` `[1]`, and the prox under
    /// `prox.`.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        if cfg.iterations == 0 || cfg.channels == 0 {
            candle_core::bail!("LP-CNN needs at least one iteration and one channel");
        }
        if !(cfg.alpha_init > 0.0 && cfg.alpha_init < ALPHA_MAX) {
            candle_core::bail!(
                "LP-CNN: alpha_init must lie in (0, {ALPHA_MAX}), got {}",
                cfg.alpha_init
            );
        }
        let t = cfg.warm_start_threshold;
        if !(t > 0.0 && t < 2.0 / 3.0) {
            candle_core::bail!("LP-CNN: warm_start_threshold must lie in (0, 2/3), got {t}");
        }
        let l = cfg.warm_start_lambda;
        if !(l > 0.0 && l.is_finite()) {
            candle_core::bail!("LP-CNN: warm_start_lambda must be positive, got {l}");
        }
        if let Some(c) = cfg
            .prox_input_limit
            .filter(|c| !(*c > 0.0 && c.is_finite()))
        {
            candle_core::bail!("LP-CNN: prox_input_limit must be positive, got {c}");
        }
        let p = cfg.alpha_init / ALPHA_MAX;
        let dropout_rng = DropoutRng::new(0);
        Ok(LpCnn {
            cfg: cfg.clone(),
            prox: Prox::new(cfg, &dropout_rng, vb.pp("prox"))?,
            dropout_rng,
            alpha_logit: vb.get_with_hints(1, "alpha_logit", Init::Const((p / (1.0 - p)).ln()))?,
            mean: vb.get_with_hints(1, "norm.mean", Init::Const(0.0))?,
            std: vb.get_with_hints(1, "norm.std", Init::Const(1.0))?,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The gradient step α = α_max · sigmoid(a), always in (0, α_max).
    pub fn alpha(&self) -> Result<Tensor> {
        candle_nn::ops::sigmoid(&self.alpha_logit)? * ALPHA_MAX
    }

    /// The generator of the prox's dropout masks in training (a trainer seeds it and saves
    /// its state with checkpoints).
    pub fn dropout_rng(&self) -> &DropoutRng {
        &self.dropout_rng
    }

    /// χ `[N, 1, D, H, W]` (ppm) from local fields `[N, B, D, H, W]` (ppm, one channel per
    /// orientation, in the order of `ops`) and a 0/1 mask `[N, 1, D, H, W]`.
    pub fn forward_t(
        &self,
        fields: &Tensor,
        ops: &DipoleSet,
        mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.run(fields, None, ops, mask, train, None)
    }

    /// Inference with the prox applied in overlapping tiles (the data term stays global);
    /// the result matches [`Self::forward_t`] when the tiling's margin is at least
    /// [`Self::prox_radius`].
    pub fn infer_tiled(
        &self,
        fields: &Tensor,
        ops: &DipoleSet,
        mask: &Tensor,
        tiling: &Tiling,
    ) -> Result<Tensor> {
        let (_, _, d, h, w) = mask.dims5()?;
        let plan = Plan::tiled(needed_voxels(mask)?, [d, h, w], *tiling);
        self.run(fields, None, ops, mask, false, Some(&plan))
    }

    /// Inference with the prox's activations bounded by `max_bytes`: the prox runs only
    /// over the mask's bounding box grown by [`Self::prox_radius`] (nothing farther reaches
    /// a mask voxel, and the result is masked), in tiles when that box does not fit. The
    /// result matches [`Self::forward_t`] within rounding.
    pub fn infer(
        &self,
        fields: &Tensor,
        ops: &DipoleSet,
        mask: &Tensor,
        max_bytes: usize,
    ) -> Result<Tensor> {
        self.infer_planned(fields, None, ops, mask, max_bytes)
    }

    /// [`Self::infer`] from a given start `x₀` `[N, 1, D, H, W]` in place of the configured
    /// warm start: e.g. SS-TV's map when the pipeline has the total field, which keeps the
    /// harmonic part that background removal loses.
    pub fn infer_from(
        &self,
        fields: &Tensor,
        start: &Tensor,
        ops: &DipoleSet,
        mask: &Tensor,
        max_bytes: usize,
    ) -> Result<Tensor> {
        self.infer_planned(fields, Some(start), ops, mask, max_bytes)
    }

    fn infer_planned(
        &self,
        fields: &Tensor,
        start: Option<&Tensor>,
        ops: &DipoleSet,
        mask: &Tensor,
        max_bytes: usize,
    ) -> Result<Tensor> {
        let (n, _, d, h, w) = mask.dims5()?;
        let plan = Plan::within_budget(
            &needed_voxels(mask)?,
            [d, h, w],
            self.prox_radius(),
            self.prox_bytes_per_voxel(fields.device()),
            max_bytes,
            1,
        );
        match plan {
            Some(plan) => self.run(fields, start, ops, mask, false, Some(&plan)),
            // No mask voxel: χ is zero everywhere.
            None => Tensor::zeros((n, 1, d, h, w), fields.dtype(), fields.device()),
        }
    }

    /// Receptive-field radius of the prox in voxels (one per 3³ convolution).
    pub fn prox_radius(&self) -> usize {
        1 + 2 * self.cfg.blocks
    }

    /// Approximate activation memory of the prox at inference, per voxel: a few C-channel
    /// f32 tensors are alive at once; on CUDA a convolution also holds Candle's im2col
    /// buffer of one depth tap (9·C values) and its partial sums (see [`super::conv3d`]).
    pub fn prox_bytes_per_voxel(&self, dev: &candle_core::Device) -> usize {
        let alive = if dev.is_cuda() { 4 + 9 + 4 } else { 4 };
        4 * alive * self.cfg.channels
    }

    fn run(
        &self,
        fields: &Tensor,
        start: Option<&Tensor>,
        ops: &DipoleSet,
        mask: &Tensor,
        train: bool,
        plan: Option<&Plan>,
    ) -> Result<Tensor> {
        // The normalisation is data, not a trained parameter.
        let (mean, std) = (self.mean.detach(), self.std.detach());
        let net = |z: &Tensor| self.prox.forward_t(z, train);
        let prox = |v: &Tensor| -> Result<Tensor> {
            let mut z = v.broadcast_sub(&mean)?.broadcast_div(&std)?;
            if let Some(c) = self.cfg.prox_input_limit {
                z = z.clamp(-c, c)?;
            }
            // Outside a plan's region the mask is zero, so any value does.
            let mut out = match plan {
                None => net(&z)?,
                Some(p) => p.apply(&z, &net)?,
            };
            if self.cfg.zero_mean_correction {
                out = (&out - masked_mean(&out, mask)?.broadcast_mul(mask)?)?;
            }
            v + out.broadcast_mul(&std)?
        };
        let x0 = match start {
            Some(x0) => x0.detach(),
            None => self.warm_start(fields, ops, mask)?,
        };
        self.iterate(x0, fields, ops, mask, &prox)
    }

    /// `x₀`: the configured classic solution of all orientations. Data only: no gradient
    /// flows through it.
    pub fn warm_start(&self, fields: &Tensor, ops: &DipoleSet, mask: &Tensor) -> Result<Tensor> {
        match self.cfg.warm_start {
            WarmStart::Tkd => ops.tkd(fields, self.cfg.warm_start_threshold as f32),
            WarmStart::Tv => ops.tv(fields, mask, self.cfg.warm_start_lambda),
        }
    }

    /// The unrolled iterations with any prox (the trained one in [`Self::forward_t`]).
    pub fn unrolled(
        &self,
        fields: &Tensor,
        ops: &DipoleSet,
        mask: &Tensor,
        prox: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.iterate(self.warm_start(fields, ops, mask)?, fields, ops, mask, prox)
    }

    fn iterate(
        &self,
        x0: Tensor,
        fields: &Tensor,
        ops: &DipoleSet,
        mask: &Tensor,
        prox: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        // The mean over orientations keeps α's stability limit independent of N.
        let step = (self.alpha()? / ops.len() as f64)?;
        let aty = ops.adjoint(fields)?;
        let mut x = (x0 * mask)?;
        for _ in 0..self.cfg.iterations {
            let grad = (ops.adjoint(&ops.forward(&x)?)? - &aty)?;
            let v = (x - grad.broadcast_mul(&step)?)?;
            x = (prox(&(v * mask)?)? * mask)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{random_tensor, values};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn tiny() -> Config {
        Config {
            channels: 4,
            blocks: 1,
            ..Config::default()
        }
    }

    fn directions(n: usize) -> Vec<[f64; 3]> {
        // Tilts up to ≈ 35°, as in head-rotation studies.
        let all: [[f64; 3]; 8] = [
            [0.0, 0.0, 1.0],
            [0.3, 0.0, 0.954],
            [0.0, 0.3, 0.954],
            [-0.2, 0.2, 0.959],
            [0.5, 0.1, 0.86],
            [-0.4, -0.3, 0.866],
            [0.1, -0.55, 0.829],
            [-0.35, 0.45, 0.822],
        ];
        all[..n]
            .iter()
            .map(|v| {
                let r = v.iter().map(|a| a * a).sum::<f64>().sqrt();
                v.map(|a| a / r)
            })
            .collect()
    }

    #[test]
    fn published_configuration_has_446k_parameters() {
        let vm = VarMap::new();
        LpCnn::new(
            &Config::default(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        // Trainable: convolutions, BN affine, α (running stats and μ, σ are buffers).
        let n: usize = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.contains("running_") && !k.starts_with("norm."))
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum();
        assert!((440_000..452_000).contains(&n), "{n} parameters");
    }

    #[test]
    fn runs_with_one_two_and_four_orientations_on_the_same_weights() {
        let vm = VarMap::new();
        let net = LpCnn::new(
            &tiny(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let (nx, ny, nz) = (8, 6, 4);
        let mask = Tensor::ones((1, 1, nz, ny, nx), DType::F32, &Device::Cpu)
            .unwrap()
            .pad_with_zeros(4, 1, 1)
            .unwrap();
        for n in [1, 2, 4] {
            let ops = DipoleSet::new([nx + 2, ny, nz], [1.0; 3], &directions(n));
            let y = random_tensor((1, n, nz, ny, nx + 2), n as u64);
            let chi = net.forward_t(&y, &ops, &mask, false).unwrap();
            assert_eq!(chi.dims(), &[1, 1, nz, ny, nx + 2]);
            let (c, m) = (values(&chi), values(&mask));
            assert!(c.iter().all(|v| v.is_finite()));
            assert!(c.iter().zip(&m).all(|(c, m)| *m == 1.0 || *c == 0.0));
            assert!(c.iter().any(|&v| v != 0.0));
        }
        // A wrong number of orientations for the operators is an error.
        let ops = DipoleSet::new([nx + 2, ny, nz], [1.0; 3], &directions(2));
        let y = random_tensor((1, 3, nz, ny, nx + 2), 9);
        assert!(net.forward_t(&y, &ops, &mask, false).is_err());
    }

    /// With an identity prox and a full mask each iteration is a gradient step on
    /// `½ mean_i ‖Dᵢ x − yᵢ‖²`. Its Lipschitz constant is at most 4/9 for any number of
    /// orientations, so with α as large as the parametrisation allows (just under 4.5) the
    /// residual falls at every iteration for 1, 2, 4 and 8 orientations. The same step on the
    /// paper's summed data term (gain up to N·4/9·α) grows without bound from 2 orientations
    /// on, which this test also checks, so it can tell the two apart.
    #[test]
    fn gradient_steps_are_stable_for_any_number_of_orientations() {
        let dims = [8, 8, 8];
        let mask = Tensor::ones((1, 1, 8, 8, 8), DType::F32, &Device::Cpu).unwrap();
        for n in [1, 2, 4, 8] {
            let ops = DipoleSet::new(dims, [1.0; 3], &directions(n));
            // Consistent fields from a random χ (so the residual can fall towards zero).
            let chi = random_tensor((1, 1, 8, 8, 8), 11 + n as u64);
            let y = ops.forward(&chi).unwrap();
            let residual = |x: &Tensor| -> f32 {
                let r = (ops.forward(x).unwrap() - &y).unwrap();
                r.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap()
            };
            let cfg = Config {
                iterations: 1,
                alpha_init: 0.999 * ALPHA_MAX,
                ..tiny()
            };
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            let net = LpCnn::new(&cfg, vb).unwrap();
            let alpha: f32 = net.alpha().unwrap().to_vec1().unwrap()[0];
            assert!(
                (alpha - 0.999 * ALPHA_MAX as f32).abs() < 1e-3,
                "α = {alpha}"
            );
            // From x = 0 (not the warm start) so that there is a residual to reduce.
            let step = alpha / n as f32;
            let aty = ops.adjoint(&y).unwrap();
            let gd = |x: &Tensor, step: f32| -> Tensor {
                let g = (ops.adjoint(&ops.forward(x).unwrap()).unwrap() - &aty).unwrap();
                (x - (g * step as f64).unwrap()).unwrap()
            };
            let mut x = mask.zeros_like().unwrap();
            let start = residual(&x);
            let mut last = start;
            for k in 0..30 {
                x = gd(&x, step);
                let r = residual(&x);
                assert!(
                    r <= last * 1.000_01,
                    "{n} orientations, step {k}: {r} > {last}"
                );
                last = r;
            }
            assert!(last < 0.5 * start, "{n} orientations: {last} from {start}");
            // LP-CNN's own iteration with an identity prox is this same step.
            let once = net.unrolled(&y, &ops, &mask, &|v| Ok(v.clone())).unwrap();
            let warm = ops.tkd(&y, cfg.warm_start_threshold as f32).unwrap();
            let want = values(&gd(&warm, step));
            for (a, b) in values(&once).iter().zip(&want) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
            // The summed data term with the same α diverges from two orientations on.
            if n >= 2 {
                let mut x = mask.zeros_like().unwrap();
                for _ in 0..30 {
                    x = gd(&x, alpha);
                }
                assert!(residual(&x) > 10.0 * start, "{n} orientations summed");
            }
        }
    }

    /// With `zero_mean_correction`, each prox application leaves the mean over each
    /// sample's mask unchanged (no gradient step: α → 0), whatever the network's weights.
    #[test]
    fn zero_mean_correction_keeps_each_samples_mean_in_its_mask() {
        let cfg = Config {
            zero_mean_correction: true,
            alpha_init: 1e-9,
            ..tiny()
        };
        let vm = VarMap::new();
        let net = LpCnn::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        randomise_head(&vm);
        let ops = DipoleSet::new([10, 8, 6], [1.0; 3], &directions(1));
        let y = random_tensor((2, 1, 6, 8, 10), 11);
        let mask = random_tensor((2, 1, 6, 8, 10), 12)
            .ge(-0.5)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let x0 = (net.warm_start(&y, &ops, &mask).unwrap() * &mask).unwrap();
        let x = net.forward_t(&y, &ops, &mask, false).unwrap();
        let (m0, m) = (
            values(&masked_mean(&x0, &mask).unwrap()),
            values(&masked_mean(&x, &mask).unwrap()),
        );
        for (a, b) in m0.iter().zip(&m) {
            assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
        // The network did change the map.
        let d: f32 = values(&(x - x0).unwrap()).iter().map(|v| v.abs()).sum();
        assert!(d > 1e-3, "{d}");
    }

    /// With `prox_input_limit`, the prox's correction of a voxel far beyond the limit is
    /// that of a voxel at the limit: a strong source passes through the residual path.
    #[test]
    fn prox_input_limit_bounds_the_correction_of_strong_sources() {
        let cfg = Config {
            prox_input_limit: Some(3.0),
            alpha_init: 1e-9,
            iterations: 1,
            ..tiny()
        };
        let vm = VarMap::new();
        let net = LpCnn::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        randomise_head(&vm);
        let ops = DipoleSet::new([10, 8, 6], [1.0; 3], &directions(1));
        let mask = Tensor::ones((1, 1, 6, 8, 10), DType::F32, &Device::Cpu).unwrap();
        // Fields whose TKD is far above 3 σ (σ = 1 before training) everywhere.
        let correction = |scale: f64| {
            let y = (Tensor::ones((1, 1, 6, 8, 10), DType::F32, &Device::Cpu).unwrap() * scale)
                .unwrap();
            let x0 = net.warm_start(&y, &ops, &mask).unwrap();
            values(&(net.forward_t(&y, &ops, &mask, false).unwrap() - x0).unwrap())
        };
        let (a, b) = (correction(10.0), correction(100.0));
        assert!(a.iter().any(|v| v.abs() > 1e-3));
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
        }
        assert!(LpCnn::new(
            &Config {
                prox_input_limit: Some(0.0),
                ..tiny()
            },
            VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu)
        )
        .is_err());
    }

    /// `infer_from` with the configured warm start as the given start is `infer`; another
    /// start changes the result.
    #[test]
    fn infer_from_a_given_start() {
        let dims = [12, 12, 12];
        let ops = DipoleSet::new(dims, [1.0; 3], &directions(1));
        let vm = VarMap::new();
        let net = LpCnn::new(
            &tiny(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let y = random_tensor((1, 1, 12, 12, 12), 5);
        let mask = Tensor::ones((1, 1, 12, 12, 12), DType::F32, &Device::Cpu).unwrap();
        let budget = usize::MAX / 2;
        let x0 = net.warm_start(&y, &ops, &mask).unwrap();
        let want = values(&net.infer(&y, &ops, &mask, budget).unwrap());
        let got = values(&net.infer_from(&y, &x0, &ops, &mask, budget).unwrap());
        assert_eq!(got, want);
        let other = values(
            &net.infer_from(&y, &(x0 * 2.0).unwrap(), &ops, &mask, budget)
                .unwrap(),
        );
        assert!(other.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-4));
    }

    /// With `warm_start: tv`, x₀ is chimap's TV-ADMM of each batch item inside its own mask,
    /// so an untrained model starts from TV's map: on a test brain it is the classic TV
    /// solution value for value, and far better than the TKD warm start.
    #[test]
    fn tv_warm_start_is_tv_admm_of_each_volume() {
        use crate::inversion::testing::{brain, fields, nrmse_demeaned, problem};
        use crate::inversion::{tv, Method};
        let dims = [48, 48, 48];
        let (chi, mask) = brain();
        let b0 = [[0.0, 0.26, 0.966]];
        let f = fields(&chi, &mask, dims, &b0, 0.004, 3);
        let want = tv::TvAdmm::new(tv::Config::default())
            .invert(&problem(dims, &f, &b0, &mask))
            .unwrap();
        let ops = DipoleSet::new(dims, [1.0; 3], &b0);
        let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), (1, 1, 48, 48, 48), &Device::Cpu);
        let m: Vec<f32> = mask.iter().map(|&m| m as u8 as f32).collect();
        // Two batch items: the field and its negative (χ flips sign with it).
        let y = Tensor::cat(&[t(&f[0]).unwrap(), t(&f[0]).unwrap().neg().unwrap()], 0).unwrap();
        let mk = Tensor::cat(&[t(&m).unwrap(), t(&m).unwrap()], 0).unwrap();
        let cfg = Config {
            warm_start: WarmStart::Tv,
            ..tiny()
        };
        let vm = VarMap::new();
        let net = LpCnn::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let x0 = values(&net.warm_start(&y, &ops, &mk).unwrap());
        let (a, b) = x0.split_at(want.len());
        for ((&a, &b), &w) in a.iter().zip(b).zip(&want) {
            assert!((a - w).abs() <= 1e-5 * (1.0 + w.abs()), "{a} vs {w}");
            assert!((b + w).abs() <= 1e-5 * (1.0 + w.abs()), "{b} vs {}", -w);
        }
        let tkd = values(&ops.tkd(&y, cfg.warm_start_threshold as f32).unwrap());
        let (e_tv, e_tkd) = (
            nrmse_demeaned(a, &chi, &mask),
            nrmse_demeaned(&tkd[..want.len()], &chi, &mask),
        );
        assert!(e_tv < 0.8 * e_tkd, "TV {e_tv} vs TKD {e_tkd}");
    }

    /// An untrained LP-CNN (its prox's last layer is zero) is the warm start plus K gradient
    /// steps, and the warm start is the TKD of the fields: a useful map before any training.
    #[test]
    fn untrained_model_is_tkd_plus_gradient_steps() {
        let vm = VarMap::new();
        let net = LpCnn::new(
            &tiny(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let ops = DipoleSet::new([10, 8, 6], [1.0; 3], &directions(2));
        let y = random_tensor((1, 2, 6, 8, 10), 7);
        let mask = Tensor::ones((1, 1, 6, 8, 10), DType::F32, &Device::Cpu).unwrap();
        let got = values(&net.forward_t(&y, &ops, &mask, false).unwrap());
        let want = values(&net.unrolled(&y, &ops, &mask, &|v| Ok(v.clone())).unwrap());
        assert_eq!(got, want);
        // The warm start is Σ D̃ᵢ Yᵢ / Σ D̃ᵢ²; checked at DC, where D = 0 is truncated to t for
        // both fields: χ's mean is (mean y₁ + mean y₂) / (2t).
        let tkd = values(&ops.tkd(&y, 0.15).unwrap());
        let mean_tkd = tkd.iter().sum::<f32>() / tkd.len() as f32;
        let mean_y = values(&y).iter().sum::<f32>() / tkd.len() as f32;
        assert!(
            (mean_tkd - mean_y / 0.3).abs() < 1e-4 * (1.0 + mean_tkd.abs()),
            "{mean_tkd} vs {}",
            mean_y / 0.3
        );
    }

    /// Gives the zero-initialised last layer random values, so the network's part shows.
    fn randomise_head(vm: &VarMap) {
        let data = vm.data().lock().unwrap();
        let w = &data["prox.head.2.weight"];
        w.set(&random_tensor(w.shape().clone(), 17)).unwrap();
    }

    #[test]
    fn tiled_inference_matches_whole_volume_inference() {
        let vm = VarMap::new();
        let net = LpCnn::new(
            &tiny(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        randomise_head(&vm);
        let ops = DipoleSet::new([14, 10, 12], [1.0; 3], &directions(2));
        let y = random_tensor((1, 2, 12, 10, 14), 5);
        let mask = Tensor::ones((1, 1, 12, 10, 14), DType::F32, &Device::Cpu).unwrap();
        let whole = values(&net.forward_t(&y, &ops, &mask, false).unwrap());
        let tiling = Tiling {
            tile: [8, 8, 8],
            margin: net.prox_radius(),
            blend: 2,
        };
        let tiled = values(&net.infer_tiled(&y, &ops, &mask, &tiling).unwrap());
        let scale = whole.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (a, b) in tiled.iter().zip(&whole) {
            assert!((a - b).abs() < 1e-4 * scale, "{a} vs {b}");
        }

        // Under a budget: cropped to the mask's reach (and tiled when it does not fit).
        let ball: Vec<f32> = (0..12 * 10 * 14)
            .map(|v| {
                let (x, y, z) = ((v % 14) as f32, ((v / 14) % 10) as f32, (v / 140) as f32);
                ((x - 9.0).powi(2) + (y - 6.0).powi(2) + (z - 7.0).powi(2) < 6.0) as u8 as f32
            })
            .collect();
        let ball = Tensor::from_vec(ball, (1, 1, 12, 10, 14), &Device::Cpu).unwrap();
        let whole = values(&net.forward_t(&y, &ops, &ball, false).unwrap());
        let per_voxel = net.prox_bytes_per_voxel(&Device::Cpu);
        for budget in [per_voxel * 100_000, per_voxel * 600] {
            let got = values(&net.infer(&y, &ops, &ball, budget).unwrap());
            for (a, b) in got.iter().zip(&whole) {
                assert!((a - b).abs() < 1e-4 * scale, "budget {budget}: {a} vs {b}");
            }
        }
        let empty = ball.zeros_like().unwrap();
        let none = values(&net.infer(&y, &ops, &empty, per_voxel * 600).unwrap());
        assert!(none.iter().all(|&v| v == 0.0));

        // With a mask in one half, the tiles that only cover the other half are skipped and
        // the result is unchanged.
        let half: Vec<f32> = (0..12 * 10 * 14)
            .map(|v| ((v % 14) < 5) as u8 as f32)
            .collect();
        let mask = Tensor::from_vec(half, (1, 1, 12, 10, 14), &Device::Cpu).unwrap();
        let whole = values(&net.forward_t(&y, &ops, &mask, false).unwrap());
        let tiled = values(&net.infer_tiled(&y, &ops, &mask, &tiling).unwrap());
        for (a, b) in tiled.iter().zip(&whole) {
            assert!((a - b).abs() < 1e-4 * scale, "{a} vs {b}");
        }
    }

    /// The fused inference path (BN folded into the convolutions) against the plain ops.
    #[test]
    fn folded_inference_matches_the_layer_by_layer_computation() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let block = ResBlock::new(4, 0.5, &DropoutRng::new(1), vb.pp("b")).unwrap();
        // Non-trivial running statistics and affine parameters.
        {
            let data = vm.data().lock().unwrap();
            for (i, name) in ["running_mean", "running_var", "weight", "bias"]
                .iter()
                .enumerate()
            {
                for bn in ["bn1", "bn2"] {
                    let v =
                        (random_tensor(4, 20 + i as u64) + if i == 1 { 1.0 } else { 0.0 }).unwrap();
                    data[&format!("b.{bn}.{name}")].set(&v).unwrap();
                }
            }
        }
        let x = random_tensor((1, 4, 5, 6, 7), 3);
        let got = values(&block.forward_t(&x, false).unwrap());
        let h = block
            .bn1
            .forward_t(&block.conv1.forward(&x).unwrap(), false)
            .unwrap();
        let h = block.conv2.forward(&h.relu().unwrap()).unwrap();
        let h = block.bn2.forward_t(&h, false).unwrap();
        let want = values(&(h + &x).unwrap().relu().unwrap());
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn weights_round_trip_through_safetensors_and_mismatches_name_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lpcnn.safetensors");
        let vm = VarMap::new();
        let net = LpCnn::new(
            &tiny(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        randomise_head(&vm);
        vm.save(&path).unwrap();
        let loaded =
            crate::nn::weights::build(&path, "LP-CNN", &Device::Cpu, |vb| LpCnn::new(&tiny(), vb))
                .unwrap();
        let ops = DipoleSet::new([6, 6, 6], [1.0; 3], &directions(1));
        let y = random_tensor((1, 1, 6, 6, 6), 3);
        let mask = Tensor::ones((1, 1, 6, 6, 6), DType::F32, &Device::Cpu).unwrap();
        let a = values(&net.forward_t(&y, &ops, &mask, false).unwrap());
        let b = values(&loaded.forward_t(&y, &ops, &mask, false).unwrap());
        assert_eq!(a, b);
        // A file for 4 channels read as the published 32-channel model.
        let err = crate::nn::weights::build(&path, "LP-CNN", &Device::Cpu, |vb| {
            LpCnn::new(&Config::default(), vb)
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("lpcnn.safetensors") && err.contains("prox."),
            "{err}"
        );
    }
}
