//! `compress prune MODEL --method magnitude|wanda|sparsegpt (--sparsity S | --pattern N:M)`:
//! writes OUT as a dense bf16 HF folder whose pruned weights are exact zeros, and/or the
//! compressed-tensors `sparse-bitmask` form of it, with `prune_report.json`.

use anyhow::{Context, bail};
use comfy_table::Table;
use model::Checkpoint;
use model::safetensors_io::StoreDtype;
use prune::Pattern;
use prune::method::MethodOptions;
use prune::owl::Owl;
use prune::pipeline::PruneOptions;
use quant::pipeline::{DenseSink, OutputSink};
use serde_json::json;

use crate::output::{TempGuard, check_output, commit, temp_sibling};
use crate::pruning::{Args, Format};

/// The pattern the flags ask for, with every option checked before any work starts.
fn pattern(a: &Args) -> anyhow::Result<Pattern> {
    let p = match (a.sparsity, &a.pattern) {
        (Some(_), Some(_)) => bail!("--sparsity and --pattern exclude each other"),
        (None, None) => bail!("give --sparsity S (unstructured) or --pattern N:M"),
        (Some(s), None) => Pattern::unstructured(s)?,
        (None, Some(nm)) => Pattern::parse_nm(nm)?,
    };
    if a.owl && !matches!(p, Pattern::Unstructured { .. }) {
        bail!("--owl applies to unstructured --sparsity only");
    }
    for (set, name) in [
        (a.ratio.is_some(), "--ratio"),
        (a.count.is_some(), "--count"),
        (a.target_params.is_some(), "--target-params"),
    ] {
        if set {
            bail!("{name} applies to --structured only");
        }
    }
    Ok(p)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let run = crate::manifest::Run::start("prune")
        .input("teacher", Some(&a.model))
        .input("calibration", a.calib.as_deref())
        .seed(a.seed);
    let Some(method_kind) = a.method else {
        bail!("give --method magnitude|wanda|sparsegpt, or --structured heads|channels|layers");
    };
    let pattern = pattern(&a)?;
    if a.damp.is_some() && method_kind != prune::method::Method::Sparsegpt {
        bail!("--damp applies to --method sparsegpt only");
    }
    if a.nm_select.is_some()
        && !(method_kind == prune::method::Method::Sparsegpt
            && matches!(pattern, Pattern::NofM { .. }))
    {
        bail!("--nm-select applies to --method sparsegpt with --pattern N:M only");
    }
    let nm_select = a.nm_select.unwrap_or_default();
    let damp = a.damp.unwrap_or(0.01);
    if !(damp.is_finite() && damp > 0.0 && damp <= 1.0) {
        bail!("--damp {damp} must be in (0, 1]");
    }
    let owl = a.owl.then(|| Owl::new(a.owl_lambda, a.owl_m)).transpose()?;
    if !a.owl && (a.owl_lambda != 0.08 || a.owl_m != 5.0) {
        bail!("--owl-lambda and --owl-m apply with --owl only");
    }
    let prunable = |f: &Format| matches!(f, Format::Dense | Format::Sparse);
    crate::formats::check(&a.format, prunable, "prune", "dense, sparse")?;
    let method = method_kind.build(&MethodOptions {
        damp,
        nm_select,
        ..MethodOptions::default()
    });
    if (method.needs_calibration() || owl.is_some()) && a.calib.is_none() {
        bail!(
            "--method {} needs --calib FILE",
            if owl.is_some() {
                "with --owl"
            } else {
                method.name()
            }
        );
    }
    if a.true_sequential && !method.needs_calibration() {
        bail!("--true-sequential applies to calibrated methods (wanda, sparsegpt) only");
    }
    let refit = a.refit.unwrap_or_else(|| method.default_refit());
    if refit > 0 && a.calib.is_none() {
        bail!("--refit needs --calib FILE (it fits the weights to calibration inputs)");
    }
    if refit > 10_000 {
        bail!(
            "--refit {refit} is beyond any use (conjugate gradients converge in at most the input width; try 20-100)"
        );
    }
    if !method.needs_calibration() && owl.is_none() && refit == 0 && a.calib.is_some() {
        bail!("--calib does not apply to --method magnitude without --refit (it is data-free)");
    }
    if crate::checks_done() {
        return Ok(());
    }
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    ckpt.check_shapes().context("cannot open model")?;
    check_output(&a.model, &a.out, a.force)?;
    let tok = model::load_tokenizer(&ckpt).context("cannot build the tokenizer")?;
    for (name, shape) in model::checkpoint::block_tensors(ckpt.config(), 0) {
        if name.ends_with("proj.weight") {
            pattern.check_width(&name, shape[1])?;
        }
    }
    let calib = crate::calib::windows(
        a.calib.as_deref(),
        a.calib_samples,
        a.calib_len,
        a.seed,
        &tok,
        ckpt.config(),
    )?;
    if let Some(d) = &a.dump_calib {
        crate::calib::dump(&calib, d, &a.model, a.force)?;
    }

    let tmp = temp_sibling(&a.out);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    let dense = a.format.contains(&Format::Dense);
    let sparse = a.format.contains(&Format::Sparse);
    // The dense model is always written first; alone, the sparse form replaces it.
    let dense_dir = if dense {
        tmp.clone()
    } else {
        tmp.join(".dense")
    };
    std::fs::create_dir_all(&dense_dir)?;
    let cfg = crate::hf_folder::write_config(&ckpt, StoreDtype::from(a.dtype), &dense_dir, None)?;
    crate::hf_folder::write_aux(&ckpt, &tok, &cfg, &dense_dir)?;
    let sinks: Vec<Box<dyn OutputSink>> = vec![Box::new(DenseSink::create(
        &dense_dir.join("model.safetensors"),
        &cfg,
        StoreDtype::from(a.dtype),
    )?)];

    let block_sparsity = match (&owl, pattern) {
        (Some(o), Pattern::Unstructured { sparsity }) => {
            let pb = crate::progress_bar("owl", cfg.num_hidden_layers as u64);
            let ratios =
                prune::owl::outlier_ratios(&ckpt, &calib, o, model::default_device(), |d, _| {
                    pb.set_position(d as u64)
                })?;
            pb.finish_and_clear();
            Some(o.sparsities(&ratios, sparsity))
        }
        _ => None,
    };
    let popts = PruneOptions {
        pattern,
        calib,
        block_sparsity,
        sample_rows: a.sample_rows,
        true_sequential: a.true_sequential,
        refit,
    };
    let report = crate::drive_sinks(method.name(), cfg.num_hidden_layers, sinks, |sinks, p| {
        prune::pipeline::prune(
            &ckpt,
            method.as_ref(),
            &popts,
            model::default_device(),
            sinks,
            p,
        )
    })?;
    let size = |p: std::path::PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let dense_bytes = size(dense_dir.join("model.safetensors"));
    let sparse_report = if sparse {
        let dir = if dense {
            tmp.join("sparse")
        } else {
            tmp.clone()
        };
        let structure = match pattern {
            Pattern::Unstructured { .. } => "unstructured".to_string(),
            Pattern::NofM { n, m } => format!("{n}:{m}"),
        };
        let r = prune::sparse::write_sparse_bitmask(&dense_dir, &dir, &structure)?;
        if !dense {
            std::fs::remove_dir_all(&dense_dir)?;
        }
        Some(r)
    } else {
        None
    };
    let full = json!({
        "teacher": a.model, "method": method_kind, "pattern": pattern,
        "options": {"damp": (method_kind == prune::method::Method::Sparsegpt).then_some(damp), "nm_select": (method_kind == prune::method::Method::Sparsegpt && matches!(pattern, Pattern::NofM { .. })).then_some(nm_select), "owl": owl, "sample_rows": a.sample_rows, "dtype": a.dtype, "true_sequential": a.true_sequential, "refit": refit},
        "calibration": a.calib.as_ref().map(|p| json!({"file": p, "samples": a.calib_samples, "len": a.calib_len, "seed": a.seed})),
        "teacher_bytes": ckpt.bytes_on_disk(), "params": cfg.num_params(),
        "dense_bytes": dense.then_some(dense_bytes), "sparse": sparse_report, "report": report,
    });
    std::fs::write(
        tmp.join("prune_report.json"),
        serde_json::to_string_pretty(&full)?,
    )?;
    run.write(&tmp, json!({"report": "prune_report.json"}))?;
    commit(&tmp, &a.out)?;
    guard.0 = None;
    print_summary(
        &report,
        &a,
        dense.then_some(dense_bytes),
        sparse_report.as_ref(),
    );
    Ok(())
}

fn print_summary(
    r: &prune::pipeline::PruneReport,
    a: &Args,
    dense_bytes: Option<u64>,
    sparse: Option<&prune::sparse::SparseReport>,
) {
    let mean = |f: &dyn Fn(&prune::pipeline::LinearReport) -> Option<f64>| {
        let v: Vec<f64> = r.linears.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let (lo, hi) = r.linears.iter().fold((1f64, 0f64), |(lo, hi), l| {
        (lo.min(l.sparsity), hi.max(l.sparsity))
    });
    let mut t = Table::new();
    t.set_header(vec![
        "method",
        "pattern",
        "linear sparsity",
        "per-linear range",
        "mean weight err",
        "mean output err",
        "seconds",
    ]);
    t.add_row(vec![
        r.method.clone(),
        r.pattern.label(),
        format!(
            "{:.4}",
            r.linear_zeros as f64 / r.linear_params.max(1) as f64
        ),
        format!("{lo:.4}-{hi:.4}"),
        format!(
            "{:.4}",
            mean(&|l| Some(l.weight_rel_error)).unwrap_or(f64::NAN)
        ),
        mean(&|l| l.output_rel_error).map_or("- (no calibration)".into(), |v| format!("{v:.4}")),
        format!("{:.1}", r.wall_seconds),
    ]);
    println!("{t}");
    if let Some(b) = dense_bytes {
        println!(
            "wrote {} (dense with exact zeros, {} bytes) and prune_report.json",
            a.out.display(),
            crate::grouped(b)
        );
    }
    if let Some(s) = sparse {
        let dir = if dense_bytes.is_some() {
            a.out.join("sparse")
        } else {
            a.out.clone()
        };
        println!(
            "wrote {} (compressed-tensors sparse-bitmask, {} bytes, {:.1}% of dense)",
            dir.display(),
            crate::grouped(s.sparse_bytes),
            100.0 * s.sparse_bytes as f64 / s.dense_bytes.max(1) as f64
        );
    }
}
