//! Fused CPU ops with a real backward, for candle's autograd: causal softmax, LayerNorm,
//! tanh-GELU, linear and the tied head with its cross-entropy. Each replaces a chain of
//! composed ops (one allocation and one pass each) by one kernel forward and one backward.
//! candle's own fused kernels have no backward and cut the graph (their ops define no `bwd`);
//! these are `CustomOp`s whose `bwd` is another kernel, so gradients flow. `ops` uses them for
//! contiguous f32 on the CPU and the composed versions elsewhere (CUDA, f64 gradient checks);
//! tests hold the two equal. The kernels themselves are in `kernels` and `head`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::head;
use super::kernels;

pub fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &'static str) -> Result<&'a [f32]> {
    let (start, end) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// Runs `f` on a CPU tensor's contiguous floats, without copying them.
pub fn with_host<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Ok(f(slice(cpu, layout, "fused op")?)),
        _ => candle_core::bail!("fused op: tensor is not on the CPU"),
    }
}

fn out(v: Vec<f32>, shape: &Shape) -> Result<(CpuStorage, Shape)> {
    Ok((CpuStorage::F32(v), shape.clone()))
}

/// Causal softmax over `(.., T, T)` scores (already scaled).
pub struct CausalSoftmax;

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "difflab-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        kernels::causal_softmax(x, *l.dims().last().unwrap_or(&1), &mut y);
        out(y, l.shape())
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?))
    }
}

struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "difflab-softmax-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, dy) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let mut dx = vec![0f32; y.len()];
        kernels::softmax_backward(y, dy, *l1.dims().last().unwrap_or(&1), &mut dx);
        out(dx, l1.shape())
    }
}

pub struct LayerNormOp {
    pub eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "difflab-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        let mut y = vec![0f32; x.len()];
        kernels::layer_norm(x, w, b, self.eps, &mut y);
        out(y, l1.shape())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (c, n) = (w.elem_count(), x.elem_count());
        // one kernel computes all three: a flat buffer [dx (N*C) | dw (C) | db (C)]
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBackward { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, c)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + c, c)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "difflab-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, dy) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        let (n, c) = (x.len(), w.len());
        let mut packed = vec![0f32; n + 2 * c];
        let (dx, params) = packed.split_at_mut(n);
        let (dw, db) = params.split_at_mut(c);
        kernels::layer_norm_backward(x, w, dy, self.eps, dx, false, dw, db);
        out(packed, &Shape::from(n + 2 * c))
    }
}

/// HF `gelu_new`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "difflab-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        kernels::gelu(x, &mut y);
        out(y, l.shape())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?))
    }
}

struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "difflab-gelu-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let mut dx = vec![0f32; x.len()];
        kernels::gelu_backward(x, dy, &mut dx);
        out(dx, l1.shape())
    }
}

/// `y = x . W + b` with `x (.., in)`, `W (in, out)`, `b (out)`: one matmul in the given
/// arithmetic with the bias pre-filled; backward (the autograd engine, which is f32 only) `dx = dy . W^T`, `dW = x^T . dy`, `db` a parallel column sum
/// (candle's composed broadcast-add backward reduces rows with a serial strided loop that
/// cost more than both matmuls together).
pub struct Linear(pub kernels::Matmuls);

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "difflab-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        let n_in = l2.dims()[0];
        if l1.dims().last() != Some(&n_in) || w.len() != n_in * b.len() {
            candle_core::bail!("linear: x {:?}, W {:?}, b {:?}", l1.dims(), l2.dims(), l3.dims())
        }
        let mut y = vec![0f32; x.len() / n_in * b.len()];
        kernels::linear(x, w.into(), b, &mut y, self.0);
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = b.len();
        }
        out(y, &Shape::from(dims))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.0 != kernels::Matmuls::F32 {
            candle_core::bail!(
                "linear: bf16 matmuls have no autograd backward (the written-out CPU step computes them)"
            )
        }
        let (n_in, n_out) = w.dims2()?;
        let dy = grad.contiguous()?.reshape(((), n_out))?;
        let x2 = x.detach().reshape(((), n_in))?;
        let dx = dy.matmul(&w.detach().t()?)?.reshape(x.shape())?;
        let dw = x2.t()?.matmul(&dy)?;
        let db = dy.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "difflab-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let c = *l.dims().last().unwrap_or(&1);
        let mut sum = vec![0f32; c];
        kernels::column_sum(x, &mut sum);
        out(sum, &Shape::from(c))
    }
}

/// The tied LM head and the mean cross-entropy: `hidden (N, C)`, `wte (V, C)`, `targets (N)`
/// -> scalar loss, without keeping `(N, V)` logits around more than `head` allows.
/// Each row's loss through the tied head, for evaluation only (no backward): `hidden (N, C)`,
/// `wte (V, C)` -> `(N)`.
pub struct HeadTokenLosses {
    pub targets: Arc<Vec<u32>>,
    pub mm: kernels::Matmuls,
}

impl CustomOp2 for HeadTokenLosses {
    fn name(&self) -> &'static str {
        "difflab-head-token-losses"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (h, w) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let c = *l1.dims().last().unwrap_or(&1);
        if *l2.dims().last().unwrap_or(&0) != c {
            candle_core::bail!("head token losses: hidden {:?}, wte {:?}", l1.dims(), l2.dims())
        }
        let losses = head::token_losses(h, w, c, &self.targets, self.mm).map_err(candle_core::Error::Msg)?;
        let n = losses.len();
        out(losses, &Shape::from(n))
    }
}

pub struct HeadCrossEntropy {
    pub targets: Arc<Vec<u32>>,
    /// False for a forward without a graph (evaluation): the softmax is not kept.
    for_backward: bool,
    mm: kernels::Matmuls,
    saved: Mutex<Option<head::Saved>>,
}

impl HeadCrossEntropy {
    pub fn new(targets: Arc<Vec<u32>>, for_backward: bool, mm: kernels::Matmuls) -> Self {
        Self { targets, for_backward, mm, saved: Mutex::new(None) }
    }
}

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("head cross-entropy: poisoned lock".into())
}

impl CustomOp2 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "difflab-head-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (h, w) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let c = *l1.dims().last().unwrap_or(&1);
        if *l2.dims().last().unwrap_or(&0) != c {
            candle_core::bail!("head cross-entropy: hidden {:?}, wte {:?}", l1.dims(), l2.dims())
        }
        let (loss, saved) = head::forward(h, w.into(), c, &self.targets, self.for_backward, self.mm)
            .map_err(candle_core::Error::Msg)?;
        if self.for_backward {
            *self.saved.lock().map_err(poisoned)? = Some(saved);
        }
        out(vec![loss], &Shape::from(()))
    }

    fn bwd(&self, h: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let saved = self
            .saved
            .lock()
            .map_err(poisoned)?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("head cross-entropy: backward before forward".into()))?;
        let (n, c) = h.dims2()?;
        let mut dh = vec![0f32; n * c];
        let mut dw = vec![0f32; w.elem_count()];
        with_host(h, |hv| {
            with_host(w, |wv| head::backward(saved, hv, wv.into(), c, &self.targets, g, &mut dh, &mut dw, self.mm))
        })??;
        Ok((Some(Tensor::from_vec(dh, (n, c), h.device())?), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}
