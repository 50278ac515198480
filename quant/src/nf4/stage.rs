//! The bitsandbytes schemes as a [`BlockStage`] on the one block driver: every decoder
//! linear is quantized in place, the sinks receive its [`BnbLinear`] with the dequantized
//! values, and the report records the per-linear error and the exact bits per weight.

use std::collections::BTreeMap;
use std::time::Instant;

use model::{Checkpoint, Device};
use serde::Serialize;

use super::{BnbLinear, BnbScheme, quantize};
use crate::QuantError;
use crate::block::{LINEARS, weight_error};
use crate::method::Outputs;
use crate::pipeline::{BlockCtx, BlockStage, DriveOptions, LinearReport, OutputSink, drive};

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct BnbReport {
    /// `bnb` (data-free: no method, no calibration).
    pub method: String,
    /// The scheme.
    pub scheme: BnbScheme,
    /// Per-linear errors (no output error: the schemes take no calibration data).
    pub linears: Vec<LinearReport>,
    /// Parameters in quantized linears.
    pub quantized_params: u64,
    /// Exact bits per weight of the quantized linears (codes, absmax, double quantization).
    pub linear_bits_per_weight: f64,
    /// The QLoRA paper's figure for this scheme (e.g. 4.127 for NF4 + DQ at block 64);
    /// absent for int8-absmax.
    pub nominal_bits_per_weight: Option<f64>,
    /// Seconds.
    pub wall_seconds: f64,
}

struct Stage<'a> {
    scheme: BnbScheme,
    sinks: &'a mut Vec<Box<dyn OutputSink>>,
    block: BTreeMap<String, (BnbLinear, Vec<f32>)>,
    reports: Vec<LinearReport>,
    qparams: u64,
    qbits: f64,
}

impl BlockStage for Stage<'_> {
    fn process(&mut self, ctx: &mut BlockCtx<'_>) -> Result<Outputs, QuantError> {
        self.block.clear();
        for (name, _) in LINEARS {
            let key = format!("{name}.weight");
            let t = ctx.weights.get(&key);
            let tensor = format!("model.layers.{}.{key}", ctx.weights.layer);
            let q = quantize(&self.scheme, &tensor, &t.data, t.shape[0], t.shape[1])?;
            let reference = std::mem::replace(&mut ctx.weights.get_mut(&key).data, q.dequantize());
            self.block.insert(name.to_string(), (q, reference));
        }
        Ok(Outputs::None)
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
        let (q, reference) = &self.block[base];
        for s in self.sinks.iter_mut() {
            s.bnb_linear(name, q, data)?;
        }
        self.reports.push(LinearReport {
            name: name.to_string(),
            weight_rel_error: weight_error(reference, data),
            output_rel_error: None,
        });
        let n = (q.rows * q.cols) as u64;
        self.qparams += n;
        self.qbits += n as f64 * self.scheme.bits_per_weight(q.rows, q.cols);
        Ok(())
    }
}

/// Errors unless every decoder linear of `cfg` takes the scheme's block (checked before any
/// work starts, naming the first tensor that does not).
pub fn check_model(scheme: &BnbScheme, cfg: &model::Config) -> Result<(), QuantError> {
    for (name, shape) in model::checkpoint::block_tensors(cfg, 0) {
        if shape.len() == 2
            && LINEARS
                .iter()
                .any(|(n, _)| name.ends_with(&format!("{n}.weight")))
        {
            scheme.check_width(&name, shape[1])?;
        }
    }
    Ok(())
}

/// Quantizes every decoder linear of `ckpt` with `scheme`, sending tensors to `sinks`.
pub fn quantize_model(
    ckpt: &Checkpoint,
    scheme: BnbScheme,
    device: Device,
    sinks: &mut Vec<Box<dyn OutputSink>>,
    progress: impl FnMut(usize, usize),
) -> Result<BnbReport, QuantError> {
    let start = Instant::now();
    check_model(&scheme, ckpt.config())?;
    let mut stage = Stage {
        scheme,
        sinks,
        block: BTreeMap::new(),
        reports: Vec::new(),
        qparams: 0,
        qbits: 0.0,
    };
    let opts = DriveOptions {
        propagate: true,
        stage_returns_teacher: false,
    };
    drive(ckpt, &[], opts, device, &mut stage, progress)?;
    Ok(BnbReport {
        method: "bnb".into(),
        scheme,
        linears: stage.reports,
        quantized_params: stage.qparams,
        linear_bits_per_weight: if stage.qparams > 0 {
            stage.qbits / stage.qparams as f64
        } else {
            0.0
        },
        nominal_bits_per_weight: scheme.nominal_bits_per_weight(),
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}
