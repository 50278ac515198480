//! `compress quant MODEL --scheme nf4|fp4|int8-absmax [--block 64] [--double-quant]`: the
//! data-free bitsandbytes schemes (see `quant::nf4` and docs/nf4.md), written as the layout
//! transformers loads with bitsandbytes (`bnb`, the default) and/or as a dense
//! bf16 HF folder, with `quant_report.json`.

use anyhow::{Context, bail};
use comfy_table::Table;
use model::Checkpoint;
use model::safetensors_io::StoreDtype;
use quant::nf4::bnb::BnbSink;
use quant::nf4::{BnbScheme, BnbType};
use quant::pipeline::{DenseSink, OutputSink};
use serde_json::json;

use crate::formats::Format;
use crate::output::{TempGuard, check_output, commit, temp_sibling};
use crate::quantize::{Args, out_is_file, print_sizes};

/// `--scheme`: a bitsandbytes scheme.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemeArg {
    /// NormalFloat-4 (QLoRA): 16 quantiles of N(0, 1), one absmax per --block values.
    Nf4,
    /// bitsandbytes' FP4 (e2m1), one absmax per --block values.
    Fp4,
    /// bitsandbytes' 8-bit weights: int8 codes, one absmax per row (LLM.int8's weight format).
    Int8Absmax,
}

impl From<SchemeArg> for BnbType {
    fn from(s: SchemeArg) -> Self {
        match s {
            SchemeArg::Nf4 => BnbType::Nf4,
            SchemeArg::Fp4 => BnbType::Fp4,
            SchemeArg::Int8Absmax => BnbType::Int8Absmax,
        }
    }
}

/// Runs `quant --scheme`. The options of the integer schemes and of calibration are refused
/// by clap (they conflict with `--scheme`); `--method` is checked here since it has a default.
pub fn run(a: &Args, ty: SchemeArg, run: crate::manifest::Run) -> anyhow::Result<()> {
    let scheme = BnbScheme::new(ty.into(), a.block, a.double_quant)?;
    if a.method != quant::method::MethodKind::Rtn {
        bail!(
            "--scheme {} is data-free (rounding to the nearest code, like rtn); --method {} does not apply",
            scheme.ty.name(),
            a.method.name()
        );
    }
    let (format, note) = if a.format.is_empty() {
        (
            vec![Format::Bnb],
            Some(
                "format bnb by default (the layout transformers loads with bitsandbytes); --format dense writes bf16 weights that compress eval reads",
            ),
        )
    } else {
        (a.format.clone(), None)
    };
    if out_is_file(&a.out) {
        bail!(
            "{}: a .gguf OUT is a GGUF file; --scheme writes an HF folder (--format dense or bnb)",
            a.out.display()
        );
    }
    let folder = |f: &Format| matches!(f, Format::Dense | Format::Bnb);
    crate::formats::check(&format, folder, "--scheme", "dense, bnb")?;
    let (dense, bnb) = (
        format.contains(&Format::Dense),
        format.contains(&Format::Bnb),
    );
    if crate::checks_done() {
        return Ok(());
    }
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    ckpt.check_shapes().context("cannot open model")?;
    // Every input width must take the block before any work starts.
    quant::nf4::stage::check_model(&scheme, ckpt.config())?;
    check_output(&a.model, &a.out, a.force)?;
    let tok = model::tokenizer::load_checked(&ckpt).context("cannot build the tokenizer")?;

    let tmp = temp_sibling(&a.out);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    // The bnb model: OUT/bnb next to the dense one, or OUT itself.
    let bnb_dir = if dense { tmp.join("bnb") } else { tmp.clone() };
    let mut sinks: Vec<Box<dyn OutputSink>> = Vec::new();
    let mut cfg = None;
    if dense {
        let c = crate::hf_folder::write_config(&ckpt, StoreDtype::BF16, &tmp, None)?;
        crate::hf_folder::write_aux(&ckpt, &tok, &c, &tmp)?;
        sinks.push(Box::new(DenseSink::create(
            &tmp.join("model.safetensors"),
            &c,
            StoreDtype::BF16,
        )?));
        cfg = Some(c);
    }
    if bnb {
        std::fs::create_dir_all(&bnb_dir).with_context(|| format!("{}", bnb_dir.display()))?;
        let qc = quant::nf4::bnb::quantization_config(&scheme);
        let extra = json!({ "quantization_config": qc });
        let c = crate::hf_folder::write_config(&ckpt, StoreDtype::BF16, &bnb_dir, Some(extra))?;
        crate::hf_folder::write_aux(&ckpt, &tok, &c, &bnb_dir)?;
        sinks.push(Box::new(BnbSink::create(
            &bnb_dir.join("model.safetensors"),
            &c,
            scheme,
        )?));
        cfg = Some(c);
    }
    let cfg = cfg.expect("a format");
    let blocks = cfg.num_hidden_layers;
    let report = crate::drive_sinks(scheme.ty.name(), blocks, sinks, |sinks, progress| {
        quant::nf4::stage::quantize_model(&ckpt, scheme, model::default_device(), sinks, progress)
    })?;
    let size = |p: std::path::PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let dense_bytes = dense.then(|| size(tmp.join("model.safetensors")));
    let bnb_bytes = bnb.then(|| size(bnb_dir.join("model.safetensors")));
    let full = json!({
        "teacher": a.model, "scheme": scheme, "scheme_label": scheme.label(), "formats": format,
        "calibration": null, "dense_bytes": dense_bytes, "bnb_bytes": bnb_bytes, "report": report,
    });
    std::fs::write(
        tmp.join("quant_report.json"),
        serde_json::to_string_pretty(&full)?,
    )?;
    let metrics = json!({"report": "quant_report.json", "linear_bits_per_weight": report.linear_bits_per_weight});
    run.write(&tmp, metrics)?;
    commit(&tmp, &a.out)?;
    guard.0 = None;

    let n = report.linears.len().max(1) as f64;
    let mean_err = report
        .linears
        .iter()
        .map(|r| r.weight_rel_error)
        .sum::<f64>()
        / n;
    let mut t = Table::new();
    t.set_header(vec![
        "scheme",
        "linear bpw",
        "paper bpw",
        "quantized params",
        "mean weight err",
        "seconds",
    ]);
    t.add_row(vec![
        scheme.label(),
        format!("{:.4}", report.linear_bits_per_weight),
        report
            .nominal_bits_per_weight
            .map_or_else(|| "–".into(), |b| format!("{b:.4}")),
        crate::grouped(report.quantized_params),
        format!("{mean_err:.4}"),
        format!("{:.1}", report.wall_seconds),
    ]);
    println!("{t}");
    let mut sizes = Vec::new();
    if let Some(b) = dense_bytes {
        println!("wrote {} (dense bf16 HF folder)", a.out.display());
        sizes.push((b, "dense bf16"));
    }
    if let Some(b) = bnb_bytes {
        let dir = if dense {
            a.out.join("bnb")
        } else {
            a.out.clone()
        };
        let bits = if scheme.ty == BnbType::Int8Absmax {
            "8-bit"
        } else {
            "4-bit"
        };
        println!(
            "wrote {} (bitsandbytes {bits} HF folder: transformers + bitsandbytes load it)",
            dir.display()
        );
        sizes.push((b, "bnb"));
    }
    println!("report: {}", a.out.join("quant_report.json").display());
    print_sizes(ckpt.bytes_on_disk(), &sizes);
    if let Some(n) = note {
        println!("note: {n}");
    }
    Ok(())
}
