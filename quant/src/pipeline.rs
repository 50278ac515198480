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
use crate::scheme::{QuantScheme, QuantizedLinear};

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
    /// Completes the output.
    fn finish(self: Box<Self>) -> Result<(), QuantError>;
}

/// Writes dequantized weights as one bf16 safetensors file (the `dense` format).
pub struct DenseSink(StreamingWriter);

impl DenseSink {
    /// A sink writing `path` for a model of this config.
    pub fn create(path: &Path, cfg: &model::Config) -> Result<Self, QuantError> {
        let plan = model::checkpoint::expected_tensors(cfg)
            .into_iter()
            .map(|(n, s)| (n, s, StoreDtype::BF16))
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

/// Quantizes every decoder block of `ckpt` with `method`, sending tensors to `sinks`.
pub fn quantize(
    ckpt: &Checkpoint,
    method: &dyn QuantMethod,
    opts: &PtqOptions,
    device: Device,
    sinks: &mut Vec<Box<dyn OutputSink>>,
    mut progress: impl FnMut(usize, usize),
) -> Result<PtqReport, QuantError> {
    let start = Instant::now();
    let cfg = ckpt.config().clone();
    if method.needs_calibration() && opts.calib.is_empty() {
        return Err(QuantError::Input(format!(
            "method `{}` needs calibration data (--calib FILE)",
            method.name()
        )));
    }
    let propagate = opts
        .propagate_quantized
        .unwrap_or_else(|| method.propagate_quantized());
    let max_len = opts.calib.iter().map(|w| w.len()).max().unwrap_or(1);
    let engine = LayerEngine::new(ckpt, device.clone(), max_len);
    let mut states = if opts.calib.is_empty() {
        Vec::new()
    } else {
        engine.embed(&opts.calib)?
    };

    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let embed = ckpt.read("model.embed_tokens.weight", &[v, h])?;
    for s in sinks.iter_mut() {
        s.plain("model.embed_tokens.weight", &embed, &[v, h])?;
    }
    drop(embed);

    let mut reports = Vec::new();
    let (mut qparams, mut qbits) = (0u64, 0f64);
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
        // A copy of the teacher block (a whole block of f32 weights) only when the method
        // does not hand back the teacher's outputs itself.
        let teacher = (!propagate && !states.is_empty() && !method.returns_teacher_outputs())
            .then(|| weights.clone());
        let mut job = BlockJob {
            cfg: &cfg,
            weights: &mut weights,
            inputs: &states,
            rope: engine.rope(),
            device: &device,
            scheme: opts.scheme,
            sample_rows: opts.sample_rows,
        };
        let res = method.quantize_block(&mut job)?;
        // Write the block in checkpoint order.
        for (name, shape) in model::checkpoint::block_tensors(&cfg, l) {
            let suffix = &name[format!("model.layers.{l}.").len()..];
            let lin = suffix
                .strip_suffix(".weight")
                .filter(|b| LINEARS.iter().any(|(n, _)| n == b));
            let data = &weights.get(suffix).data;
            if data.iter().any(|x| !x.is_finite()) {
                return Err(QuantError::Numerical(format!(
                    "`{name}` became non-finite during quantization"
                )));
            }
            for s in sinks.iter_mut() {
                match lin {
                    Some(base) => s.linear(&name, &res.linears[base], data)?,
                    None => s.plain(&name, data, &shape)?,
                }
            }
            if let Some(base) = lin {
                let q = &res.linears[base];
                let reference = &res.reference[base];
                let out_err = res
                    .stats
                    .get(base)
                    .map(|st| output_error(st, reference, data, q.rows, &device));
                reports.push(LinearReport {
                    name: name.clone(),
                    weight_rel_error: weight_error(reference, data),
                    output_rel_error: out_err.filter(|e| e.is_finite()),
                });
                let n = (q.rows * q.cols) as u64;
                qparams += n;
                qbits += n as f64 * opts.scheme.bits_per_weight(q.cols);
            }
        }
        if !states.is_empty() {
            states = match (propagate, res.outputs) {
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
    for s in sinks.iter_mut() {
        s.plain("model.norm.weight", &norm, &[h])?;
    }
    if !cfg.tie_word_embeddings {
        let head = ckpt.read("lm_head.weight", &[v, h])?;
        for s in sinks.iter_mut() {
            s.plain("lm_head.weight", &head, &[v, h])?;
        }
    }
    Ok(PtqReport {
        method: method.name().into(),
        scheme: opts.scheme,
        propagate_quantized: propagate,
        calib_samples: opts.calib.len(),
        calib_len: max_len,
        linears: reports,
        quantized_params: qparams,
        linear_bits_per_weight: if qparams > 0 {
            qbits / qparams as f64
        } else {
            0.0
        },
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}
