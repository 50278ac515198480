//! `compress prune MODEL --structured heads|channels|layers (--ratio R | --count N |
//! --target-params P) [--importance activation|magnitude] [--calib FILE] --out DIR`: whole
//! KV groups, MLP channels or decoder layers removed (`prune::structured`), written as a
//! smaller bf16 HF folder whose config matches its tensors, with `prune_report.json`.

use std::time::Instant;

use anyhow::{Context, bail};
use model::Checkpoint;
use model::safetensors_io::StoreDtype;
use prune::structured::{self as st, Amount, ImportanceKind, Plan, Scores};
use serde_json::json;

use crate::output::{TempGuard, check_output, commit, temp_sibling};
use crate::pruning::{Args, Importance, Unit};

/// The library's unit for the command line's.
fn unit_of(u: Unit) -> st::Unit {
    match u {
        Unit::Heads => st::Unit::Heads,
        Unit::Channels => st::Unit::Channels,
        Unit::Layers => st::Unit::Layers,
    }
}

/// Exactly one of --ratio, --count, --target-params.
fn amount(a: &Args) -> anyhow::Result<Amount> {
    let given = [
        a.ratio.is_some(),
        a.count.is_some(),
        a.target_params.is_some(),
    ];
    match given.iter().filter(|&&g| g).count() {
        0 => bail!("--structured needs one of --ratio R, --count N or --target-params P"),
        1 => {}
        _ => bail!("give only one of --ratio, --count and --target-params"),
    }
    Ok(match (a.ratio, a.count, &a.target_params) {
        (Some(r), _, _) => Amount::Ratio(r),
        (_, Some(n), _) => Amount::Count(n),
        (_, _, Some(p)) => Amount::TargetParams(crate::pruning::parse_params(p)?),
        _ => unreachable!("one was given"),
    })
}

/// Calibration windows drawn from --calib (and saved to --dump-calib when asked).
fn calibration(
    a: &Args,
    tok: &model::Tokenizer,
    cfg: &model::Config,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let windows = crate::calib::windows(
        a.calib.as_deref(),
        a.calib_samples,
        a.calib_len,
        a.seed,
        tok,
        cfg,
    )?;
    if let Some(dump) = &a.dump_calib {
        crate::calib::dump(&windows, dump, &a.model, a.force)?;
    }
    Ok(windows)
}

pub fn run(a: &Args, unit: Unit) -> anyhow::Result<()> {
    let run = crate::manifest::Run::start("prune")
        .input("teacher", Some(&a.model))
        .input("calibration", a.calib.as_deref())
        .seed(a.seed);
    let start = Instant::now();
    let unit = unit_of(unit);
    let amount = amount(a)?;
    let importance = match a.importance {
        Importance::Activation => ImportanceKind::Activation,
        Importance::Magnitude => ImportanceKind::Magnitude,
    };
    if importance == ImportanceKind::Magnitude && unit == st::Unit::Layers {
        bail!(st::importance::MAGNITUDE_LAYERS);
    }
    if importance == ImportanceKind::Activation && a.calib.is_none() {
        bail!("--importance activation needs --calib FILE (or use --importance magnitude)");
    }
    if importance == ImportanceKind::Magnitude && a.calib.is_some() {
        bail!("--calib does not apply to --importance magnitude (it is data-free)");
    }
    if crate::checks_done() {
        return Ok(());
    }
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    ckpt.check_shapes().context("cannot open model")?;
    check_output(&a.model, &a.out, a.force)?;
    let teacher = ckpt.config().clone();
    // Every range and budget check happens here, before tokenizing or running anything.
    let removed = st::resolve_removal(&teacher, unit, amount)?;
    let tok = model::load_tokenizer(&ckpt).context("cannot build the tokenizer")?;
    let windows = match importance {
        ImportanceKind::Activation => calibration(a, &tok, &teacher)?,
        ImportanceKind::Magnitude => Vec::new(),
    };

    let pb = crate::progress_bar("importance", teacher.num_hidden_layers as u64);
    let scores = match importance {
        ImportanceKind::Activation => {
            st::activation_scores(&ckpt, unit, &windows, model::default_device(), |l| {
                pb.set_position(l as u64)
            })?
        }
        ImportanceKind::Magnitude => {
            st::magnitude_scores(&ckpt, unit, |l| pb.set_position(l as u64))?
        }
    };
    pb.finish_and_clear();
    let plan = st::select(&teacher, unit, removed, &scores)?;

    let tmp = temp_sibling(&a.out);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    let cfg =
        crate::hf_folder::write_config_for(&plan.config, StoreDtype::from(a.dtype), &tmp, None)?;
    let n = model::checkpoint::expected_tensors(&cfg).len() as u64;
    let pb = crate::progress_bar("write", n);
    st::write_weights(
        &ckpt,
        &plan,
        &tmp.join("model.safetensors"),
        StoreDtype::from(a.dtype),
        |i| pb.set_position(i as u64),
    )?;
    pb.finish_and_clear();
    crate::hf_folder::write_aux(&ckpt, &tok, &cfg, &tmp)?;
    let out_bytes = std::fs::metadata(tmp.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    let seconds = start.elapsed().as_secs_f64();
    let report = report(
        a,
        &ckpt,
        &plan,
        &scores,
        amount,
        windows.len(),
        out_bytes,
        seconds,
    );
    std::fs::write(
        tmp.join("prune_report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    run.write(&tmp, json!({"report": "prune_report.json"}))?;
    commit(&tmp, &a.out)?;
    guard.0 = None;
    println!("{}", summary(&teacher, &plan, out_bytes, a, seconds));
    Ok(())
}

/// `prune_report.json`: what was asked, what was removed and why, and what it saved.
#[allow(clippy::too_many_arguments)]
fn report(
    a: &Args,
    ckpt: &Checkpoint,
    plan: &Plan,
    scores: &Scores,
    amount: Amount,
    windows: usize,
    out_bytes: u64,
    seconds: f64,
) -> serde_json::Value {
    let (before, after) = (ckpt.config().num_params(), plan.config.num_params());
    let removed = match plan.unit {
        st::Unit::Layers => json!({ "layers": plan.removed_units[0] }),
        _ => json!({ "per_layer": plan.removed_units }),
    };
    json!({
        "teacher": a.model,
        "structured": plan.unit,
        "importance": a.importance,
        "options": {
            "amount": amount,
            "dtype": a.dtype,
            "removed_per_layer": (plan.unit != st::Unit::Layers).then_some(plan.removed),
            "removed_layers": (plan.unit == st::Unit::Layers).then_some(plan.removed),
            "calibration": a.calib.as_ref().map(|p| json!({
                "file": p, "samples": windows, "len": a.calib_len, "seed": a.seed,
            })),
        },
        "config": {
            "num_hidden_layers": plan.config.num_hidden_layers,
            "num_attention_heads": plan.config.num_attention_heads,
            "num_key_value_heads": plan.config.num_kv_heads(),
            "head_dim": plan.config.head_dim(),
            "intermediate_size": plan.config.intermediate_size,
        },
        "removed": removed,
        "scores": scores.0,
        "params_before": before,
        "params_after": after,
        "teacher_file_bytes": ckpt.bytes_on_disk(),
        "bf16_bytes_before": before * 2,
        "bytes_after": out_bytes,
        "seconds": seconds,
    })
}

/// The one-line summary printed at the end.
fn summary(teacher: &model::Config, plan: &Plan, out_bytes: u64, a: &Args, seconds: f64) -> String {
    let what = match plan.unit {
        st::Unit::Heads => format!(
            "{} of {} KV groups ({} of {} query heads) per layer",
            plan.removed,
            teacher.num_kv_heads(),
            teacher.num_attention_heads - plan.config.num_attention_heads,
            teacher.num_attention_heads
        ),
        st::Unit::Channels => format!(
            "{} of {} MLP channels per layer (intermediate {})",
            plan.removed, teacher.intermediate_size, plan.config.intermediate_size
        ),
        st::Unit::Layers => format!(
            "{} of {} layers {:?}",
            plan.removed, teacher.num_hidden_layers, plan.removed_units[0]
        ),
    };
    let (before, after) = (teacher.num_params(), plan.config.num_params());
    format!(
        "pruned {what}: params {} -> {} ({:.1}%), bf16 bytes {} -> {}; wrote {} in {seconds:.1} s",
        crate::grouped(before),
        crate::grouped(after),
        100.0 * after as f64 / before as f64,
        crate::grouped(before * 2),
        crate::grouped(out_bytes),
        a.out.display()
    )
}
