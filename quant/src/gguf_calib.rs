//! Calibration-aware GGUF export: the teacher runs block by block over calibration windows
//! on the layer engine; each linear layer's input statistics E[x_j²] become the importance
//! its GGUF blocks are rounded with (what llama.cpp's `imatrix` collects and `quantize
//! --imatrix` uses), and optionally AWQ's per-channel scales are searched first against the
//! very GGUF rounding the file will hold, then folded into the preceding norm or linear so
//! the file stays a plain GGUF.
//!
//! Inputs of every block come from the teacher (as llm-awq and llama.cpp's imatrix). Only the
//! decoder linears get importance: the embedding is a lookup, and the tied output matrix is
//! written at Q8_0/Q6_K by the presets, where llama.cpp does not use an importance either.
//! AWQ's clipping search is not applied here (the GGUF quantizers pick their own ranges).

use std::collections::HashMap;
use std::path::Path;

use model::engine::LayerEngine;
use model::transformer::Tap;
use model::{Checkpoint, Device};

use crate::QuantError;
use crate::block::{BlockWeights, CaptureSpec, LINEARS, capture};
use crate::blocks::{dequantize, quantize};
use crate::gguf_export::{
    ExportError, ExportReport, Progress, Source, TypePlan, export_from, hf_to_gguf_name,
};
use crate::method::awq::{Awq, ScaleSearch};

/// Calibration for [`export_calibrated`].
#[derive(Debug, Clone)]
pub struct GgufCalibration<'a> {
    /// Calibration windows (token ids).
    pub windows: &'a [Vec<u32>],
    /// Search and fold AWQ scales before rounding.
    pub awq: Option<Awq>,
    /// Input rows kept per linear for AWQ's search objective.
    pub sample_rows: usize,
}

fn quant_err(e: QuantError) -> ExportError {
    match e {
        QuantError::Model(m) => ExportError::Model(m),
        other => ExportError::Input(other.to_string()),
    }
}

/// Writes `ckpt` as a GGUF file at `out` with types from `plan`, every decoder linear
/// rounded with the importance of its calibration inputs (after AWQ scaling when asked).
/// One block is in memory at a time; the calibration activations of all windows are kept.
pub fn export_calibrated(
    ckpt: &Checkpoint,
    out: &Path,
    plan: &TypePlan,
    calib: &GgufCalibration<'_>,
    device: Device,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ExportReport, ExportError> {
    if calib.windows.is_empty() {
        return Err(ExportError::Input(
            "calibration-aware export needs at least one calibration window".into(),
        ));
    }
    let cfg = ckpt.config().clone();
    let max_len = calib.windows.iter().map(Vec::len).max().unwrap_or(1);
    let engine = LayerEngine::new(ckpt, device.clone(), max_len);
    let mut states = engine.embed(calib.windows)?;
    let taps = [Tap::QkvInput, Tap::OInput, Tap::GateUpInput, Tap::DownInput];
    // The block being written: its index, its (possibly rescaled) weights, importances.
    let mut cur: Option<(usize, BlockWeights, HashMap<String, Vec<f32>>)> = None;
    let mut source = |hf: &str, _g: &str, shape: &[usize]| -> Result<Source, ExportError> {
        let Some((l, suffix)) = hf
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
        else {
            return Ok(Source {
                data: ckpt.read(hf, shape)?,
                importance: None,
                encoded: None,
            });
        };
        let l: usize = l
            .parse()
            .map_err(|_| ExportError::Input(format!("bad block tensor name `{hf}`")))?;
        if cur.as_ref().map(|c| c.0) != Some(l) {
            let mut weights = BlockWeights::read(ckpt, l).map_err(quant_err)?;
            let block = weights.build(&cfg, &device);
            let spec = CaptureSpec {
                xtx: false,
                sample_rows: calib.sample_rows,
            };
            let (mut st, outputs) = capture(&block, engine.rope(), &states, &taps, spec);
            drop(block);
            for (tap, s) in &st {
                if s.sq_mean.iter().any(|v| !v.is_finite()) {
                    return Err(ExportError::Input(format!(
                        "calibration activations at {tap:?} of block {l} contain NaN or Inf"
                    )));
                }
            }
            if let Some(awq) = &calib.awq {
                let fake = |key: &str,
                            w: &[f32],
                            rows: usize,
                            cols: usize,
                            imp: &[f32]|
                 -> Result<Vec<f32>, QuantError> {
                    let full = format!("model.layers.{l}.{key}");
                    let g = hf_to_gguf_name(&full)
                        .ok_or_else(|| QuantError::Input(format!("no GGUF name for `{full}`")))?;
                    let ty = plan.type_for(&g, &[rows, cols]);
                    let bytes = quantize(ty, w, cols, Some(imp))
                        .map_err(|e| QuantError::Input(format!("{g}: {e}")))?;
                    Ok(dequantize(ty, &bytes, rows * cols))
                };
                // The scale granularity of the block types: 32 values (16 for some K-quant
                // sub-blocks; the weight means barely change between the two).
                let group_len = |_: &str, cols: usize| Ok(cols.min(32));
                let mut search = ScaleSearch {
                    stats: &mut st,
                    inputs: &states,
                    rope: engine.rope(),
                    fake: &fake,
                    group_len: &group_len,
                };
                awq.search_scales(&cfg, &mut weights, &device, &mut search)
                    .map_err(quant_err)?;
            }
            // The next block's inputs (after the AWQ search, which reads this block's).
            states = outputs;
            let imp = LINEARS
                .iter()
                .map(|(n, tap)| {
                    (
                        format!("{n}.weight"),
                        st[tap].sq_mean.iter().map(|&v| v as f32).collect(),
                    )
                })
                .collect();
            cur = Some((l, weights, imp));
        }
        // Each tensor is asked for once, in file order: hand it over rather than copy it.
        let (_, w, imp) = cur.as_mut().expect("block prepared");
        Ok(Source {
            data: std::mem::take(&mut w.get_mut(suffix).data),
            importance: imp.remove(suffix),
            encoded: None,
        })
    };
    export_from(ckpt, out, plan, &mut source, progress)
}
