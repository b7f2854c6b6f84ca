//! The candle custom op that runs bnorm's forward and backward kernels.

use std::borrow::Cow;
use std::sync::Mutex;

use bnorm::element::Element;
use bnorm::expert::{Grads, Saved};
use bnorm::{Config, Layout, Mode, Params, RunningState, StepReport};
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp3, DType, Layout as CLayout, Result, Shape,
    Storage, Tensor, WithDType,
};

/// What one forward call produced besides its output.
#[derive(Debug, Default)]
pub(crate) struct OpResult {
    pub saved: Saved,
    pub state: Option<RunningState>,
    pub report: StepReport,
}

/// One forward step of one layer: configuration, mode, the running statistics before the
/// step, and (after `cpu_fwd`) what the step produced.
pub(crate) struct BnOp {
    pub cfg: Config,
    pub layout: Layout,
    pub mode: Mode,
    pub state_in: Option<RunningState>,
    /// Keras 3's mask (masked batch norm), x's shape without its last axis, flattened.
    pub mask: Option<Vec<bool>>,
    pub result: Mutex<OpResult>,
}

/// A [`bnorm::Error`] inside a `candle_core::Error`, kept typed (candle's `wrap` keeps
/// only its text); [`crate::bnorm_error`] takes it out.
pub(crate) struct Typed(pub bnorm::Error);

impl std::fmt::Debug for Typed {
    // candle prints a wrapped error with `{:?}`: show the message, not the structure.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::fmt::Display for Typed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for Typed {}

pub(crate) fn wrap(e: bnorm::Error) -> candle_core::Error {
    candle_core::Error::WrappedContext {
        wrapped: Box::new(Typed(e)),
        context: "bnorm".into(),
    }
    .bt()
}

/// The elements of a (possibly strided) CPU tensor in row-major order.
fn gather<'a, T: Copy>(data: &'a [T], l: &CLayout) -> Cow<'a, [T]> {
    if let Some((a, b)) = l.contiguous_offsets() {
        return Cow::Borrowed(&data[a..b]);
    }
    let dims = l.shape().dims();
    let stride = l.stride();
    let n: usize = dims.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..n {
        let off = l.start_offset() + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(data[off]);
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            if idx[d] < dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Cow::Owned(out)
}

fn params_of(s: &CpuStorage, l: &CLayout, present: bool) -> Result<Option<Vec<f64>>> {
    if !present {
        return Ok(None);
    }
    let v: Vec<f64> = match s {
        CpuStorage::F32(d) => gather(d, l).iter().map(|&v| v as f64).collect(),
        CpuStorage::F64(d) => gather(d, l).into_owned(),
        CpuStorage::F16(d) => gather(d, l).iter().map(|v| v.to_f64()).collect(),
        CpuStorage::BF16(d) => gather(d, l).iter().map(|v| v.to_f64()).collect(),
        other => candle_core::bail!("bnorm: parameters of dtype {:?}", other.dtype()),
    };
    Ok(Some(v))
}

impl BnOp {
    fn fwd_typed<T: Element + WithDType>(
        &self,
        x: &[T],
        l: &CLayout,
        params: Params,
    ) -> Result<(CpuStorage, Shape)> {
        let x = gather(x, l);
        let g = self.layout.geometry(l.shape().dims()).map_err(wrap)?;
        // The output is written by the kernels alone: allocated, not zeroed (huge pages
        // from 4 MB on).
        let mut y = bnorm::tuning::empty_buffer::<T>(x.len());
        let mut guard = self
            .result
            .lock()
            .map_err(|_| candle_core::Error::msg("poisoned"))?;
        let r = &mut *guard;
        let mut state = self.state_in.clone();
        let mut opts = bnorm::expert::Options::from(bnorm::expert::Parallelism::Rayon);
        if let Some(mask) = &self.mask {
            opts = opts.masked(mask);
        }
        let report = bnorm::expert::forward_into_uninit(
            &self.cfg,
            g,
            &x,
            &params,
            state.as_mut(),
            self.mode,
            &mut y.spare_capacity_mut()[..x.len()],
            &mut r.saved,
            &mut bnorm::expert::Workspace::default(),
            opts,
        )
        .map_err(wrap)?;
        // SAFETY: the capacity is `x.len()`, and `forward_into_uninit` returned `Ok`, so
        // it initialized every one of those elements.
        unsafe { y.set_len(x.len()) };
        r.state = state;
        r.report = report;
        Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
    }

    fn bwd_typed<T: Element + WithDType>(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        params: &Params,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dy = if dy.dtype() == x.dtype() {
            dy.clone()
        } else {
            dy.to_dtype(x.dtype())?
        };
        // Read both straight from their CPU storage (no copy when contiguous).
        let (xst, xl) = x.storage_and_layout();
        let (dst, dl) = dy.storage_and_layout();
        let (Storage::Cpu(xc), Storage::Cpu(dc)) = (&*xst, &*dst) else {
            candle_core::bail!("bnorm: the candle layer runs on CPU tensors");
        };
        let xs = gather(T::cpu_storage_as_slice(xc)?, xl);
        let dys = gather(T::cpu_storage_as_slice(dc)?, dl);
        let g = self.layout.geometry(x.dims()).map_err(wrap)?;
        let guard = self
            .result
            .lock()
            .map_err(|_| candle_core::Error::msg("poisoned"))?;
        let mut dx = bnorm::tuning::empty_buffer::<T>(xs.len());
        let mut grads = Grads::default();
        bnorm::expert::backward_into_uninit(
            &self.cfg,
            g,
            &xs,
            &dys,
            params,
            &guard.saved,
            &mut dx.spare_capacity_mut()[..xs.len()],
            &mut grads,
            &mut bnorm::expert::Workspace::default(),
            bnorm::expert::Parallelism::Rayon,
        )
        .map_err(wrap)?;
        // SAFETY: the capacity is `xs.len()`, and `backward_into_uninit` returned `Ok`, so
        // it initialized every one of those elements.
        unsafe { dx.set_len(xs.len()) };
        drop((xs, dys));
        drop((xst, dst));
        let dev = x.device();
        let dx = Tensor::from_vec(dx, x.shape(), dev)?;
        let dw = Tensor::new(grads.dweight.as_slice(), dev)?.to_dtype(w.dtype())?;
        let db = Tensor::new(grads.dbias.as_slice(), dev)?.to_dtype(w.dtype())?;
        Ok((dx, dw, db))
    }
}

impl CustomOp3 for BnOp {
    fn name(&self) -> &'static str {
        "bnorm-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
        s3: &CpuStorage,
        l3: &CLayout,
    ) -> Result<(CpuStorage, Shape)> {
        let params = Params {
            weight: params_of(s2, l2, self.cfg.get_scale())?,
            bias: params_of(s3, l3, self.cfg.get_center())?,
        };
        match s1 {
            CpuStorage::F32(x) => self.fwd_typed(x, l1, params),
            CpuStorage::F64(x) => self.fwd_typed(x, l1, params),
            CpuStorage::F16(x) => self.fwd_typed(x, l1, params),
            CpuStorage::BF16(x) => self.fwd_typed(x, l1, params),
            other => candle_core::bail!("bnorm: input of dtype {:?}", other.dtype()),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let to_f64 = |t: &Tensor, on: bool| -> Result<Option<Vec<f64>>> {
            if on {
                Ok(Some(t.to_dtype(DType::F64)?.to_vec1::<f64>()?))
            } else {
                Ok(None)
            }
        };
        let params = Params {
            weight: to_f64(w, self.cfg.get_scale())?,
            bias: to_f64(b, self.cfg.get_center())?,
        };
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, w, dy, &params)?,
            DType::F64 => self.bwd_typed::<f64>(x, w, dy, &params)?,
            DType::F16 => self.bwd_typed::<half::f16>(x, w, dy, &params)?,
            DType::BF16 => self.bwd_typed::<half::bf16>(x, w, dy, &params)?,
            d => candle_core::bail!("bnorm: input of dtype {d:?}"),
        };
        Ok((
            Some(dx),
            self.cfg.get_scale().then_some(dw),
            self.cfg.get_center().then_some(db),
        ))
    }
}
