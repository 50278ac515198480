//! The post-training quantization pipeline on the layer-by-layer engine: calibration windows
//! are embedded once, then each block is read, quantized by the method against its inputs,
//! written out, and run to produce the next block's inputs (from the quantized block or the
//! teacher, per method or option). One block in memory at a time.

use std::path::Path;
use std::time::Instant;

use model::engine::LayerEngine;
use model::safetensors_io::{StoreDtype, StreamingWriter};
use model::{Checkpoint, Device, Tensor};
use serde::Serialize;

use crate::QuantError;
use crate::block::{BlockWeights, LINEARS, output_error, weight_error};
use crate::method::{BlockJob, Outputs, QuantMethod};
use crate::nf4::BnbLinear;
use crate::scheme::{QuantScheme, QuantizedLinear};

/// Checks that a compressed form (`stored`, its dequantized values) stands for exactly what
/// the dense output holds (`dense`), bit for bit; `form` names it in the error.
pub(crate) fn check_reproduces(
    name: &str,
    form: &str,
    stored: &[f32],
    dense: &[f32],
) -> Result<(), QuantError> {
    if stored.len() != dense.len()
        || stored
            .iter()
            .zip(dense)
            .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(QuantError::Numerical(format!(
            "`{name}`: the {form} form does not reproduce the dequantized weights"
        )));
    }
    Ok(())
}

/// Where quantized tensors go, in checkpoint order (embedding, blocks, norm, lm_head).
pub trait OutputSink {
    /// A tensor kept as is (embeddings, norms, biases, lm_head).
    fn plain(&mut self, name: &str, data: &[f32], shape: &[usize]) -> Result<(), QuantError>;
    /// A quantized linear weight with its dequantized values.
    fn linear(
        &mut self,
        name: &str,
        q: &QuantizedLinear,
        dequantized: &[f32],
    ) -> Result<(), QuantError>;
    /// A linear weight in a bitsandbytes scheme (NF4, FP4, int8-absmax) with its dequantized
    /// values; formats that cannot hold one refuse it.
    fn bnb_linear(
        &mut self,
        name: &str,
        q: &BnbLinear,
        _dequantized: &[f32],
    ) -> Result<(), QuantError> {
        Err(QuantError::Input(format!(
            "`{name}`: this output format cannot hold {} weights",
            q.scheme.ty.name()
        )))
    }
    /// Completes the output.
    fn finish(self: Box<Self>) -> Result<(), QuantError>;
}

/// Writes (dequantized) weights as one safetensors file of one float dtype (the `dense` format).
pub struct DenseSink(StreamingWriter);

impl DenseSink {
    /// A sink writing `path` for a model of this config, every tensor stored as `dtype`.
    pub fn create(path: &Path, cfg: &model::Config, dtype: StoreDtype) -> Result<Self, QuantError> {
        let plan = model::checkpoint::expected_tensors(cfg)
            .into_iter()
            .map(|(n, s)| (n, s, dtype))
            .collect();
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        Ok(Self(StreamingWriter::create(path, plan, &meta)?))
    }
}

impl OutputSink for DenseSink {
    fn plain(&mut self, name: &str, data: &[f32], _: &[usize]) -> Result<(), QuantError> {
        Ok(self.0.write_next(name, data)?)
    }
    fn linear(&mut self, name: &str, _: &QuantizedLinear, deq: &[f32]) -> Result<(), QuantError> {
        Ok(self.0.write_next(name, deq)?)
    }
    fn bnb_linear(&mut self, name: &str, _: &BnbLinear, deq: &[f32]) -> Result<(), QuantError> {
        Ok(self.0.write_next(name, deq)?)
    }
    fn finish(self: Box<Self>) -> Result<(), QuantError> {
        Ok(self.0.finish()?)
    }
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct PtqOptions {
    /// The scheme.
    pub scheme: QuantScheme,
    /// Calibration windows (empty for methods without calibration).
    pub calib: Vec<Vec<u32>>,
    /// Inputs of block i from the quantized blocks before it (`Some(true)`), from the
    /// teacher (`Some(false)`), or the method's default (`None`).
    pub propagate_quantized: Option<bool>,
    /// Input rows kept per linear for search objectives and error reports.
    pub sample_rows: usize,
}

/// Quantization error of one linear layer.
#[derive(Debug, Clone, Serialize)]
pub struct LinearReport {
    /// HF name.
    pub name: String,
    /// ‖W − Q‖ / ‖W‖ (W after any function-preserving rescaling).
    pub weight_rel_error: f64,
    /// ‖X Wᵀ − X Qᵀ‖ / ‖X Wᵀ‖ on sampled calibration inputs (absent without calibration).
    pub output_rel_error: Option<f64>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct PtqReport {
    /// Method name.
    pub method: String,
    /// Scheme.
    pub scheme: QuantScheme,
    /// Whether block inputs came from the quantized blocks.
    pub propagate_quantized: bool,
    /// Calibration windows x tokens.
    pub calib_samples: usize,
    /// Tokens per calibration window.
    pub calib_len: usize,
    /// Per-linear errors.
    pub linears: Vec<LinearReport>,
    /// Parameters in quantized linears.
    pub quantized_params: u64,
    /// Effective bits per weight of the quantized linears (codes, scales, zero points).
    pub linear_bits_per_weight: f64,
    /// Seconds.
    pub wall_seconds: f64,
}

fn check_finite(t: &Tensor<3>, what: &str) -> Result<(), QuantError> {
    let m = t
        .clone()
        .abs()
        .max()
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32")[0];
    if !m.is_finite() {
        return Err(QuantError::Numerical(format!("{what} contain NaN or Inf")));
    }
    Ok(())
}

/// One decoder block as a stage sees it.
pub struct BlockCtx<'a> {
    /// Model configuration.
    pub cfg: &'a model::Config,
    /// The block's tensors; the stage transforms them in place.
    pub weights: &'a mut BlockWeights,
    /// Calibration inputs of the block (empty without calibration).
    pub inputs: &'a model::engine::States,
    /// RoPE tables.
    pub rope: &'a model::transformer::Rope,
    /// Compute device.
    pub device: &'a Device,
    /// Index of the block in the model.
    pub layer: usize,
}

/// A stage that transforms decoder blocks one at a time (quantization, pruning): the one
/// block driver, [`drive`], runs every such stage.
pub trait BlockStage {
    /// Transforms one block's weights in place; returns block outputs computed on the way.
    fn process(&mut self, ctx: &mut BlockCtx<'_>) -> Result<Outputs, QuantError>;
    /// Receives every tensor of the output in checkpoint order, once its block is final;
    /// `linear` is the HF suffix (`self_attn.q_proj`) when it is a block's linear weight.
    fn emit(
        &mut self,
        name: &str,
        data: &[f32],
        shape: &[usize],
        linear: Option<&str>,
    ) -> Result<(), QuantError>;
}

/// How [`drive`] runs the blocks.
#[derive(Debug, Clone, Copy)]
pub struct DriveOptions {
    /// Block i's calibration inputs come from the transformed blocks before it (`true`) or
    /// from the teacher (`false`).
    pub propagate: bool,
    /// The stage returns the teacher block's outputs itself ([`Outputs::Teacher`]) when not
    /// propagating, so no copy of the teacher block is needed.
    pub stage_returns_teacher: bool,
}

/// The block driver: embeds the calibration windows once, then for each decoder block reads
/// its weights, lets `stage` transform them against the block's inputs, emits the block's
/// tensors and computes the next block's inputs. One block in memory at a time.
pub fn drive(
    ckpt: &Checkpoint,
    calib: &[Vec<u32>],
    opts: DriveOptions,
    device: Device,
    stage: &mut dyn BlockStage,
    mut progress: impl FnMut(usize, usize),
) -> Result<(), QuantError> {
    let cfg = ckpt.config().clone();
    let max_len = calib.iter().map(|w| w.len()).max().unwrap_or(1);
    let engine = LayerEngine::new(ckpt, device.clone(), max_len);
    let mut states = if calib.is_empty() {
        Vec::new()
    } else {
        engine.embed(calib)?
    };
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let embed = ckpt.read("model.embed_tokens.weight", &[v, h])?;
    stage.emit("model.embed_tokens.weight", &embed, &[v, h], None)?;
    drop(embed);

    let layers = cfg.num_hidden_layers;
    progress(0, layers);
    for l in 0..layers {
        for (i, s) in states.iter().enumerate() {
            check_finite(
                s,
                &format!("calibration activations entering block {l} (window {i})"),
            )?;
        }
        let mut weights = BlockWeights::read(ckpt, l)?;
        // A copy of the teacher block (a whole block of f32 weights) only when the stage
        // does not hand back the teacher's outputs itself.
        let teacher = (!opts.propagate && !states.is_empty() && !opts.stage_returns_teacher)
            .then(|| weights.clone());
        let mut ctx = BlockCtx {
            cfg: &cfg,
            weights: &mut weights,
            inputs: &states,
            rope: engine.rope(),
            device: &device,
            layer: l,
        };
        let outputs = stage.process(&mut ctx)?;
        for (name, shape) in model::checkpoint::block_tensors(&cfg, l) {
            let suffix = &name[format!("model.layers.{l}.").len()..];
            let lin = suffix
                .strip_suffix(".weight")
                .filter(|b| LINEARS.iter().any(|(n, _)| n == b));
            let data = &weights.get(suffix).data;
            if data.iter().any(|x| !x.is_finite()) {
                return Err(QuantError::Numerical(format!(
                    "`{name}` became non-finite in block {l}"
                )));
            }
            stage.emit(&name, data, &shape, lin)?;
        }
        if !states.is_empty() {
            states = match (opts.propagate, outputs) {
                (true, Outputs::Quantized(o)) | (false, Outputs::Teacher(o)) => o,
                (true, _) => {
                    let b = weights.build(&cfg, &device);
                    states
                        .iter()
                        .map(|s| b.forward(s.clone(), engine.rope()))
                        .collect()
                }
                (false, _) => {
                    let b = teacher.as_ref().expect("teacher kept").build(&cfg, &device);
                    states
                        .iter()
                        .map(|s| b.forward(s.clone(), engine.rope()))
                        .collect()
                }
            };
        }
        progress(l + 1, layers);
    }
    let norm = ckpt.read("model.norm.weight", &[h])?;
    stage.emit("model.norm.weight", &norm, &[h], None)?;
    if !cfg.tie_word_embeddings {
        let head = ckpt.read("lm_head.weight", &[v, h])?;
        stage.emit("lm_head.weight", &head, &[v, h], None)?;
    }
    Ok(())
}

/// Quantization as a [`BlockStage`]: the method's integer forms go to the sinks, with a
/// per-linear error report.
struct PtqStage<'a> {
    method: &'a dyn QuantMethod,
    opts: &'a PtqOptions,
    sinks: &'a mut Vec<Box<dyn OutputSink>>,
    device: Device,
    block: Option<crate::method::BlockResult>,
    reports: Vec<LinearReport>,
    qparams: u64,
    qbits: f64,
}

impl BlockStage for PtqStage<'_> {
    fn process(&mut self, ctx: &mut BlockCtx<'_>) -> Result<Outputs, QuantError> {
        let mut job = BlockJob {
            cfg: ctx.cfg,
            weights: ctx.weights,
            inputs: ctx.inputs,
            rope: ctx.rope,
            device: ctx.device,
            layer: ctx.layer,
            scheme: self.opts.scheme,
            sample_rows: self.opts.sample_rows,
        };
        let mut res = self.method.quantize_block(&mut job)?;
        let outputs = std::mem::replace(&mut res.outputs, Outputs::None);
        self.block = Some(res);
        Ok(outputs)
    }

    fn emit(
        &mut self,
        name: &str,
        data: &[f32],
        shape: &[usize],
        linear: Option<&str>,
    ) -> Result<(), QuantError> {
        let Some(base) = linear else {
            for s in self.sinks.iter_mut() {
                s.plain(name, data, shape)?;
            }
            return Ok(());
        };
        let res = self.block.as_ref().expect("block processed");
        let q = &res.linears[base];
        for s in self.sinks.iter_mut() {
            s.linear(name, q, data)?;
        }
        let reference = &res.reference[base];
        let out_err = res
            .stats
            .get(base)
            .map(|st| output_error(st, reference, data, q.rows, &self.device));
        self.reports.push(LinearReport {
            name: name.to_string(),
            weight_rel_error: weight_error(reference, data),
            output_rel_error: out_err.filter(|e| e.is_finite()),
        });
        let n = (q.rows * q.cols) as u64;
        self.qparams += n;
        self.qbits += n as f64 * q.bits_per_weight(&self.opts.scheme);
        Ok(())
    }
}

/// Quantizes every decoder block of `ckpt` with `method`, sending tensors to `sinks`.
pub fn quantize(
    ckpt: &Checkpoint,
    method: &dyn QuantMethod,
    opts: &PtqOptions,
    device: Device,
    sinks: &mut Vec<Box<dyn OutputSink>>,
    progress: impl FnMut(usize, usize),
) -> Result<PtqReport, QuantError> {
    let start = Instant::now();
    if method.needs_calibration() && opts.calib.is_empty() {
        return Err(QuantError::Input(format!(
            "method `{}` needs calibration data (--calib FILE)",
            method.name()
        )));
    }
    let propagate = opts
        .propagate_quantized
        .unwrap_or_else(|| method.propagate_quantized());
    let mut stage = PtqStage {
        method,
        opts,
        sinks,
        device: device.clone(),
        block: None,
        reports: Vec::new(),
        qparams: 0,
        qbits: 0.0,
    };
    let drive_opts = DriveOptions {
        propagate,
        stage_returns_teacher: method.returns_teacher_outputs(),
    };
    drive(ckpt, &opts.calib, drive_opts, device, &mut stage, progress)?;
    let (qparams, qbits) = (stage.qparams, stage.qbits);
    Ok(PtqReport {
        method: method.name().into(),
        scheme: opts.scheme,
        propagate_quantized: propagate,
        calib_samples: opts.calib.len(),
        calib_len: opts.calib.iter().map(|w| w.len()).max().unwrap_or(1),
        linears: stage.reports,
        quantized_params: qparams,
        linear_bits_per_weight: if qparams > 0 {
            qbits / qparams as f64
        } else {
            0.0
        },
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}
