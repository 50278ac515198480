//! `compress quant MODEL --method rtn|awq|gptq --bits N ...`: weight-only post-training
//! quantization of every linear layer in the decoder blocks, calibrated on the layer-by-layer
//! engine, written as a dense bf16 HF folder (and other formats), with `quant_report.json`.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use comfy_table::Table;
use model::Checkpoint;
use model::safetensors_io::StoreDtype;
use quant::method::MethodOptions;
use quant::pack::PackedSink;
use quant::pipeline::{DenseSink, OutputSink, PtqOptions};
use quant::scheme::QuantScheme;
use serde_json::json;

use crate::output::{TempGuard, check_output, commit, temp_sibling};

/// Arguments of `quant`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF folder or a .gguf file (the teacher; never modified).
    model: crate::Path,
    /// rtn, awq or gptq.
    #[arg(long, default_value = "rtn")]
    method: String,
    /// Bits per weight code (2 to 8).
    #[arg(long, default_value_t = 4)]
    bits: u8,
    /// Input channels per scale (32, 64, 128, ...); must divide every input width.
    #[arg(long, default_value_t = 128, conflicts_with = "per_channel")]
    group: usize,
    /// One scale per output channel instead of groups.
    #[arg(long)]
    per_channel: bool,
    /// Symmetric quantization (no zero point).
    #[arg(long)]
    sym: bool,
    /// Calibration text: plain text, or JSONL with a `text` field.
    #[arg(long)]
    calib: Option<crate::Path>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 128)]
    calib_samples: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 512)]
    calib_len: usize,
    /// Seed for drawing calibration sequences.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where block i's calibration inputs come from: `quantized` blocks 0..i-1 (GPTQ's
    /// default) or the `teacher` (AWQ's default).
    #[arg(long, value_parser = ["quantized", "teacher"])]
    propagate: Option<String>,
    /// GPTQ: quantize columns in decreasing order of activation energy.
    #[arg(long)]
    act_order: bool,
    /// GPTQ: dampening as a fraction of the mean Hessian diagonal.
    #[arg(long)]
    damp: Option<f64>,
    /// AWQ: skip the per-channel scale search.
    #[arg(long)]
    no_awq_scale: bool,
    /// AWQ: skip the clipping search.
    #[arg(long)]
    no_awq_clip: bool,
    /// Calibration rows kept per layer for AWQ's searches and the error report.
    #[arg(long, default_value_t = 2048)]
    sample_rows: usize,
    /// Output folder: the dense HF model, or the packed one if only `packed` is asked.
    #[arg(long)]
    out: crate::Path,
    /// Output formats, comma-separated: `dense` (dequantized bf16 HF folder) and/or `packed`
    /// (compressed-tensors `pack-quantized`, int32-packed codes that vLLM loads; bits 2, 4 or
    /// 8). With both, OUT holds the dense model and OUT/packed the packed one. Or alone
    /// `gguf:TYPE` (q4_0, q4_k_m, q8_0, ...: see `convert --type`): OUT/model.gguf for
    /// llama.cpp, each block rounded with the importance of its calibration inputs when
    /// `--calib` is given (after AWQ scaling with `--method awq`); --bits, --group and --sym
    /// do not apply, the type decides.
    #[arg(long, default_value = "dense")]
    format: String,
    /// gguf:TYPE only: override tensor types, PATTERN=TYPE (as `convert --tensor-type`).
    #[arg(long = "tensor-type", value_name = "PATTERN=TYPE")]
    tensor_type: Vec<String>,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    crate::set_threads(a.threads);
    if let Some(ty) = a.format.trim().strip_prefix("gguf:") {
        return run_gguf(&a, ty.trim());
    }
    if a.format.contains("gguf:") {
        bail!("--format gguf:TYPE cannot be combined with other formats");
    }
    if !a.tensor_type.is_empty() {
        bail!("--tensor-type applies to --format gguf:TYPE only");
    }
    if let Some(d) = a.damp
        && !(d.is_finite() && d > 0.0 && d <= 1.0)
    {
        bail!("--damp {d} must be in (0, 1]");
    }
    let scheme = QuantScheme::new(a.bits, (!a.per_channel).then_some(a.group), a.sym)?;
    if a.group == 0 {
        bail!("--group must be positive");
    }
    let formats: Vec<&str> = a
        .format
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect();
    for f in &formats {
        if !["dense", "packed"].contains(f) {
            bail!("--format `{f}` is not supported (supported: dense, packed)");
        }
    }
    if formats.is_empty() {
        bail!("--format names no format (supported: dense, packed)");
    }
    let (dense, packed) = (formats.contains(&"dense"), formats.contains(&"packed"));
    // Groups in activation order are stored with `weight_g_idx` (GPTQ --act-order only).
    let act_order = a.act_order && a.method == "gptq";
    if packed {
        quant::pack::check_scheme(&scheme)?;
    }
    let opts = MethodOptions {
        act_order: a.act_order,
        damp: a.damp,
        no_awq_scale: a.no_awq_scale,
        no_awq_clip: a.no_awq_clip,
    };
    let method = quant::method::by_name(&a.method, &opts)?;
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    ckpt.check_shapes().context("cannot open model")?;
    check_output(&a.model, &a.out, a.force)?;
    let tok = model::load_tokenizer(&ckpt).context("cannot build the tokenizer")?;
    // Every input width must take the group size before any work starts.
    for (name, shape) in model::checkpoint::block_tensors(ckpt.config(), 0) {
        if shape.len() == 2
            && quant::block::LINEARS
                .iter()
                .any(|(n, _)| name.ends_with(&format!("{n}.weight")))
        {
            scheme.group_len(&name, shape[1])?;
        }
    }
    if a.calib.is_none() && method.needs_calibration() {
        bail!("--method {} needs --calib FILE", a.method);
    }
    let calib = calibration(&a, &tok, ckpt.config())?;

    let tmp = temp_sibling(&a.out);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    // The packed model: OUT/packed next to the dense one, or OUT itself.
    let packed_dir = if dense {
        tmp.join("packed")
    } else {
        tmp.clone()
    };
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
    if packed {
        std::fs::create_dir_all(&packed_dir)
            .with_context(|| format!("{}", packed_dir.display()))?;
        let qc = quant::pack::quantization_config(ckpt.config(), &scheme, act_order)?;
        let extra = json!({ "quantization_config": qc });
        let c = crate::hf_folder::write_config(&ckpt, StoreDtype::BF16, &packed_dir, Some(extra))?;
        crate::hf_folder::write_aux(&ckpt, &tok, &c, &packed_dir)?;
        sinks.push(Box::new(PackedSink::create(
            &packed_dir.join("model.safetensors"),
            &c,
            scheme,
            act_order,
        )?));
        cfg = Some(c);
    }
    let cfg = cfg.expect("a format");

    let pb = crate::progress_bar(&a.method, cfg.num_hidden_layers as u64);
    let popts = PtqOptions {
        scheme,
        calib,
        propagate_quantized: a.propagate.as_deref().map(|p| p == "quantized"),
        sample_rows: a.sample_rows,
    };
    let report = quant::pipeline::quantize(
        &ckpt,
        method.as_ref(),
        &popts,
        model::default_device(),
        &mut sinks,
        |d, _| pb.set_position(d as u64),
    )?;
    for s in sinks {
        s.finish()?;
    }
    pb.finish_and_clear();
    let size = |p: std::path::PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let out_ckpt_bytes = if dense {
        size(tmp.join("model.safetensors"))
    } else {
        0
    };
    let packed_bytes = if packed {
        size(packed_dir.join("model.safetensors"))
    } else {
        0
    };
    let full = json!({
        "teacher": a.model, "scheme": scheme, "scheme_label": scheme.label(), "formats": formats,
        "calibration": a.calib.as_ref().map(|p| json!({"file": p, "samples": a.calib_samples, "len": a.calib_len, "seed": a.seed})),
        "dense_bytes": dense.then_some(out_ckpt_bytes), "packed_bytes": packed.then_some(packed_bytes), "report": report,
    });
    std::fs::write(
        tmp.join("quant_report.json"),
        serde_json::to_string_pretty(&full)?,
    )?;
    commit(&tmp, &a.out)?;
    guard.0 = None;

    let mean = |f: &dyn Fn(&quant::pipeline::LinearReport) -> Option<f64>| {
        let v: Vec<f64> = report.linears.iter().filter_map(f).collect();
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let mut t = Table::new();
    t.set_header(vec![
        "method",
        "scheme",
        "linear bpw",
        "quantized params",
        "mean weight err",
        "mean output err",
        "seconds",
    ]);
    t.add_row(vec![
        report.method.clone(),
        scheme.label(),
        format!("{:.3}", report.linear_bits_per_weight),
        report.quantized_params.to_string(),
        format!("{:.4}", mean(&|r| Some(r.weight_rel_error))),
        format!("{:.4}", mean(&|r| r.output_rel_error)),
        format!("{:.1}", report.wall_seconds),
    ]);
    println!("{t}");
    if dense {
        println!(
            "wrote {} (dense bf16, {} bytes) and quant_report.json",
            a.out.display(),
            out_ckpt_bytes
        );
    }
    if packed {
        let dir = if dense {
            a.out.join("packed")
        } else {
            a.out.clone()
        };
        let report_note = if dense { "" } else { " and quant_report.json" };
        println!(
            "wrote {} (compressed-tensors pack-quantized, {packed_bytes} bytes){report_note}",
            dir.display()
        );
        if act_order && scheme.group.is_some() {
            println!(
                "note: activation-order groups are stored with weight_g_idx (actorder \"group\"), which compressed-tensors 0.19+ no longer reads; load with compressed-tensors <= 0.18"
            );
        }
    }
    Ok(())
}

/// Reads `--calib` into windows (none without it).
fn calibration(
    a: &Args,
    tok: &model::Tokenizer,
    cfg: &model::Config,
) -> anyhow::Result<Vec<Vec<u32>>> {
    crate::calib::windows(
        a.calib.as_deref(),
        a.calib_samples,
        a.calib_len,
        a.seed,
        tok,
        cfg,
    )
}

/// `--format gguf:TYPE`: OUT/model.gguf, calibration-aware when `--calib` is given.
fn run_gguf(a: &Args, ty: &str) -> anyhow::Result<()> {
    use quant::gguf_export::{PRESETS, TypePlan};
    let ty = ty.to_ascii_lowercase();
    if !PRESETS.contains(&ty.as_str()) {
        bail!(
            "--format gguf:{ty}: unknown type (valid: {})",
            PRESETS.join(", ")
        );
    }
    let awq = match a.method.as_str() {
        "rtn" => None,
        "awq" => Some(quant::method::awq::Awq::default()),
        other => bail!("--format gguf:{ty} supports --method rtn or awq, not `{other}`"),
    };
    if awq.is_some() && a.calib.is_none() {
        bail!("--method awq needs --calib FILE");
    }
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    ckpt.check_shapes().context("cannot open model")?;
    check_output(&a.model, &a.out, a.force)?;
    let tok = model::load_tokenizer(&ckpt).context("cannot build the tokenizer")?;
    let cfg = ckpt.config();
    let mut plan = TypePlan::preset(&ty, cfg.num_hidden_layers, cfg.tie_word_embeddings)?;
    for r in a.tensor_type.iter().rev() {
        plan = plan.with_rule(r)?;
    }
    let windows = calibration(a, &tok, ckpt.config())?;
    let awq = awq.filter(|_| !a.no_awq_scale);

    let tmp = temp_sibling(&a.out);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    let file = tmp.join("model.gguf");
    let n = ckpt.expected_tensors().len() as u64;
    let pb = crate::progress_bar(&a.method, n);
    let mut progress = |p: &quant::gguf_export::Progress| pb.set_position(p.index as u64);
    let report = if windows.is_empty() {
        quant::gguf_export::export(&ckpt, &file, &plan, None, &mut progress)
    } else {
        let calib = quant::gguf_calib::GgufCalibration {
            windows: &windows,
            awq: awq.clone(),
            sample_rows: a.sample_rows,
        };
        quant::gguf_calib::export_calibrated(
            &ckpt,
            &file,
            &plan,
            &calib,
            model::default_device(),
            &mut progress,
        )
    }
    .with_context(|| format!("cannot write {}", a.out.join("model.gguf").display()))?;
    pb.finish_and_clear();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    for t in &report.tensors {
        types.insert(t.name.clone(), t.ty.name().to_string());
    }
    let full = json!({
        "teacher": a.model, "format": format!("gguf:{ty}"), "method": a.method,
        "importance": !windows.is_empty(), "awq_scales": awq.is_some(),
        "calibration": a.calib.as_ref().map(|p| json!({"file": p, "samples": windows.len(), "len": a.calib_len, "seed": a.seed})),
        "file_bytes": report.file_bytes, "tensor_bytes": report.tensor_bytes(), "params": report.params(),
        "bits_per_weight": report.bpw(), "seconds": report.seconds,
        "fallbacks": report.fallbacks().map(|t| json!({"tensor": t.name, "planned": t.planned.name(), "written": t.ty.name()})).collect::<Vec<_>>(),
        "tensor_types": types,
    });
    std::fs::write(
        tmp.join("quant_report.json"),
        serde_json::to_string_pretty(&full)?,
    )?;
    commit(&tmp, &a.out)?;
    guard.0 = None;
    let how = match (&awq, windows.is_empty()) {
        (_, true) => "plain rounding".to_string(),
        (None, false) => format!("importance from {} calibration windows", windows.len()),
        (Some(_), false) => format!(
            "AWQ scales and importance from {} calibration windows",
            windows.len()
        ),
    };
    println!("{how}");
    crate::convert::print_export(&report, &plan, &a.out.join("model.gguf"));
    Ok(())
}
