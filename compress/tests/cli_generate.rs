//! `compress generate` on a tiny synthetic model: greedy output is the KV-cache generator's,
//! a seed repeats a run byte for byte, a prompt's response does not depend on the others, the
//! output reads back as training pairs, and bad inputs fail with one line, writing nothing.

mod common;

use std::path::{Path, PathBuf};

use common::{fails, ok};
use model::Checkpoint;
use model::engine::Generator;
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
    let mut g = Generator::open(&ckpt, 64).unwrap();
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

/// Data-free calibration: `--calib N` writes N sequences of --calib-len ids starting at BOS,
/// and their text; a seed repeats the file byte for byte; `--calib FILE.json` gives a stage
/// exactly those windows (read back through prune's --dump-calib).
#[test]
fn calib_sequences_are_sampled_from_bos_and_read_back_as_windows() {
    let f = fixture();
    let r = &f.root;
    let calib = |name: &str, seed: &str| {
        let out = r.join(name);
        ok(&[
            "generate",
            s(&f.model),
            "--calib",
            "5",
            "--calib-len",
            "12",
            "--seed",
            seed,
            "--out",
            s(&out),
        ]);
        out
    };
    let a = calib("a.json", "3");
    let seqs: Vec<Vec<u32>> = serde_json::from_slice(&std::fs::read(&a).unwrap()).unwrap();
    assert_eq!(seqs.len(), 5);
    for q in &seqs {
        assert_eq!(q.len(), 12);
        // The tiny model's BOS is id 0 (config.json), and sampling leaves it.
        assert_eq!(q[0], 0);
        assert!(q.iter().all(|&t| t < 300));
    }
    assert!(
        seqs.iter().any(|q| q[1..] != seqs[0][1..]),
        "sequences differ"
    );
    let text = std::fs::read_to_string(r.join("a.txt")).unwrap();
    assert_eq!(text.matches("\n==========\n").count(), 4);
    let b = calib("b.json", "3");
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let c = calib("c.json", "4");
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
    // A stage calibrates on the first --calib-samples sequences, cut to --calib-len.
    let dump = r.join("dump.json");
    ok(&[
        "prune",
        s(&f.model),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calib",
        s(&a),
        "--calib-samples",
        "4",
        "--calib-len",
        "10",
        "--dump-calib",
        s(&dump),
        "--out",
        s(&r.join("pruned")),
    ]);
    let got: Vec<Vec<u32>> = serde_json::from_slice(&std::fs::read(&dump).unwrap()).unwrap();
    let want: Vec<Vec<u32>> = seqs[..4].iter().map(|q| q[..10].to_vec()).collect();
    assert_eq!(got, want);
    // quant draws the same windows and dumps them the same way.
    let qdump = r.join("qdump.json");
    ok(&[
        "quant",
        s(&f.model),
        "--method",
        "gptq",
        "--group",
        "32",
        "--calib",
        s(&a),
        "--calib-samples",
        "4",
        "--calib-len",
        "10",
        "--dump-calib",
        s(&qdump),
        "--format",
        "dense",
        "--out",
        s(&r.join("q")),
    ]);
    assert_eq!(
        std::fs::read(&qdump).unwrap(),
        std::fs::read(&dump).unwrap()
    );
    // Too few or too short sequences, and ids outside the vocabulary, are refused.
    let prune = |file: &Path, samples: &str, len: &str, needles: &[&str]| {
        let out = r.join("p2");
        let argv = [
            "prune",
            s(&f.model),
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--calib",
            s(file),
            "--calib-samples",
            samples,
            "--calib-len",
            len,
            "--out",
            s(&out),
        ];
        let args: Vec<&Path> = argv.iter().map(Path::new).collect();
        fails(r, &args, "a.json", needles);
    };
    prune(&a, "6", "12", &["5 token sequences", "--calib-samples 6"]);
    prune(&a, "5", "13", &["sequence 0", "--calib-len 13"]);
    let bad = r.join("bad").join("a.json");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    std::fs::write(&bad, "[[0, 5, 300, 2]]").unwrap();
    prune(&bad, "1", "4", &["token id 300", "vocabulary of 300"]);
    std::fs::write(&bad, "[[0, 5], \"x\"]").unwrap();
    prune(&bad, "1", "2", &["not a token file"]);
}

#[test]
fn bad_calib_options_fail_with_one_line() {
    let f = fixture();
    let r = &f.root;
    let go = |extra: &[&str], names: &str, needles: &[&str]| {
        let mut args: Vec<&Path> = vec![Path::new("generate"), f.model.as_path()];
        args.extend(extra.iter().map(Path::new));
        fails(r, &args, names, needles);
    };
    let out = r.join("c.json");
    let o = s(&out);
    go(&["--calib", "0", "--out", o], "--calib", &["1..="]);
    go(
        &["--calib", "2", "--calib-len", "1", "--out", o],
        "--calib-len",
        &["at least 2"],
    );
    // The tiny model's context is 256 tokens.
    go(
        &["--calib", "2", "--calib-len", "257", "--out", o],
        "--calib-len",
        &["context of 256"],
    );
    go(
        &["--calib", "2", "--max-new-tokens", "5", "--out", o],
        "--max-new-tokens",
        &["does not apply"],
    );
    go(
        &["--calib", "2", "--out", s(&r.join("c.jsonl"))],
        "c.jsonl",
        &[".json"],
    );
    go(
        &["--calib", "2", "--prompts", s(&f.prompts), "--out", o],
        "--prompts",
        &[],
    );
    go(&["--out", o], "--prompts", &[]);
    go(
        &[
            "--prompts",
            s(&f.prompts),
            "--calib-len",
            "8",
            "--out",
            s(&r.join("x.jsonl")),
        ],
        "--calib-len",
        &["--calib"],
    );
    std::fs::write(&out, "[]").unwrap();
    go(&["--calib", "2", "--out", o], "c.json", &["already exists"]);
}
