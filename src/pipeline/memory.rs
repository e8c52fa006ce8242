//! Memory: what a run will need (so `--mem-gb` can refuse before any work) and what it used
//! (the peak so far after each stage, read from the kernel, for the sidecar and the benchmark).
//!
//! The estimate is a sum of whole volumes alive at each stage's peak, counted in the
//! pipeline's own units (f32 volumes on the padded work grid, complex FFT buffers), plus a
//! fixed allowance for the program itself. Its terms were read off the code and checked
//! against measured peaks (`scripts/memory_table.sh`, README's memory table): an upper bound,
//! 1.14–1.63× the measured peak on the 1 mm head it was set on and 1.15–1.21× on a 0.5 mm
//! head it was not.

use super::Config;
use crate::inversion::MethodName;

/// Bytes in a GiB, the unit of `--mem-gb`, `--max-memory` and the messages.
pub const GIB: f64 = (1u64 << 30) as f64;
/// Bytes of one f32 volume per voxel.
const F32: f64 = 4.0;
/// The program, its libraries, thread stacks and small buffers.
const FIXED_BYTES: f64 = 96.0 * (1u64 << 20) as f64;
/// The margin on every variable term: allocator slack and short-lived temporaries.
pub const MARGIN: f64 = 1.15;
/// The least activation memory a learned method is given under `--mem-gb`: below this its
/// tiles would be mostly overlap.
pub const MIN_ACTIVATION_BYTES: f64 = 256.0 * (1u64 << 20) as f64;

/// What one unit of work (an acquisition or an orientation set) needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Need {
    /// Peak resident bytes of the whole process.
    pub bytes: f64,
    /// The stage where the peak is.
    pub stage: &'static str,
}

/// The shape of the work.
#[derive(Clone, Copy, Debug)]
pub struct Work {
    /// Voxels of the input grid.
    pub input_voxels: usize,
    /// Voxels of the padded work grid (FFT-friendly sizes).
    pub work_voxels: usize,
    /// Echoes per orientation (0 for field-map inputs).
    pub echoes: usize,
    /// Whether magnitude images come with the echoes.
    pub magnitude: bool,
    /// Orientations inverted together (1 unless a joint method takes a set).
    pub orientations: usize,
    /// Voxels of a one-step method's extended grid (the work grid grown by its padding),
    /// if TFI or SS-TV runs (SS-TV also as a learned method's start from the total field).
    pub padded_voxels: Option<usize>,
    /// SS-TV's data terms (one per radius).
    pub sstv_radii: usize,
}

/// Peak bytes of one acquisition or set through preprocessing and `method`'s inversion.
/// `learned_activation_bytes` is the budget the learned methods tile their activations to.
pub fn estimate(work: &Work, method: MethodName, learned_activation_bytes: f64) -> Need {
    let w = work.work_voxels as f64;
    let i = work.input_voxels as f64;
    let e = work.echoes as f64;
    let parts = if work.magnitude { 2.0 } else { 1.0 };
    // Volumes every orientation keeps to the end: local field, mask-like bytes, weight,
    // magnitude and the preprocessing maps written beside the Chimap.
    let kept_per_orientation = if work.echoes > 0 { 8.0 } else { 3.0 } * F32 * w;
    let kept_before = kept_per_orientation * (work.orientations as f64 - 1.0).max(0.0);

    let mut stages: Vec<(&'static str, f64)> = Vec::new();
    if work.echoes > 0 {
        // Inputs as read, then their padded copies (each input freed once padded).
        stages.push(("load", parts * e * F32 * i));
        stages.push(("phase scaling", parts * e * F32 * (i.max(w)) + F32 * i));
        // The padded echoes, the unwrapped echoes, the unwrapper's and the fit's work
        // (quality maps, region labels, queues: ≈ 12 volumes) and the magnitude mask beside it.
        stages.push((
            "echo fit and magnitude mask",
            (parts + 1.0) * e * F32 * w + 12.0 * F32 * w,
        ));
        // Background removal: FFT buffers (complex f64) and the fields around them.
        stages.push(("background removal", 10.0 * F32 * w + 2.0 * 16.0 * w));
    } else {
        stages.push(("load", 2.0 * F32 * i + 2.0 * F32 * w));
        stages.push(("background removal", 6.0 * F32 * w + 2.0 * 16.0 * w));
    }
    let inversion = kept_before
        + kept_per_orientation
        + inversion_bytes(work, method, learned_activation_bytes);
    stages.push(("inversion", inversion));
    let (stage, bytes) = stages
        .into_iter()
        .map(|(s, b)| (s, b + kept_before))
        .fold(("load", 0.0f64), |a, b| if b.1 > a.1 { b } else { a });
    Need {
        bytes: FIXED_BYTES + MARGIN * bytes,
        stage,
    }
}

/// The inversion's own buffers on top of what preprocessing keeps.
fn inversion_bytes(work: &Work, method: MethodName, learned_activation_bytes: f64) -> f64 {
    let w = work.work_voxels as f64;
    let o = work.orientations as f64;
    // A complex f64 spectrum and a real f32 volume on the work grid.
    let (c, r) = (16.0 * w, F32 * w);
    match method {
        MethodName::Tkd | MethodName::Cfl2 => 2.0 * c + 2.0 * r,
        MethodName::Cosmos => (o + 2.0) * c + 2.0 * r,
        MethodName::Ilsqr => 4.0 * c + 10.0 * r,
        MethodName::Tv | MethodName::Rts | MethodName::Medi => 2.0 * c + 8.0 * r,
        MethodName::Tfi => {
            let t = work.padded_voxels.unwrap_or(work.work_voxels) as f64;
            3.0 * 16.0 * t + 6.0 * F32 * t
        }
        MethodName::Sstv => sstv_bytes(work),
        MethodName::Lpcnn | MethodName::Loopnet | MethodName::Unet => {
            let learned = (o + 1.0) * c + 8.0 * r + learned_activation_bytes;
            // The SS-TV start (a padded grid is planned only then) runs, and is freed, before
            // the network.
            match work.padded_voxels {
                Some(_) => learned.max(sstv_bytes(work)),
                None => learned,
            }
        }
    }
}

/// SS-TV's buffers on its padded grid.
fn sstv_bytes(work: &Work) -> f64 {
    // Per radius: kernel (half spectrum), target, weight and ADMM's three arrays;
    // χ, the last iterate, u, q and the padded inputs; two complex spectra.
    let t = work.padded_voxels.unwrap_or(work.work_voxels) as f64;
    let radii = work.sstv_radii as f64;
    (5.5 * radii + 14.0) * F32 * t + 2.0 * 8.0 * t / 2.0
}

/// Bytes a learned method's activations take on `work`: its whole-volume need, up to the
/// tiling `budget`. The need per voxel is that of the shipped models (see `nn::lpcnn`,
/// `nn::loopnet`); with other `--weights` only the budget bounds it.
pub fn activations(work: &Work, config: &Config, budget: f64) -> f64 {
    let per_voxel = match config.inversion.method {
        // 4 live tensors of the shipped prox's 8 channels.
        MethodName::Lpcnn => 4.0 * 4.0 * 8.0,
        // ≈ 25 tensors of the first level's 8 channels.
        MethodName::Loopnet | MethodName::Unet => 4.0 * 25.0 * 8.0,
        _ => return 0.0,
    };
    let planned = if config.inversion.weights.is_some() {
        budget
    } else {
        budget.min(per_voxel * work.work_voxels as f64)
    };
    ACTIVATION_SHARE * planned
}

/// The share of the networks' own activation estimate (what their tiles are planned with)
/// that is resident at once on the CPU: measured 0.22–0.3 on the 1 mm head (README's memory
/// table), counted as 0.4.
const ACTIVATION_SHARE: f64 = 0.4;

/// The largest resident size of this process so far (Linux's `VmHWM`, the figure `time -v`
/// and schedulers report); `None` on systems without `/proc`.
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// GiB for messages.
pub fn gib(bytes: f64) -> f64 {
    bytes / GIB
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(voxels: usize, echoes: usize) -> Work {
        Work {
            input_voxels: voxels,
            work_voxels: voxels * 11 / 10,
            echoes,
            magnitude: true,
            orientations: 1,
            padded_voxels: None,
            sstv_radii: 0,
        }
    }

    #[test]
    fn the_estimate_grows_with_the_grid_the_echoes_and_the_orientations() {
        let m = MethodName::Tkd;
        let small = estimate(&raw(1 << 20, 4), m, 0.0).bytes;
        let big = estimate(&raw(8 << 20, 4), m, 0.0).bytes;
        // Everything but the fixed part scales with the voxels.
        let ratio = (big - FIXED_BYTES) / (small - FIXED_BYTES);
        assert!((ratio - 8.0).abs() < 1e-5, "{ratio}");
        assert!(estimate(&raw(1 << 20, 6), m, 0.0).bytes > small);
        let set = Work {
            orientations: 4,
            ..raw(1 << 20, 4)
        };
        assert!(estimate(&set, MethodName::Cosmos, 0.0).bytes > small);
        // A field map skips the echoes.
        let field = Work {
            echoes: 0,
            magnitude: false,
            ..raw(1 << 20, 4)
        };
        assert!(estimate(&field, m, 0.0).bytes < small);
        // TFI's extended grid costs more than the work grid.
        let tfi = |t| Work {
            padded_voxels: Some(t),
            ..raw(1 << 20, 4)
        };
        let (a, b) = (
            estimate(&tfi(2 << 20), MethodName::Tfi, 0.0).bytes,
            estimate(&tfi(4 << 20), MethodName::Tfi, 0.0).bytes,
        );
        assert!(b > a, "{a} {b}");
        // LP-CNN with an SS-TV start (a padded grid planned) needs at least SS-TV's peak.
        let sstv = Work {
            padded_voxels: Some(2 << 20),
            sstv_radii: 5,
            ..raw(1 << 20, 4)
        };
        let lpcnn = estimate(&sstv, MethodName::Lpcnn, 0.0).bytes;
        assert!(lpcnn >= estimate(&sstv, MethodName::Sstv, 0.0).bytes);
        assert!(lpcnn > estimate(&raw(1 << 20, 4), MethodName::Lpcnn, 0.0).bytes);
    }

    #[test]
    fn learned_activations_are_the_volumes_need_up_to_the_budget() {
        let mut config = Config::default();
        config.inversion.method = MethodName::Lpcnn;
        let w = raw(1 << 20, 4);
        let need = activations(&w, &config, f64::INFINITY);
        assert!(need > 0.0);
        // A budget below the whole-volume need bounds what is counted.
        let small = need / ACTIVATION_SHARE / 2.0;
        assert!((activations(&w, &config, small) - need / 2.0).abs() < 1e-6 * need);
        // The estimate adds them in full.
        let (a, b) = (
            estimate(&w, MethodName::Lpcnn, 0.0).bytes,
            estimate(&w, MethodName::Lpcnn, need).bytes,
        );
        assert!(b > a);
        // Unknown weights: only the budget bounds them.
        config.inversion.weights = Some("other.safetensors".into());
        assert_eq!(activations(&w, &config, 100.0), 100.0 * ACTIVATION_SHARE);
        config.inversion.method = MethodName::Tv;
        assert_eq!(activations(&w, &config, 100.0), 0.0);
    }

    #[test]
    fn the_peak_resident_size_covers_memory_in_use() {
        let Some(before) = peak_resident_bytes() else {
            return; // no /proc here
        };
        assert!(before > 0);
        let mut buffer = vec![0u8; 64 << 20];
        // Touch every page so it is resident.
        for i in (0..buffer.len()).step_by(4096) {
            buffer[i] = 1;
        }
        let after = peak_resident_bytes().unwrap();
        assert!(after >= 64 << 20, "{after}");
        assert!(after >= before);
        assert_eq!(
            buffer.iter().step_by(4096).filter(|&&b| b == 1).count(),
            16384
        );
    }
}
