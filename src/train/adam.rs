//! Adam over the trainable variables of a `VarMap`, with its moments exposed so that a
//! checkpoint can hold them (Candle's `AdamW` keeps its state private, and decouples the
//! weight decay; LP-CNN's code uses PyTorch's Adam, whose decay is an L2 term).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;

use super::config::AdamConfig;

/// Variables that are data rather than trained parameters: batch-norm running statistics
/// and LP-CNN's z-score statistics.
pub fn is_trainable(name: &str) -> bool {
    !name.contains("running_") && !name.starts_with("norm.")
}

pub struct Adam {
    cfg: AdamConfig,
    /// Trainable variables sorted by name, with their first and second moments.
    vars: Vec<(String, Var, Tensor, Tensor)>,
    step: u64,
}

impl Adam {
    pub fn new(vm: &VarMap, cfg: &AdamConfig) -> Result<Self> {
        let mut vars: Vec<(String, Var, Tensor, Tensor)> = vm
            .data()
            .lock()
            .expect("var map lock")
            .iter()
            .filter(|(k, _)| is_trainable(k))
            .map(|(k, v)| {
                let z = v.as_tensor().zeros_like()?;
                Ok((k.clone(), v.clone(), z.clone(), z))
            })
            .collect::<Result<_>>()?;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Adam {
            cfg: cfg.clone(),
            vars,
            step: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr`; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (_, var, m, v) in self.vars.iter_mut() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = if c.weight_decay != 0.0 {
                (g + var.as_tensor().affine(c.weight_decay, 0.0)?)?
            } else {
                g.clone()
            };
            *m = (m.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
            *v = (v.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
            let denom = (v.affine(1.0 / bc2, 0.0)?.sqrt()? + c.eps)?;
            let update = (m.affine(lr / bc1, 0.0)? / denom)?;
            var.set(&(var.as_tensor() - update)?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`adam.m.<var>`, `adam.v.<var>`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .flat_map(|(k, _, m, v)| {
                [
                    (format!("adam.m.{k}"), m.clone()),
                    (format!("adam.v.{k}"), v.clone()),
                ]
            })
            .collect()
    }

    /// Restores the moments saved by [`Self::state`] and the step count.
    pub fn restore(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (k, var, m, v) in self.vars.iter_mut() {
            for (slot, key) in [
                (&mut *m, format!("adam.m.{k}")),
                (&mut *v, format!("adam.v.{k}")),
            ] {
                let t = match tensors.get(&key) {
                    Some(t) => t,
                    None => candle_core::bail!("checkpoint lacks {key}"),
                };
                if t.shape() != var.shape() {
                    candle_core::bail!("{key}: shape {:?}, expected {:?}", t.shape(), var.shape());
                }
                *slot = t.clone();
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Adam on `f(θ) = Σ cᵢ (θᵢ − tᵢ)²` against a scalar f64 implementation of the update.
    #[test]
    fn matches_a_scalar_reference_implementation() {
        let cfg = AdamConfig {
            lr: 0.05,
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let (c, t0, th0) = ([1.0, 3.0, 0.5], [0.3, -0.2, 1.0], [0.0, 0.5, -0.5]);
        let vm = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let theta = vb
            .get_with_hints(3, "theta", candle_nn::Init::Const(0.0))
            .unwrap();
        vm.data().lock().unwrap()["theta"]
            .set(&Tensor::new(&[0.0f32, 0.5, -0.5], &Device::Cpu).unwrap())
            .unwrap();
        // A buffer that must not move.
        vb.get_with_hints(3, "bn.running_mean", candle_nn::Init::Const(2.0))
            .unwrap();
        let mut adam = Adam::new(&vm, &cfg).unwrap();
        let ct = Tensor::new(&[1.0f32, 3.0, 0.5], &Device::Cpu).unwrap();
        let tt = Tensor::new(&[0.3f32, -0.2, 1.0], &Device::Cpu).unwrap();
        let (mut th, mut m, mut v) = (th0, [0.0f64; 3], [0.0f64; 3]);
        for step in 1..=20 {
            let loss = ((&theta - &tt).unwrap().sqr().unwrap() * &ct)
                .unwrap()
                .sum_all()
                .unwrap();
            adam.step(&loss.backward().unwrap(), cfg.lr).unwrap();
            for i in 0..3 {
                let g = 2.0 * c[i] * (th[i] - t0[i]) + cfg.weight_decay * th[i];
                m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g;
                v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g * g;
                let mh = m[i] / (1.0 - cfg.beta1.powi(step));
                let vh = v[i] / (1.0 - cfg.beta2.powi(step));
                th[i] -= cfg.lr * mh / (vh.sqrt() + cfg.eps);
            }
        }
        let got: Vec<f32> = theta.to_vec1().unwrap();
        for i in 0..3 {
            assert!((got[i] as f64 - th[i]).abs() < 1e-5, "{got:?} vs {th:?}");
        }
        assert_eq!(adam.steps(), 20);
        let bn: Vec<f32> = vm.data().lock().unwrap()["bn.running_mean"]
            .to_vec1()
            .unwrap();
        assert_eq!(bn, vec![2.0; 3]);
        // The state names every trainable variable twice, and restores.
        let state = adam.state();
        assert_eq!(state.len(), 2);
        let map: HashMap<String, Tensor> = state.into_iter().collect();
        let mut other = Adam::new(&vm, &cfg).unwrap();
        other.restore(&map, 20).unwrap();
        assert_eq!(other.steps(), 20);
        assert!(other.restore(&HashMap::new(), 0).is_err());
    }
}
