//! Small-kernel 3D filtering for the image-quality metrics: separable convolution with zero
//! padding outside the volume (MATLAB's `convn(…, 'same')`), the Gaussian window of SSIM/XSIM
//! and the Laplacian-of-Gaussian of HFEN.
//!
//! The kernels are small (≤ 15 taps) and used once or twice per map, so direct convolution
//! is simpler and, at these sizes, not slower than going through the FFT.

use rayon::prelude::*;

/// Samples of `exp(−x²/2σ²)` for x = −h..=h, normalised to sum 1.
pub fn gaussian_1d(sigma: f64, half_width: usize) -> Vec<f64> {
    let h = half_width as isize;
    let mut w: Vec<f64> = (-h..=h)
        .map(|x| (-((x * x) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = w.iter().sum();
    w.iter_mut().for_each(|v| *v /= s);
    w
}

/// `out = k_x ⊗ k_y ⊗ k_z ∗ data`, zero outside the volume, output on the input grid. Each
/// kernel has odd length and is centred (all kernels used here are symmetric, so convolution
/// and correlation agree).
pub fn separable(data: &[f64], dims: [usize; 3], kernels: [&[f64]; 3]) -> Vec<f64> {
    let mut a = data.to_vec();
    let mut b = vec![0.0; data.len()];
    for (axis, k) in kernels.iter().enumerate() {
        pass(&a, &mut b, dims, axis, k);
        std::mem::swap(&mut a, &mut b);
    }
    a
}

/// One 1-D pass along `axis`. Work is split by output x-rows, which are contiguous in both
/// input and output for every axis.
fn pass(input: &[f64], out: &mut [f64], dims: [usize; 3], axis: usize, k: &[f64]) {
    assert!(k.len() % 2 == 1, "kernels have odd length");
    let [nx, ny, nz] = dims;
    let h = (k.len() / 2) as isize;
    out.par_chunks_mut(nx).enumerate().for_each(|(row, o)| {
        let (j, kz) = ((row % ny) as isize, (row / ny) as isize);
        o.iter_mut().for_each(|v| *v = 0.0);
        match axis {
            0 => {
                // Tap by tap over the row: o[i] += w·src[i + t − h] wherever both exist.
                let src = &input[row * nx..(row + 1) * nx];
                for (t, &w) in k.iter().enumerate() {
                    let shift = t as isize - h;
                    let lo = (-shift).max(0) as usize;
                    let hi = (nx as isize - shift).min(nx as isize).max(0) as usize;
                    if lo >= hi {
                        continue;
                    }
                    let s0 = (lo as isize + shift) as usize;
                    o[lo..hi]
                        .iter_mut()
                        .zip(&src[s0..s0 + (hi - lo)])
                        .for_each(|(v, &a)| *v += w * a);
                }
            }
            _ => {
                let (pos, len) = if axis == 1 { (j, ny) } else { (kz, nz) };
                for (t, &w) in k.iter().enumerate() {
                    let p = pos + t as isize - h;
                    if p < 0 || p as usize >= len {
                        continue;
                    }
                    let src_row = if axis == 1 {
                        p as usize + ny * kz as usize
                    } else {
                        j as usize + ny * p as usize
                    };
                    let src = &input[src_row * nx..(src_row + 1) * nx];
                    o.iter_mut().zip(src).for_each(|(v, &s)| *v += w * s);
                }
            }
        }
    });
}

/// The QSM challenges' Laplacian-of-Gaussian kernel (HFEN), applied with zero padding.
///
/// On a cube of side `2h+1` with Gaussian `g` (normalised over the cube), the kernel is
/// `H = (|x|²/σ⁴ − 3/σ²)·g(x)`, minus its own mean so that it sums to zero. Both parts are
/// sums of separable terms: `H = Σ_axes d2 ⊗ g ⊗ g − c·1 ⊗ 1 ⊗ 1`, with
/// `d2(x) = (x²/σ⁴ − 1/σ²)·g₁(x)`; that is how it is applied here.
pub fn log_filter(data: &[f64], dims: [usize; 3], sigma: f64, half_width: usize) -> Vec<f64> {
    let g = gaussian_1d(sigma, half_width);
    let h = half_width as isize;
    let d2: Vec<f64> = (-h..=h)
        .zip(&g)
        .map(|(x, &gx)| ((x * x) as f64 / sigma.powi(4) - 1.0 / (sigma * sigma)) * gx)
        .collect();
    let ones = vec![1.0; g.len()];
    let n3 = (g.len() as f64).powi(3);
    // Σ H before the correction is 3·Σd2 (Σg = 1 along the other two axes).
    let c = 3.0 * d2.iter().sum::<f64>() / n3;
    let mut out = separable(data, dims, [&d2, &g, &g]);
    for ks in [[&g, &d2, &g], [&g, &g, &d2]] {
        let t = separable(data, dims, [ks[0], ks[1], ks[2]]);
        out.par_iter_mut().zip(&t).for_each(|(o, v)| *o += v);
    }
    let boxed = separable(data, dims, [&ones, &ones, &ones]);
    out.par_iter_mut()
        .zip(&boxed)
        .for_each(|(o, v)| *o -= c * v);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Direct 'same' convolution with a full 3D kernel of side `2h+1`, zero padding.
    pub(crate) fn naive_conv(
        data: &[f64],
        dims: [usize; 3],
        kernel: &dyn Fn(isize, isize, isize) -> f64,
        h: isize,
    ) -> Vec<f64> {
        let [nx, ny, nz] = dims.map(|d| d as isize);
        let mut out = vec![0.0; data.len()];
        for k in 0..nz {
            for j in 0..ny {
                for i in 0..nx {
                    let mut s = 0.0;
                    for c in -h..=h {
                        for b in -h..=h {
                            for a in -h..=h {
                                let (x, y, z) = (i - a, j - b, k - c);
                                if x >= 0 && y >= 0 && z >= 0 && x < nx && y < ny && z < nz {
                                    s += kernel(a, b, c) * data[(x + nx * (y + ny * z)) as usize];
                                }
                            }
                        }
                    }
                    out[(i + nx * (j + ny * k)) as usize] = s;
                }
            }
        }
        out
    }

    pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect()
    }

    #[test]
    fn separable_gaussian_matches_a_direct_3d_convolution_including_the_borders() {
        let dims = [6, 5, 4]; // smaller than the 7³ window along z: padding is exercised
        let data = pseudo_random(6 * 5 * 4, 3);
        let sigma = 1.5;
        let mut norm = 0.0;
        for c in -3..=3isize {
            for b in -3..=3isize {
                for a in -3..=3isize {
                    norm += (-((a * a + b * b + c * c) as f64) / (2.0 * sigma * sigma)).exp();
                }
            }
        }
        let kernel = |a: isize, b: isize, c: isize| {
            (-((a * a + b * b + c * c) as f64) / (2.0 * sigma * sigma)).exp() / norm
        };
        let want = naive_conv(&data, dims, &kernel, 3);
        let g = gaussian_1d(sigma, 3);
        let got = separable(&data, dims, [&g, &g, &g]);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    /// The challenge kernel built voxel by voxel from its definition.
    pub(crate) fn challenge_log_kernel(
        sigma: f64,
        h: isize,
    ) -> impl Fn(isize, isize, isize) -> f64 {
        let side = 2 * h + 1;
        let mut g = vec![0.0; (side * side * side) as usize];
        let idx = move |a: isize, b: isize, c: isize| {
            ((a + h) + side * ((b + h) + side * (c + h))) as usize
        };
        for c in -h..=h {
            for b in -h..=h {
                for a in -h..=h {
                    g[idx(a, b, c)] =
                        (-((a * a + b * b + c * c) as f64) / (2.0 * sigma * sigma)).exp();
                }
            }
        }
        let gs: f64 = g.iter().sum();
        let mut kern = vec![0.0; g.len()];
        for c in -h..=h {
            for b in -h..=h {
                for a in -h..=h {
                    let r2 = (a * a + b * b + c * c) as f64;
                    kern[idx(a, b, c)] =
                        (r2 / sigma.powi(4) - 3.0 / (sigma * sigma)) * g[idx(a, b, c)] / gs;
                }
            }
        }
        let mean = kern.iter().sum::<f64>() / kern.len() as f64;
        move |a, b, c| kern[idx(a, b, c)] - mean
    }

    #[test]
    fn log_filter_matches_the_challenge_kernel_applied_directly() {
        let dims = [9, 8, 7]; // smaller than the 15³ kernel on every axis
        let data = pseudo_random(9 * 8 * 7, 11);
        let want = naive_conv(&data, dims, &challenge_log_kernel(1.5, 7), 7);
        let got = log_filter(&data, dims, 1.5, 7);
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12 * scale.max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn log_kernel_sums_to_zero_so_a_constant_has_no_high_frequencies() {
        // At the centre of a 15³ constant block the whole kernel overlaps the data.
        let dims = [15, 15, 15];
        let data = vec![2.5; 15 * 15 * 15];
        let out = log_filter(&data, dims, 1.5, 7);
        assert!(out[7 + 15 * (7 + 15 * 7)].abs() < 1e-12);
        // Near the border the zero padding makes an edge, which the filter does see.
        assert!(out[0].abs() > 1e-3);
    }
}
