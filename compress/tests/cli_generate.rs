//! `compress generate` on a tiny synthetic model: greedy output is the KV-cache generator's,
//! a seed repeats a run byte for byte, a prompt's response does not depend on the others, the
//! output reads back as training pairs, and bad inputs fail with one line, writing nothing.

mod common;

use std::path::{Path, PathBuf};

use common::{fails, ok};
use model::Checkpoint;
use model::engine::{Generator, LayerEngine};
use model::testkit::{tiny_config, write_hf};
use serde_json::Value;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    prompts: PathBuf,
}

const PROMPTS: [&str; 4] = [
    "The patient was given",
    "Question: what is the dose?\nAnswer:",
    "a",
    "then the medicine and the patient slept",
];

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let model = root.join("model");
    write_hf(&model, &tiny_config(), 1, |_, _| {});
    let prompts = root.join("prompts.jsonl");
    write_prompts(&prompts, &PROMPTS);
    Fixture {
        _dir: dir,
        root,
        model,
        prompts,
    }
}

/// A prompts file, with an extra field and a blank line that are both ignored.
fn write_prompts(path: &Path, prompts: &[&str]) {
    let mut text = String::new();
    for (i, p) in prompts.iter().enumerate() {
        text += &serde_json::json!({"id": i, "prompt": p}).to_string();
        text += "\n\n";
    }
    std::fs::write(path, text).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `generate` into `out` (12 new tokens unless `extra` says otherwise) and returns its
/// lines as JSON.
fn generate(f: &Fixture, prompts: &Path, out: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "generate",
        s(&f.model),
        "--prompts",
        s(prompts),
        "--out",
        s(out),
    ];
    if !extra.contains(&"--max-new-tokens") {
        args.extend(["--max-new-tokens", "12"]);
    }
    args.extend_from_slice(extra);
    ok(&args);
    lines(out)
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn greedy_output_is_the_generators_and_reads_back_as_pairs() {
    let f = fixture();
    let greedy = f.root.join("greedy.jsonl");
    let got = generate(&f, &f.prompts, &greedy, &["--temperature", "0"]);
    assert_eq!(got.len(), PROMPTS.len());

    let ckpt = Checkpoint::open(&f.model).unwrap();
    let tok = model::load_tokenizer(&ckpt).unwrap();
    let engine = LayerEngine::new(&ckpt, model::default_device(), 64);
    let mut g = Generator::load(&engine, 64).unwrap();
    let eos = 1; // tiny_config's eos_token_id
    for (p, line) in PROMPTS.iter().zip(&got) {
        let ids = tok.encode(p).unwrap();
        let mut want = g.generate(&ids, 12).unwrap();
        let stop = match want.iter().position(|&t| t == eos) {
            Some(i) => {
                want.truncate(i);
                "eos"
            }
            None => "length",
        };
        assert_eq!(line["prompt"], *p);
        assert_eq!(line["response"], tok.decode(&want).unwrap(), "{p:?}");
        assert_eq!(line["prompt_tokens"], ids.len());
        assert_eq!(line["response_tokens"], want.len());
        assert_eq!(line["stop"], stop);
    }

    // A nucleus of 1e-6 holds only the most probable token: greedy again.
    let narrow = f.root.join("narrow.jsonl");
    generate(&f, &f.prompts, &narrow, &["--top-p", "1e-6"]);
    assert_eq!(
        std::fs::read(&narrow).unwrap(),
        std::fs::read(&greedy).unwrap()
    );

    let pairs = distill::pairs::read_pairs(&greedy).unwrap();
    assert_eq!(pairs.len(), PROMPTS.len());
    for ((p, r), line) in pairs.iter().zip(&got) {
        assert_eq!(
            (p.as_str(), r.as_str()),
            (
                line["prompt"].as_str().unwrap(),
                line["response"].as_str().unwrap()
            )
        );
    }
}

#[test]
fn a_seed_repeats_a_run_and_each_prompt_has_its_own_stream() {
    let f = fixture();
    let sample = |name: &str, seed: &str, prompts: &Path, max: &str| {
        let out = f.root.join(name);
        let args = [
            "--temperature",
            "1",
            "--seed",
            seed,
            "--max-new-tokens",
            max,
            "--threads",
            "1",
        ];
        generate(&f, prompts, &out, &args);
        (std::fs::read(&out).unwrap(), lines(&out))
    };
    let (a, la) = sample("a.jsonl", "7", &f.prompts, "10");
    let (b, _) = sample("b.jsonl", "7", &f.prompts, "10");
    assert!(a == b, "two runs with seed 7 differ");
    let (_, lc) = sample("c.jsonl", "8", &f.prompts, "10");
    assert!(
        la.iter()
            .zip(&lc)
            .any(|(x, y)| x["response"] != y["response"]),
        "seeds 7 and 8 gave the same responses"
    );
    for l in &la {
        let n = l["response_tokens"].as_u64().unwrap();
        assert!(n <= 10, "{l}");
        assert!(
            l["stop"] == "eos" || (l["stop"] == "length" && n == 10),
            "{l}"
        );
    }
    // The first two prompts alone get the same responses as in the full run.
    let two = f.root.join("two.jsonl");
    write_prompts(&two, &PROMPTS[..2]);
    let (_, ld) = sample("d.jsonl", "7", &two, "10");
    assert_eq!(ld, la[..2]);
}

#[test]
fn bad_inputs_fail_with_one_line_and_write_nothing() {
    let f = fixture();
    let r = &f.root;
    let out = r.join("out.jsonl");
    let go = |prompts: &Path, out: &Path, extra: &[&str], names: &str, needles: &[&str]| {
        let mut args: Vec<&Path> = vec![
            Path::new("generate"),
            f.model.as_path(),
            Path::new("--prompts"),
            prompts,
            Path::new("--out"),
            out,
        ];
        args.extend(extra.iter().map(Path::new));
        fails(r, &args, names, needles);
    };
    let bad = r.join("bad.jsonl");
    let bad_file = |text: &str| {
        std::fs::write(&bad, text).unwrap();
    };
    bad_file("{\"prompt\": \"a\"}\n{\"text\": \"b\"}\n");
    go(&bad, &out, &[], "bad.jsonl", &["line 2", "`prompt`"]);
    bad_file("{\"prompt\": \"a\"}\n\n{\"prompt\": 5}\n");
    go(&bad, &out, &[], "bad.jsonl", &["line 3", "not a string"]);
    bad_file("{\"prompt\": \"a\"\n");
    go(&bad, &out, &[], "bad.jsonl", &["line 1", "invalid JSON"]);
    bad_file("{\"prompt\": \"\"}\n");
    go(&bad, &out, &[], "bad.jsonl", &["line 1", "empty prompt"]);
    bad_file("");
    go(&bad, &out, &[], "bad.jsonl", &["no prompts"]);
    bad_file("\n \n");
    go(&bad, &out, &[], "bad.jsonl", &["no prompts"]);
    let p = &f.prompts;
    go(p, &out, &["--top-p", "0"], "--top-p", &["(0, 1]"]);
    go(p, &out, &["--top-p", "1.5"], "--top-p", &["(0, 1]"]);
    go(p, &out, &["--temperature", "-1"], "--temperature", &[]);
    go(p, &out, &["--temperature", "NaN"], "--temperature", &[]);
    go(p, &out, &["--temperature", "101"], "--temperature", &[]);
    go(
        p,
        &out,
        &["--temperature", "0", "--top-p", "0.5"],
        "--top-p",
        &["does not apply"],
    );
    go(p, &out, &["--max-new-tokens", "0"], "--max-new-tokens", &[]);
    // 256 new tokens leave no room for any prompt in the context of 256.
    go(
        p,
        &out,
        &["--max-new-tokens", "256"],
        "prompts.jsonl",
        &["--max-new-tokens", "context of 256"],
    );
    // The output is never an input, even with --force, nor an existing file without it.
    go(p, p, &["--force"], "prompts.jsonl", &["input"]);
    let inside = f.model.join("out.jsonl");
    go(p, &inside, &["--force"], "model", &["input"]);
    std::fs::write(&out, "old\n").unwrap();
    go(p, &out, &[], "out.jsonl", &["already exists"]);
    go(
        &r.join("absent.jsonl"),
        &r.join("new.jsonl"),
        &[],
        "absent.jsonl",
        &[],
    );
}
