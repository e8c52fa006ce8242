//! Pipeline benchmark on a 1 mm whole-head grid: prints the time of each stage and ratios
//! measured in the same run (absolute times drift on shared machines; ratios do not).
//!
//! `cargo bench --bench pipeline` (add `-- --dims NX NY NZ` for another grid).

use std::time::Instant;

use chimap::inversion::{self, Method, Orientation, Problem};
use chimap::physics::{DipoleOperator, Fft3};

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

fn main() {
    let args: Vec<String> = std::env::args().collect();
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
    println!(
        "grid {}×{}×{} ({:.1} M voxels), {} threads",
        dims[0],
        dims[1],
        dims[2],
        n as f64 / 1e6,
        rayon::current_num_threads()
    );

    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let fft = Fft3::new(dims);
    let t_fft = time(5, || {
        let mut s = fft.forward(&x);
        fft.inverse(&mut s)
    });
    println!("FFT forward+inverse pair     {:8.1} ms", t_fft * 1e3);

    let b0 = [0.0, 0.0, 1.0];
    let t_kernel = time(3, || DipoleOperator::new(dims, [1.0; 3], b0));
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
        orientations: vec![Orientation { field: &x, b0 }],
        mask: &mask,
    };
    let t_tkd = time(5, || tkd.invert(&problem).expect("TKD runs"));
    println!(
        "TKD (incl. kernel)           {:8.1} ms   ratio TKD / FFT pair = {:.2} (goal ≤ 1.5)",
        t_tkd * 1e3,
        t_tkd / t_fft
    );
}
