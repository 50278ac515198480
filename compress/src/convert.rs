//! `compress convert MODEL OUT_DIR`: any readable model to an HF folder that transformers
//! loads as `LlamaForCausalLM` / `Qwen2ForCausalLM`. Tensors stream one at a time, so the
//! whole model is never in memory; the folder appears only when complete.
//!
//! `compress convert MODEL OUT.gguf --type TYPE`: a GGUF file for llama.cpp, quantized with
//! the block quantizers of `quant` (presets documented on `quant::gguf_export::TypePlan`),
//! written to a temporary name and renamed when complete.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use model::Checkpoint;
use model::safetensors_io::{StoreDtype, StreamingWriter};

use crate::output::{TempGuard, check_output, commit, temp_sibling};

/// Arguments of `convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF folder or a .gguf file.
    model: crate::Path,
    /// The HF folder to write, or a GGUF file when it ends in .gguf (see --type).
    out: crate::Path,
    /// HF output only: storage type of the weights.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: crate::hf_folder::Dtype,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
    /// GGUF output only: the type preset (q8_0, q4_0, q4_1, q5_0, q5_1, q3_k, q4_k, q5_k,
    /// q6_k, q3_k_m, q4_k_m, q5_k_m, iq4_nl, f16, f32, bf16).
    #[arg(long = "type", default_value = "q8_0")]
    gguf_type: String,
    /// GGUF output only: override tensor types, PATTERN=TYPE (e.g. ffn_down=q6_k,
    /// `blk.*.attn_v.weight=q8_0`); repeatable, the first matching rule wins.
    #[arg(long = "tensor-type", value_name = "PATTERN=TYPE")]
    tensor_type: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.out.extension().is_some_and(|e| e == "gguf") {
        return run_gguf(a);
    }
    if crate::checks_done() {
        return Ok(());
    }
    let run = crate::manifest::Run::start("convert").input("model", Some(&a.model));
    let dtype = StoreDtype::from(a.dtype);
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    ckpt.check_shapes().context("cannot open model")?;
    check_output(&a.model, &a.out, a.force)?;
    let tok = model::tokenizer::load_checked(&ckpt).context("cannot build the tokenizer")?;

    let tmp = temp_sibling(&a.out);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut guard = TempGuard(Some(tmp.clone()));

    let cfg = crate::hf_folder::write_config(&ckpt, dtype, &tmp, None)?;

    let plan: Vec<(String, Vec<usize>, StoreDtype)> = ckpt
        .expected_tensors()
        .into_iter()
        .map(|(n, s)| (n, s, dtype))
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let st_path = tmp.join("model.safetensors");
    let pb = crate::progress_bar("convert", plan.len() as u64);
    let mut w = StreamingWriter::create(&st_path, plan.clone(), &meta)?;
    for (name, shape, _) in &plan {
        let data = ckpt.read(name, shape)?;
        w.write_next(name, &data)?;
        pb.inc(1);
    }
    w.finish()?;
    pb.finish_and_clear();

    crate::hf_folder::write_aux(&ckpt, &tok, &cfg, &tmp)?;
    run.write(&tmp, serde_json::json!({}))?;
    commit(&tmp, &a.out)?;
    guard.0 = None;
    let bytes = std::fs::metadata(a.out.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "wrote {} ({} tensors, {} bytes of {} weights)",
        a.out.display(),
        plan.len(),
        crate::grouped(bytes),
        dtype.torch_name()
    );
    Ok(())
}

/// `convert MODEL OUT.gguf --type TYPE`.
fn run_gguf(a: Args) -> anyhow::Result<()> {
    use quant::gguf_export::{PRESETS, TypePlan, export};
    if !PRESETS.contains(&a.gguf_type.to_ascii_lowercase().as_str()) {
        bail!(
            "--type `{}` is not one of {}",
            a.gguf_type,
            PRESETS.join(", ")
        );
    }
    if crate::checks_done() {
        return Ok(());
    }
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    ckpt.check_shapes().context("cannot open model")?;
    check_output(&a.model, &a.out, a.force)?;
    model::tokenizer::check_fits(&ckpt).context("cannot write the tokenizer")?;
    let cfg = ckpt.config();
    let mut plan = TypePlan::for_model(&a.gguf_type, cfg, cfg.tie_word_embeddings)?;
    for r in a.tensor_type.iter().rev() {
        plan = plan.with_rule(r)?;
    }
    let tmp = temp_sibling(&a.out);
    let mut guard = TempGuard(Some(tmp.clone()));
    let n = ckpt.expected_tensors().len() as u64;
    let pb = crate::progress_bar("convert", n);
    let report = export(&ckpt, &tmp, &plan, None, &mut |p| {
        pb.set_position(p.index as u64)
    })
    .with_context(|| format!("cannot write {}", a.out.display()))?;
    pb.finish_and_clear();
    commit(&tmp, &a.out)?;
    guard.0 = None;
    print_export(&report, &plan, &a.out);
    crate::quant_gguf::larger_than_input(&ckpt, &report, &plan.name, ckpt.bytes_on_disk());
    Ok(())
}

/// Prints an export's warnings, its fallbacks grouped by tensor kind, and a summary line.
pub fn print_export(
    report: &quant::gguf_export::ExportReport,
    plan: &quant::gguf_export::TypePlan,
    out: &std::path::Path,
) {
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    // Fallbacks grouped by (planned -> written, tensor kind): `blk.*.attn_q.weight x30`.
    let mut groups: BTreeMap<(String, String), usize> = BTreeMap::new();
    for t in report.fallbacks() {
        let kind = match t.name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((_, rest)) => format!("blk.*.{rest}"),
            None => t.name.clone(),
        };
        *groups
            .entry((format!("{}->{}", t.planned.name(), t.ty.name()), kind))
            .or_default() += 1;
    }
    if !groups.is_empty() {
        let list: Vec<String> = groups
            .iter()
            .map(|((change, kind), n)| format!("{kind} x{n} {change}"))
            .collect();
        eprintln!(
            "note: {} tensors have rows that are not a multiple of their planned type's block and fell back: {}",
            report.fallbacks().count(),
            list.join(", ")
        );
    }
    let types: Vec<String> = report
        .type_counts()
        .iter()
        .map(|(t, c)| format!("{t} {c}"))
        .collect();
    println!(
        "wrote {} ({}, {} tensors: {}; {} bytes, {:.3} bpw, {:.2} s)",
        out.display(),
        plan.name,
        report.tensors.len(),
        types.join(", "),
        crate::grouped(report.file_bytes),
        report.bpw(),
        report.seconds
    );
}
