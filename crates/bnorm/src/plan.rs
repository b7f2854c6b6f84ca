//! The plan of a step: every decision of a forward or backward step, made once from the
//! configuration, the geometry, the parameters, the state, the mode and the [`Options`],
//! before any data is touched.
//!
//! [`ForwardPlan::new`] and [`BackwardPlan::new`] validate everything that does not need
//! the data and resolve what the step will do: normalize with batch or running statistics,
//! ghost groups, renorm limits, the cold-statistics report, the update policy (apply,
//! defer, none), fused or two-pass, the thread count, synchronized or local statistics.
//! [`forward_into`](crate::expert::forward_into) and [`backward_into`](crate::expert::backward_into)
//! build the plan and execute it; the plan can be inspected on its own (it is what the
//! tests of those decisions check, without data).

use crate::config::{
    ColdPolicy, Config, NonFinitePolicy, RenormLimits, SingleValuePolicy, VarianceEstimator,
    Variant,
};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::forward::{check_channels, Normalized, Saved};
use crate::kernels::{self, Ep};
use crate::layout::Geometry;
use crate::parallel::Parallelism;
use crate::state::{Mode, Params, RunningState};
use crate::sync::Communicator;

/// What follows the normalization in the same pass over memory (forward).
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a, T> {
    /// Nothing: `y = bn(x)`.
    None,
    /// `y = relu(bn(x))`.
    Relu,
    /// `y = relu(bn(x) + residual)`, the ResNet block ending.
    AddRelu(&'a [T]),
}

impl<'a, T> Epilogue<'a, T> {
    pub(crate) fn kernel(self) -> Ep<'a, T> {
        match self {
            Epilogue::None => Ep::None,
            Epilogue::Relu => Ep::Relu,
            Epilogue::AddRelu(r) => Ep::AddRelu(r),
        }
    }
}

/// What the backward of a step with an [`Epilogue`] needs besides `x` and `dy`.
#[derive(Debug)]
pub enum BackwardEpilogue<'a, T> {
    /// The step had no epilogue.
    None,
    /// The step ended with a ReLU: its output `y` (the gradient is cut where `y = 0`).
    Relu {
        /// The forward step's output.
        y: &'a [T],
    },
    /// The step ended with `relu(bn(x) + residual)`: its output, and where to write the
    /// residual's gradient.
    AddRelu {
        /// The forward step's output.
        y: &'a [T],
        /// The residual's gradient (written).
        dresidual: &'a mut [T],
    },
}

/// What a training step does with its update of the running statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Update {
    /// Apply it to the state (the running statistics change).
    #[default]
    Apply,
    /// Return it as [`StepReport::pending`](crate::StepReport::pending) and leave the state
    /// alone: commit it later, merge micro-batches, or drop it (a skipped mixed-precision
    /// step).
    Defer,
}

/// How a forward step runs: its epilogue, its update policy, its threads, and whether its
/// statistics are those of one rank or of the global batch of several. Every combination
/// is allowed. A [`Parallelism`] converts into the default options with it.
///
/// ```
/// use bnorm::expert::{Epilogue, Options, Parallelism, Update};
/// let o: Options<'_, f32> = Options::default().epilogue(Epilogue::Relu).defer();
/// assert_eq!(o.update, Update::Defer);
/// let p: Options<'_, f32> = Parallelism::Sequential.into();
/// assert_eq!(p.parallelism, Parallelism::Sequential);
/// ```
#[derive(Clone, Copy)]
pub struct Options<'a, T> {
    /// What follows the normalization.
    pub epilogue: Epilogue<'a, T>,
    /// What a training step does with its running-statistics update.
    pub update: Update,
    /// Threads.
    pub parallelism: Parallelism,
    /// Synchronized batch norm: the statistics of the global batch of the communicator's
    /// ranks (see [`mod@crate::sync`]). Every rank must make the same call.
    pub sync: Option<&'a dyn Communicator>,
    /// Masked batch norm (Keras 3's `mask`): statistics over the values the mask selects,
    /// one flag per row of the last axis (see [`mod@crate::masked`]).
    pub mask: Option<&'a [bool]>,
}

impl<T> std::fmt::Debug for Options<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("epilogue", &self.epilogue_name())
            .field("update", &self.update)
            .field("parallelism", &self.parallelism)
            .field("synchronized", &self.sync.is_some())
            .field("masked", &self.mask.is_some())
            .finish()
    }
}

impl<T> Default for Options<'_, T> {
    fn default() -> Self {
        Options {
            epilogue: Epilogue::None,
            update: Update::Apply,
            parallelism: Parallelism::Rayon,
            sync: None,
            mask: None,
        }
    }
}

impl<T> From<Parallelism> for Options<'_, T> {
    fn from(parallelism: Parallelism) -> Self {
        Options {
            parallelism,
            ..Options::default()
        }
    }
}

impl<'a, T> Options<'a, T> {
    /// With this epilogue.
    pub fn epilogue(self, epilogue: Epilogue<'a, T>) -> Self {
        Options { epilogue, ..self }
    }
    /// With the training step's update deferred ([`Update::Defer`]).
    pub fn defer(self) -> Self {
        Options {
            update: Update::Defer,
            ..self
        }
    }
    /// With these threads.
    pub fn parallelism(self, parallelism: Parallelism) -> Self {
        Options {
            parallelism,
            ..self
        }
    }
    /// Synchronized over `comm`'s ranks.
    pub fn synchronized(self, comm: &'a dyn Communicator) -> Self {
        Options {
            sync: Some(comm),
            ..self
        }
    }
    /// Masked by `mask` (Keras 3's masked batch norm, see [`mod@crate::masked`]).
    pub fn masked(self, mask: &'a [bool]) -> Self {
        Options {
            mask: Some(mask),
            ..self
        }
    }
    fn epilogue_name(&self) -> &'static str {
        match self.epilogue {
            Epilogue::None => "none",
            Epilogue::Relu => "relu",
            Epilogue::AddRelu(_) => "add+relu",
        }
    }
}

/// How a backward step runs: the epilogue of its forward step, its threads, and whether
/// it is synchronized. A [`Parallelism`] converts into the default options with it.
pub struct BackwardOptions<'a, T> {
    /// The epilogue of the forward step being differentiated.
    pub epilogue: BackwardEpilogue<'a, T>,
    /// Threads.
    pub parallelism: Parallelism,
    /// Synchronized over these ranks (the forward step must have been).
    pub sync: Option<&'a dyn Communicator>,
}

impl<T> std::fmt::Debug for BackwardOptions<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackwardOptions")
            .field("parallelism", &self.parallelism)
            .field("synchronized", &self.sync.is_some())
            .finish_non_exhaustive()
    }
}

impl<T> Default for BackwardOptions<'_, T> {
    fn default() -> Self {
        BackwardOptions {
            epilogue: BackwardEpilogue::None,
            parallelism: Parallelism::Rayon,
            sync: None,
        }
    }
}

impl<T> From<Parallelism> for BackwardOptions<'_, T> {
    fn from(parallelism: Parallelism) -> Self {
        BackwardOptions {
            parallelism,
            ..BackwardOptions::default()
        }
    }
}

impl<'a, T> BackwardOptions<'a, T> {
    /// Through this epilogue.
    pub fn epilogue(self, epilogue: BackwardEpilogue<'a, T>) -> Self {
        BackwardOptions { epilogue, ..self }
    }
    /// With these threads.
    pub fn parallelism(self, parallelism: Parallelism) -> Self {
        BackwardOptions {
            parallelism,
            ..self
        }
    }
    /// Synchronized over `comm`'s ranks.
    pub fn synchronized(self, comm: &'a dyn Communicator) -> Self {
        BackwardOptions {
            sync: Some(comm),
            ..self
        }
    }
}

/// Threads a step may use: what it can split its work over.
fn threads(par: Parallelism) -> usize {
    par.threads().min(64)
}

/// Every decision of one forward step.
///
/// ```
/// use bnorm::{Config, Layout, Mode, Params, RunningState};
/// use bnorm::expert::{ForwardPlan, Normalized, Options};
/// let cfg = Config::torch(8);
/// let g = Layout::NCHW.geometry(&[4, 8, 16, 16])?;
/// let (p, s) = (Params::init(&cfg), RunningState::init(&cfg));
/// let opts = Options::<f32>::default();
/// let train = ForwardPlan::new(&cfg, g, &p, s.as_ref(), Mode::Train, &opts)?;
/// assert_eq!(train.normalized, Normalized::Batch);
/// assert!(train.update.is_some());
/// let infer = ForwardPlan::new(&cfg, g, &p, s.as_ref(), Mode::Inference, &opts)?;
/// assert_eq!(infer.normalized, Normalized::Running);
/// assert!(infer.cold_statistics && infer.update.is_none()); // never trained: reported
/// # Ok::<(), bnorm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ForwardPlan {
    /// The data's geometry.
    pub geometry: Geometry,
    /// Batch or running statistics.
    pub normalized: Normalized,
    /// Ghost groups (1 for plain batch norm).
    pub groups: usize,
    /// The group of each sample (empty unless ghost batches).
    pub group_of: Vec<usize>,
    /// Batch renormalization's limits at this step (`None` unless a renorm training step).
    pub renorm: Option<RenormLimits>,
    /// The step normalizes with never-updated running statistics and says so.
    pub cold_statistics: bool,
    /// What happens to the running statistics (`None`: nothing, as in inference).
    pub update: Option<Update>,
    /// Non-finite batch statistics refuse the step (rather than skip the channel).
    pub refuse_non_finite: bool,
    /// A channel (or ghost group) with a single value is normalized (variance 0, `y = β`,
    /// `dx = 0`) rather than refused: the configuration's
    /// [`SingleValuePolicy`], resolved for this step (never when the step would fold the
    /// unbiased variance of one value into the running statistics).
    pub accept_single_value: bool,
    /// The step normalizes some channel or ghost group with a single value (known here
    /// unless synchronized; the step's report says it in every case).
    pub single_value: bool,
    /// Statistics and output in one pass per group of channels (channels-first).
    pub fused: bool,
    /// The statistics are those of the global batch of several ranks.
    pub synchronized: bool,
    /// Threads.
    pub parallelism: Parallelism,
}

/// What a plan needs to know of the running statistics, without their values: how many
/// updates they have had and whether they carry batch renormalization's state. A layer
/// whose statistics live elsewhere (on a GPU) plans its steps from this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateSummary {
    /// Updates so far (0: never updated).
    pub updates: u64,
    /// Batch renormalization's state is present.
    pub renorm: bool,
}

impl StateSummary {
    /// The summary of `state`.
    ///
    /// ```
    /// use bnorm::{Config, RunningState};
    /// use bnorm::expert::StateSummary;
    /// let s = RunningState::init(&Config::torch(2)).unwrap();
    /// assert_eq!(StateSummary::of(&s), StateSummary { updates: 0, renorm: false });
    /// ```
    pub fn of(state: &RunningState) -> StateSummary {
        StateSummary {
            updates: state.updates,
            renorm: state.renorm.is_some(),
        }
    }
}

impl ForwardPlan {
    /// Validates the configuration, parameters, state and mode against each other and
    /// the geometry, and makes every decision of the step. Buffers are checked when the
    /// step runs.
    pub fn new<T: Element>(
        cfg: &Config,
        g: Geometry,
        params: &Params,
        state: Option<&RunningState>,
        mode: Mode,
        opts: &Options<'_, T>,
    ) -> Result<ForwardPlan> {
        cfg.validate()?;
        params.validate(cfg)?;
        if let (Some(s), true) = (state, cfg.get_track_running_stats()) {
            s.validate(cfg)?;
        }
        ForwardPlan::decide(cfg, g, state.map(StateSummary::of), mode, opts)
    }

    /// The semantic half of [`ForwardPlan::new`]: every decision of the step from the
    /// configuration, the geometry, what is known of the running statistics, the mode and
    /// the options, without looking at any value (the caller validates parameters and
    /// statistics where they live). `bnorm-cuda` plans its steps with it.
    ///
    /// ```
    /// use bnorm::{Config, Layout, Mode};
    /// use bnorm::expert::{ForwardPlan, Normalized, Options, StateSummary};
    /// let cfg = Config::torch(8);
    /// let g = Layout::NC.geometry(&[1, 8])?;
    /// let opts = Options::<f32>::default();
    /// let fresh = Some(StateSummary { updates: 0, renorm: false });
    /// // PyTorch: a batch of one cannot be normalized with its own statistics
    /// assert!(ForwardPlan::decide(&cfg, g, fresh, Mode::Train, &opts).is_err());
    /// // Keras: it can (y = β)
    /// let keras = ForwardPlan::decide(&Config::keras(8), g, fresh, Mode::Train, &opts)?;
    /// assert!(keras.accept_single_value && keras.single_value);
    /// let infer = ForwardPlan::decide(&cfg, g, fresh, Mode::Inference, &opts)?;
    /// assert_eq!(infer.normalized, Normalized::Running);
    /// # Ok::<(), bnorm::Error>(())
    /// ```
    pub fn decide<T: Element>(
        cfg: &Config,
        g: Geometry,
        state: Option<StateSummary>,
        mode: Mode,
        opts: &Options<'_, T>,
    ) -> Result<ForwardPlan> {
        cfg.validate()?;
        check_channels(cfg, g)?;
        match (state, cfg.get_track_running_stats()) {
            (Some(_), true) | (None, false) => {}
            (None, true) => return Err(Error::NoRunningStatistics),
            (Some(_), false) => {
                return Err(Error::StateMismatch {
                    reason: "running statistics given to a layer that does not track them",
                })
            }
        }
        let synchronized = opts.sync.is_some();
        let ghost = cfg.get_variant().ghost();
        if synchronized && ghost.is_some() {
            return Err(Error::InvalidConfig {
                setting: "variant",
                value: "ghost batches".into(),
                expected: "plain batch norm or renorm: synchronized ghost batches are not \
                           defined (each rank's groups would be local)",
            });
        }
        if opts.mask.is_some() {
            let unsupported = if synchronized {
                Some("synchronized")
            } else if !matches!(opts.epilogue, Epilogue::None) {
                Some("an epilogue")
            } else if cfg.get_variant() != Variant::BatchNorm {
                Some("renorm or ghost batches")
            } else {
                None
            };
            if let Some(what) = unsupported {
                return Err(Error::InvalidConfig {
                    setting: "mask",
                    value: what.into(),
                    expected: "plain batch norm without epilogue or synchronization \
                               (masked batch norm is Keras 3's plain layer)",
                });
            }
        }
        let normalized = match (mode, state.is_some()) {
            (Mode::Train, _) | (Mode::Inference, false) => Normalized::Batch,
            (Mode::Inference, true) | (Mode::Frozen, true) => Normalized::Running,
            (Mode::Frozen, false) => return Err(Error::NoRunningStatistics),
        };
        let mut plan = ForwardPlan {
            geometry: g,
            normalized,
            groups: 1,
            group_of: Vec::new(),
            renorm: None,
            cold_statistics: false,
            update: None,
            refuse_non_finite: false,
            accept_single_value: false,
            single_value: false,
            fused: false,
            synchronized,
            parallelism: opts.parallelism,
        };
        if normalized == Normalized::Running {
            if state.is_some_and(|s| s.updates == 0) {
                match cfg.get_cold_statistics() {
                    ColdPolicy::Error => return Err(Error::ColdStatistics),
                    ColdPolicy::Report => plan.cold_statistics = true,
                    ColdPolicy::Allow => {}
                }
            }
            return Ok(plan);
        }
        if mode == Mode::Train {
            if let Some(s) = state {
                plan.update = Some(opts.update);
                if let Some(rn) = cfg.get_variant().renorm() {
                    plan.renorm = s.renorm.then(|| rn.limits(s.updates));
                }
            }
        }
        // One value per channel: accepted per the policy, unless the step folds its
        // (undefined) unbiased variance into the running statistics.
        plan.accept_single_value = cfg.get_single_value() == SingleValuePolicy::Accept
            && !(plan.update.is_some()
                && cfg.get_running_variance() == VarianceEstimator::Unbiased);
        let least = if plan.accept_single_value { 1 } else { 2 };
        // Batch statistics: enough values per channel (per group), the groups, renorm.
        // A synchronized step checks the global count once it is known.
        if !synchronized && g.per_channel() < least {
            return Err(Error::BatchTooSmall {
                channel_values: g.per_channel(),
            });
        }
        plan.single_value = !synchronized && g.per_channel() == 1;
        if let Some(gh) = ghost {
            let (group_of, groups) = gh.assign(g.batch)?;
            let per_sample = g.per_channel() / g.batch.max(1);
            let mut count = vec![0usize; groups];
            group_of.iter().for_each(|&gi| count[gi] += per_sample);
            let smallest = count.iter().copied().min().unwrap_or(0);
            if smallest < least {
                return Err(Error::BatchTooSmall {
                    channel_values: smallest,
                });
            }
            plan.single_value = smallest == 1;
            (plan.group_of, plan.groups) = (group_of, groups);
        }
        plan.refuse_non_finite =
            plan.update.is_some() && cfg.get_non_finite() == NonFinitePolicy::Error;
        // Channels-first and one group, and no policy that could refuse the step after y
        // is written: statistics and normalization fused per group of channels (same bits
        // as two passes), when there are enough groups to keep every thread busy.
        plan.fused = !synchronized
            && ghost.is_none()
            && opts.mask.is_none()
            && g.inner > 1
            && !plan.refuse_non_finite
            && g.channels.div_ceil(kernels::fused_channels::<T>(g, 1))
                >= 2 * threads(opts.parallelism);
        Ok(plan)
    }
}

/// Every decision of one backward step.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct BackwardPlan {
    /// The data's geometry.
    pub geometry: Geometry,
    /// Which statistics the forward step normalized with.
    pub normalized: Normalized,
    /// Ghost groups of the forward step (1 for plain batch norm).
    pub groups: usize,
    /// Sums and map in one pass per group of channels (channels-first).
    pub fused: bool,
    /// The map runs in f32 ([`BackwardArithmetic::F32`](crate::config::BackwardArithmetic::F32)
    /// on f32 data).
    pub f32_map: bool,
    /// The sums are those of the global batch of several ranks.
    pub synchronized: bool,
    /// Threads.
    pub parallelism: Parallelism,
}

impl BackwardPlan {
    /// Validates the parameters and the saved statistics against the configuration and
    /// the geometry, and makes every decision of the backward step.
    pub fn new<T: Element>(
        cfg: &Config,
        g: Geometry,
        params: &Params,
        saved: &Saved,
        opts: &BackwardOptions<'_, T>,
    ) -> Result<BackwardPlan> {
        let relu = !matches!(opts.epilogue, BackwardEpilogue::None);
        let (synchronized, par) = (opts.sync.is_some(), opts.parallelism);
        BackwardPlan::decide::<T>(cfg, g, params, saved, relu, synchronized, par)
    }

    /// [`BackwardPlan::new`] from what it reads of the options: whether the step ends in
    /// a ReLU, whether it is synchronized, and its threads.
    pub(crate) fn decide<T: Element>(
        cfg: &Config,
        g: Geometry,
        params: &Params,
        saved: &Saved,
        relu: bool,
        synchronized: bool,
        parallelism: Parallelism,
    ) -> Result<BackwardPlan> {
        params.validate(cfg)?;
        check_channels(cfg, g)?;
        if saved.geometry != Some(g) {
            return Err(Error::SavedMismatch {
                reason: "the forward step saw another shape (or no forward step ran)",
            });
        }
        let groups = saved.groups.max(1);
        let n = groups * g.channels;
        if saved.mean.len() != n || saved.invstd.len() != n || saved.count.len() != n {
            return Err(Error::SavedMismatch {
                reason: "saved statistics have another channel count",
            });
        }
        let ghost = groups > 1 || !saved.group_of.is_empty();
        if !saved.mask.is_empty() && (relu || synchronized) {
            return Err(Error::SavedMismatch {
                reason: "a masked step has no epilogue and is not synchronized",
            });
        }
        if synchronized && ghost {
            return Err(Error::SavedMismatch {
                reason: "saved statistics of ghost batches",
            });
        }
        let arrays = if relu { 3 } else { 2 };
        Ok(BackwardPlan {
            geometry: g,
            normalized: saved.normalized,
            groups,
            fused: !synchronized
                && !ghost
                && g.inner > 1
                && g.channels.div_ceil(kernels::fused_channels::<T>(g, arrays))
                    >= 2 * threads(parallelism),
            f32_map: crate::backward::f32_map::<T>(cfg),
            synchronized,
            parallelism,
        })
    }
}

#[cfg(test)]
mod tests {
    //! The decisions of a step, checked without data.
    use super::*;
    use crate::config::{Ghost, GhostGrouping, GhostRemainder, GhostUpdate, Renorm};
    use crate::layout::Layout;
    use crate::sync::ThreadComm;

    fn plan(cfg: &Config, shape: &[usize], layout: Layout, mode: Mode) -> Result<ForwardPlan> {
        plan_with(cfg, shape, layout, mode, &Options::<f32>::default())
    }

    fn plan_with(
        cfg: &Config,
        shape: &[usize],
        layout: Layout,
        mode: Mode,
        opts: &Options<'_, f32>,
    ) -> Result<ForwardPlan> {
        let g = layout.geometry(shape)?;
        let mut state = RunningState::init(cfg);
        if let Some(s) = state.as_mut() {
            s.updates = 5;
        }
        ForwardPlan::new(cfg, g, &Params::init(cfg), state.as_ref(), mode, opts)
    }

    /// The plan from values and the plan from a summary of them (what `bnorm-cuda` has)
    /// are the same plan, refusals included.
    #[test]
    fn deciding_from_a_summary_is_planning_from_the_values() {
        let renorm = Config::keras(4).variant(Variant::Renorm(Renorm::default()));
        for cfg in [
            Config::torch(4),
            Config::torch(4).track_running_stats(false),
            renorm,
        ] {
            for updates in [0, 3] {
                for shape in [&[8, 4, 3, 3][..], &[1, 4][..]] {
                    for mode in [Mode::Train, Mode::Inference, Mode::Frozen] {
                        let g = Layout::NCHW.geometry(shape).or(Layout::NC.geometry(shape));
                        let g = g.unwrap();
                        let mut state = RunningState::init(&cfg);
                        if let Some(s) = state.as_mut() {
                            s.updates = updates;
                        }
                        let opts = Options::<f32>::default();
                        let p = Params::init(&cfg);
                        let full = ForwardPlan::new(&cfg, g, &p, state.as_ref(), mode, &opts);
                        let summary = state.as_ref().map(StateSummary::of);
                        let semantic = ForwardPlan::decide(&cfg, g, summary, mode, &opts);
                        assert_eq!(
                            full.as_ref().map_err(|e| e.to_string()),
                            semantic.as_ref().map_err(|e| e.to_string()),
                            "{mode:?} {shape:?} updates {updates}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_mode_decides_the_statistics_and_the_update() {
        let cfg = Config::torch(4);
        let shape = [8, 4, 3, 3];
        let train = plan(&cfg, &shape, Layout::NCHW, Mode::Train).unwrap();
        assert_eq!(
            (train.normalized, train.update),
            (Normalized::Batch, Some(Update::Apply))
        );
        for mode in [Mode::Inference, Mode::Frozen] {
            let p = plan(&cfg, &shape, Layout::NCHW, mode).unwrap();
            assert_eq!((p.normalized, p.update), (Normalized::Running, None));
        }
        let untracked = Config::torch(4).track_running_stats(false);
        let p = plan(&untracked, &shape, Layout::NCHW, Mode::Inference).unwrap();
        assert_eq!((p.normalized, p.update), (Normalized::Batch, None));
        assert_eq!(
            plan(&untracked, &shape, Layout::NCHW, Mode::Frozen),
            Err(Error::NoRunningStatistics)
        );
        let defer = Options::default().defer();
        let p = plan_with(&cfg, &shape, Layout::NCHW, Mode::Train, &defer).unwrap();
        assert_eq!(p.update, Some(Update::Defer));
    }

    #[test]
    fn ghost_groups_are_assigned_and_each_needs_two_values() {
        let cfg = Config::keras(2).variant(Variant::Ghost(Ghost {
            virtual_batch_size: 2,
            grouping: GhostGrouping::Contiguous,
            remainder: GhostRemainder::SmallerLastGroup,
            update: GhostUpdate::Averaged,
        }));
        let p = plan(&cfg, &[6, 2], Layout::NC, Mode::Train).unwrap();
        assert_eq!((p.groups, p.group_of.clone()), (3, vec![0, 0, 1, 1, 2, 2]));
        assert!(!p.fused, "ghost batches are never fused");
        // five samples: the last group holds one value per channel, refused before any
        // data is read where the policy refuses single values (PyTorch's), accepted and
        // said where it accepts them (Keras's)
        let refuse = cfg.clone().single_value(SingleValuePolicy::Refuse);
        assert_eq!(
            plan(&refuse, &[5, 2], Layout::NC, Mode::Train),
            Err(Error::BatchTooSmall { channel_values: 1 })
        );
        let p = plan(&cfg, &[5, 2], Layout::NC, Mode::Train).unwrap();
        assert!(p.accept_single_value && p.single_value);
        // with two values per sample it is enough
        let p = plan(&cfg, &[5, 2, 2], Layout::NCL, Mode::Train).unwrap();
        assert_eq!(p.group_of, vec![0, 0, 1, 1, 2]);
        let cfg1 = Config::keras(2).variant(Variant::Ghost(Ghost {
            virtual_batch_size: 1,
            grouping: GhostGrouping::Contiguous,
            remainder: GhostRemainder::Error,
            update: GhostUpdate::Averaged,
        }));
        let p = plan(&cfg1, &[4, 2], Layout::NC, Mode::Train).unwrap();
        assert!(p.single_value && p.groups == 4);
        assert_eq!(
            plan(
                &cfg1.single_value(SingleValuePolicy::Refuse),
                &[4, 2],
                Layout::NC,
                Mode::Train
            ),
            Err(Error::BatchTooSmall { channel_values: 1 })
        );
        // in inference the groups play no part
        let p = plan(&cfg, &[5, 2], Layout::NC, Mode::Inference).unwrap();
        assert_eq!((p.groups, p.group_of.len()), (1, 0));
    }

    #[test]
    fn single_values_follow_the_policy_and_never_fold_an_unbiased_variance() {
        let one = [1usize, 3];
        // the presets: PyTorch refuses, Keras and TensorFlow accept
        assert_eq!(
            plan(&Config::torch(3), &one, Layout::NC, Mode::Train),
            Err(Error::BatchTooSmall { channel_values: 1 })
        );
        for cfg in [Config::keras(3), Config::tensorflow(3)] {
            let p = plan(&cfg, &one, Layout::NC, Mode::Train).unwrap();
            assert!(p.accept_single_value && p.single_value, "{cfg:?}");
            let p = plan(&cfg, &[2, 3], Layout::NC, Mode::Train).unwrap();
            assert!(p.accept_single_value && !p.single_value);
        }
        // accepted with PyTorch's unbiased running variance only where nothing folds it
        let torch = Config::torch(3).single_value(SingleValuePolicy::Accept);
        assert_eq!(
            plan(&torch, &one, Layout::NC, Mode::Train),
            Err(Error::BatchTooSmall { channel_values: 1 })
        );
        let deferred = Options::default().defer();
        assert!(plan_with(&torch, &one, Layout::NC, Mode::Train, &deferred).is_err());
        let untracked = torch.clone().track_running_stats(false);
        for mode in [Mode::Train, Mode::Inference] {
            let p = plan(&untracked, &one, Layout::NC, mode).unwrap();
            assert!(p.single_value && p.update.is_none());
        }
        let biased = torch.running_variance(VarianceEstimator::Biased);
        assert!(
            plan(&biased, &one, Layout::NC, Mode::Train)
                .unwrap()
                .single_value
        );
        // an empty batch is refused whatever the policy
        assert_eq!(
            plan(&Config::keras(3), &[0, 3], Layout::NC, Mode::Train),
            Err(Error::BatchTooSmall { channel_values: 0 })
        );
    }

    #[test]
    fn renorm_limits_follow_the_schedule_in_training_only() {
        let rn = Renorm {
            rmax: 3.0,
            rmin: 1.0 / 3.0,
            dmax: 5.0,
            momentum: 0.99,
            schedule: None,
        };
        let cfg = Config::keras(2).variant(Variant::Renorm(rn));
        let p = plan(&cfg, &[4, 2], Layout::NC, Mode::Train).unwrap();
        assert_eq!(p.renorm, Some(rn.limits(5)));
        let p = plan(&cfg, &[4, 2], Layout::NC, Mode::Inference).unwrap();
        assert_eq!(p.renorm, None);
        // renorm of ghost batches: the groups and the limits, never fused
        let both = Config::keras(2).variant(Variant::GhostRenorm {
            ghost: Ghost::strided(2),
            renorm: rn,
        });
        let p = plan(&both, &[4, 2], Layout::NC, Mode::Train).unwrap();
        assert_eq!((p.groups, p.renorm), (2, Some(rn.limits(5))));
        assert_eq!(p.group_of, [0, 1, 0, 1]);
        assert!(!p.fused);
        let p = plan(&both, &[4, 2], Layout::NC, Mode::Inference).unwrap();
        assert_eq!((p.groups, p.renorm), (1, None));
    }

    #[test]
    fn cold_statistics_are_reported_or_refused_before_anything_runs() {
        let g = Layout::NC.geometry(&[4, 2]).unwrap();
        let opts = Options::<f32>::default();
        for (policy, want) in [
            (ColdPolicy::Report, Ok(true)),
            (ColdPolicy::Allow, Ok(false)),
            (ColdPolicy::Error, Err(Error::ColdStatistics)),
        ] {
            let cfg = Config::torch(2).cold_statistics(policy);
            let cold = RunningState::init(&cfg);
            let p = ForwardPlan::new(
                &cfg,
                g,
                &Params::init(&cfg),
                cold.as_ref(),
                Mode::Frozen,
                &opts,
            );
            assert_eq!(p.map(|p| p.cold_statistics), want, "{policy:?}");
        }
    }

    #[test]
    fn fusion_needs_channels_first_and_work_for_every_thread() {
        let cfg = Config::torch(64);
        let seq = Options::default().parallelism(Parallelism::Sequential);
        let cf = plan_with(&cfg, &[8, 64, 32, 32], Layout::NCHW, Mode::Train, &seq).unwrap();
        assert!(cf.fused);
        let cl = plan_with(&cfg, &[8, 32, 32, 64], Layout::NHWC, Mode::Train, &seq).unwrap();
        assert!(!cl.fused, "channels-last is never fused");
        let strict = Config::torch(64).non_finite(NonFinitePolicy::Error);
        let p = plan_with(&strict, &[8, 64, 32, 32], Layout::NCHW, Mode::Train, &seq).unwrap();
        assert!(
            p.refuse_non_finite && !p.fused,
            "a step that may refuse writes y last"
        );
        // one channel cannot be split over two tasks
        let one = Config::torch(1);
        let p = plan_with(&one, &[8, 1, 32, 32], Layout::NCHW, Mode::Train, &seq).unwrap();
        assert!(!p.fused);
    }

    #[test]
    fn a_synchronized_plan_waits_for_the_global_count_and_refuses_ghosts() {
        let comms = ThreadComm::group(1);
        let opts = Options::<f32>::default().synchronized(&comms[0]);
        let cfg = Config::torch(2);
        // one value per channel here may be many over the ranks
        let p = plan_with(&cfg, &[1, 2], Layout::NC, Mode::Train, &opts).unwrap();
        assert!(p.synchronized && !p.fused);
        assert_eq!(
            plan(&cfg, &[1, 2], Layout::NC, Mode::Train),
            Err(Error::BatchTooSmall { channel_values: 1 })
        );
        let ghost = Config::keras(2).variant(Variant::Ghost(Ghost::strided(2)));
        let both = Config::keras(2).variant(Variant::GhostRenorm {
            ghost: Ghost::strided(2),
            renorm: Renorm::default(),
        });
        for cfg in [ghost, both] {
            assert!(matches!(
                plan_with(&cfg, &[4, 2], Layout::NC, Mode::Train, &opts),
                Err(Error::InvalidConfig {
                    setting: "variant",
                    ..
                })
            ));
        }
    }

    #[test]
    fn a_backward_plan_checks_the_saved_statistics() {
        let cfg = Config::torch(2);
        let g = Layout::NC.geometry(&[4, 2]).unwrap();
        let opts = BackwardOptions::<f32>::default();
        let none = Saved::default();
        assert!(matches!(
            BackwardPlan::new(&cfg, g, &Params::init(&cfg), &none, &opts),
            Err(Error::SavedMismatch { .. })
        ));
    }
}
