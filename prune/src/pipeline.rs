//! Unstructured and N:M pruning on the one block driver ([`quant::pipeline::drive`]): each
//! block is run stage by stage over the calibration windows (q/k/v, o, gate/up, down, as GPTQ
//! runs), every linear is pruned by the method against the inputs the already-pruned layers
//! produce, and the pruned block's outputs feed the next block.

use std::time::Instant;

use model::transformer::Tap;
use model::{Checkpoint, Device};
use quant::QuantError;
use quant::block::{TapStats, output_error, weight_error};
use quant::method::Outputs;
use quant::pipeline::{BlockCtx, BlockStage, DriveOptions, OutputSink, drive};
use quant::staged::StagedRun;
use serde::Serialize;

use crate::mask::sparsity_of;
use crate::method::{LinearJob, PruneMethod};
use crate::{Pattern, PruneError};

/// Options of a run.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// The pattern (the target of every block without OWL).
    pub pattern: Pattern,
    /// Calibration windows (empty for data-free methods).
    pub calib: Vec<Vec<u32>>,
    /// Unstructured sparsity of each block (OWL); `None` for the pattern's everywhere.
    pub block_sparsity: Option<Vec<f64>>,
    /// Input rows kept per linear for the error report.
    pub sample_rows: usize,
    /// Each group of linears sees inputs from the groups pruned before it in its block
    /// (true-sequential); `false`: every group's statistics come from the unpruned block.
    pub true_sequential: bool,
    /// Conjugate-gradient steps refitting each linear's kept weights to its calibration
    /// inputs once its mask is chosen ([`crate::refit`]); 0 leaves the method's weights.
    pub refit: usize,
}

/// What pruning did to one linear layer.
#[derive(Debug, Clone, Serialize)]
pub struct LinearReport {
    /// HF name.
    pub name: String,
    /// Fraction of exact zeros written.
    pub sparsity: f64,
    /// ‖W − P‖ / ‖W‖.
    pub weight_rel_error: f64,
    /// ‖X Wᵀ − X Pᵀ‖ / ‖X Wᵀ‖ on sampled calibration inputs (absent without calibration).
    pub output_rel_error: Option<f64>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    /// Method name.
    pub method: String,
    /// Pattern.
    pub pattern: Pattern,
    /// Sparsity of each block (differs from the pattern's with OWL).
    pub block_sparsity: Vec<f64>,
    /// Calibration windows.
    pub calib_samples: usize,
    /// Refit steps per linear (0: none).
    pub refit: usize,
    /// Per-linear results.
    pub linears: Vec<LinearReport>,
    /// Weights in the decoder's linear layers.
    pub linear_params: u64,
    /// Of which exact zeros.
    pub linear_zeros: u64,
    /// Seconds.
    pub wall_seconds: f64,
}

/// The linear layers of a block by the tap that feeds them, in true-sequential order.
const STAGES: [(Tap, &[&str]); 4] = [
    (
        Tap::QkvInput,
        &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ),
    (Tap::OInput, &["self_attn.o_proj"]),
    (Tap::GateUpInput, &["mlp.gate_proj", "mlp.up_proj"]),
    (Tap::DownInput, &["mlp.down_proj"]),
];

struct PruneStage<'a> {
    method: &'a dyn PruneMethod,
    opts: &'a PruneOptions,
    sinks: &'a mut Vec<Box<dyn OutputSink>>,
    device: Device,
    layer: usize,
    reports: Vec<LinearReport>,
    params: u64,
    zeros: u64,
}

impl PruneStage<'_> {
    fn pattern(&self) -> Pattern {
        match (&self.opts.block_sparsity, self.opts.pattern) {
            (Some(s), Pattern::Unstructured { .. }) => Pattern::Unstructured {
                sparsity: s[self.layer],
            },
            (_, p) => p,
        }
    }

    fn prune_block(&mut self, ctx: &mut BlockCtx<'_>) -> Result<Outputs, PruneError> {
        let calibrated = !ctx.inputs.is_empty();
        let mut staged = calibrated.then(|| StagedRun::new(ctx.inputs.clone()));
        let pattern = self.pattern();
        let refit = if calibrated { self.opts.refit } else { 0 };
        // SparseGPT's Hessian counts every position once.
        let xtx = (self.method.needs_hessian() || refit > 0).then_some(1.0);
        // One pass: every stage's statistics from the unpruned block (llm-compressor's order).
        let mut early: Vec<Option<TapStats>> = Vec::new();
        if !self.opts.true_sequential
            && let Some(s) = staged.as_mut()
        {
            let block = ctx.weights.build(ctx.cfg, ctx.device);
            for (tap, _) in STAGES {
                early.push(Some(s.advance(
                    &block,
                    ctx.rope,
                    tap,
                    xtx,
                    self.opts.sample_rows,
                )));
            }
        }
        for (si, (tap, names)) in STAGES.into_iter().enumerate() {
            let mut stats = match early.get_mut(si) {
                Some(e) => e.take(),
                None => staged.as_mut().map(|s| {
                    let block = ctx.weights.build(ctx.cfg, ctx.device);
                    s.advance(&block, ctx.rope, tap, xtx, self.opts.sample_rows)
                }),
            };
            let width = stats.as_ref().map_or(0, |s| s.width);
            let raw = stats.as_mut().and_then(|s| s.xtx.take());
            // The refit needs H itself; `prepare` consumes its copy.
            let (raw, for_prep) = match (raw, self.method.needs_hessian()) {
                (Some(h), true) if refit > 0 => (Some(h.clone()), Some(h)),
                (Some(h), true) => (None, Some(h)),
                (h, _) => (h, None),
            };
            let prep = match for_prep {
                Some(h) => Some(quant::hessian::prepare(
                    h,
                    width,
                    &format!("model.layers.{}.{}.weight", self.layer, names[0]),
                    self.method.damp(),
                    false,
                )?),
                None => None,
            };
            for name in names {
                let full = format!("model.layers.{}.{name}.weight", self.layer);
                let t = ctx.weights.get_mut(&format!("{name}.weight"));
                let (rows, cols) = (t.shape[0], t.shape[1]);
                pattern.check_width(&full, cols)?;
                let before = t.data.clone();
                self.method.prune_linear(LinearJob {
                    name: &full,
                    weight: &mut t.data,
                    rows,
                    cols,
                    stats: stats.as_ref(),
                    hessian: prep.as_ref(),
                    pattern,
                })?;
                if let Some(h) = &raw {
                    crate::refit::refit(
                        &full,
                        &before,
                        &mut t.data,
                        (rows, cols),
                        h,
                        self.method.damp(),
                        refit,
                    )?;
                }
                self.report(full, &before, &t.data, rows, stats.as_ref());
            }
        }
        Ok(match staged {
            Some(s) => {
                let block = ctx.weights.build(ctx.cfg, ctx.device);
                if early.is_empty() {
                    Outputs::Quantized(s.finish(&block, ctx.rope))
                } else {
                    // One pass never advanced `s` past the pruned layers: a plain forward.
                    Outputs::Quantized(
                        ctx.inputs
                            .iter()
                            .map(|x| block.forward(x.clone(), ctx.rope))
                            .collect(),
                    )
                }
            }
            None => Outputs::None,
        })
    }
}

impl PruneStage<'_> {
    fn report(&mut self, name: String, w: &[f32], p: &[f32], rows: usize, st: Option<&TapStats>) {
        let out_err = st.map(|st| output_error(st, w, p, rows, &self.device));
        let zeros = p.iter().filter(|&&x| x == 0.0).count();
        self.params += p.len() as u64;
        self.zeros += zeros as u64;
        self.reports.push(LinearReport {
            name,
            sparsity: sparsity_of(p),
            weight_rel_error: weight_error(w, p),
            output_rel_error: out_err.filter(|e| e.is_finite()),
        });
    }
}

fn to_quant(e: PruneError) -> QuantError {
    match e {
        PruneError::Quant(q) => q,
        PruneError::Model(m) => QuantError::Model(m),
        PruneError::Input(s) => QuantError::Input(s),
        PruneError::Numerical(s) => QuantError::Numerical(s),
    }
}

impl BlockStage for PruneStage<'_> {
    fn process(&mut self, ctx: &mut BlockCtx<'_>) -> Result<Outputs, QuantError> {
        self.layer = ctx.weights.layer;
        self.prune_block(ctx).map_err(to_quant)
    }

    fn emit(
        &mut self,
        name: &str,
        data: &[f32],
        shape: &[usize],
        _linear: Option<&str>,
    ) -> Result<(), QuantError> {
        for s in self.sinks.iter_mut() {
            s.plain(name, data, shape)?;
        }
        Ok(())
    }
}

/// Prunes every decoder block of `ckpt` with `method`, sending tensors to `sinks`.
pub fn prune(
    ckpt: &Checkpoint,
    method: &dyn PruneMethod,
    opts: &PruneOptions,
    device: Device,
    sinks: &mut Vec<Box<dyn OutputSink>>,
    progress: impl FnMut(usize, usize),
) -> Result<PruneReport, PruneError> {
    let start = Instant::now();
    if method.needs_calibration() && opts.calib.is_empty() {
        return Err(PruneError::Input(format!(
            "method `{}` needs calibration data (--calib FILE)",
            method.name()
        )));
    }
    let layers = ckpt.config().num_hidden_layers;
    if let Some(s) = &opts.block_sparsity
        && s.len() != layers
    {
        return Err(PruneError::Input(format!(
            "{} block sparsities for {layers} blocks",
            s.len()
        )));
    }
    let mut stage = PruneStage {
        method,
        opts,
        sinks,
        device: device.clone(),
        layer: 0,
        reports: Vec::new(),
        params: 0,
        zeros: 0,
    };
    let drive_opts = DriveOptions {
        propagate: true,
        stage_returns_teacher: false,
    };
    drive(ckpt, &opts.calib, drive_opts, device, &mut stage, progress)?;
    let block_sparsity = (0..layers)
        .map(|l| {
            stage.layer = l;
            stage.pattern().sparsity()
        })
        .collect();
    Ok(PruneReport {
        method: method.name().into(),
        pattern: opts.pattern,
        block_sparsity,
        calib_samples: opts.calib.len(),
        refit: opts.refit,
        linear_params: stage.params,
        linear_zeros: stage.zeros,
        linears: stage.reports,
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}
