//! `compress qat --teacher MODEL [--student MODEL] --method rtn --bits B --group G [--sym]
//! [--learn-scales] --data FILE --out DIR`: quantization-aware training. The student's decoder
//! linears train behind fake quantization (PTQ's scheme arithmetic, a straight-through
//! estimator, scales frozen or learned; see `distill::qat`) with the loop, losses,
//! checkpoints and outputs of `compress distill`; the written model is dense, its linear
//! weights exactly on their final grids, and/or packed as `compress quant` writes it, with
//! `quant_report.json`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};

use crate::formats::Format;
use crate::output::{TempGuard, temp_sibling};
use distill::{CausalLm, QatInit, QatOptions};
use model::Checkpoint;
use model::safetensors_io::StoreDtype;
use quant::pack::PackedSink;
use quant::pipeline::{LinearReport, OutputSink, PtqReport};
use quant::scheme::{QuantScheme, QuantizedLinear};
use serde_json::json;

/// Arguments of `qat`: the quantization scheme, then every training option of `distill`
/// that applies (LoRA and the teacher-cache writer do not).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The PTQ result training starts from: `rtn` (round-to-nearest on the student's own
    /// weights), `gptq` or `awq` (run first on `--calib`). Required.
    #[arg(long, value_enum)]
    method: Option<QatInit>,
    /// Bits per weight code (2 to 8).
    #[arg(long, default_value_t = 4)]
    bits: u8,
    /// Input channels per scale, as `compress quant --group` (a width it does not divide gets
    /// a shorter last group).
    #[arg(long, default_value_t = 128, conflicts_with = "per_channel")]
    group: usize,
    /// One scale per output channel instead of groups.
    #[arg(long)]
    per_channel: bool,
    /// Symmetric quantization (zero point 2^(bits-1)).
    #[arg(long)]
    sym: bool,
    /// Train the scales too (LSQ-style; zero points stay frozen) instead of keeping the start's.
    #[arg(long)]
    learn_scales: bool,
    /// Output formats, comma-separated: `dense` (f32 by default, the weights exactly on their
    /// grids), `packed` (compressed-tensors `pack-quantized`, as `compress quant` writes it;
    /// bits 2, 4 or 8) and/or `gguf:TYPE` (OUT/model.gguf; the grid is kept where TYPE's
    /// blocks hold it: q8_0/q4_0/q5_0 for sym, q4_1/q5_1 for asym, group 32). With dense and
    /// packed, OUT holds the dense model and OUT/packed the packed one.
    #[arg(long, value_delimiter = ',', default_value = "dense")]
    format: Vec<Format>,
    /// Calibration of a GPTQ or AWQ start.
    #[command(flatten)]
    calib: crate::qat_init::CalibArgs,
    /// The training options, as `compress distill`; --student defaults to --teacher.
    #[command(flatten)]
    train: crate::distilling::Args,
}

impl Args {
    /// Whether the PTQ start calibrates (GPTQ or AWQ).
    pub(crate) fn calibrates(&self) -> bool {
        matches!(self.method, Some(QatInit::Gptq | QatInit::Awq))
    }
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    let Some(init) = a.method else {
        bail!(
            "qat needs --method rtn|gptq|awq, the PTQ result its scales and zero points start from (--init DIR, a quantized folder, is not supported yet)"
        );
    };
    let scheme = QuantScheme::new(a.bits, (!a.per_channel).then_some(a.group), a.sym)?;
    if a.group == 0 {
        bail!("--group must be positive");
    }
    a.calib.check(init)?;
    let t = &a.train;
    for (given, name) in [
        (t.lora_rank.is_some(), "--lora-rank"),
        (t.lora_alpha.is_some(), "--lora-alpha"),
        (t.lora_targets.is_some(), "--lora-targets"),
        (t.lora_save.is_some(), "--lora-save"),
        (t.cache_teacher.is_some(), "--cache-teacher"),
        (t.base_scheme.is_some(), "--base-scheme"),
        (t.block.is_some(), "--block"),
        (t.double_quant, "--double-quant"),
        (t.lora_init.is_some(), "--lora-init"),
        (t.loftq_iter.is_some(), "--loftq-iter"),
        (t.requant.is_some(), "--requant"),
        (t.requant_bits.is_some(), "--requant-bits"),
        (t.requant_group.is_some(), "--requant-group"),
        (t.requant_sym, "--requant-sym"),
    ] {
        if given {
            bail!(
                "{name} does not apply to qat (every linear weight trains behind fake quantization)"
            );
        }
    }
    if a.train.student.is_none() {
        a.train.student = a.train.teacher.clone();
    }
    if a.train.student.is_none() {
        bail!("qat needs --teacher MODEL (the student defaults to it) or --student MODEL");
    }
    // At most one gguf:TYPE, beside the folder formats.
    let written = |f: &Format| match f {
        Format::Gguf(t) => t != crate::formats::AUTO,
        other => matches!(other, Format::Dense | Format::Packed),
    };
    crate::formats::check(&a.format, written, "qat", "dense, packed, gguf:TYPE")?;
    let gguf = crate::formats::gguf(&a.format).map(str::to_string);
    let packed = a.format.contains(&Format::Packed);
    if packed {
        quant::pack::check_scheme(&scheme)?;
    }
    let plan = Plan {
        opts: QatOptions {
            scheme,
            init,
            learn_scales: a.learn_scales,
        },
        dense: a.format.contains(&Format::Dense),
        packed,
        gguf,
        calib: a.calib,
    };
    crate::distilling::run_with(a.train, Some(&plan))
}

/// What a QAT run trains and writes.
pub(crate) struct Plan {
    /// The fake quantization.
    pub opts: QatOptions,
    /// Write the dense model (into OUT).
    pub dense: bool,
    /// Write the packed model (into OUT/packed beside a dense one, else OUT).
    pub packed: bool,
    /// Write OUT/model.gguf of this type preset.
    pub gguf: Option<String>,
    /// Calibration of a GPTQ or AWQ start.
    pub calib: crate::qat_init::CalibArgs,
}

impl Plan {
    /// The PTQ start of a GPTQ or AWQ init (none for RTN), with `student` (the opened
    /// student) replaced by it, and the guard that removes a temporary start when the run
    /// ends: without checkpoints it is not needed afterwards.
    pub fn start(
        &self,
        a: &crate::distilling::Args,
        student_path: &Path,
        out: &Path,
        student: &mut Checkpoint,
    ) -> anyhow::Result<(Option<crate::qat_init::PtqStart>, TempGuard)> {
        let resumable = a.save_every > 0;
        let start = self.ptq_start(student_path, out, a.seed, resumable)?;
        let guard = TempGuard(start.as_ref().filter(|_| !resumable).map(|s| s.dir.clone()));
        if let Some(s) = &start {
            *student = crate::distilling::open(&s.dir, "student")?;
        }
        Ok((start, guard))
    }

    /// Runs the PTQ start of a GPTQ or AWQ init on `student`; `None` for RTN, which starts
    /// from the student itself. With checkpoints (`resumable`) it goes into `OUT.ptq-start`
    /// beside `OUT.checkpoints`, which a resumed run writes again (the PTQ is deterministic
    /// and the fingerprint checks it) and which is removed with the checkpoints; otherwise
    /// into a temporary sibling of `out` that the caller removes when the run ends (and an
    /// interrupt removes).
    fn ptq_start(
        &self,
        student: &Path,
        out: &Path,
        seed: u64,
        resumable: bool,
    ) -> anyhow::Result<Option<crate::qat_init::PtqStart>> {
        if self.opts.init == QatInit::Rtn {
            return Ok(None);
        }
        let (o, c) = (&self.opts, &self.calib);
        if !resumable {
            let name = out
                .file_name()
                .map_or("out".into(), |n| n.to_string_lossy());
            let tmp = temp_sibling(&out.with_file_name(format!("{name}.ptq-start")));
            let mut guard = TempGuard(Some(tmp.clone()));
            let start = crate::qat_init::run(student, o.init, o.scheme, c, seed, &tmp)?;
            guard.0 = None;
            return Ok(Some(start));
        }
        let name = out
            .file_name()
            .map_or("out".into(), |n| n.to_string_lossy());
        let dir = out.with_file_name(format!("{name}.ptq-start"));
        let tmp = temp_sibling(&dir);
        let mut guard = TempGuard(Some(tmp.clone()));
        let mut start = crate::qat_init::run(student, o.init, o.scheme, c, seed, &tmp)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        }
        std::fs::rename(&tmp, &dir).with_context(|| format!("{}", dir.display()))?;
        guard.0 = None;
        start.dir = dir;
        Ok(Some(start))
    }

    /// The formats written, as `compress quant` lists them.
    fn formats(&self) -> Vec<String> {
        let mut v: Vec<String> = [(self.dense, "dense"), (self.packed, "packed")]
            .into_iter()
            .filter_map(|(on, f)| on.then(|| f.to_string()))
            .collect();
        v.extend(self.gguf.iter().map(|t| format!("gguf:{t}")));
        v
    }
}

/// Writes what QAT adds to the training outputs in `dir`: `quant_report.json`, and the
/// packed model when asked (the dense one is the trainer's usual output).
pub(crate) fn write_outputs(
    q: &Plan,
    a: &crate::distilling::Args,
    student: &Checkpoint,
    tok: &model::Tokenizer,
    trained: &CausalLm,
    secs: f64,
    ptq: Option<&serde_json::Value>,
    dir: &Path,
) -> anyhow::Result<()> {
    let grids = trained.quantized_linears(&q.opts.scheme);
    let weights = trained.hf_tensors();
    let gguf = match &q.gguf {
        Some(t) => Some(crate::qat_gguf::write(
            t,
            &q.opts.scheme,
            student,
            &weights,
            &grids,
            dir,
        )?),
        None => None,
    };
    write_report(q, student, &grids, &weights, (a, secs, ptq, gguf), dir)?;
    if !q.packed {
        return Ok(());
    }
    let packed_dir = if q.dense {
        dir.join("packed")
    } else {
        dir.to_path_buf()
    };
    std::fs::create_dir_all(&packed_dir).with_context(|| format!("{}", packed_dir.display()))?;
    let qc = quant::pack::quantization_config(student.config(), &q.opts.scheme, false)?;
    let extra = json!({ "quantization_config": qc });
    let cfg = crate::hf_folder::write_config(student, StoreDtype::BF16, &packed_dir, Some(extra))?;
    crate::hf_folder::write_aux(student, tok, &cfg, &packed_dir)?;
    let path = packed_dir.join("model.safetensors");
    let mut sink = PackedSink::create(&path, &cfg, q.opts.scheme, false)?;
    for (name, shape) in model::checkpoint::expected_tensors(&cfg) {
        let data = weights
            .get(&name)
            .with_context(|| format!("trained model has no tensor {name}"))?;
        match grids.get(&name) {
            Some(g) => sink.linear(&name, g, data)?,
            None => sink.plain(&name, data, &shape)?,
        }
    }
    Box::new(sink).finish()?;
    Ok(())
}

/// Writes `dir/quant_report.json` for the trained student: the scheme, bits per weight and
/// each linear's error against the student it started from, as `compress quant` reports
/// them; refuses weights (`weights`) that are not exactly on their grids (`grids`).
fn write_report(
    plan: &Plan,
    student: &Checkpoint,
    grids: &BTreeMap<String, QuantizedLinear>,
    weights: &BTreeMap<String, Vec<f32>>,
    (a, secs, ptq, gguf): (
        &crate::distilling::Args,
        f64,
        Option<&serde_json::Value>,
        Option<serde_json::Value>,
    ),
    dir: &Path,
) -> anyhow::Result<()> {
    let q = &plan.opts;
    let (mut linears, mut params, mut bits) = (Vec::new(), 0u64, 0f64);
    for (name, shape) in model::checkpoint::expected_tensors(student.config()) {
        let Some(g) = grids.get(&name) else {
            continue;
        };
        let deq = g.dequantize();
        if deq
            .iter()
            .zip(&weights[&name])
            .any(|(x, y)| x.to_bits() != y.to_bits())
        {
            bail!("`{name}`: the trained weights are not on their quantization grid");
        }
        let start = student
            .read(&name, &shape)
            .with_context(|| format!("{}", student.path().display()))?;
        linears.push(LinearReport {
            name: name.clone(),
            weight_rel_error: quant::block::weight_error(&start, &deq),
            output_rel_error: None,
        });
        let n = (g.rows * g.cols) as u64;
        params += n;
        bits += n as f64 * q.scheme.bits_per_weight(g.cols);
    }
    let report = PtqReport {
        method: format!(
            "qat from {}",
            serde_json::to_value(q.init)?.as_str().unwrap_or("?")
        ),
        scheme: q.scheme,
        propagate_quantized: false,
        calib_samples: 0,
        calib_len: 0,
        linears,
        quantized_params: params,
        linear_bits_per_weight: bits / params.max(1) as f64,
        wall_seconds: secs,
    };
    let full = json!({
        "teacher": a.teacher, "student": a.student, "scheme": q.scheme,
        "scheme_label": q.scheme.label(), "formats": plan.formats(), "dtype": a.dtype,
        "qat": q, "ptq_start": ptq, "gguf": gguf, "report": report,
    });
    std::fs::write(
        dir.join("quant_report.json"),
        serde_json::to_string_pretty(&full)?,
    )?;
    Ok(())
}
