//! `compress qat --format gguf:TYPE`: the trained student as one GGUF file, `OUT/model.gguf`.
//! Where the type's blocks can hold the QAT grid (Q8_0, Q4_0, Q5_0 for a symmetric scheme of
//! 8, 4 or 5 bits, Q4_1 and Q5_1 for an asymmetric one of 4 or 5 bits, groups of 32), each
//! linear is written from its trained codes, so the grid is kept and only the scales (and
//! minimums) are rounded to the f16 the format stores; every other tensor, and every linear
//! whose grid the type cannot hold, is rounded by the type's own quantizer. The report says
//! which, with each linear's error against the trained weights, read back from the file.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use model::Checkpoint;
use quant::gguf_export::{Source, TypePlan, export_from, hf_to_gguf_name};
use quant::scheme::{QuantScheme, QuantizedLinear};
use serde_json::{Value, json};

/// Writes `dir/model.gguf` of type preset `name` for the trained `weights` (HF names) with
/// their `grids`; `student` gives the architecture, metadata and tokenizer. Returns the
/// report entry.
pub fn write(
    name: &str,
    scheme: &QuantScheme,
    student: &Checkpoint,
    weights: &BTreeMap<String, Vec<f32>>,
    grids: &BTreeMap<String, QuantizedLinear>,
    dir: &Path,
) -> anyhow::Result<Value> {
    let cfg = student.config();
    let tied = cfg.tie_word_embeddings && !student.has("lm_head.weight");
    let plan = TypePlan::for_model(name, cfg, tied)?;
    let file = dir.join("model.gguf");
    let mut kept = Vec::new();
    let mut source =
        |hf: &str, g: &str, shape: &[usize]| -> Result<Source, quant::gguf_export::ExportError> {
            let data = weights.get(hf).cloned().ok_or_else(|| {
                quant::gguf_export::ExportError::Input(format!("no tensor `{hf}`"))
            })?;
            let encoded = grids
                .get(hf)
                .filter(|_| scheme.group == Some(32))
                .and_then(|q| quant::gguf_grid::encode_linear(plan.type_for(g, shape), q));
            if encoded.is_some() {
                kept.push(hf.to_string());
            }
            Ok(Source {
                data,
                importance: None,
                encoded,
            })
        };
    let pb = crate::progress_bar("gguf", student.expected_tensors().len() as u64);
    let mut progress = |p: &quant::gguf_export::Progress| pb.set_position(p.index as u64);
    let report = export_from(student, &file, &plan, &mut source, &mut progress)?;
    pb.finish_and_clear();
    // Each linear as the file holds it, against the trained weights.
    let back = Checkpoint::open(&file).with_context(|| format!("{}", file.display()))?;
    let mut linears = Vec::new();
    for (hf, q) in grids {
        let shape = [q.rows, q.cols];
        let got = back
            .read(hf, &shape)
            .with_context(|| format!("{}", file.display()))?;
        let want = &weights[hf];
        linears.push(json!({
            "name": hf,
            "gguf_type": plan.type_for(&hf_to_gguf_name(hf).unwrap_or_default(), &shape).name(),
            "grid_kept": kept.contains(hf),
            "rel_error": quant::block::weight_error(want, &got),
        }));
    }
    let n_kept = kept.iter().filter(|h| grids.contains_key(*h)).count();
    let mean = |keep: bool| {
        let v: Vec<f64> = linears
            .iter()
            .filter(|l| l["grid_kept"] == keep)
            .filter_map(|l| l["rel_error"].as_f64())
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    println!(
        "gguf:{}: {n_kept} of {} linears keep the trained grid{}{}",
        name.to_ascii_lowercase(),
        grids.len(),
        mean(true).map_or(String::new(), |e| format!(
            " (scales rounded to f16: mean rel. error {e:.2e})"
        )),
        mean(false).map_or(String::new(), |e| format!(
            "; the others were re-rounded by the type's quantizer ({} does not hold a {} grid: mean rel. error {e:.2e})",
            name.to_ascii_lowercase(),
            scheme.label()
        )),
    );
    Ok(json!({
        "type": name.to_ascii_lowercase(),
        "file": "model.gguf",
        "bytes": report.file_bytes,
        "linears": grids.len(),
        "linears_grid_kept": n_kept,
        "per_linear": linears,
    }))
}
