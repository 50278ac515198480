//! Any bytes as the model.safetensors of an HF folder with a fixed valid config: opening and
//! reading every tensor must return errors, never panic or allocate without bound.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16,
  "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
  "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "tie_word_embeddings": true}"#;

/// One scratch folder per process; model.safetensors is rewritten for every input.
fn scratch() -> &'static PathBuf {
    static P: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &P.get_or_init(|| {
        let d = tempfile::tempdir().expect("temp dir");
        std::fs::write(d.path().join("config.json"), CONFIG).expect("write config");
        let p = d.path().to_path_buf();
        (d, p)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    std::fs::write(dir.join("model.safetensors"), data).expect("write input");
    if let Ok(c) = model::Checkpoint::open(dir) {
        for t in c.tensors() {
            let _ = c.read(&t.name, &t.shape);
        }
    }
});
