//! Round to nearest: each group's min/max (or absmax) sets its scale; the baseline.

use std::collections::BTreeMap;

use super::{BlockJob, BlockResult, Outputs, QuantMethod};
use crate::QuantError;
use crate::block::{CaptureSpec, LINEARS, capture};
use crate::scheme::quantize_rtn;

/// Round-to-nearest quantization.
#[derive(Debug, Clone, Copy)]
pub struct Rtn;

impl QuantMethod for Rtn {
    fn name(&self) -> &'static str {
        "rtn"
    }

    fn needs_calibration(&self) -> bool {
        false
    }

    fn quantize_block(&self, job: &mut BlockJob<'_>) -> Result<BlockResult, QuantError> {
        // Calibration, when given, only feeds the error report.
        let mut stats = BTreeMap::new();
        if !job.inputs.is_empty() {
            let block = job.weights.build(job.cfg, job.device);
            let taps: Vec<_> = LINEARS.iter().map(|l| l.1).collect();
            let (st, _) = capture(
                &block,
                job.rope,
                job.inputs,
                &taps,
                CaptureSpec {
                    xtx: false,
                    sample_rows: job.sample_rows,
                },
            );
            for (name, tap) in LINEARS {
                stats.insert(name.to_string(), st[&tap].clone());
            }
        }
        let mut linears = BTreeMap::new();
        let mut reference = BTreeMap::new();
        for (name, _) in LINEARS {
            let key = format!("{name}.weight");
            let t = job.weights.get(&key);
            reference.insert(name.to_string(), t.data.clone());
            let q = quantize_rtn(&job.scheme, &key, &t.data, t.shape[0], t.shape[1])?;
            job.weights.get_mut(&key).data = q.dequantize();
            linears.insert(name.to_string(), q);
        }
        Ok(BlockResult {
            linears,
            reference,
            stats,
            outputs: Outputs::None,
        })
    }
}
