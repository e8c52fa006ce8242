//! The training loop's state: the model's variables, the optimiser, and the batch counter.
//!
//! Batches are a pure function of (seed, step) ([`super::synth`]), initial weights a pure
//! function of the seed ([`super::init`]), and a checkpoint holds the variables, the Adam
//! moments, the step and the state of LP-CNN's dropout generator: so a run resumed from a
//! checkpoint continues exactly as the uninterrupted run would have.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use super::adam::Adam;
use super::config::{Loss, ModelKind, TrainConfig};
use super::init::seeded_var_builder;
use super::synth::{Batch, Stream, Synth};
use crate::evaluate::metrics::{nrmse_demeaned, Reference};
use crate::nn::dipole::DipoleSet;
use crate::nn::loopnet::{LoopNet, Start};
use crate::nn::lpcnn::{LpCnn, WarmStart};
use crate::nn::{masked_mean, tensor_dims, weights};
use crate::simulate::rng::Rng;
use crate::{Error, Result};

use weights::{
    CPU_SECONDS_KEY, GROWN_FROM_KEY, STEP_KEY, TRAIN_CONFIG_KEY, VERSION_KEY, WALL_SECONDS_KEY,
};
/// State of LP-CNN's dropout generator, so a resumed run draws the same masks.
const DROPOUT_KEY: &str = "chimap.train.dropout_rng";
/// Stream of the seed that starts the dropout generator (batches use 1 and 2).
const DROPOUT_STREAM: u64 = 3;

/// The network being trained.
enum Net {
    Lp(LpCnn),
    Loop(LoopNet),
}

/// Validation scores averaged over the validation samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Validation {
    /// Masked MSE, ppm².
    pub loss: f64,
    /// Demeaned NRMSE, HFEN (percent) and SSIM of `crate::evaluate`.
    pub nrmse: f64,
    pub hfen: f64,
    pub ssim: f64,
}

pub struct Trainer {
    kind: ModelKind,
    cfg: TrainConfig,
    vm: VarMap,
    net: Net,
    adam: Adam,
    synth: Synth,
    step: u64,
    /// Where the variables live and the batches are computed.
    device: Device,
    /// Wall and CPU seconds spent training so far, when the caller measured them.
    clock: Option<(f64, f64)>,
    /// Factor on the scheduled learning rate (1 unless the caller anneals over a budget).
    lr_scale: f64,
    /// The U-net this LoopNet started as ([`Trainer::grow`]), for the weights' provenance.
    grown_from: Option<String>,
}

/// The loss of χ `x` against `target` inside `mask` (all `[N, 1, D, H, W]`), as [`Loss`]
/// describes: for `Mse` and `Demeaned` the squared error summed over the masks over their
/// total voxel count, for `Nrmse` the mean over samples of their squared demeaned NRMSE.
fn masked_loss(
    x: &Tensor,
    target: &Tensor,
    mask: &Tensor,
    loss: Loss,
) -> candle_core::Result<Tensor> {
    // Each sample's values minus their mean in its mask, zero outside.
    let demean = |v: &Tensor| -> candle_core::Result<Tensor> {
        (v * mask)? - masked_mean(v, mask)?.broadcast_mul(mask)?
    };
    let r = (x - target)?;
    match loss {
        Loss::Mse | Loss::Demeaned => {
            let inside = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
            let r = if loss == Loss::Mse {
                (r * mask)?
            } else {
                demean(&r)?
            };
            r.sqr()?.sum_all()? / inside
        }
        Loss::Nrmse => {
            let energy = demean(target)?.sqr()?.sum_keepdim((2, 3, 4))?;
            // A flat target has no contrast to score against: a floor keeps it finite.
            let floor = (energy.mean_all()?.to_scalar::<f32>()? as f64 * 1e-3).max(1e-12);
            let ratio = demean(&r)?
                .sqr()?
                .sum_keepdim((2, 3, 4))?
                .div(&energy.clamp(floor, f64::INFINITY)?)?;
            ratio.mean_all()
        }
    }
}

/// LP-CNN's dipole operators for a batch's grid and B0 directions.
/// A prediction of χ for a batch, for [`Trainer::score`].
type Predict<'a> = Box<dyn Fn(&Batch) -> candle_core::Result<Tensor> + 'a>;

fn operators(b: &Batch) -> DipoleSet {
    DipoleSet::new(b.dims, b.voxel_size, &b.b0)
}

/// A U-net tensor `v` widened to the LoopNet's `dims`: conv weights `[out, in, ...]` gain
/// the reverse connection's inputs, which come last, as zeros (or, with `fill_mean`, as
/// the tensor's mean); other tensors are unchanged.
fn widened(v: &Tensor, dims: &[usize], fill_mean: bool) -> candle_core::Result<Tensor> {
    let s = v.dims();
    if !(s.len() == 5 && dims.len() == 5 && s[0] == dims[0] && s[1] < dims[1]) {
        return Ok(v.clone());
    }
    let mut shape = s.to_vec();
    shape[1] = dims[1] - s[1];
    let fill = if fill_mean {
        v.mean_all()?.to_scalar::<f32>()?
    } else {
        0.0
    };
    let extra = Tensor::full(fill, shape, v.device())?;
    Tensor::cat(&[v, &extra], 1)
}

/// The U-net's name for a LoopNet variable: per-loop norm sets (`bn1.<t>.`) share the
/// U-net's one set (`bn1.`).
fn unet_variable(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    parts
        .iter()
        .enumerate()
        .filter(|&(i, p)| {
            let per_loop = i > 0
                && matches!(parts[i - 1], "bn1" | "bn2")
                && p.chars().all(|c| c.is_ascii_digit());
            !per_loop
        })
        .map(|(_, p)| *p)
        .collect::<Vec<_>>()
        .join(".")
}

fn nn_err(e: candle_core::Error) -> Error {
    Error::Numerics(format!("training: {e}"))
}

impl Trainer {
    /// A fresh run: seeded initial weights; for LP-CNN, the z-score statistics of the
    /// training targets.
    /// The model lives on `device` (`chimap train --device`).
    pub fn new(kind: ModelKind, cfg: &TrainConfig, device: &Device) -> Result<Self> {
        if kind != ModelKind::Lpcnn && cfg.data.orientations != 1 {
            return Err(Error::Config(format!(
                "{} is a single-orientation model; set data.orientations to 1",
                kind.as_str()
            )));
        }
        let synth = Synth::new(&cfg.data, cfg.seed)?;
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, cfg.seed, device);
        let net = match kind {
            ModelKind::Lpcnn => Net::Lp(LpCnn::new(&cfg.model.lpcnn, vb).map_err(nn_err)?),
            ModelKind::Loopnet => Net::Loop(LoopNet::new(&cfg.model.loopnet, vb).map_err(nn_err)?),
            ModelKind::Unet => Net::Loop(LoopNet::new(&cfg.model.unet, vb).map_err(nn_err)?),
        };
        if let Net::Lp(lp) = &net {
            lp.dropout_rng()
                .set_state(Rng::derived(cfg.seed, &[DROPOUT_STREAM]).state());
        }
        let adam = Adam::new(&vm, &cfg.optimizer).map_err(nn_err)?;
        let t = Trainer {
            kind,
            cfg: cfg.clone(),
            vm,
            net,
            adam,
            synth,
            step: 0,
            device: device.clone(),
            clock: None,
            lr_scale: 1.0,
            grown_from: None,
        };
        if kind == ModelKind::Lpcnn {
            let (mean, std) = t.target_statistics();
            t.set_var("norm.mean", mean)?;
            t.set_var("norm.std", std)?;
        }
        Ok(t)
    }

    /// Continues the run saved in `checkpoint`; `cfg` (when given) replaces the saved
    /// configuration, e.g. to train for more epochs.
    pub fn resume(
        checkpoint: &Path,
        kind: Option<ModelKind>,
        cfg: Option<&TrainConfig>,
        device: &Device,
    ) -> Result<Self> {
        let (tensors, meta) = weights::read(checkpoint)?;
        let bad = |msg: String| Error::input(checkpoint, msg);
        let (Some(model), Some(step), Some(saved)) = (
            meta.get(weights::MODEL_KEY),
            meta.get(STEP_KEY),
            meta.get(TRAIN_CONFIG_KEY),
        ) else {
            return Err(bad(
                "not a chimap training checkpoint (no model, step or config in its metadata); \
                 pass a checkpoint.safetensors written by `chimap train`"
                    .into(),
            ));
        };
        let saved_kind = ModelKind::parse(model)
            .ok_or_else(|| bad(format!("unknown model {model:?} in the metadata")))?;
        if let Some(k) = kind.filter(|&k| k != saved_kind) {
            return Err(bad(format!(
                "holds a {model} run, not {}; pass --model {model} or another checkpoint",
                k.as_str()
            )));
        }
        let step: u64 = step
            .parse()
            .map_err(|_| bad(format!("step {step:?} is not a number")))?;
        let cfg = match cfg {
            Some(c) => c.clone(),
            None => TrainConfig::from_yaml(saved).map_err(|e| bad(e.to_string()))?,
        };
        let mut t = Trainer::new(saved_kind, &cfg, device)?;
        // The checkpoint is read on the host; the run continues on `device`.
        let tensors: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(device)?)))
            .collect::<candle_core::Result<_>>()
            .map_err(nn_err)?;
        {
            let data = t.vm.data().lock().expect("var map lock");
            for (name, var) in data.iter() {
                let v = tensors.get(name).ok_or_else(|| {
                    bad(format!(
                        "lacks the variable {name}; is it from another configuration?"
                    ))
                })?;
                var.set(v).map_err(|e| bad(format!("{name}: {e}")))?;
            }
        }
        t.adam
            .restore(&tensors, step)
            .map_err(|e| bad(e.to_string()))?;
        t.step = step;
        t.grown_from = meta.get(GROWN_FROM_KEY).cloned();
        if let Net::Lp(lp) = &t.net {
            match meta.get(DROPOUT_KEY) {
                Some(state) => {
                    let state = state
                        .parse()
                        .map_err(|_| bad(format!("dropout state {state:?} is not a number")))?;
                    lp.dropout_rng().set_state(state);
                }
                None if t.cfg.model.lpcnn.dropout > 0.0 => {
                    return Err(bad(
                        "lacks the dropout generator's state (written by an older \
                                    chimap); resume with model.lpcnn.dropout: 0 or start anew"
                            .into(),
                    ));
                }
                None => {}
            }
        }
        Ok(t)
    }

    /// A LoopNet run that starts as the trained U-net in `source` (its weights or a
    /// checkpoint), so that LoopNet's training time adds to the U-net's rather than
    /// repeating it. With one loop and no GHPA a LoopNet is that U-net, so: every loop gets
    /// the U-net's convolutions and (with `norm_per_loop`) its norms; the extracting path's
    /// inputs from the reverse connections get zero weights. The grown net then returns
    /// the U-net's χ exactly and learns to use the reverse connections from there.
    /// The step (hence the schedule and the batches), the training clock and the
    /// provenance continue the U-net's. From a checkpoint Adam continues too (a fresh Adam
    /// moves every converged weight by about the learning rate in its first steps): the new
    /// weights' first moments start at zero and their second moments at their tensor's
    /// mean. From a weights file, which has no moments, Adam starts afresh.
    pub fn grow(source: &Path, cfg: &TrainConfig, device: &Device) -> Result<Self> {
        // Read once: the recorded sha256 is that of the tensors loaded.
        let unet_file = weights::Weights::open(source)?;
        let meta = unet_file.metadata()?;
        let tensors = unet_file.tensors()?;
        let bad = |msg: String| Error::input(source, msg);
        match meta.get(weights::MODEL_KEY).map(String::as_str) {
            Some("unet") => {}
            other => {
                let held = other.map_or("no chimap model".to_string(), |m| format!("a {m}"));
                return Err(bad(format!(
                    "holds {held}, not a U-net; --grow-from takes the weights or checkpoint \
                     of `chimap train --model unet`"
                )));
            }
        }
        let unet: crate::nn::loopnet::Config = weights::architecture(source, &meta)?
            .ok_or_else(|| bad("lacks the U-net's configuration in its metadata".into()))?;
        let target = &cfg.model.loopnet;
        if unet.channels != target.channels || unet.start != target.start {
            return Err(bad(format!(
                "is a U-net of channels {:?} starting from {:?}; model.loopnet has {:?} from \
                 {:?}: set model.loopnet.channels and start to the U-net's",
                unet.channels, unet.start, target.channels, target.start
            )));
        }
        let made = weights::Provenance::from_metadata(&meta);
        let step = made.steps.unwrap_or(0);
        let mut t = Trainer::new(ModelKind::Loopnet, cfg, device)?;
        let mut moments = HashMap::new();
        {
            let data = t.vm.data().lock().expect("var map lock");
            for (name, var) in data.iter() {
                let from = unet_variable(name);
                let v = tensors.get(&from).ok_or_else(|| {
                    bad(format!(
                        "has no {from} for the LoopNet's {name}: only a LoopNet without GHPA \
                         and loop fusion can start as a U-net"
                    ))
                })?;
                let widen = |v: &Tensor, fill: bool| {
                    widened(v, var.dims(), fill).and_then(|v| v.to_device(device))
                };
                var.set(&widen(v, false).map_err(nn_err)?)
                    .map_err(|e| bad(format!("{from} → {name}: {e}")))?;
                if !super::adam::is_trainable(name) {
                    continue;
                }
                let (m, v) = (format!("adam.m.{from}"), format!("adam.v.{from}"));
                if let (Some(m), Some(v)) = (tensors.get(&m), tensors.get(&v)) {
                    moments.insert(format!("adam.m.{name}"), widen(m, false).map_err(nn_err)?);
                    moments.insert(format!("adam.v.{name}"), widen(v, true).map_err(nn_err)?);
                }
            }
        }
        // A weights file has no moments: Adam starts afresh there.
        if !moments.is_empty() {
            t.adam
                .restore(&moments, step)
                .map_err(|e| bad(format!("its Adam moments: {e}")))?;
        }
        t.step = step;
        if let Some(wall) = made.wall_seconds {
            t.clock = Some((wall, made.cpu_seconds.unwrap_or(f64::NAN)));
        }
        let file = source.file_name().unwrap_or_default().to_string_lossy();
        t.grown_from = Some(format!(
            "unet {} at step {} (sha256 {})",
            file,
            t.step,
            unet_file.sha256()
        ));
        Ok(t)
    }

    /// Wall and CPU seconds of training so far, as last recorded (a grown run starts with
    /// its U-net's).
    pub fn clock(&self) -> Option<(f64, f64)> {
        self.clock
    }

    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The learning rate of the next step: the schedule's for this epoch times the scale.
    pub fn learning_rate(&self) -> f64 {
        self.cfg.learning_rate(self.epoch()) * self.lr_scale
    }

    /// Multiplies the scheduled learning rate by `scale` (in [0, 1]) from the next step on;
    /// not saved in checkpoints, since it follows the caller's budget, not the run.
    pub fn set_lr_scale(&mut self, scale: f64) {
        self.lr_scale = scale.clamp(0.0, 1.0);
    }

    /// Optimiser steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn total_steps(&self) -> u64 {
        (self.cfg.epochs * self.cfg.steps_per_epoch) as u64
    }

    /// The epoch (0-based) the next step belongs to.
    pub fn epoch(&self) -> usize {
        (self.step / self.cfg.steps_per_epoch as u64) as usize
    }

    /// Trainable parameters.
    pub fn parameters(&self) -> usize {
        self.vm
            .data()
            .lock()
            .expect("var map lock")
            .iter()
            .filter(|(k, _)| super::adam::is_trainable(k))
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// One optimiser step on the next training batch; returns its loss (before the step).
    pub fn train_step(&mut self) -> Result<f64> {
        let lr = self.learning_rate();
        let batch = self
            .synth
            .batch(Stream::Train, self.step, self.cfg.batch_size);
        let loss = self.loss(&batch, true).map_err(nn_err)?;
        let grads = loss.backward().map_err(nn_err)?;
        self.adam.step(&grads, lr).map_err(nn_err)?;
        self.step += 1;
        let value: f32 = loss.to_scalar().map_err(nn_err)?;
        if !value.is_finite() {
            return Err(Error::Numerics(format!(
                "training diverged at step {} (loss {value}); lower optimizer.lr",
                self.step
            )));
        }
        Ok(value as f64)
    }

    /// Scores the fixed validation set in evaluation mode.
    pub fn validate(&self) -> Result<Validation> {
        self.score(|b| self.predict(b, false))
    }

    /// The same validation scores of the classic solution the model starts from (LP-CNN's
    /// warm start `x₀`, a U-net's TV start) alone, with its name, so the log shows whether
    /// the network improves on it; `None` for the models that start from the field.
    pub fn validate_warm_start(&self) -> Result<Option<(&'static str, Validation)>> {
        let (name, start): (_, Predict) = match &self.net {
            Net::Lp(net) => (
                match net.config().warm_start {
                    WarmStart::Tkd => "tkd",
                    WarmStart::Tv => "tv",
                },
                Box::new(move |b| {
                    let (fields, mask) = self.tensors(b)?;
                    net.warm_start(&fields, &operators(b), &mask)? * &mask
                }),
            ),
            Net::Loop(net) if net.config().start == Start::Tv => (
                "tv",
                Box::new(move |b| {
                    let (fields, mask) = self.tensors(b)?;
                    net.input(&fields, &operators(b), &mask)? * &mask
                }),
            ),
            Net::Loop(_) => return Ok(None),
        };
        Ok(Some((name, self.score(start)?)))
    }

    fn score(&self, predict: impl Fn(&Batch) -> candle_core::Result<Tensor>) -> Result<Validation> {
        let (mut loss, mut nrmse, mut hfen, mut ssim, mut count) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for index in 0..self.cfg.validation_batches as u64 {
            let batch = self
                .synth
                .batch(Stream::Validation, index, self.cfg.batch_size);
            let pred = predict(&batch).map_err(nn_err)?;
            let pred: Vec<f32> = pred
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(nn_err)?;
            let nv = batch.voxels();
            for i in 0..batch.n {
                let x = &pred[i * nv..][..nv];
                let r = &batch.chi[i * nv..][..nv];
                let region: Vec<bool> = batch.mask[i * nv..][..nv]
                    .iter()
                    .map(|&m| m > 0.5)
                    .collect();
                let inside = region.iter().filter(|&&m| m).count().max(1);
                let se: f64 = x
                    .iter()
                    .zip(r)
                    .zip(&region)
                    .filter(|(_, &m)| m)
                    .map(|((a, b), _)| ((a - b) as f64).powi(2))
                    .sum();
                let reference = Reference::new(r, &region, batch.dims);
                loss += se / inside as f64;
                nrmse += nrmse_demeaned(x, r, &region);
                hfen += reference.hfen(x);
                ssim += reference.ssim(x);
                count += 1.0;
            }
        }
        let c = f64::max(count, 1.0);
        Ok(Validation {
            loss: loss / c,
            nrmse: nrmse / c,
            hfen: hfen / c,
            ssim: ssim / c,
        })
    }

    /// χ `[N, 1, D, H, W]` for a batch.
    fn predict(&self, b: &Batch, train: bool) -> candle_core::Result<Tensor> {
        let (fields, mask) = self.tensors(b)?;
        match &self.net {
            Net::Lp(net) => net.forward_t(&fields, &operators(b), &mask, train),
            Net::Loop(net) => {
                let x = net.input(&fields, &operators(b), &mask)?;
                net.forward_t(&x, train)?.chi * &mask
            }
        }
    }

    /// A batch's fields `[N, B, D, H, W]` and mask `[N, 1, D, H, W]` on the device.
    fn tensors(&self, b: &Batch) -> candle_core::Result<(Tensor, Tensor)> {
        let [d, h, w] = tensor_dims(b.dims);
        let dev = &self.device;
        let mask = Tensor::from_slice(&b.mask, (b.n, 1, d, h, w), dev)?;
        let fields = Tensor::from_slice(&b.fields, (b.n, b.b0.len(), d, h, w), dev)?;
        Ok((fields, mask))
    }

    /// MSE inside the masks (the papers' loss, restricted to where χ is defined); for a
    /// LoopNet with deep supervision, the weighted sum over its loops' outputs (and the
    /// fused output).
    fn loss(&self, b: &Batch, train: bool) -> candle_core::Result<Tensor> {
        let [d, h, w] = tensor_dims(b.dims);
        let dev = &self.device;
        let target = Tensor::from_slice(&b.chi, (b.n, 1, d, h, w), dev)?;
        let mask = Tensor::from_slice(&b.mask, (b.n, 1, d, h, w), dev)?;
        let loss = self.cfg.loss;
        let mse = |x: &Tensor| masked_loss(x, &target, &mask, loss);
        match &self.net {
            Net::Loop(net) if net.config().deep_supervision => {
                let fields = Tensor::from_slice(&b.fields, (b.n, 1, d, h, w), dev)?;
                let out = net.forward_t(&net.input(&fields, &operators(b), &mask)?, train)?;
                let weights = net.config().loop_weights();
                let mut total = if net.config().fuse && out.loops.len() > 1 {
                    mse(&out.chi)?
                } else {
                    Tensor::zeros((), candle_core::DType::F32, dev)?
                };
                for (x, wt) in out.loops.iter().zip(weights) {
                    total = (total + (mse(x)? * wt)?)?;
                }
                Ok(total)
            }
            _ => mse(&self.predict(b, train)?),
        }
    }

    /// Mean and standard deviation of the χ targets inside the masks of the first
    /// training batches.
    fn target_statistics(&self) -> (f64, f64) {
        let (mut s, mut s2, mut n) = (0.0f64, 0.0f64, 0.0f64);
        for index in 0..self.cfg.normalisation_batches.max(1) as u64 {
            let b = self.synth.batch(Stream::Train, index, self.cfg.batch_size);
            for (&c, &m) in b.chi.iter().zip(&b.mask) {
                if m > 0.5 {
                    s += c as f64;
                    s2 += (c as f64).powi(2);
                    n += 1.0;
                }
            }
        }
        let mean = s / n.max(1.0);
        let var = (s2 / n.max(1.0) - mean * mean).max(0.0);
        (mean, var.sqrt().max(1e-6))
    }

    fn set_var(&self, name: &str, value: f64) -> Result<()> {
        let data = self.vm.data().lock().expect("var map lock");
        let var = data
            .get(name)
            .ok_or_else(|| Error::Numerics(format!("model has no variable {name}")))?;
        let t = Tensor::full(value as f32, var.shape(), var.device()).map_err(nn_err)?;
        var.set(&t).map_err(nn_err)
    }

    /// The model's variables, sorted by name.
    fn model_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vm
            .data()
            .lock()
            .expect("var map lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Records the training time so far (wall and CPU seconds, over all resumed runs), so
    /// that the weights files written next carry it.
    pub fn set_clock(&mut self, wall_seconds: f64, cpu_seconds: f64) {
        self.clock = Some((wall_seconds, cpu_seconds));
    }

    /// What a weights file says about its model: name, architecture and how it was trained.
    fn model_metadata(&self) -> HashMap<String, String> {
        let arch = match self.kind {
            ModelKind::Lpcnn => serde_json::to_string(&self.cfg.model.lpcnn),
            ModelKind::Loopnet => serde_json::to_string(&self.cfg.model.loopnet),
            ModelKind::Unet => serde_json::to_string(&self.cfg.model.unet),
        }
        .expect("configurations serialise");
        HashMap::from([
            (
                weights::MODEL_KEY.to_string(),
                self.kind.as_str().to_string(),
            ),
            (weights::MODEL_CONFIG_KEY.to_string(), arch),
            (VERSION_KEY.to_string(), crate::VERSION.to_string()),
            (TRAIN_CONFIG_KEY.to_string(), self.cfg.to_yaml()),
            (STEP_KEY.to_string(), self.step.to_string()),
        ])
        .into_iter()
        .chain(
            self.grown_from
                .iter()
                .map(|g| (GROWN_FROM_KEY.to_string(), g.clone())),
        )
        .chain(self.clock.into_iter().flat_map(|(wall, cpu)| {
            // CPU time is NaN where the system does not report it: then it is left out.
            [(WALL_SECONDS_KEY, wall), (CPU_SECONDS_KEY, cpu)]
                .into_iter()
                .filter(|(_, v)| v.is_finite())
                .map(|(k, v)| (k.to_string(), format!("{v:.1}")))
        }))
        .collect()
    }

    /// Weights, Adam moments, step and configuration: everything `--resume` needs.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors = self.model_tensors();
        tensors.extend(self.adam.state());
        let mut meta = self.model_metadata();
        if let Net::Lp(lp) = &self.net {
            meta.insert(DROPOUT_KEY.into(), lp.dropout_rng().state().to_string());
        }
        weights::save(path, tensors, meta)
    }

    /// The weights alone (with the z-score statistics and the model's metadata), for
    /// `--method <model> --weights FILE`.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        weights::save(path, self.model_tensors(), self.model_metadata())
    }

    #[cfg(test)]
    fn variable(&self, name: &str) -> Vec<f32> {
        self.vm.data().lock().unwrap()[name]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{loopnet, lpcnn};
    use crate::train::synth::DataConfig;

    fn tiny(orientations: usize) -> TrainConfig {
        let mut cfg = TrainConfig {
            seed: 11,
            epochs: 2,
            steps_per_epoch: 3,
            batch_size: 2,
            validation_batches: 1,
            normalisation_batches: 2,
            data: DataConfig {
                patch: 16,
                orientations,
                ..DataConfig::default()
            },
            ..TrainConfig::default()
        };
        cfg.model.lpcnn = lpcnn::Config {
            channels: 4,
            blocks: 1,
            iterations: 2,
            ..cfg.model.lpcnn
        };
        cfg.model.unet = loopnet::Config {
            channels: vec![4, 8],
            ..loopnet::Config::unet()
        };
        cfg.optimizer.lr = 3e-3;
        cfg
    }

    /// Train 2 steps, checkpoint, resume and train 1 step: the same loss and weights as
    /// 3 steps straight, bit for bit, with LP-CNN's dropout on (p = 0.5) and off.
    #[test]
    fn resuming_from_a_checkpoint_continues_bit_for_bit() {
        for dropout in [0.5, 0.0] {
            resume_bit_for_bit(dropout);
        }
    }

    fn resume_bit_for_bit(dropout: f32) {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("checkpoint.safetensors");
        let mut cfg = tiny(2);
        cfg.model.lpcnn.dropout = dropout;
        {
            // Dropout is active in training: two passes over one batch differ (after one
            // step, since the prox's last layer starts at zero).
            let mut t = Trainer::new(ModelKind::Lpcnn, &cfg, &Device::Cpu).unwrap();
            t.train_step().unwrap();
            let b = t.synth.batch(Stream::Train, 0, 2);
            let l = |t: &Trainer| -> f32 { t.loss(&b, true).unwrap().to_scalar().unwrap() };
            assert_eq!(l(&t) != l(&t), dropout > 0.0, "dropout {dropout}");
        }
        let mut straight = Trainer::new(ModelKind::Lpcnn, &cfg, &Device::Cpu).unwrap();
        let losses: Vec<f64> = (0..3).map(|_| straight.train_step().unwrap()).collect();
        let mut first = Trainer::new(ModelKind::Lpcnn, &cfg, &Device::Cpu).unwrap();
        for want in &losses[..2] {
            assert_eq!(first.train_step().unwrap(), *want, "same seed, same run");
        }
        first.save_checkpoint(&ckpt).unwrap();
        drop(first);
        let mut resumed = Trainer::resume(&ckpt, None, None, &Device::Cpu).unwrap();
        assert_eq!(resumed.step(), 2);
        assert_eq!(resumed.train_step().unwrap(), losses[2]);
        for name in [
            "alpha_logit",
            "prox.conv_in.weight",
            "prox.blocks.0.bn1.running_var",
        ] {
            assert_eq!(resumed.variable(name), straight.variable(name), "{name}");
        }
        // A checkpoint of another model is refused with the file named.
        let err = Trainer::resume(&ckpt, Some(ModelKind::Unet), None, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("checkpoint.safetensors") && err.contains("--model lpcnn"),
            "{err}"
        );
    }

    /// A LoopNet grown from a trained U-net returns that U-net's χ exactly (loop 2 sees the
    /// reverse connections through zero weights, every loop has the U-net's norms),
    /// continues its step and clock, records where it came from, and then learns: the
    /// reverse connections' weights move off zero. Other files are refused by name.
    #[test]
    fn a_loopnet_grown_from_a_unet_starts_as_that_unet() {
        use crate::nn::testing::{random_tensor, values};
        let dir = tempfile::tempdir().unwrap();
        let unet_file = dir.path().join("unet.safetensors");
        let cfg = tiny(1);
        let mut unet = Trainer::new(ModelKind::Unet, &cfg, &Device::Cpu).unwrap();
        for _ in 0..2 {
            unet.train_step().unwrap();
        }
        unet.set_clock(30.0, 20.0);
        unet.save_weights(&unet_file).unwrap();
        let mut grown_cfg = cfg.clone();
        grown_cfg.model.loopnet = loopnet::Config {
            loops: 2,
            ghpa: false,
            norm_per_loop: true,
            ..cfg.model.unet.clone()
        };
        let mut grown = Trainer::grow(&unet_file, &grown_cfg, &Device::Cpu).unwrap();
        assert_eq!((grown.step(), grown.clock()), (2, Some((30.0, 20.0))));
        let x = random_tensor((1, 1, 12, 16, 8), 7);
        let chi = |t: &Trainer| match &t.net {
            Net::Loop(n) => values(&n.forward_t(&x, false).unwrap().chi),
            Net::Lp(_) => unreachable!(),
        };
        let (want, got) = (chi(&unet), chi(&grown));
        let scale = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        assert!(scale > 0.0);
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b}");
        }
        let meta = {
            let f = dir.path().join("grown.safetensors");
            grown.save_weights(&f).unwrap();
            weights::metadata(&f).unwrap()
        };
        let from = &meta[GROWN_FROM_KEY];
        assert!(
            from.starts_with("unet unet.safetensors at step 2 (sha256 "),
            "{from}"
        );
        // The reverse connection enters enc.0.conv1 after the input's one channel.
        let reverse = |t: &Trainer| -> f32 {
            let w = t.vm.data().lock().unwrap()["enc.0.conv1.weight"]
                .as_tensor()
                .clone();
            let w = w.narrow(1, 1, 4).unwrap();
            values(&w).iter().map(|v| v.abs()).sum()
        };
        assert_eq!(reverse(&grown), 0.0);
        assert_eq!(grown.adam.steps(), 0, "a weights file has no moments");
        grown.train_step().unwrap();
        assert!(reverse(&grown) > 0.0);
        // From a checkpoint Adam continues: the U-net's moments, the new inputs' first
        // moments zero and second moments their tensor's mean.
        let ckpt = dir.path().join("checkpoint.safetensors");
        unet.save_checkpoint(&ckpt).unwrap();
        let from_ckpt = Trainer::grow(&ckpt, &grown_cfg, &Device::Cpu).unwrap();
        assert_eq!(from_ckpt.adam.steps(), 2);
        let moment = |t: &Trainer, key: &str| -> Tensor {
            t.adam
                .state()
                .into_iter()
                .find(|(k, _)| k == key)
                .unwrap()
                .1
        };
        for which in ["m", "v"] {
            let key = format!("adam.{which}.enc.0.conv1.weight");
            let (was, now) = (moment(&unet, &key), moment(&from_ckpt, &key));
            let kept = values(&now.narrow(1, 0, 1).unwrap());
            assert_eq!(kept, values(&was));
            let added = values(&now.narrow(1, 1, 4).unwrap());
            let want = if which == "m" {
                0.0
            } else {
                was.mean_all().unwrap().to_scalar::<f32>().unwrap()
            };
            assert!(
                want >= 0.0 && added.iter().all(|&a| a == want),
                "{which}: {want}"
            );
        }
        assert_eq!(
            values(&moment(&from_ckpt, "adam.v.enc.0.bn1.1.weight")),
            values(&moment(&unet, "adam.v.enc.0.bn1.weight")),
            "each loop's norms continue the U-net's moments"
        );
        // Not a U-net, or a U-net of other channels: refused, the file named.
        let lp_file = dir.path().join("lpcnn.safetensors");
        Trainer::new(ModelKind::Lpcnn, &tiny(1), &Device::Cpu)
            .unwrap()
            .save_weights(&lp_file)
            .unwrap();
        let err = Trainer::grow(&lp_file, &grown_cfg, &Device::Cpu)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("lpcnn.safetensors")
                && err.to_string().contains("not a U-net"),
            "{err}"
        );
        grown_cfg.model.loopnet.channels = vec![8, 16];
        let err = Trainer::grow(&unet_file, &grown_cfg, &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("model.loopnet.channels"), "{err}");
    }

    #[test]
    fn unet_names_of_loopnet_variables_drop_the_loop_index_of_norms() {
        assert_eq!(
            unet_variable("enc.0.bn1.1.running_mean"),
            "enc.0.bn1.running_mean"
        );
        assert_eq!(unet_variable("dec.2.bn2.0.weight"), "dec.2.bn2.weight");
        assert_eq!(unet_variable("enc.1.conv1.weight"), "enc.1.conv1.weight");
        assert_eq!(unet_variable("head.bias"), "head.bias");
    }

    /// The demeaned and NRMSE losses ignore a constant offset of one sample's χ inside its
    /// mask (and only there), the plain MSE does not; each matches its formula by hand.
    #[test]
    fn demeaned_and_nrmse_losses_ignore_each_samples_offset_in_its_mask() {
        use crate::nn::testing::{random_tensor, values};
        let target = random_tensor((2, 1, 4, 5, 6), 3);
        let x = random_tensor((2, 1, 4, 5, 6), 4);
        let mask = random_tensor((2, 1, 4, 5, 6), 5)
            .ge(0.0)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let value = |x: &Tensor, l| {
            masked_loss(x, &target, &mask, l)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // Offsets of +0.7 in sample 0 and −0.3 in sample 1, inside and outside the masks.
        let offset = Tensor::new(&[0.7f32, -0.3], &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 1, 1, 1))
            .unwrap();
        let shifted = x.broadcast_add(&offset).unwrap();
        let (a, b) = (value(&x, Loss::Demeaned), value(&shifted, Loss::Demeaned));
        assert!((a - b).abs() < 1e-5 * a, "{a} vs {b}");
        assert!(value(&shifted, Loss::Mse) > value(&x, Loss::Mse) + 0.05);
        // The demeaned loss is the MSE of the demeaned error, so never larger.
        assert!(a <= value(&x, Loss::Mse));
        // The NRMSE loss is the mean squared demeaned NRMSE of `crate::evaluate`, offsets
        // ignored too.
        let (xv, tv, mv) = (values(&x), values(&target), values(&mask));
        let nv = xv.len() / 2;
        let want: f64 = (0..2)
            .map(|i| {
                let m: Vec<bool> = mv[i * nv..][..nv].iter().map(|&m| m > 0.5).collect();
                (nrmse_demeaned(&xv[i * nv..][..nv], &tv[i * nv..][..nv], &m) / 100.0).powi(2)
            })
            .sum::<f64>()
            / 2.0;
        for v in [&x, &shifted] {
            let got = value(v, Loss::Nrmse) as f64;
            assert!((got - want).abs() < 1e-4 * want, "{got} vs {want}");
        }
        // By hand for the plain MSE.
        let n: f32 = mv.iter().sum();
        let want: f32 = xv
            .iter()
            .zip(&tv)
            .zip(&mv)
            .map(|((a, b), m)| m * (a - b).powi(2))
            .sum::<f32>()
            / n;
        let got = value(&x, Loss::Mse);
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    }

    /// The tiny training run of the suite: a few Adam steps on 16³ patches lower the loss,
    /// whichever loss is configured (LP-CNN and the U-net from TV's map for the NRMSE loss).
    #[test]
    fn a_few_adam_steps_lower_the_loss() {
        for (kind, loss, tv) in [
            (ModelKind::Lpcnn, Loss::Mse, false),
            (ModelKind::Lpcnn, Loss::Nrmse, true),
            (ModelKind::Unet, Loss::Demeaned, false),
            (ModelKind::Unet, Loss::Demeaned, true),
        ] {
            let mut cfg = tiny(1);
            // One fixed batch: the loss of the same data must fall.
            cfg.data.nifti_fraction = 0.0;
            cfg.loss = loss;
            if tv {
                cfg.model.lpcnn.warm_start = lpcnn::WarmStart::Tv;
                cfg.model.unet.start = loopnet::Start::Tv;
            }
            let mut t = Trainer::new(kind, &cfg, &Device::Cpu).unwrap();
            let batch = t.synth.batch(Stream::Train, 0, 2);
            // The U-net's output is in ppm, not in training σ as LP-CNN's correction: a
            // smaller step, or Adam's first steps overshoot the small correction TV needs.
            let lr = if tv && kind == ModelKind::Unet {
                1e-3
            } else {
                1e-2
            };
            let (before, after) = ten_steps_on(&mut t, &batch, lr);
            // From TV's map there is less left to learn than from TKD's.
            let factor = if tv { 0.9 } else { 0.8 };
            assert!(
                after < factor * before,
                "{kind:?} {loss:?}: {before} -> {after}"
            );
        }
    }

    /// The log's bar: a U-net with a TV start scores its start's validation (an untrained
    /// one is exactly TV, so both match); one that starts from the field has no bar.
    #[test]
    fn the_tv_start_is_validated_as_the_bar() {
        let mut cfg = tiny(1);
        cfg.model.unet.start = loopnet::Start::Tv;
        let t = Trainer::new(ModelKind::Unet, &cfg, &Device::Cpu).unwrap();
        let (name, bar) = t.validate_warm_start().unwrap().unwrap();
        assert_eq!(name, "tv");
        let net = t.validate().unwrap();
        assert!(
            (bar.nrmse - net.nrmse).abs() < 1e-6,
            "{} {}",
            bar.nrmse,
            net.nrmse
        );
        cfg.model.unet.start = loopnet::Start::Field;
        let t = Trainer::new(ModelKind::Unet, &cfg, &Device::Cpu).unwrap();
        assert!(t.validate_warm_start().unwrap().is_none());
    }

    /// The loss of `batch` before and after ten Adam steps of `lr` on it alone.
    fn ten_steps_on(t: &mut Trainer, batch: &Batch, lr: f64) -> (f32, f32) {
        let loss = |t: &Trainer| -> f32 { t.loss(batch, true).unwrap().to_scalar().unwrap() };
        let before = loss(t);
        for _ in 0..10 {
            let g = t.loss(batch, true).unwrap().backward().unwrap();
            t.adam.step(&g, lr).unwrap();
        }
        (before, loss(t))
    }

    /// Training on a derivative dataset from `chimap simulate`'s truth: batches come from
    /// it (the held-out subject validates), and Adam steps lower the loss of its patches.
    #[test]
    fn trains_on_a_derivative_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::train::userdata::simulated_derivatives(dir.path());
        let mut cfg = tiny(2);
        cfg.data.derivatives = Some(crate::train::userdata::DerivativesConfig {
            root,
            validation_subjects: vec!["2".into()],
            stride: Some(8),
            ..Default::default()
        });
        let mut t = Trainer::new(ModelKind::Lpcnn, &cfg, &Device::Cpu).unwrap();
        // User batches have the data's 3 mm voxels; synthetic ones 1 mm.
        let batch = t.synth.batch(Stream::Train, 0, 2);
        assert_eq!(batch.voxel_size, [3.0; 3]);
        assert_eq!(t.synth.batch(Stream::Validation, 0, 2).voxel_size, [3.0; 3]);
        let (before, after) = ten_steps_on(&mut t, &batch, 1e-2);
        assert!(after < 0.8 * before, "{before} -> {after}");
        for _ in 0..2 {
            assert!(t.train_step().unwrap().is_finite());
        }
        let v = t.validate().unwrap();
        assert!(
            v.loss > 0.0 && v.nrmse.is_finite() && v.ssim <= 1.0,
            "{v:?}"
        );
        // Mixed with synthetic data: some batches of each.
        let mixed = TrainConfig {
            data: DataConfig {
                derivatives: cfg
                    .data
                    .derivatives
                    .clone()
                    .map(|d| crate::train::userdata::DerivativesConfig { fraction: 0.5, ..d }),
                ..cfg.data.clone()
            },
            ..cfg.clone()
        };
        let s = Synth::new(&mixed.data, 3).unwrap();
        let sizes: std::collections::BTreeSet<u64> = (0..16)
            .map(|i| s.batch(Stream::Train, i, 1).voxel_size[0] as u64)
            .collect();
        assert_eq!(sizes, [1, 3].into());
    }

    #[test]
    fn weights_load_in_the_pipeline_model_with_their_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("final.safetensors");
        let mut t = Trainer::new(ModelKind::Lpcnn, &tiny(1), &Device::Cpu).unwrap();
        t.train_step().unwrap();
        t.save_weights(&path).unwrap();
        // The z-score statistics are those of the targets (χ well inside ±0.5 ppm).
        let (mean, std) = (t.variable("norm.mean")[0], t.variable("norm.std")[0]);
        assert!(mean.abs() < 0.2 && std > 0.01 && std < 0.5, "{mean} {std}");
        let meta = weights::metadata(&path).unwrap();
        assert_eq!(meta[weights::MODEL_KEY], "lpcnn");
        let arch: lpcnn::Config = serde_json::from_str(&meta[weights::MODEL_CONFIG_KEY]).unwrap();
        assert_eq!(arch, t.config().model.lpcnn);
        let net =
            weights::build(&path, "LP-CNN", &Device::Cpu, |vb| LpCnn::new(&arch, vb)).unwrap();
        let b = t.synth.batch(Stream::Validation, 0, 1);
        let ours: Vec<f32> = t
            .predict(&b, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let [d, h, w] = tensor_dims(b.dims);
        let fields = Tensor::from_slice(&b.fields, (1, b.b0.len(), d, h, w), &Device::Cpu).unwrap();
        let mask = Tensor::from_slice(&b.mask, (1, 1, d, h, w), &Device::Cpu).unwrap();
        let ops = DipoleSet::new(b.dims, b.voxel_size, &b.b0);
        let theirs: Vec<f32> = net
            .forward_t(&fields, &ops, &mask, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ours, theirs);
        // Validation scores are finite and in their ranges.
        let v = t.validate().unwrap();
        assert!(
            v.loss > 0.0 && v.nrmse > 0.0 && v.hfen > 0.0 && v.ssim <= 1.0,
            "{v:?}"
        );
    }

    /// Deep supervision: the loss is Σ 0.5^(T−t)·MSE(loop t) + MSE(fused), checked against
    /// a sum computed here from the network's outputs; the option travels in the weights'
    /// metadata, and the network built from it predicts the same χ.
    #[test]
    fn deep_supervision_weights_every_loop_and_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny(1);
        cfg.model.loopnet = loopnet::Config {
            channels: vec![4, 8],
            loops: 3,
            ghpa: false,
            fuse: true,
            deep_supervision: true,
            ..loopnet::Config::default()
        };
        assert_eq!(cfg.model.loopnet.loop_weights(), vec![0.25, 0.5, 1.0]);
        let t = Trainer::new(ModelKind::Loopnet, &cfg, &Device::Cpu).unwrap();
        let b = t.synth.batch(Stream::Train, 0, 2);
        let Net::Loop(net) = &t.net else { panic!() };
        let [d, h, w] = tensor_dims(b.dims);
        let fields = Tensor::from_slice(&b.fields, (2, 1, d, h, w), &Device::Cpu).unwrap();
        // Evaluation mode on both sides: batch statistics would not change the sum's form.
        let out = net.forward_t(&fields, false).unwrap();
        let inside: f64 = b.mask.iter().map(|&m| m as f64).sum();
        let mse = |x: &Tensor| -> f64 {
            let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            v.iter()
                .zip(&b.chi)
                .zip(&b.mask)
                .map(|((x, c), m)| ((x - c) as f64 * *m as f64).powi(2))
                .sum::<f64>()
                / inside
        };
        let want = mse(&out.chi)
            + 0.25 * mse(&out.loops[0])
            + 0.5 * mse(&out.loops[1])
            + mse(&out.loops[2]);
        let got: f32 = t.loss(&b, false).unwrap().to_scalar().unwrap();
        assert!((got as f64 / want - 1.0).abs() < 1e-5, "{got} vs {want}");
        // Without deep supervision the loss is the fused output's alone.
        let mut plain = cfg.clone();
        plain.model.loopnet.deep_supervision = false;
        let p = Trainer::new(ModelKind::Loopnet, &plain, &Device::Cpu).unwrap();
        let got: f32 = p.loss(&b, false).unwrap().to_scalar().unwrap();
        assert!((got as f64 / mse(&out.chi) - 1.0).abs() < 1e-5);
        // The metadata rebuilds the same network.
        let path = dir.path().join("w.safetensors");
        t.save_weights(&path).unwrap();
        let meta = weights::metadata(&path).unwrap();
        let arch: loopnet::Config = serde_json::from_str(&meta[weights::MODEL_CONFIG_KEY]).unwrap();
        assert!(arch.fuse && arch.deep_supervision);
        let again =
            weights::build(&path, "LoopNet", &Device::Cpu, |vb| LoopNet::new(&arch, vb)).unwrap();
        let theirs: Vec<f32> = again
            .forward_t(&fields, false)
            .unwrap()
            .chi
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ours: Vec<f32> = out.chi.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn multi_orientation_data_for_a_single_orientation_model_is_a_config_error() {
        let err = Trainer::new(ModelKind::Unet, &tiny(2), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("orientations"), "{err}");
    }
}
