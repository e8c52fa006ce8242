//! Seeded weight initialisation: a `VarBuilder` backend that creates each variable of a
//! `VarMap` from the layer's own `Init` hint, drawn from the project's seeded generator.
//! Candle's CPU random tensors cannot be seeded, so without this two runs with the same
//! seed would start from different weights.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::simulate::rng::Rng;

/// A `VarBuilder` that fills `vm` with weights that depend only on `seed` and each
/// variable's name, placed on `device` (drawn on the host, so the same seed gives the same
/// weights on every device).
pub fn seeded_var_builder(vm: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(Seeded {
            vm: vm.clone(),
            seed,
        }),
        DType::F32,
        device.clone(),
    )
}

struct Seeded {
    vm: VarMap,
    seed: u64,
}

/// FNV-1a: a stable hash of a variable name (std's hasher may change between releases).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `n` values of `init` for a tensor of `shape`.
pub fn draw(init: Init, shape: &Shape, rng: &mut Rng) -> Vec<f32> {
    let n = shape.elem_count();
    let normal = |rng: &mut Rng, mean: f64, std: f64| -> Vec<f32> {
        (0..n).map(|_| (mean + std * rng.normal()) as f32).collect()
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => (0..n).map(|_| rng.range(lo, up) as f32).collect(),
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    (0..n).map(|_| rng.range(-b, b) as f32).collect()
                }
                candle_nn::init::NormalOrUniform::Normal => normal(rng, 0.0, std),
            }
        }
    }
}

impl SimpleBackend for Seeded {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.vm.data().lock().expect("var map lock");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape());
            }
            return Ok(v.as_tensor().clone());
        }
        let mut rng = Rng::derived(self.seed, &[name_hash(name)]);
        let t = Tensor::from_vec(draw(h, &s, &mut rng), s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        match self.vm.data().lock().expect("var map lock").get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no variable {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vm
            .data()
            .lock()
            .expect("var map lock")
            .contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::lpcnn::{Config, LpCnn};

    fn weights(seed: u64) -> Vec<(String, Vec<f32>)> {
        let vm = VarMap::new();
        let cfg = Config {
            channels: 4,
            blocks: 1,
            ..Config::default()
        };
        LpCnn::new(&cfg, seeded_var_builder(&vm, seed, &Device::Cpu)).unwrap();
        let mut all: Vec<(String, Vec<f32>)> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    #[test]
    fn same_seed_same_weights_and_hints_are_honoured() {
        let a = weights(3);
        assert_eq!(a, weights(3));
        assert_ne!(a, weights(4));
        let get = |name: &str| &a.iter().find(|(k, _)| k == name).unwrap().1;
        // Constants stay constants; the first conv (1 → 4, 3³) is uniform in ±1/√27.
        assert!((get("alpha_logit")[0] - (4.0f32 / 0.5).ln()).abs() < 1e-6);
        assert_eq!(get("prox.head.2.weight"), &vec![0.0; 4]);
        assert_eq!(get("norm.std"), &vec![1.0]);
        let w = get("prox.conv_in.weight");
        let b = 1.0 / 27f32.sqrt();
        assert!(w.iter().all(|v| v.abs() <= b));
        assert!(w.iter().any(|v| v.abs() > 0.8 * b) && w.iter().any(|&v| v < 0.0));
        // Kaiming normal: fan-in 50 (shape [10, 50]), ReLU gain √2 → σ = 0.2.
        let mut rng = Rng::new(1);
        let v = draw(
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
            &Shape::from((10, 50)),
            &mut rng,
        );
        let sd = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        assert!((sd - 0.2).abs() < 0.02, "{sd}");
    }
}
