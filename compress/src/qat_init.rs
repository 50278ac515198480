//! QAT from GPTQ or AWQ (`compress qat --method gptq|awq --calib FILE`): the PTQ method runs
//! on the student first, as `compress quant` would run it, and QAT starts from its result:
//! the dequantized weights (f32, so fake quantization reproduces them exactly) become the
//! student, and each linear's scales and zero points initialise its fake quantization.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{Context, bail};
use distill::QatInit;
use model::Checkpoint;
use model::safetensors_io::StoreDtype;
use quant::QuantError;
use quant::method::MethodOptions;
use quant::pipeline::{DenseSink, OutputSink, PtqOptions};
use quant::scheme::{QuantScheme, QuantizedLinear};
use serde_json::{Value, json};

/// The calibration a GPTQ or AWQ start draws, as `compress quant`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct CalibArgs {
    /// `--method gptq|awq`: calibration text for the PTQ start (plain text, or JSONL with a
    /// `text` field); does not apply to `--method rtn`.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration sequences for the PTQ start.
    #[arg(long, default_value_t = 128)]
    pub calib_samples: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 512)]
    pub calib_len: usize,
    /// `--method gptq`: start the latent weights at GPTQ's unrounded, error-updated values
    /// (each still rounds to GPTQ's code, so step 0 is GPTQ's model) instead of at its
    /// dequantized grid points, the middles of their rounding bins.
    #[arg(long)]
    pub gptq_latent: bool,
}

impl CalibArgs {
    /// Refuses calibration flags that `init` does not use, and a GPTQ/AWQ start without them.
    pub fn check(&self, init: QatInit) -> anyhow::Result<()> {
        let given = self.calib.is_some() || self.calib_samples != 128 || self.calib_len != 512;
        match init {
            QatInit::Rtn if given => {
                bail!("--calib, --calib-samples and --calib-len apply to --method gptq|awq only")
            }
            QatInit::Rtn | QatInit::Awq if self.gptq_latent => {
                bail!("--gptq-latent applies to --method gptq only")
            }
            QatInit::Gptq | QatInit::Awq if self.calib.is_none() => {
                bail!(
                    "--method {} needs --calib FILE (its PTQ start is calibrated)",
                    init.name()
                )
            }
            _ => Ok(()),
        }
    }
}

/// What the PTQ start produced.
pub struct PtqStart {
    /// The folder holding the dequantized student (f32).
    pub dir: PathBuf,
    /// Each linear's integer form, by HF weight name.
    pub params: BTreeMap<String, QuantizedLinear>,
    /// For the report: method, calibration and the PTQ report.
    pub summary: Value,
}

/// The start: its weights (each linear's latent values where the method kept them, else its
/// dequantized ones) into the dense model, and each linear's integer form into a map shared
/// with the caller, since the pipeline owns its sinks.
struct Start {
    dense: DenseSink,
    params: Rc<RefCell<BTreeMap<String, QuantizedLinear>>>,
}

impl OutputSink for Start {
    fn plain(&mut self, name: &str, data: &[f32], shape: &[usize]) -> Result<(), QuantError> {
        self.dense.plain(name, data, shape)
    }
    fn linear(&mut self, name: &str, q: &QuantizedLinear, deq: &[f32]) -> Result<(), QuantError> {
        self.dense
            .linear(name, q, q.latent.as_deref().unwrap_or(deq))?;
        let kept = QuantizedLinear {
            rows: q.rows,
            cols: q.cols,
            codes: q.codes.clone(),
            params: q.params.clone(),
            groups: q.groups,
            g_idx: q.g_idx.clone(),
            latent: None,
            blocks: None,
        };
        self.params.borrow_mut().insert(name.to_string(), kept);
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<(), QuantError> {
        Box::new(self.dense).finish()
    }
}

/// Runs `init` (GPTQ or AWQ) with `scheme` on `student` and writes the dequantized result
/// into `dir`, which must not exist. `seed` draws the calibration windows as `compress quant
/// --seed` does.
pub fn run(
    student: &Path,
    init: QatInit,
    scheme: QuantScheme,
    c: &CalibArgs,
    seed: u64,
    dir: &Path,
) -> anyhow::Result<PtqStart> {
    let ckpt = Checkpoint::open(student).context("cannot open the student")?;
    ckpt.check_shapes().context("cannot open the student")?;
    let tok = model::tokenizer::load_checked(&ckpt).context("cannot build the tokenizer")?;
    let calib = crate::calib::windows(
        c.calib.as_deref(),
        c.calib_samples,
        c.calib_len,
        seed,
        &tok,
        ckpt.config(),
    )?;
    let mopts = MethodOptions {
        keep_latent: c.gptq_latent,
        ..MethodOptions::default()
    };
    let method = init.build(&mopts)?;
    let tmp = dir;
    std::fs::create_dir_all(tmp).with_context(|| format!("{}", tmp.display()))?;
    let cfg = crate::hf_folder::write_config(&ckpt, StoreDtype::F32, tmp, None)?;
    crate::hf_folder::write_aux(&ckpt, &tok, &cfg, tmp)?;
    let params = Rc::new(RefCell::new(BTreeMap::new()));
    let sinks: Vec<Box<dyn OutputSink>> = vec![Box::new(Start {
        dense: DenseSink::create(&tmp.join("model.safetensors"), &cfg, StoreDtype::F32)?,
        params: params.clone(),
    })];
    let opts = PtqOptions {
        scheme,
        calib,
        propagate_quantized: None,
        sample_rows: 2048,
    };
    let report = crate::quantize::run_ptq(&ckpt, method.as_ref(), &opts, sinks, init.name())?;
    let summary = json!({
        "method": init.name(), "student": student,
        "calibration": {"file": c.calib, "samples": c.calib_samples, "len": c.calib_len, "seed": seed},
        "latent": if c.gptq_latent { "gptq unrounded" } else { "dequantized" },
        "report": report,
    });
    Ok(PtqStart {
        dir: dir.to_path_buf(),
        params: params.take(),
        summary,
    })
}
