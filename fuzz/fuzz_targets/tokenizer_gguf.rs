//! Any bytes as a GGUF file whose `tokenizer.ggml.*` metadata a tokenizer is built from:
//! opening it, building the tokenizer (`Tokenizer::from_gguf`, which converts the metadata to
//! HF `tokenizer.json` and parses that), encoding and decoding a fixed text, and the
//! vocabulary checks against the checkpoint (`tokenizer::check_fits`, `load_checked`) must
//! return errors, never panic or allocate without bound.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use model::checkpoint::Checkpoint;
use model::gguf::GgufFile;
use model::tokenizer::{self, Tokenizer};

/// One scratch file per process, rewritten for every input.
fn scratch() -> &'static PathBuf {
    static P: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &P.get_or_init(|| {
        let d = tempfile::tempdir().expect("temp dir");
        let p = d.path().join("input.gguf");
        (d, p)
    })
    .1
}

const TEXT: &str = "Hello world, it's 2026! \u{e9}t\u{e9} \u{4f60}\u{597d} \n\t<s> 12345";

fn exercise(tok: &Tokenizer) {
    if let Ok(ids) = tok.encode(TEXT) {
        let _ = tok.decode(&ids);
        for &id in ids.iter().take(8) {
            let _ = tok.id_to_token(id);
        }
    }
    // Ids the vocabulary may not hold.
    let _ = tok.decode(&[0, 1, 2, u32::MAX]);
    let _ = tok.vocab_size();
    let _ = tok.token_to_id("<s>");
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).expect("write input");
    // The route the CLI takes when the file opens as a model (config and tensor checks
    // first, then the tokenizer built and checked against the vocabulary); otherwise the
    // tokenizer alone from the metadata. One tokenizer build per input either way.
    if let Ok(ckpt) = Checkpoint::open(path) {
        let _ = tokenizer::check_fits(&ckpt);
        match tokenizer::load_checked(&ckpt) {
            Ok(tok) => exercise(&tok),
            Err(_) => {
                // A tokenizer that builds but does not fit the vocabulary.
                if let Some(g) = ckpt.gguf()
                    && let Ok(tok) = Tokenizer::from_gguf(g)
                {
                    exercise(&tok);
                }
            }
        }
    } else if let Ok(g) = GgufFile::open(path)
        && let Ok(tok) = Tokenizer::from_gguf(&g)
    {
        exercise(&tok);
    }
});
