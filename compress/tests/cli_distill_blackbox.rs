//! Black-box distillation end to end on tiny models: the teacher's generations
//! (`compress generate`) train the student with CE on the responses only, which lowers its
//! CE on held-out generations; bad pair files fail with the line named.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{fails, ok};
use distill::{CausalLm, LossSpec};
use model::Checkpoint;
use model::testkit::{calib_text, tiny_config, write_hf};
use model::transformer::Rope;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Mean CE of `model` on the response tokens of the pairs in `file` (prompts masked).
fn response_ce(model: &Path, file: &Path) -> f64 {
    let ckpt = Checkpoint::open(model).unwrap();
    let tok = model::load_tokenizer(&ckpt).unwrap();
    let batches =
        distill::pairs::pair_batches(&distill::pairs::read_pairs(file).unwrap(), &tok, 64).unwrap();
    let device = Device::flex();
    let lm = CausalLm::load(&ckpt, &device).unwrap();
    let rope = Rope::new(ckpt.config(), 64, &device);
    let spec = LossSpec {
        divergence: None,
        temperature: 1.0,
        kd_weight: 0.0,
        ce_weight: 1.0,
    };
    let (mut sum, mut n) = (0.0, 0.0);
    for mb in &batches {
        let w = &mb.windows[0];
        let tg: Vec<i64> = w[1..].iter().map(|&t| t as i64).collect();
        let m = mb.mask.clone().unwrap();
        let parts = spec.compute(
            lm.logits(&[w[..w.len() - 1].to_vec()], &rope),
            None,
            Tensor::<1, Int>::from_data(TensorData::new(tg.clone(), [tg.len()]), &device),
            Some(Tensor::<1>::from_data(
                TensorData::new(m, [tg.len()]),
                &device,
            )),
            1.0,
        );
        sum += parts.ce * parts.rows;
        n += parts.rows;
    }
    sum / n
}

#[test]
fn blackbox_kd_on_teacher_generations_lowers_held_out_ce() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (teacher, student) = (root.join("teacher"), root.join("student"));
    write_hf(&teacher, &tiny_config(), 1, |_, _| {});
    write_hf(&student, &tiny_config(), 2, |_, _| {});
    // 48 prompts: windows of a text; the teacher answers each greedily.
    let words = calib_text(48 * 6);
    let words: Vec<&str> = words.split(' ').collect();
    let prompts: String = words
        .chunks(6)
        .map(|c| serde_json::json!({ "prompt": c.join(" ") }).to_string() + "\n")
        .collect();
    std::fs::write(root.join("prompts.jsonl"), prompts).unwrap();
    let gen_ = root.join("gen.jsonl");
    ok(&[
        "generate",
        s(&teacher),
        "--prompts",
        s(&root.join("prompts.jsonl")),
        "--out",
        s(&gen_),
        "--max-new-tokens",
        "24",
        "--temperature",
        "0",
    ]);
    let lines: Vec<String> = std::fs::read_to_string(&gen_)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 48);
    let (train, held) = (root.join("train.jsonl"), root.join("held.jsonl"));
    std::fs::write(&train, lines[..36].join("\n")).unwrap();
    std::fs::write(&held, lines[36..].join("\n")).unwrap();

    let out = root.join("bb");
    let msg = ok(&[
        "distill",
        "--mode",
        "blackbox",
        "--student",
        s(&student),
        "--data",
        s(&train),
        "--out",
        s(&out),
        "--seq-len",
        "64",
        "--batch-tokens",
        "256",
        "--max-tokens",
        "3000",
        "--lr",
        "3e-3",
    ]);
    assert!(msg.contains("distilled"), "{msg}");
    let (before, after) = (response_ce(&student, &held), response_ce(&out, &held));
    assert!(
        after < 0.8 * before,
        "held-out response CE {before:.4} -> {after:.4}"
    );
    // The budget counts response tokens only; pairs differ in length, so it is met to
    // within about a step (4 pairs of up to 24 tokens).
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let tokens: u64 = serde_json::from_str::<serde_json::Value>(log.lines().last().unwrap())
        .unwrap()["tokens"]
        .as_u64()
        .unwrap();
    assert!((2800..3200).contains(&tokens), "trained on {tokens} tokens");

    // A pair file with a missing field names the line; options that need a teacher are refused.
    let bad = root.join("bad.jsonl");
    std::fs::write(
        &bad,
        format!("{}\n{}\n{{\"prompt\": \"x\"}}\n", lines[0], lines[1]),
    )
    .unwrap();
    let p = |x: &str| PathBuf::from(x);
    let args = |data: &Path, extra: &[&str]| -> Vec<PathBuf> {
        let mut v = vec![
            p("distill"),
            p("--mode"),
            p("blackbox"),
            p("--student"),
            student.clone(),
            p("--data"),
            data.to_path_buf(),
            p("--out"),
            root.join("o"),
            p("--seq-len"),
            p("64"),
            p("--batch-tokens"),
            p("256"),
        ];
        v.extend(extra.iter().map(|x| p(x)));
        v
    };
    let go = |v: Vec<PathBuf>, names: &str, needles: &[&str]| {
        fails(
            root,
            &v.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
            names,
            needles,
        );
    };
    go(args(&bad, &[]), "bad.jsonl", &["line 3", "response"]);
    go(args(&train, &["--teacher", s(&teacher)]), "--teacher", &[]);
    go(args(&train, &["--loss", "fkl"]), "--mode blackbox", &[]);
    let text = root.join("plain.txt");
    std::fs::write(&text, "just text, not JSON\n").unwrap();
    go(args(&text, &[]), "plain.txt", &["line 1"]);
}
