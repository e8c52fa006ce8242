//! Pipeline benchmark on a 1 mm whole-head grid: prints the time of each stage and ratios
//! measured in the same run (absolute times drift on shared machines; ratios do not).
//!
//! `cargo bench --bench pipeline` (add `-- --dims NX NY NZ` for another grid, `--quick` to
//! skip the peer-comparison grid).
//!
//! Part 1 times an FFT pair and TKD on the grid as given. Part 2 simulates one procedural
//! 5-echo head (setup, not timed) and times every stage of the raw-phase pipeline once, in
//! the order and with the calls of `pipeline::acquisition::raw_local_field` and the
//! inversion stage of `pipeline::process`. Part 3 repeats the total on the 164×205×205 grid
//! of the peer comparison.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use chimap::inversion::{self, Method, Orientation, Problem};
use chimap::physics::{fft::fast_len, units::hz_per_ppm, DipoleOperator, Fft3};
use chimap::pipeline::Config;
use chimap::simulate::{simulate_series, Phantom, Series, SimParams};
use chimap::{preprocess, volume, Volume};

/// The grid of the peer comparison (issue goal: raw phase → TKD in ≤ 7 s on 2 cores).
const PEER_DIMS: [usize; 3] = [164, 205, 205];
const PEER_GOAL_S: f64 = 7.0;
const B0: [f64; 3] = [0.0, 0.0, 1.0];
const B0_TESLA: f64 = 3.0;
const ECHO_TIMES_S: [f64; 5] = [0.004, 0.008, 0.012, 0.016, 0.020];

/// Median of `reps` timings of `f`, in seconds.
fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            black_box(f());
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

/// One timed call: its result and its time in seconds.
fn once<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let s = Instant::now();
    let out = black_box(f());
    (out, s.elapsed().as_secs_f64())
}

/// Median time of an FFT forward+inverse pair on `dims` (plan made outside the timing).
fn fft_pair(dims: [usize; 3]) -> f64 {
    let n: usize = dims.iter().product();
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let fft = Fft3::new(dims);
    time(5, || {
        let mut s = fft.forward(black_box(&x));
        fft.inverse(&mut s)
    })
}

fn fmt_dims(d: [usize; 3]) -> String {
    format!("{}×{}×{}", d[0], d[1], d[2])
}

/// One procedural head at 1 mm on `dims`: 5 echoes (4–20 ms), 3 T, SNR 100, no oversampling.
fn simulate(dims: [usize; 3]) -> Series {
    let phantom = Phantom::procedural(dims, [1.0; 3], 0).expect("procedural phantom");
    let params = SimParams {
        field_strength: B0_TESLA,
        echo_times: ECHO_TIMES_S.to_vec(),
        snr: 100.0,
        oversample: 1,
        phase_offset: true,
        seed: 0,
    };
    simulate_series(&phantom, &params, B0).expect("simulated series")
}

/// Runs raw phase → χ with the stage calls of the pipeline, each timed once.
/// Returns (stage, seconds) in pipeline order.
fn run_stages(series: &Series, config: &Config) -> Vec<(&'static str, f64)> {
    let pre = &config.preprocess;
    let phase_paths = vec![PathBuf::from("sim_part-phase_MEGRE.nii")];
    // Inputs as `fields::load_echoes` hands them over (copies made outside the timings).
    let mut phase: Vec<Volume> = series.phase.clone();
    let magnitude: Vec<Volume> = series.magnitude.clone();
    let mut t = Vec::new();

    let (scaling, s) = once(|| {
        preprocess::scale::scale_phase(&mut phase, &phase_paths, false, &pre.scale)
            .expect("phase scaling")
    });
    black_box(&scaling);
    t.push(("phase scaling", s));

    let dims = phase[0].dims;
    let work = dims.map(fast_len);
    let ((phase, magnitude), s) = once(|| {
        let p: Vec<Volume> = phase.iter().map(|v| v.padded(work)).collect();
        let m: Vec<Volume> = magnitude.iter().map(|v| v.padded(work)).collect();
        (p, m)
    });
    t.push(("pad to work grid", s));

    let (fit, s) = once(|| {
        preprocess::echo_fit::fit_field(
            &phase,
            Some(&magnitude),
            &ECHO_TIMES_S,
            &pre.echo_fit,
            &pre.unwrap,
        )
        .expect("echo fit")
    });
    drop(phase);
    t.push(("echo fit (offset, unwrap)", s));

    let ((rss, mask), s) = once(|| {
        let rss = preprocess::echo_fit::root_sum_of_squares(&magnitude).expect("magnitudes");
        let mask = preprocess::mask::brain_mask(&rss, Some(&fit.residual_rad), &pre.mask)
            .expect("brain mask");
        (rss, mask)
    });
    t.push(("RSS + brain mask", s));

    let (filled, s) = once(|| {
        preprocess::voids::fill_voids(
            &fit.field_hz,
            &mask,
            Some(&rss),
            Some(&fit.residual_rad),
            &pre.voids,
        )
        .expect("signal voids")
    });
    t.push(("signal voids", s));

    let (total_ppm, s) = once(|| {
        let to_ppm = 1.0 / hz_per_ppm(B0_TESLA);
        filled.field.with_data(
            filled
                .field
                .data
                .iter()
                .map(|&v| (v as f64 * to_ppm) as f32)
                .collect(),
        )
    });
    t.push(("Hz → ppm", s));

    let (local, s) = once(|| {
        preprocess::background::vsharp(&total_ppm, &mask, &pre.background).expect("V-SHARP")
    });
    t.push(("V-SHARP", s));

    // `process`: crop the local field, pad it again, invert, crop, reference to the mean.
    let method = config.inversion.method();
    let (chi, s) = once(|| {
        let field = local.field.cropped(dims);
        let mask = volume::crop(&local.mask, work, dims);
        let field_w = field.padded(work);
        let mask_w = volume::pad(&mask, dims, work, false);
        let problem = Problem {
            dims: work,
            voxel_size: field.geometry.voxel_size,
            orientations: vec![Orientation {
                field: &field_w.data,
                b0: B0,
            }],
            mask: &mask_w,
        };
        let mut chi = volume::crop(&method.invert(&problem).expect("TKD"), work, dims);
        let reference = inversion::reference_to_mean(&mut chi, &mask, &mask);
        (chi, reference)
    });
    black_box(&chi);
    t.push(("TKD (crop, pad, invert, ref.)", s));
    t
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let dims = match args.iter().position(|a| a == "--dims") {
        Some(i) => [0, 1, 2].map(|k| {
            args.get(i + 1 + k)
                .and_then(|v| v.parse().ok())
                .expect("--dims NX NY NZ")
        }),
        // The 1 mm MNI head grid.
        None => [197, 233, 189],
    };
    let n: usize = dims.iter().product();
    let work = dims.map(fast_len);
    println!(
        "grid {} ({:.1} M voxels), work grid {}, {} threads",
        fmt_dims(dims),
        n as f64 / 1e6,
        fmt_dims(work),
        rayon::current_num_threads()
    );

    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let t_fft = fft_pair(dims);
    println!("FFT forward+inverse pair     {:8.1} ms", t_fft * 1e3);
    let t_fft_work = fft_pair(work);
    println!(
        "FFT pair on the work grid    {:8.1} ms   ({:.2} FFT pairs)",
        t_fft_work * 1e3,
        t_fft_work / t_fft
    );

    let t_kernel = time(3, || DipoleOperator::new(dims, [1.0; 3], B0));
    println!(
        "dipole operator setup        {:8.1} ms   ({:.2} FFT pairs)",
        t_kernel * 1e3,
        t_kernel / t_fft
    );

    let mask = vec![true; n];
    let tkd = inversion::tkd::Tkd::new(Default::default());
    let problem = Problem {
        dims,
        voxel_size: [1.0; 3],
        orientations: vec![Orientation { field: &x, b0: B0 }],
        mask: &mask,
    };
    let t_tkd = time(5, || tkd.invert(black_box(&problem)).expect("TKD runs"));
    println!(
        "TKD (incl. kernel)           {:8.1} ms   ratio TKD / FFT pair = {:.2} (goal ≤ 1.5)",
        t_tkd * 1e3,
        t_tkd / t_fft
    );
    drop(problem);
    drop((x, mask));

    // Raw phase → χ, stage by stage, on a simulated head at this grid.
    let config = Config::default();
    let (series, t_setup) = once(|| simulate(dims));
    println!(
        "\nraw phase → TKD, {} echoes (setup: simulation {:.1} s, not timed)",
        series.phase.len(),
        t_setup
    );
    println!(
        "  {:<30} {:>9} {:>10} {:>10}",
        "stage", "ms", "/ FFT pair", "/ work pair"
    );
    let stages = run_stages(&series, &config);
    drop(series);
    for (name, s) in &stages {
        println!(
            "  {:<30} {:9.1} {:10.2} {:10.2}",
            name,
            s * 1e3,
            s / t_fft,
            s / t_fft_work
        );
    }
    let total: f64 = stages.iter().map(|(_, s)| s).sum();
    println!(
        "  {:<30} {:9.1} {:10.2} {:10.2}",
        "total raw phase → TKD",
        total * 1e3,
        total / t_fft,
        total / t_fft_work
    );

    if quick {
        println!(
            "\n--quick: peer-comparison grid {} skipped",
            fmt_dims(PEER_DIMS)
        );
        return;
    }
    let peer_work = PEER_DIMS.map(fast_len);
    let t_fft_peer = fft_pair(PEER_DIMS);
    let t_fft_peer_work = fft_pair(peer_work);
    let series = simulate(PEER_DIMS);
    let total_peer: f64 = run_stages(&series, &config).iter().map(|(_, s)| s).sum();
    println!(
        "\npeer grid {} (work grid {}), {} echoes: raw phase → TKD {:.2} s (goal ≤ {PEER_GOAL_S} s on 2 cores)",
        fmt_dims(PEER_DIMS),
        fmt_dims(peer_work),
        series.phase.len(),
        total_peer,
    );
    println!(
        "  = {:.1} FFT pairs on that grid ({:.1} ms), {:.1} on its work grid ({:.1} ms)",
        total_peer / t_fft_peer,
        t_fft_peer * 1e3,
        total_peer / t_fft_peer_work,
        t_fft_peer_work * 1e3
    );
}
