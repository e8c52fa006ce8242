//! CUDA against CPU: every op and model of the learned methods gives the same values and
//! gradients on the GPU as the CPU path that the other tests check against references.
//! Built only with `--features cuda` and run on a GPU machine (scripts/gpu_check.sh); CI has
//! neither.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::conv3d::{conv3d, conv3d_bias_act};
use super::dipole::DipoleSet;
use super::loopnet::{self, LoopNet};
use super::lpcnn::{self, LpCnn};
use super::pool::{max_pool2, upsample2};
use super::testing::{random_tensor, values};
use super::tiling::Tiling;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU")
}

/// Largest difference relative to the largest magnitude of `want`.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-6f64, |m, &v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).abs() / scale)
        .fold(0.0, f64::max)
}

fn close(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let err = rel_err(&values(got), &values(want));
    assert!(
        err < tol,
        "{name}: CUDA differs from CPU by {err:e} (relative)"
    );
}

/// `f(inputs)` and the gradients of `Σ r·f` for each input, on one device.
fn run_with_grads(
    dev: &Device,
    inputs: &[&Tensor],
    r: &Tensor,
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let loss = (&y * r.to_device(dev).unwrap()).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let grads = ts.iter().map(|t| g.get(t).unwrap().clone()).collect();
    (y, grads)
}

fn compare_with_grads(
    name: &str,
    inputs: &[&Tensor],
    r: &Tensor,
    tol: f64,
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) {
    let (y0, g0) = run_with_grads(&Device::Cpu, inputs, r, f);
    let (y1, g1) = run_with_grads(&gpu(), inputs, r, f);
    assert!(y1.device().is_cuda(), "{name}: result left the GPU");
    close(name, &y1, &y0, tol);
    for (i, (a, b)) in g1.iter().zip(&g0).enumerate() {
        close(&format!("{name}: gradient {i}"), a, b, tol);
    }
}

#[test]
fn conv3d_values_and_gradients_match_the_cpu() {
    for (k, pad, seed) in [(3, 1, 1), (1, 0, 2), (5, 2, 3), (3, 0, 4)] {
        let x = random_tensor((2, 3, 7, 6, 9), seed);
        let w = random_tensor((4, 3, k, k, k), seed + 10);
        let od = |n: usize| n + 2 * pad + 1 - k;
        let r = random_tensor((2, 4, od(7), od(6), od(9)), seed + 20);
        compare_with_grads(&format!("conv3d k={k}"), &[&x, &w], &r, 1e-4, &|t| {
            conv3d(&t[0], &t[1], pad)
        });
    }
    let (x, w, b) = (
        random_tensor((1, 3, 6, 5, 4), 5),
        random_tensor((2, 3, 3, 3, 3), 6),
        random_tensor(2, 7),
    );
    let want = conv3d_bias_act(&x, &w, &b, 1, true).unwrap();
    let g = gpu();
    let got = conv3d_bias_act(
        &x.to_device(&g).unwrap(),
        &w.to_device(&g).unwrap(),
        &b.to_device(&g).unwrap(),
        1,
        true,
    )
    .unwrap();
    close("conv3d + bias + relu", &got, &want, 1e-4);
}

#[test]
fn pooling_and_upsampling_match_the_cpu() {
    let x = random_tensor((2, 3, 6, 4, 8), 1);
    let r = random_tensor((2, 3, 3, 2, 4), 2);
    compare_with_grads("max-pool", &[&x], &r, 1e-6, &|t| max_pool2(&t[0]));
    let r = random_tensor((2, 3, 12, 8, 16), 3);
    compare_with_grads("upsample", &[&x], &r, 1e-6, &|t| upsample2(&t[0]));
}

#[test]
fn dipole_ops_and_gradients_match_the_cpu() {
    // Odd and even sizes: the half spectrum's Nyquist handling differs.
    for dims in [[12usize, 10, 8], [9, 7, 11]] {
        let b0 = [[0.0, 0.0, 1.0], [0.3, 0.0, 0.954], [0.0, 0.3, 0.954]];
        let set = DipoleSet::new(dims, [1.0, 1.1, 0.9], &b0);
        let [nx, ny, nz] = dims;
        let chi = random_tensor((2, 1, nz, ny, nx), 1);
        let r = random_tensor((2, 3, nz, ny, nx), 2);
        compare_with_grads("dipole forward", &[&chi], &r, 1e-5, &|t| set.forward(&t[0]));
        let r = random_tensor((2, 1, nz, ny, nx), 3);
        let fields = random_tensor((2, 3, nz, ny, nx), 4);
        compare_with_grads("dipole adjoint", &[&fields], &r, 1e-5, &|t| {
            set.adjoint(&t[0])
        });
    }
}

/// The weights of a CPU-initialised model as tensors that a `VarBuilder` can put anywhere.
fn tensors(vm: &VarMap) -> HashMap<String, Tensor> {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

#[test]
fn lpcnn_matches_the_cpu_whole_and_tiled() {
    let cfg = lpcnn::Config {
        channels: 8,
        blocks: 2,
        ..lpcnn::Config::default()
    };
    let vm = VarMap::new();
    let cpu_net = LpCnn::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let g = gpu();
    let gpu_net = LpCnn::new(&cfg, VarBuilder::from_tensors(tensors(&vm), DType::F32, &g)).unwrap();
    let dims = [20usize, 18, 16];
    let [nx, ny, nz] = dims;
    for n in [1, 2] {
        let b0 = &[[0.0, 0.0, 1.0], [0.3, 0.0, 0.954]][..n];
        let ops = DipoleSet::new(dims, [1.0; 3], b0);
        let y = (random_tensor((1, n, nz, ny, nx), n as u64) * 0.1).unwrap();
        let mask = Tensor::ones((1, 1, nz, ny, nx), DType::F32, &Device::Cpu).unwrap();
        let want = cpu_net.forward_t(&y, &ops, &mask, false).unwrap();
        let (yg, mg) = (y.to_device(&g).unwrap(), mask.to_device(&g).unwrap());
        let got = gpu_net.forward_t(&yg, &ops, &mg, false).unwrap();
        close(&format!("LP-CNN, {n} orientations"), &got, &want, 1e-4);
        // Tiles on the GPU: the same result as the whole volume.
        let t = Tiling::for_budget([nz, ny, nx], 4 * 8 * 17, 4 * 8 * 17 * 2000, 5, 1)
            .expect("a budget of 2000 voxels must tile a 5760-voxel volume");
        let tiled = gpu_net.infer_tiled(&yg, &ops, &mg, &t).unwrap();
        close(
            &format!("LP-CNN tiled, {n} orientations"),
            &tiled,
            &want,
            1e-4,
        );
    }
}

#[test]
fn loopnet_with_ghpa_matches_the_cpu() {
    let cfg = loopnet::Config {
        channels: vec![4, 8, 8],
        loops: 2,
        ghpa: true,
        ghpa_from_level: 1,
        ghpa_map_size: 4,
        fuse: true,
        deep_supervision: false,
    };
    let vm = VarMap::new();
    let cpu_net =
        LoopNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let g = gpu();
    let gpu_net =
        LoopNet::new(&cfg, VarBuilder::from_tensors(tensors(&vm), DType::F32, &g)).unwrap();
    let x = random_tensor((1, 1, 12, 10, 14), 1);
    let want = cpu_net.forward_t(&x, false).unwrap().chi;
    let got = gpu_net
        .forward_t(&x.to_device(&g).unwrap(), false)
        .unwrap()
        .chi;
    close("LoopNet", &got, &want, 1e-4);
}

/// Training on the GPU: the same seeded weights give the same first loss as on the CPU, and
/// further steps and a validation run there.
#[test]
fn training_runs_on_the_gpu_and_matches_the_cpu_loss() {
    use crate::train::config::{ModelKind, TrainConfig};
    use crate::train::trainer::Trainer;
    let yaml = "epochs: 1\nsteps_per_epoch: 3\nvalidation_batches: 1\nnormalisation_batches: 1\n\
                data:\n  patch: 16\nmodel:\n  unet:\n    channels: [4, 8]\n    loops: 1\n    ghpa: false\n";
    let cfg = TrainConfig::from_yaml(yaml).unwrap();
    let mut cpu = Trainer::new(ModelKind::Unet, &cfg, &Device::Cpu).unwrap();
    let mut cuda = Trainer::new(ModelKind::Unet, &cfg, &gpu()).unwrap();
    let (l0, l1) = (cpu.train_step().unwrap(), cuda.train_step().unwrap());
    assert!(
        ((l0 - l1) / l0).abs() < 1e-3,
        "first loss: CPU {l0}, CUDA {l1}"
    );
    for _ in 0..2 {
        let l = cuda.train_step().unwrap();
        assert!(l.is_finite());
    }
    let v = cuda.validate().unwrap();
    assert!(v.loss.is_finite() && v.nrmse.is_finite());
}
