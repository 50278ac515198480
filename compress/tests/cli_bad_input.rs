//! The real `compress` binary on corrupt inputs and refused outputs: exit code 2, exactly one
//! `error:` line on stderr naming the file, and nothing written (the whole scratch folder is
//! byte-for-byte the same before and after).

mod common;

use std::path::{Path, PathBuf};

use common::fails;

use serde_json::json;

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
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let text = serde_json::to_string(&header).unwrap();
    let mut bytes = header_len
        .unwrap_or(text.len() as u64)
        .to_le_bytes()
        .to_vec();
    bytes.extend_from_slice(text.as_bytes());
    bytes.resize(bytes.len() + off, 0);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(config).unwrap(),
    )
    .unwrap();
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
    fails(
        root,
        &[p("inspect"), &past_eof],
        "past_eof/model.safetensors",
        &["runs past the end"],
    );
    fails(
        root,
        &[p("inspect"), &no_hidden],
        "no_hidden/config.json",
        &["hidden_size"],
    );
    fails(
        root,
        &[p("eval"), &gguf, p("--ppl"), &text],
        "bad.gguf",
        &["1099511627776"],
    );
    fails(
        root,
        &[p("eval"), &no_hidden, p("--ppl"), &text],
        "no_hidden/config.json",
        &["hidden_size"],
    );
    // A task file with a bad line fails before the model is read.
    let tasks = root.join("my_tasks.jsonl");
    std::fs::write(
        &tasks,
        "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 5}\n",
    )
    .unwrap();
    fails(
        root,
        &[p("eval"), &gguf, p("--task-file"), &tasks],
        "my_tasks.jsonl:1",
        &["`answer` 5 is out of range"],
    );
    fails(
        root,
        &[p("convert"), &gguf, &root.join("fresh")],
        "bad.gguf",
        &["1099511627776"],
    );
    fails(
        root,
        &[p("convert"), &past_eof, &root.join("fresh")],
        "past_eof/model.safetensors",
        &["runs past the end"],
    );
    fails(
        root,
        &[p("convert"), &good, &existing],
        "existing",
        &["already exists", "--force"],
    );
    fails(root, &[p("convert"), &gguf, &existing], "bad.gguf", &[]);
    fails(
        root,
        &[p("convert"), &good, &good.join("out")],
        "good/out",
        &["into the input model"],
    );
    fails(
        root,
        &[p("convert"), &good, &good],
        "good",
        &["into the input model"],
    );
}

/// A word-level tokenizer over the 16 ids of [`config`] (`<unk>`, `<s>`, 14 words).
fn add_tokenizer(dir: &Path) {
    let words = [
        "the", "a", "cell", "heart", "dose", "blood", "is", "of", "and", "to", "in", "we", "it",
        "on",
    ];
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), json!(0));
    vocab.insert("<s>".into(), json!(1));
    for (i, w) in words.iter().enumerate() {
        vocab.insert((*w).into(), json!(i + 2));
    }
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&tok).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "add_bos_token": true}"#,
    )
    .unwrap();
}

/// Overwrites the first value of tensor `name` in `dir/model.safetensors` with `value`.
fn poke(dir: &Path, name: &str, value: f32) {
    let path = dir.join("model.safetensors");
    let mut b = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let off = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    b[off..off + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&path, b).unwrap();
}

#[test]
fn quant_refuses_bad_options_inputs_and_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let good = hf_folder(&root.join("good"), &config(), None);
    add_tokenizer(&good);
    let nan = hf_folder(&root.join("nan"), &config(), None);
    add_tokenizer(&nan);
    poke(&nan, "model.layers.0.mlp.down_proj.weight", f32::NAN);
    let short = root.join("short.txt");
    std::fs::write(&short, "the heart is a dose of blood\n").unwrap();
    let existing = root.join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("keep.txt"), "do not touch").unwrap();
    let fresh = root.join("fresh");
    let p = Path::new;
    let q = |extra: &[&'static str]| -> Vec<&'static Path> {
        extra.iter().map(|s| Path::new(*s)).collect()
    };

    // Bits outside 2..=8 (a group that does not divide a width is not an error: the last
    // group of each row is shorter, as the README documents).
    for bits in ["1", "9"] {
        let mut a = vec![p("quant"), &good, p("--out"), &fresh, p("--bits"), p(bits)];
        a.extend(q(&["--group", "8"]));
        fails(root, &a, &format!("--bits {bits}"), &["2 to 8"]);
    }
    // Calibration text shorter than one sequence.
    let mut a = vec![
        p("quant"),
        &good,
        p("--out"),
        &fresh,
        p("--method"),
        p("awq"),
        p("--calib"),
        &short,
    ];
    a.extend(q(&["--calib-len", "64", "--group", "8"]));
    fails(root, &a, "short.txt", &["64"]);
    // NaN in a weight: the tensor is named, nothing is left behind.
    let mut a = vec![p("quant"), &nan, p("--out"), &fresh];
    a.extend(q(&["--group", "8"]));
    fails(root, &a, "model.layers.0.mlp.down_proj.weight", &["NaN"]);
    // Existing output without --force; output inside the teacher.
    fails(
        root,
        &[
            p("quant"),
            &good,
            p("--out"),
            &existing,
            p("--group"),
            p("8"),
        ],
        "existing",
        &["already exists", "--force"],
    );
    fails(
        root,
        &[
            p("quant"),
            &good,
            p("--out"),
            &good.join("q"),
            p("--group"),
            p("8"),
        ],
        "good/q",
        &["into the input model"],
    );
    // GGUF output: unknown type lists the valid ones; inside the teacher; GPTQ without calib.
    fails(
        root,
        &[
            p("quant"),
            &good,
            p("--out"),
            &fresh,
            p("--format"),
            p("gguf:q3_xs"),
        ],
        "gguf:q3_xs",
        &["q4_0", "q4_k_m", "q8_0"],
    );
    fails(
        root,
        &[
            p("quant"),
            &good,
            p("--out"),
            &good.join("g"),
            p("--format"),
            p("gguf:q8_0"),
        ],
        "good/g",
        &["into the input model"],
    );
    fails(
        root,
        &[
            p("quant"),
            &good,
            p("--out"),
            &fresh,
            p("--format"),
            p("gguf:q4_0"),
            p("--method"),
            p("gptq"),
        ],
        "--method gptq",
        &["needs --calib"],
    );
    fails(
        root,
        &[
            p("quant"),
            &good,
            p("--out"),
            &fresh,
            p("--format"),
            p("dense,gguf:q4_0"),
        ],
        "gguf:TYPE",
        &["combined"],
    );
}
