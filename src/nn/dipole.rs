//! The dipole forward model as differentiable Candle ops, for a batch of volumes and a set of
//! B0 directions on one grid.
//!
//! [`DipoleSet::forward`] maps χ `[N, 1, D, H, W]` to fields `[N, B, D, H, W]` (one per B0
//! direction); [`DipoleSet::adjoint`] maps fields back, `Σ_b D_b f_b`. Each is the other's
//! backward pass because every `D_b` is real and even (self-adjoint). The transforms are the
//! project's `physics::DipoleOperator`s; tensor dims are the reverse of physics dims (see
//! [`super`]). On a CUDA device (`--features cuda`) the same ops run on cuFFT
//! (`super::dipole_cuda`).

use super::contiguous_f32;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::physics::fft::multiply_real;
use crate::physics::DipoleOperator;

/// A tensor's values on the host, detached (the classic solvers run there).
fn host_values(t: &Tensor) -> Result<Vec<f32>> {
    t.detach()
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// `values` as `[N, 1, D, H, W]` on the device of `like` `[N, B, D, H, W]`.
fn one_channel_like(values: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    let mut dims = like.dims().to_vec();
    dims[1] = 1;
    Tensor::from_vec(values, dims, like.device())
}

/// Dipole operators of one grid and voxel size, one per B0 direction.
#[derive(Clone)]
pub struct DipoleSet {
    ops: Arc<Vec<DipoleOperator>>,
    /// FFT plans and kernels on the GPU, made on first use there.
    #[cfg(feature = "cuda")]
    gpu: Arc<super::dipole_cuda::Slot>,
}

impl DipoleSet {
    /// `dims` and `voxel_size` in physics order (x, y, z); `b0` unit directions in the voxel
    /// frame.
    pub fn new(dims: [usize; 3], voxel_size: [f64; 3], b0: &[[f64; 3]]) -> Self {
        assert!(
            !b0.is_empty(),
            "a dipole set needs at least one B0 direction"
        );
        let ops = b0
            .par_iter()
            .map(|&b| DipoleOperator::new(dims, voxel_size, b))
            .collect();
        DipoleSet {
            ops: Arc::new(ops),
            #[cfg(feature = "cuda")]
            gpu: Default::default(),
        }
    }

    /// Number of B0 directions.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Physics dims `[nx, ny, nz]` of the grid.
    pub fn dims(&self) -> [usize; 3] {
        self.ops[0].dims()
    }

    pub fn operators(&self) -> &[DipoleOperator] {
        &self.ops
    }

    /// Fields `[N, B, D, H, W]` of χ `[N, 1, D, H, W]` (or `[N, D, H, W]`), one per direction.
    pub fn forward(&self, chi: &Tensor) -> Result<Tensor> {
        let chi = self.as_5d(chi, 1)?;
        chi.contiguous()?.apply_op1(Forward(self.clone()))
    }

    /// `Σ_b D_b f_b`: fields `[N, B, D, H, W]` to `[N, 1, D, H, W]`.
    pub fn adjoint(&self, fields: &Tensor) -> Result<Tensor> {
        let fields = self.as_5d(fields, self.len())?;
        fields.contiguous()?.apply_op1(Adjoint(self.clone()))
    }

    /// TKD of fields `[N, B, D, H, W]` over all B directions (`physics::dipole::tkd`),
    /// `[N, 1, D, H, W]` on the fields' device. Data only: no gradient flows through it.
    pub fn tkd(&self, fields: &Tensor, threshold: f32) -> Result<Tensor> {
        let fields = self.as_5d(fields, self.len())?;
        let host = host_values(&fields)?;
        let (nv, b) = (self.voxels(), self.len());
        let kernels: Vec<&[f32]> = self.ops.iter().map(|o| o.kernel()).collect();
        let mut out = Vec::with_capacity(host.len() / b);
        for volume in host.chunks(nv * b) {
            let per_direction: Vec<&[f32]> = volume.chunks(nv).collect();
            out.extend(crate::physics::dipole::tkd(
                self.ops[0].fft(),
                &per_direction,
                &kernels,
                threshold,
            ));
        }
        one_channel_like(out, &fields)
    }

    /// TV-ADMM (`inversion::tv`, weight λ, its other settings at their defaults) of fields
    /// `[N, B, D, H, W]` over all B directions inside `mask` `[N, 1, D, H, W]`: χ
    /// `[N, 1, D, H, W]` on the fields' device, zero outside the mask. Data only.
    pub fn tv(&self, fields: &Tensor, mask: &Tensor, lambda: f64) -> Result<Tensor> {
        use crate::inversion::{tv, Method, Orientation, Problem};
        let fields = self.as_5d(fields, self.len())?;
        let (f, m) = (host_values(&fields)?, host_values(&self.as_5d(mask, 1)?)?);
        let (nv, b) = (self.voxels(), self.len());
        let solver = tv::TvAdmm::new(tv::Config {
            lambda: crate::inversion::lambda::Lambda::Value(lambda),
            ..tv::Config::default()
        });
        let mut out = Vec::with_capacity(m.len());
        for (volume, mask) in f.chunks(nv * b).zip(m.chunks(nv)) {
            let mask: crate::Mask = mask.iter().map(|&v| v > 0.5).collect();
            let problem = Problem {
                dims: self.dims(),
                voxel_size: self.ops[0].voxel_size(),
                orientations: volume
                    .chunks(nv)
                    .zip(self.ops.iter())
                    .map(|(field, op)| Orientation { field, b0: op.b0() })
                    .collect(),
                mask: &mask,
                weight: None,
                magnitude: None,
                total: None,
                csf: None,
            };
            let chi = solver
                .invert(&problem)
                .map_err(|e| candle_core::Error::Msg(format!("TV warm start: {e}")))?;
            out.extend(chi);
        }
        one_channel_like(out, &fields)
    }

    /// Checks the grid and channel count; accepts `[N, D, H, W]` for one channel.
    fn as_5d(&self, t: &Tensor, channels: usize) -> Result<Tensor> {
        let [nx, ny, nz] = self.dims();
        let t = if t.rank() == 4 && channels == 1 {
            t.unsqueeze(1)?
        } else {
            t.clone()
        };
        if t.rank() != 5 || t.dims()[1..] != [channels, nz, ny, nx] || t.dtype() != DType::F32 {
            candle_core::bail!(
                "dipole: expected f32 [N, {channels}, {nz}, {ny}, {nx}], got {:?}",
                t.dims()
            );
        }
        Ok(t)
    }

    fn voxels(&self) -> usize {
        self.dims().iter().product()
    }
}

struct Forward(DipoleSet);

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "dipole-forward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "dipole: input")?;
        let (set, nv) = (&self.0, self.0.voxels());
        let mut out = Vec::with_capacity(x.len() * set.len());
        for chi in x.chunks(nv) {
            // One forward FFT per volume, one inverse per direction.
            let spec = set.ops[0].fft().forward(chi);
            for op in set.ops.iter() {
                let mut s = spec.clone();
                multiply_real(&mut s, op.kernel());
                out.extend(op.fft().inverse(&mut s));
            }
        }
        let mut dims = l.dims().to_vec();
        dims[1] = set.len();
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::dipole_cuda::forward(&self.0, &self.0.gpu, s, l)
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.adjoint(grad)?))
    }
}

struct Adjoint(DipoleSet);

impl CustomOp1 for Adjoint {
    fn name(&self) -> &'static str {
        "dipole-adjoint"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let f = contiguous_f32(s, l, "dipole: input")?;
        let (set, nv) = (&self.0, self.0.voxels());
        let mut out = Vec::with_capacity(f.len() / set.len());
        for fields in f.chunks(nv * set.len()) {
            // Sum in k-space: one forward FFT per direction, one inverse per volume.
            let mut acc = None;
            for (op, field) in set.ops.iter().zip(fields.chunks(nv)) {
                let mut s = op.fft().forward(field);
                multiply_real(&mut s, op.kernel());
                match &mut acc {
                    None => acc = Some(s),
                    Some(a) => a
                        .par_chunks_mut(4096)
                        .zip(s.par_chunks(4096))
                        .for_each(|(a, s)| a.iter_mut().zip(s).for_each(|(a, s)| *a += s)),
                }
            }
            let mut acc = acc.expect("a dipole set is never empty");
            out.extend(set.ops[0].fft().inverse(&mut acc));
        }
        let mut dims = l.dims().to_vec();
        dims[1] = 1;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::dipole_cuda::adjoint(&self.0, &self.0.gpu, s, l)
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.forward(grad)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{random, random_tensor, values};
    use candle_core::{Device, Var};

    const DIMS: [usize; 3] = [6, 5, 4]; // physics (x, y, z): tensors are [.., 4, 5, 6]
    const VOXEL: [f64; 3] = [1.0, 1.2, 0.9];

    fn set() -> DipoleSet {
        let b = |v: [f64; 3]| {
            let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            v.map(|a| a / n)
        };
        DipoleSet::new(
            DIMS,
            VOXEL,
            &[b([0.0, 0.0, 1.0]), b([0.3, -0.2, 0.9]), b([0.0, 0.5, 0.8])],
        )
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    #[test]
    fn forward_matches_the_physics_operator_per_direction() {
        let set = set();
        let x = random_tensor((2, 1, 4, 5, 6), 1);
        let y = values(&set.forward(&x).unwrap());
        let xv = values(&x);
        for n in 0..2 {
            for (b, op) in set.operators().iter().enumerate() {
                let want = op.forward(&xv[n * 120..][..120]);
                let got = &y[(n * 3 + b) * 120..][..120];
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-6, "volume {n}, direction {b}");
                }
            }
        }
        // [N, D, H, W] is accepted for one channel; wrong grids are errors.
        let x4 = x.squeeze(1).unwrap();
        assert_eq!(values(&set.forward(&x4).unwrap()), y);
        assert!(set.forward(&random_tensor((1, 1, 6, 5, 4), 2)).is_err());
    }

    #[test]
    fn adjoint_is_the_transpose_of_forward() {
        let set = set();
        let x = random_tensor((2, 1, 4, 5, 6), 3);
        let r = random_tensor((2, 3, 4, 5, 6), 4);
        let lhs = dot(&values(&set.forward(&x).unwrap()), &values(&r));
        let rhs = dot(&values(&x), &values(&set.adjoint(&r).unwrap()));
        assert!(
            (lhs - rhs).abs() < 1e-5 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    /// Autograd of `L = ½‖F x − y‖²` (through both ops' backward passes) against central
    /// differences.
    #[test]
    fn gradient_matches_finite_differences() {
        let set = set();
        let x0 = random(120, 5);
        let y = random_tensor((1, 3, 4, 5, 6), 6);
        let loss = |x: &Tensor| -> Tensor {
            let r = (set.forward(x).unwrap() - &y).unwrap();
            (r.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap()
        };
        let x = Var::from_slice(&x0, (1, 1, 4, 5, 6), &Device::Cpu).unwrap();
        // Through the adjoint too: L2 = ½‖Fᵀ(F x) − Fᵀy‖² exercises Adjoint's backward.
        let g = values(loss(&x).backward().unwrap().get(&x).unwrap());
        let aty = set.adjoint(&y).unwrap();
        let loss2 = |x: &Tensor| -> Tensor {
            let r = (set.adjoint(&set.forward(x).unwrap()).unwrap() - &aty).unwrap();
            (r.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap()
        };
        let g2 = values(loss2(&x).backward().unwrap().get(&x).unwrap());
        for j in [0, 17, 59, 119] {
            // L is quadratic, so central differences are exact up to rounding.
            let h = 0.05;
            let at = |d: f32, f: &dyn Fn(&Tensor) -> Tensor| -> f64 {
                let mut v = x0.clone();
                v[j] += d;
                let t = Tensor::from_vec(v, (1, 1, 4, 5, 6), &Device::Cpu).unwrap();
                f(&t).to_scalar::<f32>().unwrap() as f64
            };
            let fd = (at(h, &loss) - at(-h, &loss)) / (2.0 * h as f64);
            assert!(
                (fd - g[j] as f64).abs() < 2e-3 * fd.abs().max(0.1),
                "{fd} vs {}",
                g[j]
            );
            let fd2 = (at(h, &loss2) - at(-h, &loss2)) / (2.0 * h as f64);
            assert!(
                (fd2 - g2[j] as f64).abs() < 2e-3 * fd2.abs().max(0.1),
                "{fd2} vs {}",
                g2[j]
            );
        }
    }
}
