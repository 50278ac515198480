//! `compress convert MODEL OUT_DIR`: any readable model to an HF folder that transformers
//! loads as `LlamaForCausalLM` / `Qwen2ForCausalLM`. Tensors stream one at a time, so the
//! whole model is never in memory; the folder appears only when complete.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use model::Checkpoint;
use model::safetensors_io::{StoreDtype, StreamingWriter};
use serde_json::json;

use crate::output::{TempGuard, check_output, commit, temp_sibling};

/// Arguments of `convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF folder or a .gguf file.
    model: crate::Path,
    /// The HF folder to write.
    out: crate::Path,
    /// Storage type of the weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.out.extension().is_some_and(|e| e == "gguf") {
        bail!("{}: writing GGUF is not supported yet; give an output folder for an HF checkpoint", a.out.display());
    }
    let dtype = StoreDtype::parse(&a.dtype)
        .with_context(|| format!("--dtype `{}` is not one of f32, f16, bf16", a.dtype))?;
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    check_output(&a.model, &a.out, a.force)?;
    let tok = model::load_tokenizer(&ckpt).context("cannot build the tokenizer")?;

    let tmp = temp_sibling(&a.out);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut guard = TempGuard(Some(tmp.clone()));

    let mut cfg = ckpt.config().clone();
    cfg.torch_dtype = Some(dtype.torch_name().into());
    cfg.num_key_value_heads = Some(cfg.num_kv_heads());
    if cfg.architectures.is_empty() {
        cfg.architectures = vec![if cfg.model_type == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }.into()];
    }
    std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;

    let plan: Vec<(String, Vec<usize>, StoreDtype)> =
        ckpt.expected_tensors().into_iter().map(|(n, s)| (n, s, dtype)).collect();
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

    // Tokenizer: copy an HF folder's files as they are; build them from GGUF metadata.
    let src_dir = a.model.is_dir().then_some(a.model.as_path());
    std::fs::write(tmp.join("tokenizer.json"), tok.to_json())?;
    let bos = cfg.bos_token_id.as_ref().and_then(|b| b.first());
    let eos = cfg.eos_token_id.as_ref().and_then(|b| b.first());
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let copied = |f: &str| -> anyhow::Result<bool> {
        if let Some(d) = src_dir
            && d.join(f).exists()
        {
            std::fs::copy(d.join(f), tmp.join(f)).with_context(|| format!("{}", d.join(f).display()))?;
            return Ok(true);
        }
        Ok(false)
    };
    if !copied("tokenizer_config.json")? {
        let mut tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": tok.add_bos,
            "model_max_length": cfg.max_position_embeddings,
            "clean_up_tokenization_spaces": false,
        });
        if let Some(b) = name(bos) {
            tc["bos_token"] = json!(b);
        }
        if let Some(e) = name(eos) {
            tc["eos_token"] = json!(e);
        }
        if let Some(t) = ckpt.gguf().and_then(|g| g.get_str("tokenizer.chat_template")) {
            tc["chat_template"] = json!(t);
        }
        std::fs::write(tmp.join("tokenizer_config.json"), serde_json::to_string_pretty(&tc)?)?;
    }
    if !copied("generation_config.json")? {
        let gc = json!({"_from_model_config": true, "bos_token_id": bos, "eos_token_id": eos});
        std::fs::write(tmp.join("generation_config.json"), serde_json::to_string_pretty(&gc)?)?;
    }
    commit(&tmp, &a.out)?;
    guard.0 = None;
    let bytes = std::fs::metadata(a.out.join("model.safetensors")).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({} tensors, {} bytes of {} weights)", a.out.display(), plan.len(), bytes, a.dtype);
    Ok(())
}
