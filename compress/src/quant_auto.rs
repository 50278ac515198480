//! `quant --format gguf:auto --target-bpw X | --target-bytes N`: each decoder linear's GGUF
//! type chosen under the size budget from its measured sensitivity ([`quant::gguf_auto`]);
//! the plan is then written as any preset is (importance rounding, AWQ or GPTQ).

use anyhow::{Context, bail};
use model::Checkpoint;
use quant::block::LINEARS;
use quant::gguf_auto::{allocate, auto_plan, measure, smallest_bytes};
use quant::gguf_export::{TypePlan, hf_to_gguf_name};
use serde_json::{Value, json};

use crate::formats::AUTO;
use crate::quantize::Args;

/// Checks the budget options before any work: exactly one of them with `gguf:auto` (which
/// also needs `--calib` and takes no `--tensor-type`), neither without it, and in range.
pub(crate) fn check(a: &Args) -> anyhow::Result<()> {
    let auto = crate::formats::gguf(&a.format) == Some(AUTO);
    let flag = if a.target_bpw.is_some() {
        "--target-bpw"
    } else {
        "--target-bytes"
    };
    let set = a.target_bpw.is_some() || a.target_bytes.is_some();
    if !auto {
        if set {
            bail!("{flag} applies to --format gguf:auto only");
        }
        return Ok(());
    }
    if !set {
        bail!("--format gguf:auto needs a size budget: --target-bpw BITS or --target-bytes N");
    }
    if let Some(b) = a.target_bpw
        && !(b.is_finite() && (1.0..=32.0).contains(&b))
    {
        bail!("--target-bpw {b} must be in [1, 32]");
    }
    if a.target_bytes == Some(0) {
        bail!("--target-bytes 0 must be positive");
    }
    if a.calib.is_none() {
        bail!(
            "--format gguf:auto needs --calib FILE (each tensor's sensitivity is measured on it)"
        );
    }
    if !a.tensor_type.is_empty() {
        bail!(
            "--tensor-type does not apply to --format gguf:auto (the allocator chooses every type)"
        );
    }
    Ok(())
}

/// Measures the linears' sensitivities on `windows`, allocates the budget and returns the
/// plan with its report entry (the budget, the bytes outside the linears, each linear's
/// type, bytes and predicted cost).
pub(crate) fn plan(
    a: &Args,
    ckpt: &Checkpoint,
    windows: &[Vec<u32>],
) -> anyhow::Result<(TypePlan, Value)> {
    let cfg = ckpt.config();
    let base = TypePlan::for_model("q4_k_m", cfg, cfg.tie_word_embeddings)?;
    // The budget, and whether it can hold the smallest choice, before the measurement.
    let (mut fixed, mut params, mut least) = (0u64, 0u64, 0u64);
    for (hf, shape) in ckpt.expected_tensors() {
        let n: usize = shape.iter().product();
        params += n as u64;
        let g = hf_to_gguf_name(&hf).with_context(|| format!("no GGUF name for `{hf}`"))?;
        let linear = hf.starts_with("model.layers.")
            && LINEARS
                .iter()
                .any(|(l, _)| hf.ends_with(&format!("{l}.weight")));
        if linear {
            least = least.saturating_add(smallest_bytes(shape[0], shape[1]));
            continue;
        }
        let (blk, bytes) = base
            .type_for(&g, &shape)
            .block_layout()
            .with_context(|| format!("no block layout for {g}"))?;
        fixed += (n / blk * bytes) as u64;
    }
    let (what, target) = match (a.target_bpw, a.target_bytes) {
        (Some(b), _) => (
            format!("--target-bpw {b}"),
            (b * params as f64 / 8.0).floor() as u64,
        ),
        (None, Some(n)) => (format!("--target-bytes {n}"), n),
        (None, None) => bail!("--format gguf:auto needs --target-bpw or --target-bytes"),
    };
    if target < fixed.saturating_add(least) {
        bail!(
            "{what}: {target} bytes do not even hold the smallest choice, {} bytes ({fixed} for the embeddings, output and norms)",
            fixed.saturating_add(least)
        );
    }
    let budget = target - fixed;
    let pb = crate::progress_bar("sensitivity", cfg.num_hidden_layers as u64);
    let linears = measure(ckpt, windows, model::default_device(), &mut |done, _| {
        pb.set_position(done as u64)
    })
    .context("cannot measure the sensitivities for gguf:auto")?;
    pb.finish_and_clear();
    let cands: Vec<_> = linears.iter().map(|l| l.candidates.clone()).collect();
    let pick = allocate(&cands, budget).map_err(|e| {
        anyhow::anyhow!(
            "{what}: {e} for the decoder linears (after {fixed} bytes for the other tensors)"
        )
    })?;
    let chosen: Vec<Value> = linears
        .iter()
        .zip(&pick)
        .map(|(l, &k)| {
            let c = &l.candidates[k];
            json!({"tensor": l.name, "type": c.ty.name(), "bytes": c.bytes, "cost": c.cost})
        })
        .collect();
    let used: u64 = linears
        .iter()
        .zip(&pick)
        .map(|(l, &k)| l.candidates[k].bytes)
        .sum();
    let cost: f64 = linears
        .iter()
        .zip(&pick)
        .map(|(l, &k)| l.candidates[k].cost)
        .sum();
    let plan = auto_plan(base, &linears, &pick);
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for c in &chosen {
        *counts.entry(c["type"].as_str().unwrap_or("?")).or_default() += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "gguf:auto: {} of {budget} bytes for the decoder linears ({}), {fixed} bytes for the other tensors",
        used,
        summary.join(", ")
    );
    let report = json!({
        "target_bytes": target, "other_tensor_bytes": fixed, "linear_budget": budget,
        "linear_bytes": used, "predicted_cost": cost, "calibration_windows": windows.len(),
        "cost": "sum over rows and input columns of E[x_j^2] (w - q)^2 on the calibration inputs",
        "linears": chosen,
    });
    Ok((plan, report))
}
