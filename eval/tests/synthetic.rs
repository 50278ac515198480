//! `eval::perplexity` on a small synthetic checkpoint equals exp(mean NLL) computed from an
//! independent f64 reference forward pass, under both protocols.

#[path = "../../model/tests/common/mod.rs"]
mod common;

use std::path::Path;

use common::*;
use eval::{PplOptions, Protocol, perplexity};
use model::Checkpoint;
use model::safetensors_io::StoreDtype;
use serde_json::{Value, json};

const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "a", "is", "was", "for", "on", "as", "with", "by", "he", "it",
    "at", "from", "his", "an", "were", "are", "which", "this", "be", "or", "has", "had", "first",
    "one", "their", "its", "new", "after", "but", "who", "not", "they", "have", "her", "she",
    "two", "been", "other", "when", "there", "all", "during", "into",
];

/// A word-level tokenizer: `<unk>` = 0, `<s>` = 1 (added first by the post-processor, so
/// `add_bos` is true), then `WORDS` from id 2; whitespace splits words.
fn tokenizer() -> model::Tokenizer {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), json!(0));
    vocab.insert("<s>".into(), json!(1));
    for (i, w) in WORDS.iter().enumerate() {
        vocab.insert((*w).into(), json!(i + 2));
    }
    let special = |id: u32, s: &str| {
        json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true})
    };
    let j = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    model::Tokenizer::from_json(j.to_string(), Path::new("tokenizer.json")).unwrap()
}

fn config() -> Value {
    json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 50,
        "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "tie_word_embeddings": false, "bos_token_id": 1})
}

/// NLL of `target` under one row of f64 logits.
fn nll(row: &[f64], target: u32) -> f64 {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - row[target as usize]
}

#[test]
fn perplexity_equals_reference_exp_mean_nll() {
    let tok = tokenizer();
    assert!(tok.add_bos);
    assert_eq!(tok.bos_id, Some(1));

    let mut rng = Rng::new(99);
    let words: Vec<&str> = (0..120)
        .map(|_| WORDS[rng.below(WORDS.len() as u32) as usize])
        .collect();
    let text = words
        .chunks(10)
        .map(|l| l.join(" "))
        .collect::<Vec<_>>()
        .join("\n");
    let tokens = tok.encode(&text).unwrap();
    let expected_ids: Vec<u32> = words
        .iter()
        .map(|w| WORDS.iter().position(|x| x == w).unwrap() as u32 + 2)
        .collect();
    assert_eq!(tokens, expected_ids, "word-level tokenizer");

    let cfg = config();
    let synth = synthesize(cfg.clone(), 21, StoreDtype::F32);
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &synth, StoreDtype::F32, 1);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let tensors = synth.map();
    let inv = reference_inv_freq(&cfg);
    let reference = |w: &[u32]| reference_logits(&cfg, &tensors, &inv, RopeStyle::Half, w);

    let (ctx, chunks) = (16, 3);
    for protocol in [Protocol::Hf, Protocol::Llama] {
        let opts = PplOptions {
            ctx,
            chunks: Some(chunks),
            protocol,
        };
        let res = perplexity(
            &ckpt,
            &tok,
            &tokens,
            &opts,
            model::default_device(),
            |_, _| {},
        )
        .unwrap();
        // The windows and scored positions each protocol defines, built here independently.
        let mut nlls = Vec::new();
        for c in 0..chunks {
            let (w, first): (Vec<u32>, usize) = match protocol {
                // BOS once at the start of the text; every token after the first is scored.
                Protocol::Hf => {
                    let seq: Vec<u32> = std::iter::once(1).chain(tokens.iter().copied()).collect();
                    (seq[c * ctx..(c + 1) * ctx].to_vec(), 0)
                }
                // BOS replaces each chunk's first token; the second half is scored.
                Protocol::Llama => {
                    let mut w = tokens[c * ctx..(c + 1) * ctx].to_vec();
                    w[0] = 1;
                    (w, ctx / 2)
                }
            };
            let logits = reference(&w);
            for j in first..ctx - 1 {
                nlls.push(nll(&logits[j], w[j + 1]));
            }
        }
        let mean = nlls.iter().sum::<f64>() / nlls.len() as f64;
        let ppl = mean.exp();
        assert_eq!(res.tokens_scored, nlls.len(), "{protocol:?}");
        assert_eq!(res.chunks, chunks);
        assert_eq!(res.tokens_processed, chunks * ctx);
        assert_eq!(res.tokens_total, tokens.len());
        assert!(
            (res.mean_nll - mean).abs() < 1e-5,
            "{protocol:?}: mean NLL {} vs reference {mean}",
            res.mean_nll
        );
        assert!(
            ((res.value - ppl) / ppl).abs() < 1e-5,
            "{protocol:?}: perplexity {} vs reference {ppl}",
            res.value
        );
        // Random weights: near-uniform predictions over 50 tokens, but not exactly.
        assert!(
            ppl > 5.0 && ppl < 500.0 && (ppl - 50.0).abs() > 1e-3,
            "{ppl}"
        );
    }
}

#[test]
fn kld_refuses_teacher_and_student_with_different_vocabularies() {
    let tok = tokenizer();
    let cfg = config();
    let mut bigger = cfg.clone();
    bigger["vocab_size"] = serde_json::json!(60);
    let (dt, ds) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_hf(
        dt.path(),
        &synthesize(cfg, 1, StoreDtype::F32),
        StoreDtype::F32,
        1,
    );
    write_hf(
        ds.path(),
        &synthesize(bigger, 2, StoreDtype::F32),
        StoreDtype::F32,
        1,
    );
    let (t, s) = (
        Checkpoint::open(dt.path()).unwrap(),
        Checkpoint::open(ds.path()).unwrap(),
    );
    let e = eval::kld::check_same_vocab(&t, &s, &tok, &tok)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vocabulary of 50") && e.contains("has 60") && e.contains("same vocabulary"),
        "{e}"
    );
}
