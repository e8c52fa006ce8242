//! The dipole ops on a CUDA device (`--features cuda`): cuFFT 3D real-to-complex and
//! complex-to-real plans for the grid, and one small NVRTC kernel that multiplies the half
//! spectrum by `D_b(k)` (optionally accumulating over directions).
//!
//! The spectrum layout is the physics module's: a row-major `[D, H, W]` tensor is a cuFFT
//! `(nz, ny, nx)` transform whose half spectrum `[nz, ny, nx/2 + 1]` is indexed like
//! `DipoleOperator::kernel`, so the CPU kernels are uploaded unchanged.

use std::sync::{Mutex, MutexGuard, OnceLock};

use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{CudaStorage, Layout, Result, Shape};
use cudarc::cufft::sys::{cufftType, float2};
use cudarc::cufft::CudaFft;
use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::dipole::DipoleSet;

const MODULE: &str = "chimap_dipole";
const FUNCTION: &str = "chimap_dipole_madd";
/// `out = (accumulate ? out : 0) + scale · k · s`, complex `s` and `out`, real `k`.
const SOURCE: &str = r#"
extern "C" __global__ void chimap_dipole_madd(const float2* s, const float* k, float2* out,
                                              unsigned int n, float scale, int accumulate) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = k[i] * scale;
    float2 v = s[i];
    float2 o = accumulate ? out[i] : make_float2(0.0f, 0.0f);
    o.x += g * v.x;
    o.y += g * v.y;
    out[i] = o;
}
"#;

fn cuda_err(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

/// The kernel's PTX, compiled once per process by NVRTC.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("compiling the dipole kernel: {e}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Cuda(e.clone().into()))
}

/// What a dipole set keeps on one GPU: its FFT plans and every direction's `D(k)`.
pub(super) struct Resident {
    device: DeviceId,
    r2c: CudaFft,
    c2r: CudaFft,
    /// `B × spectrum_len` values.
    kernels: CudaSlice<f32>,
}

/// Per-set slot for the resident state, created on first use on a device.
#[derive(Default)]
pub(super) struct Slot(Mutex<Option<Resident>>);

impl Slot {
    fn get(&self, set: &DipoleSet, dev: &CudaDevice) -> Result<MutexGuard<'_, Option<Resident>>> {
        let mut guard = self.0.lock().expect("dipole plan lock");
        if guard.as_ref().is_none_or(|r| r.device != dev.id()) {
            let [nx, ny, nz] = set.dims();
            let plan = |kind| {
                CudaFft::plan_3d(nz as i32, ny as i32, nx as i32, kind, dev.cuda_stream())
                    .map_err(cuda_err)
            };
            let host: Vec<f32> = set
                .operators()
                .iter()
                .flat_map(|op| op.kernel().iter().copied())
                .collect();
            *guard = Some(Resident {
                device: dev.id(),
                r2c: plan(cufftType::CUFFT_R2C)?,
                c2r: plan(cufftType::CUFFT_C2R)?,
                kernels: dev.clone_htod(&host)?,
            });
        }
        Ok(guard)
    }
}

/// Grid sizes: voxels and half-spectrum bins.
fn sizes(set: &DipoleSet) -> (usize, usize) {
    let [nx, ny, nz] = set.dims();
    (nx * ny * nz, (nx / 2 + 1) * ny * nz)
}

/// The contiguous f32 input of a custom op.
fn input<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("dipole: input must be contiguous");
    };
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

#[allow(clippy::too_many_arguments)]
fn madd(
    dev: &CudaDevice,
    spec: &CudaSlice<f32>,
    kernel: &CudaView<f32>,
    out: &mut CudaSlice<f32>,
    bins: usize,
    scale: f32,
    accumulate: bool,
) -> Result<()> {
    let func = dev.get_or_load_custom_func(FUNCTION, MODULE, ptx()?)?;
    let mut b = func.builder();
    let (n, acc) = (bins as u32, accumulate as i32);
    b.arg(spec);
    b.arg(kernel);
    b.arg(out);
    b.arg(&n);
    b.arg(&scale);
    b.arg(&acc);
    // SAFETY: the kernel reads `n` float2 of `spec`, `n` floats of `kernel` and writes `n`
    // float2 of `out`; every buffer holds at least that many (allocated from `bins`).
    unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.map_err(cuda_err)?;
    Ok(())
}

fn r2c(plan: &CudaFft, x: &CudaView<f32>, spec: &mut CudaSlice<f32>, bins: usize) -> Result<()> {
    // SAFETY: `spec` holds `2·bins` f32, i.e. `bins` float2.
    let mut out = unsafe { spec.transmute_mut::<float2>(bins) }
        .ok_or_else(|| candle_core::Error::Cuda("dipole: spectrum buffer too small".into()))?;
    plan.exec_r2c(x, &mut out).map_err(cuda_err)
}

fn c2r(
    plan: &CudaFft,
    spec: &mut CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    at: usize,
    nv: usize,
    bins: usize,
) -> Result<()> {
    // SAFETY: as in `r2c`; cuFFT's C2R clobbers its input, which is scratch here.
    let mut input = unsafe { spec.transmute_mut::<float2>(bins) }
        .ok_or_else(|| candle_core::Error::Cuda("dipole: spectrum buffer too small".into()))?;
    let mut dst = out.slice_mut(at..at + nv);
    plan.exec_c2r(&mut input, &mut dst).map_err(cuda_err)
}

/// χ `[N, 1, D, H, W]` to fields `[N, B, D, H, W]`.
pub(super) fn forward(
    set: &DipoleSet,
    slot: &Slot,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let x = input(s, l)?;
    let (nv, bins) = sizes(set);
    let (n, nb) = (x.len() / nv, set.len());
    let guard = slot.get(set, dev)?;
    let r = guard.as_ref().expect("filled by Slot::get");
    let mut out = dev.alloc_zeros::<f32>(n * nb * nv)?;
    let mut spec = dev.alloc_zeros::<f32>(2 * bins)?;
    let mut tmp = dev.alloc_zeros::<f32>(2 * bins)?;
    let scale = 1.0 / nv as f32;
    for i in 0..n {
        r2c(&r.r2c, &x.slice(i * nv..(i + 1) * nv), &mut spec, bins)?;
        for b in 0..nb {
            let k = r.kernels.slice(b * bins..(b + 1) * bins);
            madd(dev, &spec, &k, &mut tmp, bins, scale, false)?;
            c2r(&r.c2r, &mut tmp, &mut out, (i * nb + b) * nv, nv, bins)?;
        }
    }
    let mut dims = l.dims().to_vec();
    dims[1] = nb;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(dims),
    ))
}

/// Fields `[N, B, D, H, W]` to `Σ_b D_b f_b`, `[N, 1, D, H, W]` (summed in k-space).
pub(super) fn adjoint(
    set: &DipoleSet,
    slot: &Slot,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let f = input(s, l)?;
    let (nv, bins) = sizes(set);
    let nb = set.len();
    let n = f.len() / (nv * nb);
    let guard = slot.get(set, dev)?;
    let r = guard.as_ref().expect("filled by Slot::get");
    let mut out = dev.alloc_zeros::<f32>(n * nv)?;
    let mut spec = dev.alloc_zeros::<f32>(2 * bins)?;
    let mut acc = dev.alloc_zeros::<f32>(2 * bins)?;
    let scale = 1.0 / nv as f32;
    for i in 0..n {
        for b in 0..nb {
            let at = (i * nb + b) * nv;
            r2c(&r.r2c, &f.slice(at..at + nv), &mut spec, bins)?;
            let k = r.kernels.slice(b * bins..(b + 1) * bins);
            madd(dev, &spec, &k, &mut acc, bins, scale, b > 0)?;
        }
        c2r(&r.c2r, &mut acc, &mut out, i * nv, nv, bins)?;
    }
    let mut dims = l.dims().to_vec();
    dims[1] = 1;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(dims),
    ))
}
