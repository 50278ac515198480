//! The real `compress` binary on corrupt inputs and refused outputs: exit code 2, exactly one
//! `error:` line on stderr naming the file, and nothing written (the whole scratch folder is
//! byte-for-byte the same before and after).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

/// Every file under `root`, with its bytes (folders as empty entries).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.insert(p.clone(), None);
                stack.push(p);
            } else {
                out.insert(p.clone(), Some(std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// Runs `compress args` and checks: exit code 2, stderr one line starting `error:` that
/// contains `names` (a file name) and every `needle`, and no change under `root`.
fn fails(root: &Path, args: &[&Path], names: &str, needles: &[&str]) {
    let before = snapshot(root);
    let out = Command::new(env!("CARGO_BIN_EXE_compress")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let cmd = format!("compress {}", args.iter().map(|a| a.display().to_string()).collect::<Vec<_>>().join(" "));
    assert_eq!(out.status.code(), Some(2), "{cmd}: exit status {:?}, stderr {err}", out.status);
    assert!(err.starts_with("error: ") && err.ends_with('\n') && err.lines().count() == 1, "{cmd}: stderr not one error line: {err:?}");
    assert!(err.contains(names), "{cmd}: stderr does not name `{names}`: {err}");
    for n in needles {
        assert!(err.contains(n), "{cmd}: stderr lacks `{n}`: {err}");
    }
    assert!(snapshot(root) == before, "{cmd}: files under {} changed", root.display());
}

/// A valid tiny Llama HF folder (config.json + model.safetensors, F32 zeros), with the
/// safetensors header length replaced by `header_len` when given.
fn hf_folder(dir: &Path, config: &serde_json::Value, header_len: Option<u64>) -> PathBuf {
    let (v, h, kv, i) = (16usize, 8usize, 4usize, 16usize);
    let p = "model.layers.0";
    let tensors: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        (format!("{p}.input_layernorm.weight"), vec![h]),
        (format!("{p}.self_attn.q_proj.weight"), vec![h, h]),
        (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
        (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
        (format!("{p}.self_attn.o_proj.weight"), vec![h, h]),
        (format!("{p}.post_attention_layernorm.weight"), vec![h]),
        (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
        (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
        (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ("model.norm.weight".into(), vec![h]),
    ];
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for (name, shape) in &tensors {
        let n = shape.iter().product::<usize>() * 4;
        header.insert(name.clone(), json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}));
        off += n;
    }
    let text = serde_json::to_string(&header).unwrap();
    let mut bytes = header_len.unwrap_or(text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    bytes.resize(bytes.len() + off, 0);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string(config).unwrap()).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    dir.to_path_buf()
}

fn config() -> serde_json::Value {
    json!({"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": true})
}

/// A GGUF file whose first metadata key claims 2^40 bytes.
fn bad_gguf(path: &Path) -> PathBuf {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    b.extend_from_slice(&(1u64 << 40).to_le_bytes()); // key length
    b.extend_from_slice(b"general.architecture");
    std::fs::write(path, b).unwrap();
    path.to_path_buf()
}

#[test]
fn corrupt_inputs_and_refused_outputs_exit_2_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let gguf = bad_gguf(&root.join("bad.gguf"));
    let past_eof = hf_folder(&root.join("past_eof"), &config(), Some(1 << 40));
    let mut c = config();
    c.as_object_mut().unwrap().remove("hidden_size");
    let no_hidden = hf_folder(&root.join("no_hidden"), &c, None);
    let good = hf_folder(&root.join("good"), &config(), None);
    let text = root.join("text.txt");
    std::fs::write(&text, "hello world\n").unwrap();
    let existing = root.join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("keep.txt"), "do not touch").unwrap();
    let p = Path::new;

    fails(root, &[p("inspect"), &gguf], "bad.gguf", &["1099511627776"]);
    fails(root, &[p("inspect"), &past_eof], "past_eof/model.safetensors", &["runs past the end"]);
    fails(root, &[p("inspect"), &no_hidden], "no_hidden/config.json", &["hidden_size"]);
    fails(root, &[p("eval"), &gguf, p("--ppl"), &text], "bad.gguf", &["1099511627776"]);
    fails(root, &[p("eval"), &no_hidden, p("--ppl"), &text], "no_hidden/config.json", &["hidden_size"]);
    fails(root, &[p("convert"), &gguf, &root.join("fresh")], "bad.gguf", &["1099511627776"]);
    fails(root, &[p("convert"), &past_eof, &root.join("fresh")], "past_eof/model.safetensors", &["runs past the end"]);
    fails(root, &[p("convert"), &good, &existing], "existing", &["already exists", "--force"]);
    fails(root, &[p("convert"), &gguf, &existing], "bad.gguf", &[]);
    fails(root, &[p("convert"), &good, &good.join("out")], "good/out", &["into the input model"]);
    fails(root, &[p("convert"), &good, &good], "good", &["into the input model"]);
}
