//! `compress distill --requant rtn|gptq|awq`: the trained student (LoRA adapters merged, e.g.
//! after QLoRA) is quantized again by `compress quant` itself, so a recovery run ends in a
//! deployable integer model. The `quant` arguments are built as a command line and parsed by
//! its own clap struct, so defaults and checks are the ones `compress quant` has; they are
//! built (and so checked) before training starts.

use std::path::Path;

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};

use crate::distill_args::{Args, LoraSave, Mode};
use crate::quantize;
use quant::method::MethodKind;

/// `compress quant`'s arguments, parsed from a built command line.
#[derive(Parser)]
#[command(no_binary_name = true)]
struct QuantLine {
    #[command(flatten)]
    args: quantize::Args,
}

/// What `--requant` asks for: the `quant` arguments (model and out set when it runs) and
/// their summary for `distill_report.json`.
pub struct Requant {
    args: quantize::Args,
    summary: Value,
}

/// The requantization `a` asks for, checked (`None` without --requant).
pub fn plan(a: &Args) -> anyhow::Result<Option<Requant>> {
    let Some(method) = a.requant else {
        for (given, flag) in [
            (a.requant_bits.is_some(), "--requant-bits"),
            (a.requant_group.is_some(), "--requant-group"),
            (a.requant_sym, "--requant-sym"),
        ] {
            if given {
                bail!("{flag} needs --requant rtn|gptq|awq");
            }
        }
        return Ok(None);
    };
    if a.lora_save == Some(LoraSave::Adapters) {
        bail!(
            "--requant quantizes the merged student, and --lora-save adapters writes none (use --lora-save merged or both)"
        );
    }
    let calibrated = method != MethodKind::Rtn;
    if calibrated && a.mode == Mode::Blackbox {
        bail!(
            "--requant {} calibrates on --data as text, but --mode blackbox data is (prompt, response) JSONL; use --requant rtn, or `compress quant OUT --method {} --calib FILE` afterwards",
            method.name(),
            method.name()
        );
    }
    let (bits, group) = (a.requant_bits.unwrap_or(4), a.requant_group.unwrap_or(128));
    if group == 0 {
        bail!("--requant-group must be positive");
    }
    quant::scheme::QuantScheme::new(bits, Some(group), a.requant_sym)
        .map_err(|e| anyhow::anyhow!("--requant-bits {bits}: {e}"))?;
    let mut line: Vec<String> = vec![
        "<student>".into(),
        "--method".into(),
        method.name().into(),
        "--bits".into(),
        bits.to_string(),
        "--group".into(),
        group.to_string(),
        "--out".into(),
        "<out>".into(),
    ];
    if a.requant_sym {
        line.push("--sym".into());
    }
    if calibrated {
        // The training text, in windows of the training length.
        line.extend([
            "--calib".into(),
            a.data.display().to_string(),
            "--calib-len".into(),
            a.seq_len.to_string(),
        ]);
    }
    if let Some(t) = a.threads {
        line.extend(["--threads".into(), t.to_string()]);
    }
    let args = QuantLine::try_parse_from(&line)
        .map_err(|e| anyhow::anyhow!("--requant: {}", e.to_string().trim()))?
        .args;
    let summary = json!({
        "method": method.name(), "bits": bits, "group": group, "sym": a.requant_sym,
        "calibration": calibrated.then(|| json!({"file": a.data, "len": a.seq_len})),
        "report": "quant_report.json",
    });
    Ok(Some(Requant { args, summary }))
}

impl Requant {
    /// Quantizes the merged student in `merged` into `dir` (the run's temporary output):
    /// the quantized model's files go to `dir`, an `adapter` folder beside the merged model
    /// moves along, and `merged` is removed. Returns the summary for the report.
    pub fn run(mut self, merged: &Path, dir: &Path) -> anyhow::Result<Value> {
        let q = dir.join(".requant");
        self.args.model = merged.to_path_buf();
        self.args.out = q.clone();
        quantize::run(self.args)?;
        for e in std::fs::read_dir(&q).with_context(|| format!("{}", q.display()))? {
            let e = e?;
            std::fs::rename(e.path(), dir.join(e.file_name()))?;
        }
        std::fs::remove_dir(&q)?;
        let adapter = merged.join("adapter");
        if adapter.is_dir() {
            std::fs::rename(&adapter, dir.join("adapter"))?;
        }
        std::fs::remove_dir_all(merged)?;
        // The report's input was the merged student, a temporary folder now gone.
        let report = dir.join("quant_report.json");
        let mut r: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
        r["teacher"] = json!("the distilled student, adapters merged (distill_report.json)");
        std::fs::write(&report, serde_json::to_string_pretty(&r)?)?;
        Ok(self.summary)
    }
}
