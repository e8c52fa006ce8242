//! Learned-inversion benchmark: prints, measured in one run, the GFLOP/s of the GEMM-based
//! conv3d (forward, and forward + backward) as a ratio to Candle's own matmul on the same
//! machine, Candle's conv2d for comparison, and the CPU inference time of LP-CNN.
//!
//! Absolute speeds drift on shared machines; ratios do not, so each round times the matmul
//! and the convolutions back to back and the median of the per-round ratios is reported.
//!
//! `cargo bench --bench nn [-- --quick] [--size N] [--rounds R]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use chimap::nn::conv3d;
use chimap::nn::dipole::DipoleSet;
use chimap::nn::loopnet::{self, LoopNet};
use chimap::nn::lpcnn::{Config, LpCnn};

mod common;
use common::peak_rss_gib;

fn secs<T>(f: impl FnOnce() -> T) -> f64 {
    let s = Instant::now();
    std::hint::black_box(f());
    s.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
}

fn arg(args: &[String], name: &str) -> Option<usize> {
    let i = args.iter().position(|a| a == name)?;
    Some(args.get(i + 1)?.parse().expect("integer argument"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let size = arg(&args, "--size").unwrap_or(if quick { 32 } else { 64 });
    let rounds = arg(&args, "--rounds").unwrap_or(if quick { 3 } else { 5 });
    let (c, k) = (32, 3);
    let mm = if quick { 768 } else { 1536 };
    let mm_flops = 2.0 * (mm as f64).powi(3);
    let flops = 2.0 * (c * c * k * k * k) as f64 * (size as f64).powi(3);

    let (a, b) = (randn(&[mm, mm]), randn(&[mm, mm]));
    let x = randn(&[1, c, size, size, size]);
    let w = randn(&[c, c, k, k, k]);
    let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
    // Candle's conv2d on the same work, as D slices of [C, H, W].
    let x2 = x.squeeze(0).unwrap().transpose(0, 1).unwrap();
    let x2 = x2.contiguous().unwrap();
    let w2 = randn(&[c, c, k, k]);
    a.matmul(&b).unwrap();
    conv3d(&x, &w, 1).unwrap();

    let (mut r_fwd, mut r_bwd, mut r_c2, mut g_mm, mut t_fwd, mut t_bwd) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let mm_gflops = mm_flops / secs(|| a.matmul(&b).unwrap()) / 1e9;
        let tf = secs(|| conv3d(&x, &w, 1).unwrap());
        // Forward + backward: input and weight gradients, three convolutions' work.
        let tb = secs(|| {
            let y = conv3d(&xv, &wv, 1).unwrap();
            y.sum_all().unwrap().backward().unwrap()
        });
        let t2 = secs(|| x2.conv2d(&w2, 1, 1, 1, 1).unwrap());
        r_fwd.push(flops / tf / 1e9 / mm_gflops);
        r_bwd.push(3.0 * flops / tb / 1e9 / mm_gflops);
        r_c2.push(flops / k as f64 / t2 / 1e9 / mm_gflops);
        g_mm.push(mm_gflops);
        t_fwd.push(tf);
        t_bwd.push(tb);
    }
    let mm_gflops = median(g_mm);
    println!("candle matmul {mm}^3: {mm_gflops:.1} GFLOP/s (median of {rounds} rounds)");
    println!("conv3d {c}->{c}, {k}^3, {size}^3, batch 1 (ratios: median over rounds):");
    println!(
        "  forward            {:6.3} s  ratio to matmul {:.2} (goal >= 0.5)",
        median(t_fwd),
        median(r_fwd)
    );
    println!(
        "  forward + backward {:6.3} s  ratio to matmul {:.2} (goal >= 0.4)",
        median(t_bwd),
        median(r_bwd)
    );
    println!(
        "  candle conv2d 3x3 over {size} slices, forward: ratio to matmul {:.2}",
        median(r_c2)
    );

    // LP-CNN inference (published architecture, random weights: speed does not depend on
    // them), one orientation, on a cube of `size`.
    let vm = VarMap::new();
    let net = LpCnn::new(
        &Config::default(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let ops = DipoleSet::new([size; 3], [1.0; 3], &[[0.0, 0.0, 1.0]]);
    let y = randn(&[1, 1, size, size, size]);
    let mask = Tensor::ones((1, 1, size, size, size), DType::F32, &Device::Cpu).unwrap();
    let mm_before = mm_flops / secs(|| a.matmul(&b).unwrap()) / 1e9;
    let t = secs(|| net.forward_t(&y, &ops, &mask, false).unwrap());
    let mm_after = mm_flops / secs(|| a.matmul(&b).unwrap()) / 1e9;
    let mm_now = 0.5 * (mm_before + mm_after);
    // The convolutions dominate: 2 per block, 3³ taps, C², per voxel and iteration.
    let cfg = Config::default();
    let conv_flops = cfg.iterations as f64
        * 2.0
        * (size as f64).powi(3)
        * ((2 * cfg.blocks * c * c * 27 + 27 * c + 2 * c * c + c) as f64);
    let head = 200.0 * 230.0 * 190.0 / (size as f64).powi(3);
    println!(
        "LP-CNN inference, {size}^3, 1 orientation: {t:.2} s, conv work {:.2} of matmul speed; \
         1 mm head (200x230x190) by voxel count: {:.0} s at this matmul speed \
         ({mm_now:.0} GFLOP/s), {:.0} s at 155 GFLOP/s",
        conv_flops / t / 1e9 / mm_now,
        t * head,
        t * head * mm_now / 155.0,
    );
    println!("  peak resident memory so far: {:.2} GiB", peak_rss_gib());

    for (name, cfg) in [
        ("LoopNet", loopnet::Config::default()),
        ("U-net", loopnet::Config::unet()),
    ] {
        let vm = VarMap::new();
        let net =
            LoopNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let t = secs(|| net.forward_t(&y, false).unwrap());
        println!(
            "{name} inference ({} loops, GHPA {}), {size}^3: {t:.2} s; 1 mm head by voxel count: \
             {:.0} s at this machine's speed",
            cfg.loops,
            cfg.ghpa,
            t * head
        );
    }
    println!("peak resident memory: {:.2} GiB", peak_rss_gib());
}
