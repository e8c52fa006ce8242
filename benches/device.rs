//! Whole-head inference of the learned methods on the CPU and on CUDA, measured in one run:
//! LP-CNN (published architecture) and LoopNet, each cropped and tiled under the memory budget
//! as in the app: time and peak memory per device, and the CPU/CUDA time ratio. Random weights: speed and
//! memory do not depend on them.
//!
//! `cargo bench --features cuda --bench device [-- --dims 200,230,190] [--max-memory GIB]
//!  [--skip-cpu] [--lpcnn-only]`. Without the `cuda` feature only the CPU rows are printed.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use chimap::nn::device::{self, DeviceChoice};
use chimap::nn::dipole::DipoleSet;
use chimap::nn::loopnet::{self, LoopNet};
use chimap::nn::lpcnn::{Config, LpCnn};

mod common;
use common::peak_rss_gib;

/// Samples the GPU's used memory while `f` runs; returns `f`'s seconds and the peak rise of
/// used memory in GiB (on the CPU: the process's peak RSS so far).
fn measure(dev: &Device, f: impl FnOnce()) -> (f64, f64) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = dev {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let ctx = cuda.cuda_stream().context().clone();
        let used = move || ctx.mem_get_info().map_or(0, |(free, total)| total - free);
        let base = used();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(used());
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak.max(used())
        });
        let s = Instant::now();
        f();
        dev.synchronize().unwrap();
        let t = s.elapsed().as_secs_f64();
        done.store(true, Ordering::Relaxed);
        let peak = sampler.join().unwrap();
        return (t, peak.saturating_sub(base) as f64 / (1u64 << 30) as f64);
    }
    let s = Instant::now();
    f();
    dev.synchronize().unwrap();
    (s.elapsed().as_secs_f64(), peak_rss_gib())
}

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

struct Row {
    device: String,
    lpcnn: (f64, f64),
    loopnet: Option<(f64, f64)>,
}

/// Measures one device, printing each figure as soon as it is known (a CPU run of the
/// whole head takes minutes).
fn run(dev: &Device, dims: [usize; 3], budget: usize, with_loopnet: bool) -> Row {
    let [nx, ny, nz] = dims;
    let y = Tensor::randn(0f32, 0.05, (1, 1, nz, ny, nx), dev).unwrap();
    // A brain-sized ellipsoid (≈140×170×120 mm in a 200×230×190 mm head grid): LP-CNN's
    // tiles outside the mask are skipped, as in the app.
    let brain: Vec<f32> = (0..nx * ny * nz)
        .map(|v| {
            let p = [v % nx, (v / nx) % ny, v / (nx * ny)];
            let semi = [0.35 * nx as f64, 0.37 * ny as f64, 0.32 * nz as f64];
            let r2: f64 = (0..3)
                .map(|a| ((p[a] as f64 - dims[a] as f64 / 2.0) / semi[a]).powi(2))
                .sum();
            (r2 < 1.0) as u8 as f32
        })
        .collect();
    let mask = Tensor::from_vec(brain, (1, 1, nz, ny, nx), dev).unwrap();
    let vm = VarMap::new();
    let net = LpCnn::new(
        &Config::default(),
        VarBuilder::from_varmap(&vm, DType::F32, dev),
    )
    .unwrap();
    let ops = DipoleSet::new(dims, [1.0; 3], &[[0.0, 0.0, 1.0]]);
    // Warm-up on a small cube (kernel loading, cuBLAS and cuFFT plans).
    let small = DipoleSet::new([16; 3], [1.0; 3], &[[0.0, 0.0, 1.0]]);
    let ys = Tensor::zeros((1, 1, 16, 16, 16), DType::F32, dev).unwrap();
    net.forward_t(&ys, &small, &ys.ones_like().unwrap(), false)
        .unwrap();
    let lpcnn = measure(dev, || {
        // As the app runs it (src/inversion/learned.rs): cropped to the mask's reach and
        // tiled within the budget.
        let chi = net.infer(&y, &ops, &mask, budget).unwrap();
        std::hint::black_box(chi.to_dtype(DType::F32).unwrap());
    });
    println!(
        "  {:7} LP-CNN {:8.2} s {:6.2} GiB",
        device::name(dev),
        lpcnn.0,
        lpcnn.1
    );
    drop(net);
    if !with_loopnet {
        return Row {
            device: device::name(dev),
            lpcnn,
            loopnet: None,
        };
    }
    let vm = VarMap::new();
    let cfg = loopnet::Config::default();
    let net = LoopNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, dev)).unwrap();
    let loopnet = measure(dev, || {
        std::hint::black_box(net.infer(&y, &mask, budget).unwrap());
    });
    Row {
        device: device::name(dev),
        lpcnn,
        loopnet: Some(loopnet),
    }
}

fn main() {
    chimap::cli::use_one_malloc_arena();
    let args: Vec<String> = std::env::args().collect();
    let dims: Vec<usize> = arg(&args, "--dims")
        .unwrap_or("200,230,190")
        .split(',')
        .map(|v| v.parse().expect("--dims NX,NY,NZ"))
        .collect();
    let dims = [dims[0], dims[1], dims[2]];
    let gib: f64 = arg(&args, "--max-memory").map_or(3.0, |v| v.parse().expect("GiB"));
    let budget = device::budget_bytes(gib).unwrap();
    let with_loopnet = !args.iter().any(|a| a == "--lpcnn-only");
    println!(
        "whole volume {}x{}x{}, 1 orientation, --max-memory {gib} GiB; peak memory: process RSS \
         (CPU), rise of the GPU's used memory (CUDA)",
        dims[0], dims[1], dims[2]
    );
    let mut rows = Vec::new();
    if !args.iter().any(|a| a == "--skip-cpu") {
        rows.push(run(&Device::Cpu, dims, budget, with_loopnet));
    }
    match device::open(DeviceChoice::Cuda) {
        Ok(dev) => rows.push(run(&dev, dims, budget, with_loopnet)),
        Err(e) => println!("CUDA: not measured ({e})"),
    }
    for r in &rows {
        if let Some(l) = r.loopnet {
            println!("  {:7} LoopNet {:8.2} s {:6.2} GiB", r.device, l.0, l.1);
        }
    }
    println!("  peak process RSS: {:.2} GiB", peak_rss_gib());
    if let [cpu, gpu] = &rows[..] {
        println!(
            "  CPU / CUDA time: LP-CNN {:.1}x",
            cpu.lpcnn.0 / gpu.lpcnn.0
        );
        if let (Some(c), Some(g)) = (cpu.loopnet, gpu.loopnet) {
            println!("  CPU / CUDA time: LoopNet {:.1}x", c.0 / g.0);
        }
    }
}
