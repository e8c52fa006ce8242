//! 3D convolution (cubic kernel, stride 1, zero padding) as a Candle op whose CPU forward and
//! backward passes are GEMMs.
//!
//! Activations are `[N, C, D, H, W]` row-major, weights `[Cout, Cin, k, k, k]` (the PyTorch
//! layout, so published weights load unchanged). The trick that keeps the GEMM operands cheap:
//! work in the *flattened padded* grid. With the input zero-padded to `[Cin, Dp, Hp, Wp]`, the
//! output voxel whose corner sits at padded flat index `q` reads input `q + off(tap)`, with
//! `off = kd·Hp·Wp + kh·Wp + kw`. So one im2col row is a plain `memcpy` of a contiguous run of
//! the padded input, and a chunk of `q` values is one GEMM `[Cout × Cin·k³] · [Cin·k³ × chunk]`.
//! The `q` whose (h, w) fall in the padding are computed and dropped (a few per cent on real
//! volumes). Chunks run in parallel with rayon, each GEMM single-threaded, so the im2col buffer
//! of each worker stays in its cache.
//!
//! Backward: the input gradient is the same convolution of the output gradient with the
//! weights transposed over channels and flipped in space (padding `k − 1 − pad`); the weight
//! gradient is `Σ dy · colᵀ` over the same chunks.

use super::contiguous_f32;
use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use gemm::Parallelism;
use rayon::prelude::*;

/// Geometry of one stride-1 convolution with a cubic kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    /// Input `[D, H, W]`.
    pub dims: [usize; 3],
    pub k: usize,
    pub pad: usize,
}

impl ConvShape {
    fn padded(&self) -> [usize; 3] {
        self.dims.map(|n| n + 2 * self.pad)
    }

    /// Output `[D, H, W]`.
    pub fn out_dims(&self) -> [usize; 3] {
        self.padded().map(|n| n + 1 - self.k)
    }

    fn taps(&self) -> usize {
        self.k * self.k * self.k
    }

    /// Length of the GEMM's inner dimension, `Cin·k³`.
    fn depth(&self) -> usize {
        self.cin * self.taps()
    }

    /// Number of padded-flat positions that cover every output voxel.
    fn q_len(&self) -> usize {
        let [_, hp, wp] = self.padded();
        let [d, h, w] = self.out_dims();
        (d - 1) * hp * wp + (h - 1) * wp + w
    }

    /// Offset of each tap in the padded-flat grid, in weight order (kd, kh, kw).
    fn tap_offsets(&self) -> Vec<usize> {
        let [_, hp, wp] = self.padded();
        let k = self.k;
        (0..self.taps())
            .map(|t| (t / (k * k)) * hp * wp + ((t / k) % k) * wp + t % k)
            .collect()
    }

    /// Multiply-adds of the forward pass (the usual FLOP count is twice this).
    pub fn macs(&self) -> usize {
        let [d, h, w] = self.out_dims();
        self.batch * self.cout * self.depth() * d * h * w
    }

    /// The convolution that maps output gradients to input gradients.
    fn transposed(&self) -> ConvShape {
        ConvShape {
            batch: self.batch,
            cin: self.cout,
            cout: self.cin,
            dims: self.out_dims(),
            k: self.k,
            pad: self.k - 1 - self.pad,
        }
    }

    fn check(&self) -> Result<()> {
        if self.k == 0 || self.pad >= self.k || self.dims.iter().any(|&n| n + 2 * self.pad < self.k)
        {
            candle_core::bail!(
                "conv3d: kernel {} with padding {} does not fit input {:?}",
                self.k,
                self.pad,
                self.dims
            );
        }
        Ok(())
    }
}

/// Columns per GEMM: the im2col chunk (`depth × chunk` floats) is kept near half of a
/// 1 MiB L2 cache.
fn chunk_len(depth: usize, q: usize) -> usize {
    ((1usize << 17) / depth).clamp(64, 4096).min(q)
}

/// Zero-pads each `[D, H, W]` volume of `x` (`planes` of them) by `pad` on every side.
fn pad_volumes(x: &[f32], planes: usize, dims: [usize; 3], pad: usize) -> Cow<'_, [f32]> {
    if pad == 0 {
        return Cow::Borrowed(x);
    }
    let [d, h, w] = dims;
    let [dp, hp, wp] = dims.map(|n| n + 2 * pad);
    let mut out = vec![0.0f32; planes * dp * hp * wp];
    out.par_chunks_mut(dp * hp * wp)
        .zip(x.par_chunks(d * h * w))
        .for_each(|(o, src)| {
            for z in 0..d {
                for y in 0..h {
                    let s = (z * h + y) * w;
                    let t = ((z + pad) * hp + y + pad) * wp + pad;
                    o[t..t + w].copy_from_slice(&src[s..s + w]);
                }
            }
        });
    Cow::Owned(out)
}

/// Calls `f(q, run, out_offset)` for every run of valid output voxels among the padded-flat
/// positions `q0..q1`.
fn valid_runs(s: &ConvShape, q0: usize, q1: usize, mut f: impl FnMut(usize, usize, usize)) {
    let [_, hp, wp] = s.padded();
    let [_, ho, wo] = s.out_dims();
    let plane = hp * wp;
    let mut q = q0;
    while q < q1 {
        let r = q % plane;
        let (oh, ow) = (r / wp, r % wp);
        if oh >= ho {
            q += plane - r;
        } else if ow >= wo {
            q += wp - ow;
        } else {
            let run = (wo - ow).min(q1 - q);
            f(q, run, ((q / plane) * ho + oh) * wo + ow);
            q += run;
        }
    }
}

fn im2col(xb: &[f32], s: &ConvShape, offsets: &[usize], q0: usize, len: usize, col: &mut [f32]) {
    let sp: usize = s.padded().iter().product();
    let taps = offsets.len();
    for ci in 0..s.cin {
        for (t, &off) in offsets.iter().enumerate() {
            let src = ci * sp + q0 + off;
            col[(ci * taps + t) * len..][..len].copy_from_slice(&xb[src..src + len]);
        }
    }
}

/// A raw pointer that rayon workers may share because they write disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    // A method, so closures capture the wrapper rather than the bare pointer field.
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Forward convolution on contiguous buffers: `x` is `[N, Cin, D, H, W]`, `w` is
/// `[Cout, Cin, k, k, k]`; returns `[N, Cout, Do, Ho, Wo]`.
pub fn conv3d_forward(x: &[f32], w: &[f32], s: &ConvShape) -> Vec<f32> {
    conv3d_forward_fused(x, w, s, None, false)
}

/// [`conv3d_forward`] followed by a per-channel bias and optionally ReLU, applied while the
/// result is still in cache (inference: saves two passes over the activations).
pub fn conv3d_forward_fused(
    x: &[f32],
    w: &[f32],
    s: &ConvShape,
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let sp: usize = s.padded().iter().product();
    let so: usize = s.out_dims().iter().product();
    let (kk, q) = (s.depth(), s.q_len());
    assert_eq!(x.len(), s.batch * s.cin * s.dims.iter().product::<usize>());
    assert_eq!(w.len(), s.cout * kk);
    let xp = pad_volumes(x, s.batch * s.cin, s.dims, s.pad);
    let offsets = s.tap_offsets();
    let pc = chunk_len(kk, q);
    let chunks = q.div_ceil(pc);
    let mut out = vec![0.0f32; s.batch * s.cout * so];
    let dst = SharedMut(out.as_mut_ptr());
    (0..s.batch * chunks).into_par_iter().for_each_init(
        || (vec![0.0f32; kk * pc], vec![0.0f32; s.cout * pc]),
        |(col, acc), task| {
            let (b, q0) = (task / chunks, (task % chunks) * pc);
            let len = pc.min(q - q0);
            let xb = &xp[b * s.cin * sp..(b + 1) * s.cin * sp];
            let (rhs, rhs_rs) = if s.k == 1 {
                (xb[q0..].as_ptr(), sp as isize)
            } else {
                im2col(xb, s, &offsets, q0, len, col);
                (col.as_ptr(), len as isize)
            };
            // SAFETY: every operand lies inside its buffer: `acc` is `Cout × len`, `w` is
            // `Cout × kk`, and `rhs` is `kk` rows of `len` (im2col) or `Cin` rows of stride
            // `sp` starting at `q0` with `q0 + len ≤ q ≤ sp`.
            unsafe {
                gemm::gemm(
                    s.cout,
                    len,
                    kk,
                    acc.as_mut_ptr(),
                    1,
                    len as isize,
                    false,
                    w.as_ptr(),
                    1,
                    kk as isize,
                    rhs,
                    1,
                    rhs_rs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            valid_runs(s, q0, q0 + len, |qq, run, o| {
                for co in 0..s.cout {
                    let src = &mut acc[co * len + qq - q0..][..run];
                    if let Some(b) = bias {
                        src.iter_mut().for_each(|v| *v += b[co]);
                    }
                    if relu {
                        src.iter_mut().for_each(|v| *v = v.max(0.0));
                    }
                    // SAFETY: each output voxel belongs to exactly one padded-flat position,
                    // hence to one task; the range lies inside `out`.
                    unsafe {
                        let p = dst.get().add((b * s.cout + co) * so + o);
                        std::ptr::copy_nonoverlapping(src.as_ptr(), p, run);
                    }
                }
            });
        },
    );
    out
}

/// Weight gradient: `dw[co, ci, t] = Σ dy[co, o] · x_padded[ci, o + off(t)]`, with `dy` the
/// gradient of the output (`[N, Cout, Do, Ho, Wo]`).
pub fn conv3d_weight_grad(x: &[f32], dy: &[f32], s: &ConvShape) -> Vec<f32> {
    let sp: usize = s.padded().iter().product();
    let so: usize = s.out_dims().iter().product();
    let (kk, q) = (s.depth(), s.q_len());
    assert_eq!(dy.len(), s.batch * s.cout * so);
    let xp = pad_volumes(x, s.batch * s.cin, s.dims, s.pad);
    let offsets = s.tap_offsets();
    let pc = chunk_len(kk, q);
    let chunks = q.div_ceil(pc);
    let zero = || vec![0.0f32; s.cout * kk];
    (0..s.batch * chunks)
        .into_par_iter()
        .fold(
            || (vec![0.0f32; kk * pc], vec![0.0f32; s.cout * pc], zero()),
            |(mut col, mut dyc, mut dw), task| {
                let (b, q0) = (task / chunks, (task % chunks) * pc);
                let len = pc.min(q - q0);
                let xb = &xp[b * s.cin * sp..(b + 1) * s.cin * sp];
                // Output gradient on the padded-flat positions, zero where they are padding.
                dyc[..s.cout * len].fill(0.0);
                valid_runs(s, q0, q0 + len, |qq, run, o| {
                    for co in 0..s.cout {
                        dyc[co * len + qq - q0..][..run]
                            .copy_from_slice(&dy[(b * s.cout + co) * so + o..][..run]);
                    }
                });
                let (rhs, rhs_cs) = if s.k == 1 {
                    (xb[q0..].as_ptr(), sp as isize)
                } else {
                    im2col(xb, s, &offsets, q0, len, &mut col);
                    (col.as_ptr(), len as isize)
                };
                // SAFETY: `dw` is `Cout × kk`, `dyc` holds `Cout × len`, and `rhs` read as
                // `len × kk` stays inside `col` or, for k = 1, inside `xb` (see forward).
                unsafe {
                    gemm::gemm(
                        s.cout,
                        kk,
                        len,
                        dw.as_mut_ptr(),
                        1,
                        kk as isize,
                        true,
                        dyc.as_ptr(),
                        1,
                        len as isize,
                        rhs,
                        rhs_cs,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                (col, dyc, dw)
            },
        )
        .map(|(_, _, dw)| dw)
        .reduce(zero, |mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
}

/// `w[co, ci, a, b, c] → w[ci, co, k−1−a, k−1−b, k−1−c]`: the weights of the transposed
/// convolution.
pub fn flip_transpose(w: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    let taps = k * k * k;
    let mut out = vec![0.0f32; w.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..taps {
                out[(ci * cout + co) * taps + taps - 1 - t] = w[(co * cin + ci) * taps + t];
            }
        }
    }
    out
}

/// Shape of a convolution of `x` (`[N, Cin, D, H, W]`) by `w` (`[Cout, Cin, k, k, k]`).
fn conv_shape(x: &[usize], w: &[usize], pad: usize) -> Result<ConvShape> {
    let (&[n, cin, d, h, ww], &[cout, wcin, k, k1, k2]) = (x, w) else {
        candle_core::bail!("conv3d: expected 5D input and weight, got {x:?} and {w:?}");
    };
    if wcin != cin || k1 != k || k2 != k {
        candle_core::bail!("conv3d: weight {w:?} does not fit input {x:?} (cubic kernels only)");
    }
    let s = ConvShape {
        batch: n,
        cin,
        cout,
        dims: [d, h, ww],
        k,
        pad,
    };
    s.check()?;
    Ok(s)
}

/// The Candle op `(x, w) ↦ conv3d(x, w)`.
struct Conv3dOp {
    pad: usize,
}

impl CustomOp2 for Conv3dOp {
    fn name(&self) -> &'static str {
        "conv3d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = conv_shape(l1.dims(), l2.dims(), self.pad)?;
        let x = contiguous_f32(s1, l1, "conv3d: input")?;
        let w = contiguous_f32(s2, l2, "conv3d: weight")?;
        let out = conv3d_forward(x, w, &s);
        let [d, h, ww] = s.out_dims();
        Ok((
            CpuStorage::F32(out),
            Shape::from((s.batch, s.cout, d, h, ww)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let s = conv_shape(x.dims(), w.dims(), self.pad)?;
        let grad = grad.contiguous()?;
        let wt = flip_transpose(&w.flatten_all()?.to_vec1::<f32>()?, s.cout, s.cin, s.k);
        let wt = Tensor::from_vec(wt, (s.cin, s.cout, s.k, s.k, s.k), w.device())?;
        let dx = grad.apply_op2(
            &wt,
            Conv3dOp {
                pad: s.transposed().pad,
            },
        )?;
        let dw = x.apply_op2_no_bwd(&grad, &WeightGradOp { shape: s })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The Candle op `(x, dy) ↦ dw` (no backward of its own: second derivatives are not needed).
struct WeightGradOp {
    shape: ConvShape,
}

impl CustomOp2 for WeightGradOp {
    fn name(&self) -> &'static str {
        "conv3d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = &self.shape;
        let x = contiguous_f32(s1, l1, "conv3d: input")?;
        let dy = contiguous_f32(s2, l2, "conv3d: output gradient")?;
        let dw = conv3d_weight_grad(x, dy, s);
        Ok((
            CpuStorage::F32(dw),
            Shape::from((s.cout, s.cin, s.k, s.k, s.k)),
        ))
    }
}

/// Inference-only `relu?(conv3d(x, w) + bias)` in one pass (no backward).
struct FusedConv3dOp {
    pad: usize,
    bias: Vec<f32>,
    relu: bool,
}

impl CustomOp2 for FusedConv3dOp {
    fn name(&self) -> &'static str {
        "conv3d-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = conv_shape(l1.dims(), l2.dims(), self.pad)?;
        if self.bias.len() != s.cout {
            candle_core::bail!(
                "conv3d: bias of {} for {} channels",
                self.bias.len(),
                s.cout
            );
        }
        let x = contiguous_f32(s1, l1, "conv3d: input")?;
        let w = contiguous_f32(s2, l2, "conv3d: weight")?;
        let out = conv3d_forward_fused(x, w, &s, Some(&self.bias), self.relu);
        let [d, h, ww] = s.out_dims();
        Ok((
            CpuStorage::F32(out),
            Shape::from((s.batch, s.cout, d, h, ww)),
        ))
    }
}

/// Inference-only `conv3d(x, w) + bias`, then ReLU if `relu`: the same result as the
/// differentiable ops, without their extra passes and without a backward pass.
pub fn conv3d_bias_act(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    pad: usize,
    relu: bool,
) -> Result<Tensor> {
    conv_shape(x.dims(), w.dims(), pad)?;
    if !x.device().is_cpu() {
        let y =
            conv3d_by_depth_taps(x, w, pad)?.broadcast_add(&bias.reshape((1, (), 1, 1, 1))?)?;
        return if relu { y.relu() } else { Ok(y) };
    }
    let bias = bias.flatten_all()?.to_vec1::<f32>()?;
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &FusedConv3dOp { pad, bias, relu })
}

/// Differentiable 3D convolution, stride 1, zero padding `pad` on every side; f32 only.
pub fn conv3d(x: &Tensor, w: &Tensor, pad: usize) -> Result<Tensor> {
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        candle_core::bail!("conv3d: f32 tensors only");
    }
    conv_shape(x.dims(), w.dims(), pad)?;
    if !x.device().is_cpu() {
        return conv3d_by_depth_taps(x, w, pad);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv3dOp { pad })
}

/// The same convolution composed from Candle's own ops, for the devices that have no CPU
/// GEMM: a sum over the `k` depth taps of 2D convolutions over (H, W), each taking the
/// depth-shifted slab of the input as a batch of `N·Do` images. Candle differentiates it
/// (on CUDA, its conv2d is an im2col + cuBLAS GEMM), so it needs no backward of its own.
/// Memory: one tap's im2col buffer, `9·Cin` values per voxel for k = 3.
pub fn conv3d_by_depth_taps(x: &Tensor, w: &Tensor, pad: usize) -> Result<Tensor> {
    let s = conv_shape(x.dims(), w.dims(), pad)?;
    let [_, h, ww] = s.dims;
    let [od, oh, ow] = s.out_dims();
    // [N, Cin, D, H, W] -> [N, Dp, Cin, H, W]: a depth slab is then N·Do images of Cin planes.
    let xt = x.permute((0, 2, 1, 3, 4))?;
    let xt = if pad > 0 {
        xt.pad_with_zeros(1, pad, pad)?
    } else {
        xt
    };
    let mut acc: Option<Tensor> = None;
    for kd in 0..s.k {
        let slab = xt
            .narrow(1, kd, od)?
            .contiguous()?
            .reshape((s.batch * od, s.cin, h, ww))?;
        let wk = w.narrow(2, kd, 1)?.squeeze(2)?.contiguous()?;
        let y = slab.conv2d(&wk, pad, 1, 1, 1)?;
        acc = Some(match acc {
            None => y,
            Some(a) => (a + y)?,
        });
    }
    let y = acc.expect("a kernel has at least one tap");
    y.reshape((s.batch, od, s.cout, oh, ow))?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()
}

/// A 3D convolution layer: cubic kernel, stride 1, "same" padding for odd kernels, optional
/// bias. Variables: `weight` `[Cout, Cin, k, k, k]`, `bias` `[Cout]`.
#[derive(Clone, Debug)]
pub struct Conv3d {
    weight: Tensor,
    bias: Option<Tensor>,
    pad: usize,
}

impl Conv3d {
    /// A convolution whose weights and bias start at zero (a residual branch that starts as
    /// nothing).
    pub fn zeroed(cin: usize, cout: usize, k: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((cout, cin, k, k, k), "weight", Init::Const(0.0))?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Conv3d {
            weight,
            bias,
            pad: k / 2,
        })
    }

    /// Kaiming-uniform initialisation as in PyTorch, for random weights in tests and training.
    pub fn new(cin: usize, cout: usize, k: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let fan_in = (cin * k * k * k) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let weight = vb.get_with_hints(
            (cout, cin, k, k, k),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let bias = if bias {
            Some(vb.get_with_hints(
                cout,
                "bias",
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?)
        } else {
            None
        };
        Ok(Conv3d {
            weight,
            bias,
            pad: k / 2,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// This convolution over only the first `cin` input channels: what it gives on an
    /// input whose other channels are zero, without convolving those zeros (LoopNet's first
    /// loop, whose reverse connections are zeros). Gradients reach the full weight.
    pub fn leading(&self, cin: usize) -> Result<Conv3d> {
        let all = self.weight.dim(1)?;
        if cin == all {
            return Ok(self.clone());
        }
        if cin == 0 || cin > all {
            candle_core::bail!("conv3d: {cin} leading input channels of {all}");
        }
        Ok(Conv3d {
            weight: self.weight.narrow(1, 0, cin)?,
            bias: self.bias.clone(),
            pad: self.pad,
        })
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Inference: `relu?(scale · conv(x) + shift)` per output channel in one pass, e.g. a
    /// batch norm in evaluation mode folded into the convolution.
    pub fn forward_affine_act(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        relu: bool,
    ) -> Result<Tensor> {
        let w = self
            .weight
            .broadcast_mul(&scale.reshape(((), 1, 1, 1, 1))?)?;
        let b = match &self.bias {
            Some(b) => ((b * scale)? + shift)?,
            None => shift.clone(),
        };
        conv3d_bias_act(x, &w, &b, self.pad, relu)
    }
}

impl Module for Conv3d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv3d(x, &self.weight, self.pad)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1, 1))?),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{random, random_tensor, values};
    use candle_core::{Device, Var};

    /// The input voxel that tap `t` of output voxel `o = [z, y, x]` reads, or `None` in the
    /// zero padding.
    fn tap_input(
        x: &[f32],
        s: &ConvShape,
        n: usize,
        ci: usize,
        o: [usize; 3],
        t: usize,
    ) -> Option<f32> {
        let (k, p) = (s.k as isize, s.pad as isize);
        let t = t as isize;
        let offset = [t / (k * k), (t / k) % k, t % k];
        let mut at = [0usize; 3];
        for a in 0..3 {
            let i = o[a] as isize + offset[a] - p;
            if i < 0 || i >= s.dims[a] as isize {
                return None;
            }
            at[a] = i as usize;
        }
        let [d, h, w] = s.dims;
        Some(x[(((n * s.cin + ci) * d + at[0]) * h + at[1]) * w + at[2]])
    }

    /// Seven nested loops over (n, co, ci, od, oh, ow, tap), in f64.
    fn naive(x: &[f32], w: &[f32], s: &ConvShape) -> Vec<f64> {
        let [od, oh, ow] = s.out_dims();
        let mut out = vec![0.0; s.batch * s.cout * od * oh * ow];
        for n in 0..s.batch {
            for co in 0..s.cout {
                for ci in 0..s.cin {
                    for z in 0..od {
                        for y in 0..oh {
                            for xx in 0..ow {
                                let mut acc = 0.0;
                                for t in 0..s.taps() {
                                    let Some(xv) = tap_input(x, s, n, ci, [z, y, xx], t) else {
                                        continue;
                                    };
                                    let wv = w[(co * s.cin + ci) * s.taps() + t];
                                    acc += xv as f64 * wv as f64;
                                }
                                out[(((n * s.cout + co) * od + z) * oh + y) * ow + xx] += acc;
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn shapes() -> Vec<ConvShape> {
        let s = |batch, cin, cout, dims, k, pad| ConvShape {
            batch,
            cin,
            cout,
            dims,
            k,
            pad,
        };
        vec![
            s(1, 1, 1, [5, 6, 7], 3, 1),
            s(2, 3, 4, [4, 5, 3], 3, 1),
            s(1, 5, 2, [6, 4, 5], 3, 0),
            s(1, 2, 3, [7, 5, 6], 5, 2),
            s(2, 4, 3, [3, 4, 5], 1, 0),
            s(1, 3, 2, [9, 7, 8], 3, 2),
            // Large enough for several GEMM chunks per volume.
            s(1, 8, 6, [12, 13, 11], 3, 1),
        ]
    }

    fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs() / scale)
            .fold(0.0, f64::max)
    }

    #[test]
    fn forward_matches_naive_loops() {
        for (i, s) in shapes().iter().enumerate() {
            let x = random(
                s.batch * s.cin * s.dims.iter().product::<usize>(),
                10 + i as u64,
            );
            let w = random(s.cout * s.depth(), 20 + i as u64);
            let err = max_rel_err(&conv3d_forward(&x, &w, s), &naive(&x, &w, s));
            assert!(err < 1e-5, "{s:?}: error {err}");
        }
    }

    /// `∂L/∂w[co,ci,t] = Σ_n Σ_o r[n,co,o] · x[n,ci,o+t−pad]` for `L = Σ r · conv3d(x, w)`,
    /// in nested loops.
    fn naive_weight_grad(x: &[f32], r: &[f32], s: &ConvShape) -> Vec<f64> {
        let [od, oh, ow] = s.out_dims();
        let mut g = vec![0.0; s.cout * s.depth()];
        for n in 0..s.batch {
            for co in 0..s.cout {
                for ci in 0..s.cin {
                    for t in 0..s.taps() {
                        let mut acc = 0.0;
                        for z in 0..od {
                            for y in 0..oh {
                                for xx in 0..ow {
                                    let Some(xv) = tap_input(x, s, n, ci, [z, y, xx], t) else {
                                        continue;
                                    };
                                    let rv = r[(((n * s.cout + co) * od + z) * oh + y) * ow + xx];
                                    acc += xv as f64 * rv as f64;
                                }
                            }
                        }
                        g[(co * s.cin + ci) * s.taps() + t] += acc;
                    }
                }
            }
        }
        g
    }

    /// Gradients of `L = Σ r · conv3d(x, w)` through Candle's autograd (the custom backward)
    /// against the naive reference: the weight gradient against nested loops, the input
    /// gradient through `⟨∂L/∂x, v⟩ = Σ r · naive(v, w)` for random directions `v` (exact,
    /// since L is linear in x).
    #[test]
    fn gradients_match_naive_reference() {
        for (i, s) in shapes().iter().enumerate() {
            let [od, oh, ow] = s.out_dims();
            let xs = (s.batch, s.cin, s.dims[0], s.dims[1], s.dims[2]);
            let x = Var::from_tensor(&random_tensor(xs, 30 + i as u64)).unwrap();
            let w = Var::from_tensor(&random_tensor(
                (s.cout, s.cin, s.k, s.k, s.k),
                40 + i as u64,
            ))
            .unwrap();
            let r = random_tensor((s.batch, s.cout, od, oh, ow), 50 + i as u64);
            let loss = (conv3d(&x, &w, s.pad).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let gx = grads.get(&x).unwrap().flatten_all().unwrap();
            let gw = grads.get(&w).unwrap().flatten_all().unwrap();
            let gx = gx.to_vec1::<f32>().unwrap();
            let gw = gw.to_vec1::<f32>().unwrap();
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rv = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = max_rel_err(&gw, &naive_weight_grad(&xv, &rv, s));
            assert!(err < 1e-5, "{s:?}: weight gradient error {err}");
            // ∂L/∂x against random directions v: ⟨gx, v⟩ = Σ r · naive(v, w).
            for seed in 0..3 {
                let v = random(xv.len(), 60 + seed);
                let lhs: f64 = gx.iter().zip(&v).map(|(&a, &b)| a as f64 * b as f64).sum();
                let rhs: f64 = naive(&v, &wv, s)
                    .iter()
                    .zip(&rv)
                    .map(|(a, &b)| a * b as f64)
                    .sum();
                assert!(
                    (lhs - rhs).abs() < 1e-4 * rhs.abs().max(1.0),
                    "{s:?}: input gradient {lhs} vs {rhs}"
                );
            }
        }
    }

    #[test]
    fn input_gradient_matches_finite_differences() {
        let s = ConvShape {
            batch: 1,
            cin: 2,
            cout: 3,
            dims: [4, 5, 3],
            k: 3,
            pad: 1,
        };
        let x = random(s.batch * s.cin * 60, 7);
        let w = random(s.cout * s.depth(), 8);
        let r = random(s.batch * s.cout * 60, 9);
        let loss = |x: &[f32]| -> f64 {
            naive(x, &w, &s)
                .iter()
                .zip(&r)
                .map(|(a, &b)| a * b as f64)
                .sum()
        };
        let xt = Var::from_slice(&x, (1, 2, 4, 5, 3), &Device::Cpu).unwrap();
        let wt = Tensor::from_slice(&w, (3, 2, 3, 3, 3), &Device::Cpu).unwrap();
        let rt = Tensor::from_slice(&r, (1, 3, 4, 5, 3), &Device::Cpu).unwrap();
        let l = (conv3d(&xt, &wt, 1).unwrap() * rt)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = l.backward().unwrap();
        let g = g.get(&xt).unwrap().flatten_all().unwrap();
        let g = g.to_vec1::<f32>().unwrap();
        for j in [0, 7, 33, 59, 60, 100, 119] {
            let h = 1e-2;
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[j] += h;
            xm[j] -= h;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * h as f64);
            assert!(
                (fd - g[j] as f64).abs() < 1e-3 * fd.abs().max(1.0),
                "voxel {j}: finite difference {fd} vs autograd {}",
                g[j]
            );
        }
    }

    /// The composed version (the CUDA path) against the GEMM op on the CPU: same values,
    /// same gradients for x and w.
    #[test]
    fn depth_tap_composition_matches_the_gemm_op_and_its_gradients() {
        for (i, s) in shapes().iter().enumerate().take(6) {
            let xs = (s.batch, s.cin, s.dims[0], s.dims[1], s.dims[2]);
            let x = Var::from_tensor(&random_tensor(xs, 40 + i as u64)).unwrap();
            let ws = (s.cout, s.cin, s.k, s.k, s.k);
            let w = Var::from_tensor(&random_tensor(ws, 50 + i as u64)).unwrap();
            let [od, oh, ow] = s.out_dims();
            let r = random_tensor((s.batch, s.cout, od, oh, ow), 60 + i as u64);
            let run = |f: &dyn Fn(&Tensor, &Tensor, usize) -> Result<Tensor>| {
                let y = f(x.as_tensor(), w.as_tensor(), s.pad).unwrap();
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gx = values(g.get(x.as_tensor()).unwrap());
                let gw = values(g.get(w.as_tensor()).unwrap());
                (values(&y), gx, gw)
            };
            let (y0, gx0, gw0) = run(&conv3d);
            let (y1, gx1, gw1) = run(&conv3d_by_depth_taps);
            for (name, a, b) in [("y", y0, y1), ("dx", gx0, gx1), ("dw", gw0, gw1)] {
                let want: Vec<f64> = a.iter().map(|&v| v as f64).collect();
                let err = max_rel_err(&b, &want);
                assert!(err < 1e-5, "{s:?} {name}: error {err}");
            }
        }
    }

    #[test]
    fn fused_bias_and_relu_match_separate_ops() {
        let x = random_tensor((1, 3, 5, 4, 6), 70);
        let w = random_tensor((4, 3, 3, 3, 3), 71);
        let b = random_tensor(4, 72);
        let plain = conv3d(&x, &w, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 4, 1, 1, 1)).unwrap())
            .unwrap();
        for relu in [false, true] {
            let want = if relu {
                plain.relu().unwrap()
            } else {
                plain.clone()
            };
            let got = conv3d_bias_act(&x, &w, &b, 1, relu).unwrap();
            assert_eq!(values(&got), values(&want));
        }
    }

    #[test]
    fn layer_adds_bias_and_keeps_size() {
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let conv = Conv3d::new(2, 3, 3, true, vb.pp("c")).unwrap();
        let x = Tensor::zeros((1, 2, 4, 5, 6), DType::F32, &Device::Cpu).unwrap();
        let y = conv.forward(&x).unwrap();
        assert_eq!(y.dims(), &[1, 3, 4, 5, 6]);
        // Zero input: the output is the bias everywhere.
        let b = vm.data().lock().unwrap()["c.bias"]
            .as_tensor()
            .to_vec1::<f32>();
        let b = b.unwrap();
        let y = y.to_dtype(DType::F32).unwrap();
        for co in 0..3 {
            let v = y.get(0).unwrap().get(co).unwrap().flatten_all().unwrap();
            assert!(v.to_vec1::<f32>().unwrap().iter().all(|&v| v == b[co]));
        }
    }

    /// Convolving the leading channels alone is convolving the input padded with zero
    /// channels, for values, the weight's gradient (zero on the skipped channels) and the
    /// folded inference path.
    #[test]
    fn leading_channels_match_zero_padded_channels() {
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let conv = Conv3d::new(5, 3, 3, true, vb.pp("c")).unwrap();
        let x = random_tensor((2, 2, 5, 4, 6), 11);
        let padded = x.pad_with_zeros(1, 0, 3).unwrap();
        let part = conv.leading(2).unwrap();
        let (got, want) = (part.forward(&x).unwrap(), conv.forward(&padded).unwrap());
        assert_eq!(got.dims(), want.dims());
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-5);
        assert!(close(&values(&got), &values(&want)));
        let weight = vm.data().lock().unwrap()["c.weight"].clone();
        let r = random_tensor(want.dims(), 12);
        let grad = |y: &Tensor| {
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            values(g.get(weight.as_tensor()).unwrap())
        };
        let (g_part, g_full) = (grad(&got), grad(&want));
        assert!(close(&g_part, &g_full));
        // Input channels 2..5 of every [out, in] kernel got no gradient.
        assert!(g_part
            .chunks(27)
            .enumerate()
            .filter(|(i, _)| i % 5 >= 2)
            .all(|(_, k)| k.iter().all(|&v| v == 0.0)));
        assert!(g_part.iter().any(|&v| v != 0.0));
        let (scale, shift) = (random_tensor(3, 13), random_tensor(3, 14));
        let folded = part.forward_affine_act(&x, &scale, &shift, true).unwrap();
        let whole = conv
            .forward_affine_act(&padded, &scale, &shift, true)
            .unwrap();
        assert!(close(&values(&folded), &values(&whole)));
        assert!(conv.leading(6).is_err() && conv.leading(0).is_err());
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let x = Tensor::zeros((1, 2, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((3, 1, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(conv3d(&x, &w, 1).is_err());
        let w = Tensor::zeros((3, 2, 5, 5, 5), DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::zeros((1, 2, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(conv3d(&x, &w, 1).is_err());
    }
}
