//! The training loop: AdamW (burn's) on a [`CausalLm`] held on an autodiff device, a
//! warmup-and-decay schedule, gradient accumulation over micro-batches up to a token budget
//! per optimizer step, and clipping by the global gradient norm (as PyTorch's
//! `clip_grad_norm_`; burn's own clipping works per parameter).

use std::path::Path;
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use model::transformer::Rope;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Counters, load_tensors, save_tensors};
use crate::lm::CausalLm;
use crate::{DistillError, Result};

/// Files of a saved training state.
const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.bpk";
const COUNTERS: &str = "counters.json";

fn invalid(path: &Path, e: impl std::fmt::Display) -> DistillError {
    DistillError::Invalid(format!("{}: {e}", path.display()))
}
use crate::loss::{LossSpec, TeacherOut};

/// Optimizer settings (AdamW, decoupled weight decay).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWOptions {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator floor.
    pub eps: f64,
    /// Decoupled weight decay (applied to every trained tensor).
    pub weight_decay: f64,
}

impl Default for AdamWOptions {
    /// PyTorch's AdamW betas and eps; no weight decay, as transformers' `Trainer`.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One optimizer step's record, for the progress bar and the JSONL log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    /// Optimizer steps done (1-based).
    pub step: usize,
    /// Tokens trained on so far (predicted positions).
    pub tokens: u64,
    /// Learning rate of this step.
    pub lr: f64,
    /// The minimized loss per token (weighted parts).
    pub loss: f64,
    /// Mean divergence per token, when distilling.
    pub kd: Option<f64>,
    /// Mean cross-entropy on the data per token.
    pub ce: f64,
    /// Mean hidden-state squared error per token (summed over the mapped layers, averaged
    /// over the hidden dimension), when that loss is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Seconds this step took.
    pub secs: f64,
}

/// What a training step asks of the teacher: its outputs for a micro-batch, given the
/// windows without their last token (`None` when the loss needs no teacher).
pub type TeacherFn<'a> = dyn FnMut(&MicroBatch, &[Vec<u32>]) -> Option<TeacherOut> + 'a;

/// Windows that go through one forward/backward pass together.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// Equally long windows: the model reads all but the last token of each and predicts
    /// all but the first.
    pub windows: Vec<Vec<u32>>,
    /// Optional 0/1 weight of every predicted position (window-major): 0 leaves a position
    /// out of the loss (a prompt's tokens in black-box distillation).
    pub mask: Option<Vec<f32>>,
    /// Where each window sits in the training data (a teacher cache's row order); empty
    /// when not from indexed data.
    pub index: Vec<usize>,
}

impl MicroBatch {
    /// Plain windows, every position counted.
    pub fn plain(windows: Vec<Vec<u32>>) -> Self {
        Self {
            windows,
            mask: None,
            index: Vec::new(),
        }
    }

    /// Windows `index` of the training data, every position counted.
    pub fn indexed(windows: Vec<Vec<u32>>, index: Vec<usize>) -> Self {
        Self {
            windows,
            mask: None,
            index,
        }
    }

    /// The positions that count.
    pub fn counted(&self) -> f64 {
        match &self.mask {
            Some(m) => m.iter().map(|&w| w as f64).sum(),
            None => self
                .windows
                .iter()
                .map(|w| w.len().saturating_sub(1) as f64)
                .sum(),
        }
    }
}

/// A student under training with its optimizer state.
pub struct Trainer {
    student: Option<CausalLm>,
    optim: ModuleOptimizer,
    rope: Rope,
    loss: LossSpec,
    clip: Option<f64>,
    device: Device,
    steps: usize,
    tokens: u64,
    hidden: Option<HiddenLoss>,
}

/// A hidden-state loss: squared error between the outputs of mapped blocks (student
/// block, teacher block), through the student's learned projections when it has them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiddenLoss {
    /// Weight of the term (per token, summed over the map, mean over the hidden dimension).
    pub weight: f64,
    /// (student block, teacher block) pairs, 0-based.
    pub map: Vec<(usize, usize)>,
}

/// The hidden-state loss of `n` rows: the sum over rows (times `weights`) of the mean squared
/// error per row, summed over the mapped blocks, student outputs through `student`'s
/// projections when it has them; `[1]`.
pub fn hidden_mse(
    student: &CausalLm,
    s_hidden: Vec<Tensor<2>>,
    t_hidden: Vec<Tensor<2>>,
    weights: Option<Tensor<1>>,
    n: usize,
) -> Tensor<1> {
    assert_eq!(
        s_hidden.len(),
        t_hidden.len(),
        "one teacher hidden state per mapped block"
    );
    let mut total: Option<Tensor<1>> = None;
    for (j, (s, t)) in s_hidden.into_iter().zip(t_hidden).enumerate() {
        let s = match student.hidden_proj.get(j) {
            Some(p) => p.forward(s),
            None => s,
        };
        let d = s.dims()[1];
        let mut rows = (s - t.autodiff().detach())
            .powi_scalar(2)
            .sum_dim(1)
            .reshape([n])
            .div_scalar(d as f64);
        if let Some(w) = &weights {
            rows = rows * w.clone();
        }
        let sum = rows.sum();
        total = Some(match total {
            Some(t) => t + sum,
            None => sum,
        });
    }
    total.expect("a hidden-state loss maps at least one block")
}

impl Trainer {
    /// Starts training `student` (already on an autodiff `device`) on windows of `seq_len`
    /// predicted tokens.
    pub fn new(
        student: CausalLm,
        cfg: &model::Config,
        seq_len: usize,
        adamw: AdamWOptions,
        loss: LossSpec,
        clip: Option<f64>,
        device: &Device,
    ) -> Self {
        let optim = ModuleOptimizer::from(crate::adamw::FusedAdamW::new(crate::adamw::Hyper {
            beta1: adamw.beta1 as f32,
            beta2: adamw.beta2 as f32,
            eps: adamw.eps as f32,
            weight_decay: adamw.weight_decay as f32,
        }));
        Self {
            // Path-derived ids: a saved optimizer record finds its parameters after a restart.
            student: Some(student.with_stable_ids()),
            optim,
            rope: Rope::new(cfg, seq_len, device),
            loss,
            clip,
            device: device.clone(),
            steps: 0,
            tokens: 0,
            hidden: None,
        }
    }

    /// The model being trained.
    pub fn student(&self) -> &CausalLm {
        self.student
            .as_ref()
            .expect("student present between steps")
    }

    /// Gives the trained model back.
    pub fn into_student(mut self) -> CausalLm {
        self.student.take().expect("student present between steps")
    }

    /// Optimizer steps done.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Adds a hidden-state loss (the teacher closure then returns the mapped teacher blocks'
    /// outputs, in map order).
    pub fn with_hidden(mut self, loss: HiddenLoss) -> Self {
        self.hidden = Some(loss);
        self
    }

    /// Tokens trained on so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Writes what [`Trainer::restore`] needs into the folder `dir` (created): the trainable
    /// tensors, the AdamW record and the step counters.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| invalid(dir, e))?;
        save_tensors(&dir.join(TRAINABLE), &self.student().trainable())?;
        let opt = dir.join(OPTIMIZER);
        self.optim.save(&opt).map_err(|e| invalid(&opt, e))?;
        let c = Counters {
            steps: self.steps,
            tokens: self.tokens,
        };
        let json = serde_json::to_string(&c).expect("counters serialize");
        std::fs::write(dir.join(COUNTERS), json).map_err(|e| invalid(dir, e))
    }

    /// Continues from a folder written by [`Trainer::save`] for the same model and options.
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        let t = dir.join(TRAINABLE);
        let tensors = load_tensors(&t)?;
        let student = self.student.take().expect("student present between steps");
        self.student = Some(student.with_trainable(tensors, &t)?);
        let opt = dir.join(OPTIMIZER);
        self.optim = self
            .optim
            .clone()
            .load(&opt)
            .map_err(|e| invalid(&opt, e))?;
        let cp = dir.join(COUNTERS);
        let text = std::fs::read_to_string(&cp).map_err(|e| invalid(&cp, e))?;
        let c: Counters = serde_json::from_str(&text).map_err(|e| invalid(&cp, e))?;
        self.steps = c.steps;
        self.tokens = c.tokens;
        Ok(())
    }

    /// Runs one optimizer step over `micro_batches`; `teacher` gives the teacher's logits
    /// `[rows, vocab]` of a micro-batch's inputs (every window but its last token) when the
    /// loss has a KD term. Every counted position weighs the same, however the step is split.
    /// A loss or gradient norm that is NaN or infinite is an error
    /// ([`DistillError::NonFinite`]), and the model, optimizer and counters stay as they were.
    pub fn step(
        &mut self,
        micro_batches: &[MicroBatch],
        lr: f64,
        teacher: &mut TeacherFn<'_>,
    ) -> Result<StepLog> {
        let start = Instant::now();
        let student = self.student.take().expect("student present between steps");
        let rows: f64 = micro_batches.iter().map(MicroBatch::counted).sum();
        let scale = 1.0 / rows.max(1.0);
        let mut acc = GradientsAccumulator::<CausalLm>::new();
        let (mut loss, mut kd, mut ce) = (0.0, 0.0, 0.0);
        let mut has_kd = false;
        let mut hidden_sum = 0.0;
        let taps: Vec<usize> = self
            .hidden
            .as_ref()
            .map_or(Vec::new(), |h| h.map.iter().map(|m| m.0).collect());
        for mb in micro_batches {
            let inputs: Vec<Vec<u32>> = mb
                .windows
                .iter()
                .map(|w| w[..w.len() - 1].to_vec())
                .collect();
            let targets: Vec<i64> = mb
                .windows
                .iter()
                .flat_map(|w| w[1..].iter().map(|&t| t as i64))
                .collect();
            let n = targets.len();
            let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &self.device);
            let weights = mb.mask.as_ref().map(|m| {
                assert_eq!(m.len(), n, "one mask weight per predicted position");
                Tensor::<1>::from_data(TensorData::new(m.clone(), [n]), &self.device)
            });
            let out = self
                .loss
                .divergence
                .is_some()
                .then(|| teacher(mb, &inputs))
                .flatten();
            let (t_target, t_hidden) = match out {
                Some(o) => (Some(o.target.autodiff()), o.hidden),
                None => (None, Vec::new()),
            };
            let (logits, s_hidden) = student.logits_and_hidden(&inputs, &self.rope, &taps);
            let mut parts = self
                .loss
                .compute(logits, t_target, targets, weights.clone(), scale);
            if let Some(h) = &self.hidden {
                let mse = hidden_mse(&student, s_hidden, t_hidden, weights, n);
                hidden_sum += mse.clone().into_scalar::<f64>() * scale;
                parts.total = parts.total + mse.mul_scalar(h.weight * scale);
            }
            loss += parts.total.clone().into_scalar::<f64>();
            ce += parts.ce * parts.rows * scale;
            if let Some(k) = parts.kd {
                has_kd = true;
                kd += k * parts.rows * scale;
            }
            let grads = parts.total.backward();
            acc.accumulate(&student, GradientsParams::from_grads(grads, &student));
        }
        let mut grads = acc.grads();
        let norm = global_norm(&student, &grads);
        let bad = [(loss, "loss"), (norm, "gradient norm")]
            .into_iter()
            .find(|(v, _)| !v.is_finite());
        if let Some((_, what)) = bad {
            self.student = Some(student);
            return Err(DistillError::NonFinite {
                step: self.steps + 1,
                what,
            });
        }
        if let Some(max) = self.clip
            && norm > max
        {
            scale_grads(&student, &mut grads, max / (norm + 1e-6));
        }
        self.student = Some(self.optim.step(lr, student, grads));
        self.steps += 1;
        self.tokens += rows.round() as u64;
        Ok(StepLog {
            step: self.steps,
            tokens: self.tokens,
            lr,
            loss,
            kd: has_kd.then_some(kd),
            ce,
            hidden: self.hidden.is_some().then_some(hidden_sum),
            grad_norm: norm,
            secs: start.elapsed().as_secs_f64(),
        })
    }
}

/// The L2 norm of all gradients together.
pub fn global_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    struct SumSq<'a> {
        grads: &'a GradientsParams,
        sum: f64,
    }
    impl ModuleVisitor for SumSq<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(p.id) {
                self.sum += g.powi_scalar(2).sum().into_scalar::<f64>();
            }
        }
    }
    let mut v = SumSq { grads, sum: 0.0 };
    module.visit(&mut v);
    v.sum.sqrt()
}

/// Multiplies every gradient by `factor`.
fn scale_grads<M: Module>(module: &M, grads: &mut GradientsParams, factor: f64) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(p.id) {
                self.grads.register::<D>(p.id, g.mul_scalar(self.factor));
            }
        }
    }
    module.visit(&mut Scale { grads, factor });
}
