//! Reads and replays conformance cases (`bnorm-conformance/1` and its superset
//! `bnorm-conformance/2`, see `conformance/FORMAT.md` in the repository): short histories of one layer recorded from PyTorch, Keras,
//! tf_keras and TensorFlow, replayed here step by step and compared element by element.
//!
//! ```no_run
//! let results = bnorm::conformance::run_dir("conformance/cases".as_ref())?;
//! let failed = results.iter().filter(|r| !r.passed).count();
//! println!("{} passed, {} failed", results.len() - failed, failed);
//! # Ok::<(), bnorm::conformance::CaseError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::config::{Config, Ghost, Momentum, Renorm, SingleValuePolicy, Variant};
use crate::element::{bf16, f16};
use crate::element::{DType, Element};
use crate::error::Error;
use crate::layer::BatchNorm;
use crate::layout::Layout;
use crate::state::{Mode, Params, RenormState, RunningState};

/// Why a case file could not be read or understood (distinct from a case that fails).
#[derive(Debug)]
pub enum CaseError {
    /// The file or directory could not be read.
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a valid safetensors file.
    Safetensors {
        /// The path.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A metadata key is missing or has a value outside the format.
    Metadata {
        /// The key.
        key: &'static str,
        /// The value found (empty when missing).
        value: String,
    },
    /// A tensor is missing, of another dtype than declared, or of a bad shape.
    Tensor {
        /// The tensor name.
        name: String,
        /// What is wrong.
        problem: &'static str,
    },
}

impl fmt::Display for CaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaseError::Io { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            CaseError::Safetensors { path, message } => {
                write!(
                    f,
                    "{} is not a valid safetensors file: {message}",
                    path.display()
                )
            }
            CaseError::Metadata { key, value } => {
                write!(
                    f,
                    "metadata {key} = {value:?} is missing or not in the format"
                )
            }
            CaseError::Tensor { name, problem } => write!(f, "tensor {name}: {problem}"),
        }
    }
}

impl std::error::Error for CaseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CaseError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A tensor of a case, widened to f64.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseTensor {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub data: Vec<f64>,
}

/// One parsed case.
#[derive(Debug, Clone)]
pub struct Case {
    /// File stem.
    pub name: String,
    /// All metadata.
    pub meta: BTreeMap<String, String>,
    /// All tensors by name.
    pub tensors: BTreeMap<String, CaseTensor>,
    /// Storage type of `x`, `y`, `dy`, `dx`.
    pub dtype: DType,
    /// Storage type of the parameters, statistics and their gradients (format 2's
    /// `param_dtype`, mixed precision; `dtype` when absent).
    pub param_dtype: DType,
    /// Layout of `x`.
    pub layout: Layout,
    /// One mode per step.
    pub steps: Vec<Mode>,
}

fn meta_err(key: &'static str, value: Option<&String>) -> CaseError {
    CaseError::Metadata {
        key,
        value: value.cloned().unwrap_or_default(),
    }
}

fn widen(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f64>, CaseError> {
    let chunks = |w: usize| bytes.chunks_exact(w);
    Ok(match dtype {
        Dtype::F32 => chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect(),
        Dtype::F64 => chunks(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect(),
        Dtype::F16 => chunks(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        Dtype::BF16 => chunks(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        _ => {
            return Err(CaseError::Tensor {
                name: name.to_string(),
                problem: "dtype is not a floating-point type of the format",
            })
        }
    })
}

impl Case {
    /// Reads a case file.
    pub fn load(path: &Path) -> Result<Case, CaseError> {
        let bytes = std::fs::read(path).map_err(|source| CaseError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |e: safetensors::SafeTensorError| CaseError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(bad)?;
        let st = SafeTensors::deserialize(&bytes).map_err(bad)?;
        let meta: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let formats = ["bnorm-conformance/1", "bnorm-conformance/2"];
        if !formats.contains(&meta.get("format").map_or("", String::as_str)) {
            return Err(meta_err("format", meta.get("format")));
        }
        let dtype = meta
            .get("dtype")
            .and_then(|d| DType::parse(d))
            .ok_or_else(|| meta_err("dtype", meta.get("dtype")))?;
        let param_dtype = match meta.get("param_dtype") {
            None => dtype,
            Some(d) => DType::parse(d).ok_or_else(|| meta_err("param_dtype", Some(d)))?,
        };
        let layout = meta
            .get("layout")
            .and_then(|l| Layout::parse(l))
            .ok_or_else(|| meta_err("layout", meta.get("layout")))?;
        let steps = meta
            .get("steps")
            .ok_or_else(|| meta_err("steps", None))?
            .split(',')
            .map(|s| match s.trim() {
                "train" => Ok(Mode::Train),
                "eval" => Ok(Mode::Inference),
                _ => Err(meta_err("steps", meta.get("steps"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let data = widen(&name, view.dtype(), view.data())?;
            tensors.insert(
                name,
                CaseTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Case {
            name,
            meta,
            tensors,
            dtype,
            param_dtype,
            layout,
            steps,
        })
    }

    fn get(&self, key: &'static str) -> Option<&String> {
        self.meta.get(key)
    }

    fn flag(&self, key: &'static str, default: bool) -> Result<bool, CaseError> {
        match self.get(key).map(String::as_str) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(_) => Err(meta_err(key, self.get(key))),
        }
    }

    fn number(&self, key: &'static str) -> Result<f64, CaseError> {
        self.get(key)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| meta_err(key, self.get(key)))
    }

    /// Refuses the first of `keys` the metadata holds.
    fn absent(&self, keys: &[&'static str]) -> Result<(), CaseError> {
        match keys.iter().copied().find(|&k| self.get(k).is_some()) {
            Some(k) => Err(meta_err(k, self.get(k))),
            None => Ok(()),
        }
    }

    /// The renorm keys of `batch_renorm` and `ghost_renorm` (fixed clipping, as tf_keras).
    fn renorm(&self) -> Result<Renorm, CaseError> {
        Ok(Renorm {
            rmax: self.number("rmax")?,
            rmin: self.number("rmin")?,
            dmax: self.number("dmax")?,
            momentum: self.number("renorm_momentum")?,
            schedule: None,
        })
    }

    /// The ghost keys of `ghost` and `ghost_renorm` (strided groups, as tf_keras).
    fn ghost(&self) -> Result<Ghost, CaseError> {
        if self.get("ghost_grouping").map(String::as_str) != Some("strided") {
            return Err(meta_err("ghost_grouping", self.get("ghost_grouping")));
        }
        Ok(Ghost::strided(self.number("virtual_batch_size")? as usize))
    }

    fn tensor(&self, name: &str) -> Option<&CaseTensor> {
        self.tensors.get(name)
    }

    /// The update count the running statistics start with (format 2's
    /// `num_batches_tracked`; 0 when absent).
    pub fn initial_updates(&self) -> Result<u64, CaseError> {
        match self.get("num_batches_tracked") {
            None => Ok(0),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| meta_err("num_batches_tracked", Some(v))),
        }
    }

    /// The layer configuration the case describes.
    pub fn config(&self) -> Result<Config, CaseError> {
        let channels = ["init.weight", "init.bias", "init.running_mean"]
            .iter()
            .find_map(|n| self.tensor(n).map(|t| t.data.len()))
            .or_else(|| {
                self.tensor("step0.x")
                    .and_then(|t| t.shape.get(self.layout.channel_axis()).copied())
            })
            .ok_or(CaseError::Tensor {
                name: "step0.x".into(),
                problem: "missing",
            })?;
        let momentum = self.get("momentum").map(String::as_str);
        let base = match self.get("convention").map(String::as_str) {
            Some("torch") => Config::torch(channels).momentum(match momentum {
                Some("none") => Momentum::Cumulative,
                _ => Momentum::NewWeight(self.number("momentum")?),
            }),
            Some("keras") => {
                Config::keras(channels).momentum(Momentum::Decay(self.number("momentum")?))
            }
            Some("tf") => {
                let d = self.number("momentum")?;
                let debias = self.flag("zero_debias", true)?;
                Config::keras(channels).momentum(
                    match (debias, self.flag("ema_num_updates", false)?) {
                        (true, false) => Momentum::DebiasedDecay(d),
                        (false, false) => Momentum::Decay(d),
                        (false, true) => Momentum::WarmupDecay(d),
                        // a zero-debiased average with the num_updates cap: no bnorm convention
                        (true, true) => {
                            return Err(meta_err("ema_num_updates", self.get("ema_num_updates")))
                        }
                    },
                )
            }
            _ => return Err(meta_err("convention", self.get("convention"))),
        };
        let variant = match self.get("variant").map(String::as_str) {
            None | Some("batch_norm") => Variant::BatchNorm,
            // renorm of ghost batches is `ghost_renorm` (FORMAT.md): a `batch_renorm` case
            // with a ghost key, or a `ghost` case with a renorm key, is malformed
            Some("batch_renorm") => {
                self.absent(&["virtual_batch_size", "ghost_grouping"])?;
                Variant::Renorm(self.renorm()?)
            }
            Some("ghost") => {
                self.absent(&["rmax", "rmin", "dmax", "renorm_momentum"])?;
                Variant::Ghost(self.ghost()?)
            }
            Some("ghost_renorm") => Variant::GhostRenorm {
                ghost: self.ghost()?,
                renorm: self.renorm()?,
            },
            Some(_) => return Err(meta_err("variant", self.get("variant"))),
        };
        // format 2: the single-value policy, defaulting to the convention's
        let base = match self.get("single_value").map(String::as_str) {
            None => base,
            Some("refuse") => base.single_value(SingleValuePolicy::Refuse),
            Some("accept") => base.single_value(SingleValuePolicy::Accept),
            Some(_) => return Err(meta_err("single_value", self.get("single_value"))),
        };
        Ok(base
            .eps(self.number("eps")?)
            .scale(self.flag("scale", true)?)
            .center(self.flag("center", true)?)
            .track_running_stats(self.flag("track_running_stats", true)?)
            .variant(variant))
    }
}

/// The outcome of replaying one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// Whether every compared tensor matched (or the expected error came).
    pub passed: bool,
    /// Number of elements compared.
    pub compared: usize,
    /// A one-line description: the worst element, or what went wrong.
    pub detail: String,
}

#[derive(Default)]
struct Worst {
    ratio: f64,
    text: String,
    failed: bool,
    compared: usize,
}

impl Worst {
    fn compare(&mut self, what: &str, got: &[f64], want: &CaseTensor, atol: f64, rtol: f64) {
        if got.len() != want.data.len() {
            self.failed = true;
            self.ratio = f64::INFINITY;
            self.text = format!("{what}: {} values, expected {}", got.len(), want.data.len());
            return;
        }
        for (i, (&g, &w)) in got.iter().zip(&want.data).enumerate() {
            self.compared += 1;
            let tol = atol + rtol * w.abs();
            let err = (g - w).abs();
            let ok = err <= tol || (g.is_nan() && w.is_nan());
            let ratio = if ok && err.is_nan() {
                0.0
            } else if tol > 0.0 {
                err / tol
            } else if err == 0.0 {
                0.0
            } else {
                f64::INFINITY
            };
            let ratio = if ratio.is_nan() { f64::INFINITY } else { ratio };
            if !ok {
                self.failed = true;
            }
            if ratio > self.ratio || self.text.is_empty() {
                self.ratio = ratio;
                self.text = format!(
                    "{what}[{i}]: got {g:.9e}, expected {w:.9e}, |diff| {err:.3e} vs tol {tol:.3e}"
                );
            }
        }
    }
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::BatchTooSmall { .. } => "batch_too_small",
        Error::ShapeMismatch { .. }
        | Error::RankMismatch { .. }
        | Error::ChannelMismatch { .. }
        | Error::LengthMismatch { .. } => "shape_mismatch",
        _ => "other",
    }
}

/// Replays a case and compares every recorded tensor.
pub fn replay(case: &Case) -> CaseResult {
    let outcome = match case.dtype {
        DType::F32 => replay_typed::<f32>(case),
        DType::F64 => replay_typed::<f64>(case),
        DType::F16 => replay_typed::<f16>(case),
        DType::BF16 => replay_typed::<bf16>(case),
    };
    match outcome {
        Ok(w) => CaseResult {
            name: case.name.clone(),
            passed: !w.failed,
            compared: w.compared,
            detail: w.text,
        },
        Err(e) => CaseResult {
            name: case.name.clone(),
            passed: false,
            compared: 0,
            detail: e,
        },
    }
}

fn replay_typed<T: Element>(case: &Case) -> Result<Worst, String> {
    let cfg = case.config().map_err(|e| e.to_string())?;
    let atol = case.number("atol").map_err(|e| e.to_string())?;
    let rtol = case.number("rtol").map_err(|e| e.to_string())?;
    let expect_error = case.get("expect_error").cloned();
    let mut layer = BatchNorm::new(cfg.clone()).map_err(|e| e.to_string())?;
    let vec_of = |n: &str| case.tensor(n).map(|t| t.data.clone());
    // Parameters and statistics go in as recorded; a wrong length surfaces at the first
    // step, as the format's error cases expect.
    let params = Params {
        weight: vec_of("init.weight"),
        bias: vec_of("init.bias"),
    };
    let (rm, rv) = (vec_of("init.running_mean"), vec_of("init.running_var"));
    let updates = case.initial_updates().map_err(|e| e.to_string())?;
    let renorm_init = match (
        vec_of("init.renorm_mean"),
        vec_of("init.renorm_stddev"),
        vec_of("init.moving_stddev"),
    ) {
        (Some(mean), Some(stddev), Some(moving_stddev)) => Some(RenormState {
            mean,
            stddev,
            moving_stddev,
        }),
        (None, None, None) => None,
        _ => {
            return Err(
                "init.renorm_mean, init.renorm_stddev, init.moving_stddev: all or none".into(),
            )
        }
    };
    let mut worst = Worst::default();
    let setup = (|| -> Result<(), Error> {
        if params.weight.is_some() || params.bias.is_some() {
            layer.set_params(params.clone())?;
        }
        if let (Some(rm), Some(rv)) = (rm.clone(), rv.clone()) {
            let mut s = RunningState::from_values(&cfg, rm, rv, updates)?;
            if renorm_init.is_some() {
                s.renorm.clone_from(&renorm_init);
            }
            layer.set_running_state(s)?;
        }
        Ok(())
    })();
    if let Err(e) = setup {
        return match expect_error {
            Some(k) if k == kind(&e) => {
                worst.text = format!("refused as expected: {e}");
                Ok(worst)
            }
            _ => Err(format!("setup failed: {e}")),
        };
    }
    for (k, &mode) in case.steps.iter().enumerate() {
        let x = case
            .tensor(&format!("step{k}.x"))
            .ok_or_else(|| format!("step{k}.x missing"))?;
        let xt: Vec<T> = x.data.iter().map(|&v| T::from_f64(v)).collect();
        // format 2: parameters changed before this step (an optimizer step)
        let (w, b) = (
            vec_of(&format!("step{k}.weight")),
            vec_of(&format!("step{k}.bias")),
        );
        if w.is_some() || b.is_some() {
            let p = Params {
                weight: w.or_else(|| layer.params().weight.clone()),
                bias: b.or_else(|| layer.params().bias.clone()),
            };
            layer
                .set_params(p)
                .map_err(|e| format!("step {k} parameters: {e}"))?;
        }
        let before = layer.running_state().cloned();
        // format 2: a Keras 3 mask, x's shape without its last axis
        let fwd = match case.tensor(&format!("step{k}.mask")) {
            Some(m) => {
                let mask: Vec<bool> = m.data.iter().map(|&v| v != 0.0).collect();
                layer.forward_masked(&xt, &mask, &x.shape, case.layout, mode)
            }
            None => layer.forward(&xt, &x.shape, case.layout, mode),
        };
        let (y, _) = match (fwd, &expect_error) {
            (Err(e), Some(want)) => {
                if kind(&e) != want {
                    return Err(format!("step {k}: expected {want}, got: {e}"));
                }
                if layer.running_state() != before.as_ref() {
                    return Err(format!(
                        "step {k}: refused step changed the running statistics"
                    ));
                }
                // The steps before were compared; the refused step is the last and
                // records no outputs (FORMAT.md, "Errors").
                if k + 1 != case.steps.len() {
                    return Err(format!(
                        "step {k} refused ({want}) but the case records later steps"
                    ));
                }
                if case.tensor(&format!("step{k}.y")).is_some() {
                    return Err(format!("step {k} refused ({want}) but records an output"));
                }
                worst.text = format!("refused as expected: {e}");
                return Ok(worst);
            }
            (Err(e), None) => return Err(format!("step {k}: {e}")),
            (Ok(out), _) => out,
        };
        let wide = |v: &[T]| v.iter().map(|e| e.to_f64()).collect::<Vec<_>>();
        let check = |w: &mut Worst, name: &str, got: &[f64]| {
            if let Some(want) = case.tensor(&format!("step{k}.{name}")) {
                w.compare(&format!("step{k}.{name}"), got, want, atol, rtol);
            }
        };
        check(&mut worst, "y", &wide(&y));
        if let Some(dy) = case.tensor(&format!("step{k}.dy")) {
            let dyt: Vec<T> = dy.data.iter().map(|&v| T::from_f64(v)).collect();
            let b = layer
                .backward(&xt, &dyt, &x.shape, case.layout)
                .map_err(|e| format!("step {k} backward: {e}"))?;
            check(&mut worst, "dx", &wide(&b.dx));
            if let Some(dw) = &b.dweight {
                check(&mut worst, "dweight", dw);
            }
            if let Some(db) = &b.dbias {
                check(&mut worst, "dbias", db);
            }
        }
        if let Some(s) = layer.running_state() {
            check(&mut worst, "running_mean", &s.mean);
            check(&mut worst, "running_var", &s.var);
            if let Some(r) = &s.renorm {
                check(&mut worst, "renorm_mean", &r.mean);
                check(&mut worst, "renorm_stddev", &r.stddev);
                check(&mut worst, "moving_stddev", &r.moving_stddev);
            }
        }
    }
    if let Some(want) = expect_error {
        return Err(format!("expected error {want}, but every step succeeded"));
    }
    Ok(worst)
}

/// Loads and replays every `*.safetensors` case in `dir`, sorted by name.
pub fn run_dir(dir: &Path) -> Result<Vec<CaseResult>, CaseError> {
    let io = |source| CaseError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        out.push(match Case::load(&p) {
            Ok(case) => replay(&case),
            Err(e) => CaseResult {
                name: p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                passed: false,
                compared: 0,
                detail: e.to_string(),
            },
        });
    }
    Ok(out)
}
