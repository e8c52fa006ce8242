//! A trained network against the classic inversions on data it was not trained on: a held-out
//! synthetic set (another seed, larger patches) and the MNI head phantom's local field.
//!
//! ```sh
//! cargo run --release --example learned_vs_classic -- --weights out/lpcnn/run/final.safetensors \
//!     --phantom ../shared/data/mni_phantom --methods tkd,tv
//! ```
//!
//! The phantom's local field is `D·χ_brain` (no background field, so the comparison is about
//! the inversion alone) plus Gaussian noise of a 3 T acquisition with phase SNR 100; with
//! `--orientations 1,4` LP-CNN and the classic methods also see 4 head orientations (the
//! published 7 T directions listed in the data README). Scores: demeaned NRMSE, HFEN (%),
//! SSIM, inside the brain mask.

use std::path::{Path, PathBuf};

use clap::Parser;

use chimap::evaluate::metrics::{nrmse_demeaned, Reference};
use chimap::inversion::{self, learned::Learned, MethodName, Orientation, Problem};
use chimap::nn::device::DeviceChoice;
use chimap::physics::fft::fast_len;
use chimap::physics::DipoleOperator;
use chimap::simulate::rng::Rng;
use chimap::train::synth::{field_noise_ppm, DataConfig, Stream, Synth};
use chimap::volume::{crop, pad};

#[derive(Parser)]
struct Args {
    /// Trained weights (final.safetensors or a checkpoint).
    #[arg(long)]
    weights: PathBuf,
    /// Learned method the weights are for.
    #[arg(long, default_value = "lpcnn")]
    method: String,
    /// Folder with chi_brain.nii.gz and brainmask.nii.gz.
    #[arg(long)]
    phantom: Option<PathBuf>,
    /// Held-out synthetic samples.
    #[arg(long, default_value_t = 8)]
    synthetic: usize,
    /// Classic methods to compare with (comma-separated).
    #[arg(long, default_value = "tkd", value_delimiter = ',')]
    methods: Vec<String>,
    /// Orientation counts scored on the phantom.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    orientations: Vec<usize>,
    /// Memory for the network's activations (GiB); less runs it in smaller tiles, as
    /// `chimap --max-memory` does.
    #[arg(long, default_value_t = 3.0)]
    max_memory: f64,
}

/// Published 7 T head-orientation B0 directions (image frame), from the data README.
const DIRECTIONS: [[f64; 3]; 4] = [
    [-0.1413, 0.1058, 0.9843],
    [0.0524, 0.1595, 0.9858],
    [-0.0275, 0.1083, 0.9937],
    [0.0021, -0.2207, 0.9753],
];

fn method(name: &str, weights: &Path, gib: f64) -> Box<dyn inversion::Method + Send + Sync> {
    let m: MethodName = clap::ValueEnum::from_str(name, true).expect("a method name");
    match m {
        MethodName::Lpcnn | MethodName::Loopnet | MethodName::Unet => Box::new(
            Learned::new(
                m,
                Some(weights.to_path_buf()),
                DeviceChoice::Auto,
                gib,
                None,
            )
            .expect("weights"),
        ),
        _ => inversion::Config {
            method: m,
            ..Default::default()
        }
        .method()
        .expect("a classic method"),
    }
}

fn scores(x: &[f32], truth: &[f32], mask: &[bool], dims: [usize; 3]) -> [f64; 3] {
    let r = Reference::new(truth, mask, dims);
    [nrmse_demeaned(x, truth, mask), r.hfen(x), r.ssim(x)]
}

fn print(name: &str, s: [f64; 3], seconds: f64) {
    println!(
        "| {name:<22} | {:>6.2} | {:>6.2} | {:>6.3} | {:>7.1} |",
        s[0], s[1], s[2], seconds
    );
}

fn main() {
    let args = Args::parse();
    let mut methods: Vec<String> = args.methods.clone();
    methods.push(args.method.clone());
    println!("| method                 | NRMSE  | HFEN   | SSIM   | seconds |");
    println!("|---|---|---|---|---|");

    // Held-out synthetic patches: another seed and stream than any training run, 32³.
    if args.synthetic > 0 {
        let cfg = DataConfig {
            patch: 32,
            orientations: 1,
            ..DataConfig::default()
        };
        let synth = Synth::new(&cfg, 0x05ee_d0ff).expect("synthetic data");
        for name in methods.iter().filter(|n| *n != "cosmos") {
            let m = method(name, &args.weights, args.max_memory);
            let (mut sum, t0) = ([0.0; 3], std::time::Instant::now());
            for i in 0..args.synthetic {
                let b = synth.batch(Stream::Validation, i as u64, 1);
                let mask: Vec<bool> = b.mask.iter().map(|&v| v > 0.5).collect();
                let problem = Problem {
                    dims: b.dims,
                    voxel_size: b.voxel_size,
                    orientations: vec![Orientation {
                        field: &b.fields,
                        b0: b.b0[0],
                    }],
                    mask: &mask,
                    weight: None,
                    magnitude: None,
                    total: None,
                    csf: None,
                };
                let chi = m.invert(&problem).expect("inversion");
                let s = scores(&chi, &b.chi, &mask, b.dims);
                for k in 0..3 {
                    sum[k] += s[k] / args.synthetic as f64;
                }
            }
            print(
                &format!("{name} (synthetic, 1 ori)"),
                sum,
                t0.elapsed().as_secs_f64(),
            );
        }
    }

    let Some(dir) = &args.phantom else { return };
    let read = |f: &str| {
        chimap::io::read_image(&dir.join(f))
            .expect("phantom file")
            .frames
            .remove(0)
    };
    let chi = read("chi_brain.nii.gz");
    let mask_v = read("brainmask.nii.gz");
    // Crop to the brain's bounding box plus a margin, padded to fast FFT sizes.
    let full = chi.dims;
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    for (v, &m) in mask_v.data.iter().enumerate() {
        if m > 0.5 {
            let p = [
                v % full[0],
                (v / full[0]) % full[1],
                v / (full[0] * full[1]),
            ];
            for a in 0..3 {
                lo[a] = lo[a].min(p[a]);
                hi[a] = hi[a].max(p[a]);
            }
        }
    }
    let margin = 6;
    let lo = [0, 1, 2].map(|a| lo[a].saturating_sub(margin));
    let dims = [0, 1, 2].map(|a| fast_len((hi[a] + margin + 1).min(full[a]) - lo[a]));
    let take = |data: &[f32]| -> Vec<f32> {
        let mut out = vec![0.0; dims.iter().product()];
        for k in 0..dims[2] {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    let (x, y, z) = (lo[0] + i, lo[1] + j, lo[2] + k);
                    if x < full[0] && y < full[1] && z < full[2] {
                        out[i + dims[0] * (j + dims[1] * k)] =
                            data[x + full[0] * (y + full[1] * z)];
                    }
                }
            }
        }
        out
    };
    let mask: Vec<bool> = take(&mask_v.data).iter().map(|&m| m > 0.5).collect();
    let truth: Vec<f32> = take(&chi.data)
        .iter()
        .zip(&mask)
        .map(|(&c, &m)| if m { c } else { 0.0 })
        .collect();
    let vs = chi.geometry.voxel_size;
    let sigma = field_noise_ppm(100.0, 3.0, 0.02);
    let dirs: Vec<[f64; 3]> = std::iter::once([0.0, 0.0, 1.0])
        .chain(DIRECTIONS.iter().copied().skip(1))
        .collect();
    let mut rng = Rng::new(17);
    let fields: Vec<Vec<f32>> = dirs
        .iter()
        .map(|&b| {
            // Sources from the whole (padded) brain, so no edge of the crop cuts a field.
            let big = [0, 1, 2].map(|a| fast_len(dims[a] + 32));
            let f = DipoleOperator::new(big, vs, b).forward(&pad(&truth, dims, big, 0.0));
            crop(&f, big, dims)
                .iter()
                .zip(&mask)
                .map(|(&v, &m)| {
                    if m {
                        v + (sigma * rng.normal()) as f32
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    println!(
        "\nMNI phantom, grid {dims:?} (crop of {full:?}), 3 T noise σ = {:.2} ppb",
        sigma * 1e3
    );
    for &n in &args.orientations {
        for name in &methods {
            if n == 1 && name == "cosmos" {
                continue;
            }
            let m = method(name, &args.weights, args.max_memory);
            let problem = Problem {
                dims,
                voxel_size: vs,
                orientations: (0..n)
                    .map(|i| Orientation {
                        field: &fields[i],
                        b0: dirs[i],
                    })
                    .collect(),
                mask: &mask,
                weight: None,
                magnitude: None,
                total: None,
                csf: None,
            };
            let t0 = std::time::Instant::now();
            let chi = m.invert(&problem).expect("inversion");
            print(
                &format!("{name} (MNI, {n} ori)"),
                scores(&chi, &truth, &mask, dims),
                t0.elapsed().as_secs_f64(),
            );
        }
    }
}
