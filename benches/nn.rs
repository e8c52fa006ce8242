//! Learned-inversion benchmark: prints, measured in one run, the GFLOP/s of the GEMM-based
//! conv3d (forward, and forward + backward) as a ratio to Candle's own matmul on the same
//! machine (absolute speeds drift on shared machines; ratios do not), Candle's conv2d for
//! comparison, and the CPU inference time of the learned models.
//!
//! `cargo bench --bench nn [-- --quick] [--size N]`

use std::time::Instant;

use candle_core::{Device, Tensor, Var};

use chimap::nn::conv3d;

/// Median of `reps` timings of `f`, in seconds.
fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            std::hint::black_box(f());
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let size = args
        .iter()
        .position(|a| a == "--size")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse::<usize>().expect("--size takes an integer"))
        .unwrap_or(if quick { 32 } else { 64 });
    let reps = if quick { 3 } else { 5 };
    let (c, k) = (32, 3);

    // Candle's matmul: the reference speed.
    let mm = if quick { 768 } else { 1536 };
    let (a, b) = (randn(&[mm, mm]), randn(&[mm, mm]));
    a.matmul(&b).unwrap();
    let t_mm = time(reps, || a.matmul(&b).unwrap());
    let mm_gflops = 2.0 * (mm as f64).powi(3) / t_mm / 1e9;
    println!("candle matmul {mm}x{mm}x{mm}: {mm_gflops:.1} GFLOP/s");

    // conv3d forward.
    let x = randn(&[1, c, size, size, size]);
    let w = randn(&[c, c, k, k, k]);
    let flops = 2.0 * (c * c * k * k * k) as f64 * (size as f64).powi(3);
    conv3d(&x, &w, 1).unwrap();
    let t_fwd = time(reps, || conv3d(&x, &w, 1).unwrap());
    let fwd = flops / t_fwd / 1e9;

    // conv3d forward + backward (input and weight gradients: three convolutions' work).
    let xv = Var::from_tensor(&x).unwrap();
    let wv = Var::from_tensor(&w).unwrap();
    let t_bwd = time(reps, || {
        let y = conv3d(&xv, &wv, 1).unwrap();
        y.sum_all().unwrap().backward().unwrap()
    });
    let bwd = 3.0 * flops / t_bwd / 1e9;

    // Candle's conv2d on the same work, as D slices of [C, H, W] (forward only).
    let x2 = x
        .squeeze(0)
        .unwrap()
        .transpose(0, 1)
        .unwrap()
        .contiguous()
        .unwrap();
    let w2 = randn(&[c, c, k, k]);
    let t_c2 = time(reps.min(3), || x2.conv2d(&w2, 1, 1, 1, 1).unwrap());
    let c2 = flops / k as f64 / t_c2 / 1e9;

    println!("conv3d {c}->{c}, {k}^3, {size}^3, batch 1:");
    println!(
        "  forward            {:7.3} s  {fwd:6.1} GFLOP/s  ratio to matmul {:.2} (goal >= 0.5)",
        t_fwd,
        fwd / mm_gflops
    );
    println!(
        "  forward + backward {:7.3} s  {bwd:6.1} GFLOP/s  ratio to matmul {:.2} (goal >= 0.4)",
        t_bwd,
        bwd / mm_gflops
    );
    println!(
        "  candle conv2d 3x3 over {size} slices (forward): {c2:.1} GFLOP/s, ratio {:.2}",
        c2 / mm_gflops
    );
}
