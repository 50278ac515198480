//! `compress inspect MODEL`.

use std::collections::BTreeMap;

use anyhow::Context;
use comfy_table::Table;
use model::Checkpoint;

/// Arguments of `inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF folder or a .gguf file.
    model: crate::Path,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    let c = ckpt.config();
    let tensors = ckpt.tensors();
    let mut by_type: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    for t in &tensors {
        let e = by_type.entry(t.dtype.clone()).or_default();
        e.0 += 1;
        e.1 += t.numel();
        e.2 += t.bytes;
    }
    let size = eval::SizeReport::of(&ckpt);
    let tok = model::load_tokenizer(&ckpt).ok();
    // Whether rope_theta came from HF's class default rather than the file (HF folders only;
    // the folder opened above, so its config.json parses).
    let cfg_json = a.model.join("config.json");
    let theta_defaulted = a.model.is_dir()
        && model::config::Config::from_file_with_origin(&cfg_json)
            .is_ok_and(|(_, o)| o.theta_defaulted);
    let theta = if theta_defaulted {
        format!(
            "{} (not in config.json: HF's default for this model_type)",
            c.rope_theta
        )
    } else {
        c.rope_theta.to_string()
    };
    if a.json {
        let v = serde_json::json!({
            "path": a.model, "format": ckpt.format(), "architecture": c.architectures.first(),
            "config": c, "rope_theta_defaulted": theta_defaulted, "tensors": tensors.len(),
            "by_dtype": by_type.iter().map(|(k, v)| (k.clone(), serde_json::json!({"count": v.0, "params": v.1, "bytes": v.2}))).collect::<serde_json::Map<_,_>>(),
            "size": size, "tokenizer": tok.as_ref().map(|t| serde_json::json!({"vocab": t.vocab_size(), "add_bos": t.add_bos})),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut t = Table::new();
    t.set_header(vec!["field", "value"]);
    let rows: Vec<(&str, String)> = vec![
        ("path", a.model.display().to_string()),
        ("format", ckpt.format().into()),
        (
            "architecture",
            c.architectures
                .first()
                .cloned()
                .unwrap_or_else(|| c.model_type.clone()),
        ),
        ("model_type", c.model_type.clone()),
        ("layers", c.num_hidden_layers.to_string()),
        (
            "hidden / intermediate",
            format!("{} / {}", c.hidden_size, c.intermediate_size),
        ),
        (
            "heads / kv heads / head_dim",
            format!(
                "{} / {} / {}",
                c.num_attention_heads,
                c.num_kv_heads(),
                c.head_dim()
            ),
        ),
        ("vocab", crate::grouped(c.vocab_size as u64)),
        ("rope_theta", theta),
        ("rms_norm_eps", c.rms_norm_eps.to_string()),
        ("tied embeddings", c.tie_word_embeddings.to_string()),
        ("q/k/v bias", c.qkv_bias().to_string()),
        ("context", c.max_position_embeddings.to_string()),
        ("tensors", tensors.len().to_string()),
        ("parameters", crate::grouped(size.params)),
        ("bytes on disk", crate::grouped(size.bytes)),
        ("bits per weight", format!("{:.3}", size.bits_per_weight)),
        (
            "tokenizer",
            tok.map(|t| format!("vocab {}, add_bos {}", t.vocab_size(), t.add_bos))
                .unwrap_or_else(|| "none".into()),
        ),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    let mut d = Table::new();
    d.set_header(vec!["dtype", "tensors", "parameters", "bytes"]);
    for (k, v) in by_type {
        d.add_row(vec![
            k,
            v.0.to_string(),
            crate::grouped(v.1),
            crate::grouped(v.2),
        ]);
    }
    println!("{d}");
    Ok(())
}
