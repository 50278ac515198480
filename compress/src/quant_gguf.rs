//! `compress quant --format gguf:TYPE`: a GGUF file that llama.cpp runs, from plain,
//! importance-weighted or AWQ-scaled rounding, or GPTQ into each linear's block type; and
//! `gguf:auto`'s budgeted plan ([`crate::quant_auto`]).

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use model::Checkpoint;
use quant::method::MethodKind;
use quant::pipeline::PtqOptions;
use quant::scheme::QuantScheme;
use serde_json::json;

use crate::output::{TempGuard, check_output, commit, temp_sibling};
use crate::quantize::{
    Args, Propagate, calibration, check_dump_calib, gptq_options, method_options, out_is_file,
    print_sizes, run_ptq,
};

pub(crate) fn run_gguf(a: &Args, ty: &str, run: crate::manifest::Run) -> anyhow::Result<()> {
    use quant::gguf_export::{PRESETS, TypePlan};
    // `Format` parsed the type: one of PRESETS or `auto`, lower case.
    debug_assert!(PRESETS.contains(&ty) || ty == crate::formats::AUTO);
    let awq = (a.method == MethodKind::Awq)
        .then(|| quant::method::awq::Awq::from_options(&method_options(a)));
    let gptq = a.method == MethodKind::Gptq;
    a.method.check_options(&method_options(a))?;
    if a.method != MethodKind::Rtn && a.calib.is_none() {
        bail!("--method {} needs --calib FILE", a.method.name());
    }
    if gptq && a.act_order && !a.static_groups {
        bail!(
            "--act-order with --format gguf:{ty} needs --static-groups (a GGUF block is 32 consecutive input columns)"
        );
    }
    if !gptq && a.propagate.is_some() {
        bail!(
            "--propagate applies to --method gptq with --format gguf:TYPE (rtn and awq round with the teacher's inputs)"
        );
    }
    check_dump_calib(a)?;
    if crate::checks_done() {
        return Ok(());
    }
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    ckpt.check_shapes().context("cannot open model")?;
    check_output(&a.model, &a.out, a.force)?;
    // An OUT ending in .gguf is the file itself (as `convert`), its report next to it.
    let as_file = out_is_file(&a.out);
    let (gguf_out, report_out) = if as_file {
        let r = a.out.with_extension("quant_report.json");
        crate::output::check_output_file(&r, "the report", &[&a.model], a.force)?;
        (a.out.clone(), r)
    } else {
        (a.out.join("model.gguf"), a.out.join("quant_report.json"))
    };
    let tok = model::tokenizer::load_checked(&ckpt).context("cannot build the tokenizer")?;
    let cfg = ckpt.config();
    // A preset's plan (and GPTQ's check of its types) comes before reading the calibration
    // text; gguf:auto's is measured on it.
    let gptq_check = |plan: &TypePlan| {
        if gptq {
            quant::gguf_grid::check_plan(plan, cfg)
                .map_err(|e| anyhow::anyhow!("--method gptq --format gguf:{ty}: {e}"))?;
        }
        anyhow::Ok(())
    };
    let preset = if ty == crate::formats::AUTO {
        None
    } else {
        let mut plan = TypePlan::for_model(ty, cfg, cfg.tie_word_embeddings)?;
        for r in a.tensor_type.iter().rev() {
            plan = plan.with_rule(r)?;
        }
        gptq_check(&plan)?;
        Some(plan)
    };
    let windows = calibration(a, &tok, ckpt.config())?;
    let (plan, auto) = match preset {
        Some(plan) => (plan, serde_json::Value::Null),
        None => {
            let (plan, report) = crate::quant_auto::plan(a, &ckpt, &windows)?;
            gptq_check(&plan)?;
            (plan, report)
        }
    };
    let awq = awq.filter(|_| !a.no_awq_scale);

    let tmp = temp_sibling(&a.out);
    let file = if as_file {
        tmp.clone()
    } else {
        std::fs::create_dir_all(&tmp).with_context(|| format!("{}", tmp.display()))?;
        tmp.join("model.gguf")
    };
    let mut guard = TempGuard(Some(tmp.clone()));
    let n = ckpt.expected_tensors().len() as u64;
    let pb = crate::progress_bar(if gptq { "gguf" } else { a.method.name() }, n);
    let mut progress = |p: &quant::gguf_export::Progress| pb.set_position(p.index as u64);
    let written = |r: Result<_, quant::gguf_export::ExportError>| {
        r.map(|r| (r, serde_json::Value::Null))
            .with_context(|| format!("cannot write {}", gguf_out.display()))
    };
    let (report, gptq_summary) = match gptq {
        true => gptq_gguf(a, &ckpt, &file, &plan, &windows, &mut progress)
            .with_context(|| format!("cannot write {}", gguf_out.display()))?,
        false if windows.is_empty() => written(quant::gguf_export::export(
            &ckpt,
            &file,
            &plan,
            None,
            &mut progress,
        ))?,
        false => {
            let calib = quant::gguf_calib::GgufCalibration {
                windows: &windows,
                awq: awq.clone(),
                sample_rows: a.sample_rows,
            };
            written(quant::gguf_calib::export_calibrated(
                &ckpt,
                &file,
                &plan,
                &calib,
                model::default_device(),
                &mut progress,
            ))?
        }
    };
    pb.finish_and_clear();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    for t in &report.tensors {
        types.insert(t.name.clone(), t.ty.name().to_string());
    }
    let full = json!({
        "teacher": a.model, "format": format!("gguf:{ty}"), "method": a.method,
        "importance": !gptq && !windows.is_empty(), "awq_scales": awq.is_some(), "gptq": gptq_summary,
        "gptq_options": gptq_options(a), "awq_options": crate::quantize::awq_options(a), "auto": auto,
        "calibration": a.calib.as_ref().map(|p| json!({"file": p, "samples": windows.len(), "len": a.calib_len, "seed": a.seed})),
        "file_bytes": report.file_bytes, "tensor_bytes": report.tensor_bytes(), "params": report.params(),
        "bits_per_weight": report.bpw(), "seconds": report.seconds,
        "fallbacks": report.fallbacks().map(|t| json!({"tensor": t.name, "planned": t.planned.name(), "written": t.ty.name()})).collect::<Vec<_>>(),
        "tensor_types": types,
    });
    let metrics = json!({"bits_per_weight": report.bpw(), "file_bytes": report.file_bytes});
    let mut full = full;
    if as_file {
        full["manifest"] = run.to_json(metrics)?;
        commit(&tmp, &a.out)?;
        guard.0 = None;
        crate::output::write_atomic(&report_out, serde_json::to_string_pretty(&full)?.as_bytes())?;
    } else {
        run.write(&tmp, metrics)?;
        std::fs::write(
            tmp.join("quant_report.json"),
            serde_json::to_string_pretty(&full)?,
        )?;
        commit(&tmp, &a.out)?;
        guard.0 = None;
    }
    let how = match (&awq, windows.is_empty()) {
        _ if gptq => format!(
            "GPTQ into each linear's block type from {} calibration windows",
            windows.len(),
        ),
        (_, true) => "plain rounding".to_string(),
        (None, false) => format!("importance from {} calibration windows", windows.len()),
        (Some(_), false) => format!(
            "AWQ scales and importance from {} calibration windows",
            windows.len()
        ),
    };
    println!("{how}");
    crate::convert::print_export(&report, &plan, &gguf_out);
    println!("report: {}", report_out.display());
    let input = ckpt.bytes_on_disk();
    print_sizes(input, &[(report.file_bytes, &format!("gguf:{ty}"))]);
    larger_than_input(&ckpt, &report, &ty, input);
    if let Some(n) = &a.default_note {
        println!("note: {n}");
    }
    Ok(())
}

/// `--method gptq --format gguf:TYPE`: GPTQ into the block type `plan` gives each linear
/// ([`quant::gguf_grid`]); the PTQ summary for the report.
fn gptq_gguf(
    a: &Args,
    ckpt: &Checkpoint,
    file: &std::path::Path,
    plan: &quant::gguf_export::TypePlan,
    windows: &[Vec<u32>],
    progress: &mut dyn FnMut(&quant::gguf_export::Progress),
) -> anyhow::Result<(quant::gguf_export::ExportReport, serde_json::Value)> {
    let method = a.method.build(&quant::method::MethodOptions {
        gguf: Some(plan.clone()),
        ..method_options(a)
    })?;
    // The scheme is not used (each type decides its grid); the report names the plan.
    let opts = PtqOptions {
        scheme: QuantScheme::new(4, Some(32), true)?,
        calib: windows.to_vec(),
        propagate_quantized: a.propagate.map(|p| p == Propagate::Quantized),
        sample_rows: a.sample_rows,
    };
    let (sink, store) = quant::gguf_grid::GridSink::new(plan.clone());
    let ptq = run_ptq(ckpt, method.as_ref(), &opts, vec![Box::new(sink)], "gptq")?;
    let store = std::mem::take(&mut *store.lock().expect("not poisoned"));
    let report = quant::gguf_grid::export_grid(ckpt, file, plan, store, progress)?;
    Ok((report, json!({"plan": plan.name, "ptq": ptq})))
}

/// Tensor bytes of `ckpt` written with `plan` (fallbacks included), without writing them.
fn planned_tensor_bytes(ckpt: &Checkpoint, plan: &quant::gguf_export::TypePlan) -> Option<u64> {
    let mut total = 0u64;
    for (hf, shape) in ckpt.expected_tensors() {
        let g = quant::gguf_export::hf_to_gguf_name(&hf)?;
        let (blk, bytes) = plan.type_for(&g, &shape).block_layout()?;
        let n: usize = shape.iter().product();
        total += (n / blk * bytes) as u64;
    }
    Some(total)
}

/// When a GGUF output came out more than 1% larger than its input (K-quants falling back on
/// rows that are not multiples of 256), says so on stdout and names the best-quality preset
/// that would be at least 1% smaller than the input, with its estimated size.
pub(crate) fn larger_than_input(
    ckpt: &Checkpoint,
    report: &quant::gguf_export::ExportReport,
    ty: &str,
    input: u64,
) {
    use quant::gguf_export::{PRESETS, TypePlan};
    // A re-encode to the input's own type differs by a few metadata bytes: not worth a note.
    if report.file_bytes as f64 <= 1.01 * input as f64 {
        return;
    }
    let cfg = ckpt.config();
    let overhead = report.file_bytes.saturating_sub(report.tensor_bytes());
    let smaller = PRESETS
        .iter()
        .filter(|p| !["f32", "f16", "bf16"].contains(p))
        .filter_map(|p| {
            let plan = TypePlan::for_model(p, cfg, cfg.tie_word_embeddings).ok()?;
            Some((overhead + planned_tensor_bytes(ckpt, &plan)?, *p))
        })
        .filter(|(b, _)| (*b as f64) < 0.99 * input as f64)
        .max();
    let fell = report.fallbacks().count();
    let why = if fell > 0 {
        format!(
            ": {fell} tensors fell back to wider types (their rows are not a multiple of the type's block)"
        )
    } else {
        String::new()
    };
    let hint = match smaller {
        Some((b, p)) => format!(
            "; gguf:{p} would be smaller, about {} bytes",
            crate::grouped(b)
        ),
        None => "; no GGUF preset would be smaller".into(),
    };
    println!(
        "note: the gguf:{ty} output is {:.1}% larger than the input ({} vs {} bytes){why}{hint}",
        100.0 * (report.file_bytes as f64 / input as f64 - 1.0),
        crate::grouped(report.file_bytes),
        crate::grouped(input)
    );
}
