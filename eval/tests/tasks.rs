//! Multiple-choice tasks: bad task files are reported with file and line; packed scoring
//! equals one plain causal window per continuation; a hand-made task with obvious answers
//! scores acc = 1 end to end. The model tests need `models/SmolLM2-135M-Instruct.Q4_1.gguf`
//! and skip themselves (with a note) when it is missing.
#![allow(missing_docs)]

use std::path::{Path, PathBuf};

use eval::tasks::data::{load_arc, load_medqa, load_mmlu, load_piqa, load_pubmedqa};
use eval::tasks::{Request, encode_request, run_tasks, score_requests};
use model::engine::LayerEngine;
use model::{Checkpoint, Tokenizer};

/// A scratch folder under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("eval-tasks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn write(&self, rel: &str, text: &str) {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn err_of<T: std::fmt::Debug>(r: Result<T, eval::EvalError>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn piqa_missing_field_names_file_and_line() {
    let s = Scratch::new("piqa-field");
    s.write(
        "piqa/valid.jsonl",
        "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n{\"goal\": \"g2\", \"sol1\": \"a\"}\n",
    );
    s.write("piqa/valid-labels.lst", "0\n1\n");
    let e = err_of(load_piqa(&s.0, ""));
    assert!(
        e.contains("piqa/valid.jsonl:2") && e.contains("`sol2`"),
        "{e}"
    );
}

#[test]
fn piqa_label_out_of_range_names_labels_file_and_line() {
    let s = Scratch::new("piqa-label");
    s.write(
        "piqa/valid.jsonl",
        "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n"
            .repeat(3)
            .as_str(),
    );
    s.write("piqa/valid-labels.lst", "0\n1\n2\n");
    let e = err_of(load_piqa(&s.0, ""));
    assert!(
        e.contains("valid-labels.lst:3") && e.contains("out of range"),
        "{e}"
    );
    // Fewer labels than documents is an error too.
    s.write("piqa/valid-labels.lst", "0\n1\n");
    assert!(err_of(load_piqa(&s.0, "")).contains("2 labels for 3 documents"));
}

#[test]
fn arc_answer_key_out_of_range_and_missing_stem() {
    let s = Scratch::new("arc");
    let good = r#"{"question": {"stem": "Q", "choices": [{"text": "x", "label": "1"}, {"text": "y", "label": "2"}]}, "answerKey": "2"}"#;
    let bad_key = r#"{"question": {"stem": "Q", "choices": [{"text": "x", "label": "A"}, {"text": "y", "label": "B"}]}, "answerKey": "E"}"#;
    s.write("arc/arc_easy_test.jsonl", &format!("{good}\n\n{bad_key}\n"));
    let e = err_of(load_arc(&s.0, ""));
    assert!(
        e.contains("arc_easy_test.jsonl:3") && e.contains("answerKey `E` is out of range"),
        "{e}"
    );
    let no_stem = r#"{"question": {"choices": []}, "answerKey": "A"}"#;
    s.write("arc/arc_easy_test.jsonl", &format!("{good}\n{no_stem}\n"));
    let e = err_of(load_arc(&s.0, ""));
    assert!(e.contains("arc_easy_test.jsonl:2"), "{e}");
    s.write("arc/arc_easy_test.jsonl", &format!("{good}\n"));
    let r = load_arc(&s.0, "").unwrap();
    assert_eq!((r[0].gold, r[0].options.len()), (1, 2));
}

#[test]
fn medqa_and_mmlu_bad_answers() {
    let s = Scratch::new("medqa-mmlu");
    s.write(
        "medqa/test.jsonl",
        "{\"question\": \"q\", \"options\": {\"B\": \"b\", \"A\": \"a\"}, \"answer_idx\": \"A\"}\n\
         {\"question\": \"q\", \"options\": {\"A\": \"a\", \"B\": \"b\"}, \"answer_idx\": \"F\"}\n",
    );
    let e = err_of(load_medqa(&s.0, ""));
    assert!(
        e.contains("medqa/test.jsonl:2") && e.contains("answer_idx `F`"),
        "{e}"
    );
    s.write(
        "mmlu-medical/anatomy_test.csv",
        "\"multi\nline, question\",a,b,c,d,B\nq2,a,b,c,d,E\n",
    );
    let e = err_of(load_mmlu(&s.0, "anatomy"));
    assert!(
        e.contains("anatomy_test.csv:3") && e.contains("answer `E`"),
        "{e}"
    );
    s.write("mmlu-medical/anatomy_test.csv", "q,a,b,c,A\n");
    let e = err_of(load_mmlu(&s.0, "anatomy"));
    assert!(
        e.contains("anatomy_test.csv:1") && e.contains("5 columns"),
        "{e}"
    );
    s.write(
        "mmlu-medical/anatomy_test.csv",
        "\"multi\nline, question\",a,b,c,d,B\n",
    );
    let r = load_mmlu(&s.0, "anatomy").unwrap();
    assert_eq!(
        (r[0].question.as_str(), r[0].gold),
        ("multi\nline, question", 1)
    );
}

#[test]
fn pubmedqa_bad_label_and_missing_pmid() {
    let s = Scratch::new("pubmedqa");
    s.write(
        "pubmedqa/ori_pqal.json",
        "{\n  \"1\": {\"QUESTION\": \"q\", \"CONTEXTS\": [\"a\", \"b\"]},\n  \"2\": {\"CONTEXTS\": []}\n}",
    );
    s.write(
        "pubmedqa/test_ground_truth.json",
        "{\n  \"1\": \"yes\",\n  \"2\": \"perhaps\"\n}",
    );
    let e = err_of(load_pubmedqa(&s.0, ""));
    assert!(
        e.contains("test_ground_truth.json:3") && e.contains("`perhaps`"),
        "{e}"
    );
    s.write(
        "pubmedqa/test_ground_truth.json",
        "{\n  \"1\": \"yes\",\n  \"2\": \"no\"\n}",
    );
    let e = err_of(load_pubmedqa(&s.0, ""));
    assert!(
        e.contains("ori_pqal.json:3") && e.contains("`QUESTION`"),
        "{e}"
    );
    s.write(
        "pubmedqa/test_ground_truth.json",
        "{\"3\": \"no\", \"1\": \"maybe\"}",
    );
    assert!(err_of(load_pubmedqa(&s.0, "")).contains("PMID 3"));
    // Documents come in the order of ori_pqal.json, not of the (answer-sorted) ground truth.
    s.write(
        "pubmedqa/ori_pqal.json",
        "{\"5\": {\"QUESTION\": \"q5\", \"CONTEXTS\": []}, \"1\": {\"QUESTION\": \"q\", \"CONTEXTS\": [\"a\", \"b\"]}, \"7\": {}}",
    );
    s.write(
        "pubmedqa/test_ground_truth.json",
        "{\"1\": \"maybe\", \"5\": \"no\"}",
    );
    let r = load_pubmedqa(&s.0, "").unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].question.as_str(), r[0].gold), ("q5", 1));
    assert_eq!((r[1].extra.as_str(), r[1].gold), ("a\nb", 2));
}

fn smollm2() -> Option<(Checkpoint, Tokenizer)> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model::testkit::require_file(&p, "scripts/get-smollm2.sh fetches it") {
        return None;
    }
    let ckpt = Checkpoint::open(&p).expect("open SmolLM2");
    let tok = model::load_tokenizer(&ckpt).expect("tokenizer");
    Some((ckpt, tok))
}

#[test]
fn packed_scoring_equals_one_window_per_continuation() {
    let Some((ckpt, tok)) = smollm2() else { return };
    let docs: Vec<(&str, Vec<&str>)> = vec![
        (
            "Question: How do you boil an egg?\nAnswer:",
            vec![
                " Put it in boiling water for ten minutes.",
                " Freeze it overnight.",
                " Paint it.",
            ],
        ),
        (
            "Question: Which gas do plants take in?\nAnswer:",
            vec![" carbon dioxide", " oxygen gas from the soil"],
        ),
        // All single tokens: the one-window path.
        ("Is the sun hot? Answer:", vec![" yes", " no"]),
    ];
    let max_len = ckpt.config().max_position_embeddings;
    let reqs: Vec<Request> = docs
        .iter()
        .map(|(c, conts)| {
            encode_request(
                &tok,
                c,
                &conts.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                max_len,
            )
            .unwrap()
        })
        .collect();
    assert!(!reqs[0].single_token() && reqs[2].single_token());
    // The same continuations, each in its own plain window.
    let plain: Vec<Request> = reqs
        .iter()
        .flat_map(|r| {
            r.continuations.iter().map(|c| {
                let mut context = r.context.clone();
                context.extend_from_slice(&c[..c.len() - 1]);
                Request {
                    context,
                    continuations: vec![c.clone()],
                }
            })
        })
        .collect();
    let engine = LayerEngine::new(&ckpt, model::default_device(), 256);
    let head = engine.load_head().unwrap();
    let packed = score_requests(&engine, &head, &reqs, 1 << 16, |_, _| {}).unwrap();
    // Scored by hand from causal windows: sum the log-probabilities of the continuation tokens.
    let windows: Vec<Vec<u32>> = plain.iter().map(|r| r.context.clone()).collect();
    let mut states = engine.embed(&windows).unwrap();
    engine
        .run_blocks(&mut states, |_, _, _| Ok(()), || {})
        .unwrap();
    let v = head.vocab();
    let mut unpacked = Vec::new();
    for (r, s) in plain.iter().zip(&states) {
        let c = &r.continuations[0];
        let from = r.context.len() - c.len();
        let logits = head.logits(s, from);
        let mut ll = 0.0f64;
        for (j, &t) in c.iter().enumerate() {
            let row = &logits[j * v..(j + 1) * v];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            ll += row[t as usize] as f64 - lse;
        }
        unpacked.push(ll);
    }
    let packed: Vec<f64> = packed.into_iter().flatten().collect();
    assert_eq!(packed.len(), unpacked.len());
    let worst = packed
        .iter()
        .zip(&unpacked)
        .map(|(p, u)| (p - u).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "packed vs unpacked: {} continuations, largest difference {worst:.2e}",
        packed.len()
    );
    for (p, u) in packed.iter().zip(&unpacked) {
        assert!(
            (p - u).abs() < 1e-3,
            "packed {p} vs unpacked {u} (all: {packed:?} vs {unpacked:?})"
        );
    }
}

#[test]
fn obvious_task_scores_acc_one_end_to_end() {
    let Some((ckpt, tok)) = smollm2() else { return };
    let s = Scratch::new("obvious");
    let doc = |q: &str, choices: &[(&str, &str)], key: &str| {
        let ch: Vec<String> = choices
            .iter()
            .map(|(l, t)| {
                format!("{{\"text\": \"{t}\", \"label\": \"{l}\", \"para\": \"ignored\"}}")
            })
            .collect();
        format!(
            "{{\"id\": \"x\", \"question\": {{\"stem\": \"{q}\", \"choices\": [{}]}}, \"answerKey\": \"{key}\"}}\n",
            ch.join(", ")
        )
    };
    let text = [
        doc(
            "What color is the sky on a clear day?",
            &[("A", "potato"), ("B", "blue")],
            "B",
        ),
        doc(
            "What is the capital of France?",
            &[
                ("1", "Paris"),
                ("2", "a sandwich"),
                ("3", "the number seven"),
            ],
            "1",
        ),
        doc(
            "Which animal says meow?",
            &[("A", "a spoon"), ("B", "a table"), ("C", "a cat")],
            "C",
        ),
    ]
    .concat();
    s.write("arc/arc_easy_test.jsonl", &text);
    let names = vec!["arc_easy".to_string()];
    let res = run_tasks(
        &ckpt,
        &tok,
        &names,
        &[],
        Some(&s.0),
        None,
        model::default_device(),
        |_, _, _| {},
    )
    .unwrap();
    let r = &res["arc_easy"];
    assert_eq!(r.n, 3);
    assert_eq!(r.acc, 1.0, "{r:?}");
    assert_eq!(r.acc_stderr, 0.0);
    // --limit keeps the first documents.
    let res = run_tasks(
        &ckpt,
        &tok,
        &names,
        &[],
        Some(&s.0),
        Some(2),
        model::default_device(),
        |_, _, _| {},
    )
    .unwrap();
    assert_eq!(res["arc_easy"].n, 2);
}

#[test]
fn unknown_task_is_an_error_before_loading_anything() {
    let Some((ckpt, tok)) = smollm2() else { return };
    let e = run_tasks(
        &ckpt,
        &tok,
        &["piqa".into(), "nope".into()],
        &[],
        Some(Path::new("/nonexistent")),
        None,
        model::default_device(),
        |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("unknown task `nope`") && e.contains("arc_easy") && e.contains("mmlu_medical"),
        "{e}"
    );
}

/// MedQA-format items (the `medqa/test.jsonl` layout), written for the test.
const MEDQA_ITEMS: &[(&str, [&str; 4], &str)] = &[
    (
        "A 54-year-old man has crushing chest pain radiating to the left arm for 30 minutes. Which test should be done first?",
        [
            "Electrocardiogram",
            "Colonoscopy",
            "Skin biopsy",
            "Audiometry",
        ],
        "A",
    ),
    (
        "A 6-year-old girl has a barking cough and inspiratory stridor. Which virus most often causes this?",
        [
            "Parainfluenza virus",
            "Hepatitis B virus",
            "Rabies virus",
            "Epstein-Barr virus",
        ],
        "A",
    ),
    (
        "Which vitamin deficiency causes scurvy?",
        ["Vitamin A", "Vitamin D", "Vitamin C", "Vitamin K"],
        "C",
    ),
    (
        "A patient on warfarin has an INR of 9 and no bleeding. What is given by mouth?",
        ["Protamine", "Vitamin K", "Heparin", "Aspirin"],
        "B",
    ),
    (
        "Which organ produces insulin?",
        ["Spleen", "Gallbladder", "Thyroid", "Pancreas"],
        "D",
    ),
    (
        "Which electrolyte disturbance causes peaked T waves on an ECG?",
        [
            "Hypocalcemia",
            "Hyperkalemia",
            "Hyponatremia",
            "Hypomagnesemia",
        ],
        "B",
    ),
];

/// A task file in the documented schema, written from MedQA items, gives exactly the prompts
/// and the accuracy of the built-in `medqa` task on the same items (broken once by dropping
/// the trailing newline of the lettered options in the custom template: the requests and the
/// scores differed).
#[test]
fn task_file_from_medqa_scores_exactly_as_the_built_in_task() {
    let s = Scratch::new("custom-medqa");
    let medqa: String = MEDQA_ITEMS
        .iter()
        .map(|(q, o, a)| {
            format!(
                "{}\n",
                serde_json::json!({"question": q, "answer_idx": a,
                    "options": {"A": o[0], "B": o[1], "C": o[2], "D": o[3]}})
            )
        })
        .collect();
    s.write("medqa/test.jsonl", &medqa);
    // The same items in the task-file schema, half with a letter and half with an index.
    let recs = load_medqa(&s.0, "").unwrap();
    let custom: String = recs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let answer = if i % 2 == 0 {
                serde_json::json!(r.labels[r.gold])
            } else {
                serde_json::json!(r.gold)
            };
            format!(
                "{}\n",
                serde_json::json!({"question": r.question, "choices": r.options, "answer": answer})
            )
        })
        .collect();
    let file = s.0.join("my_medqa.jsonl");
    std::fs::write(&file, custom).unwrap();
    let mine = eval::tasks::custom::load_task_file(&file).unwrap();
    assert_eq!(
        mine.iter().map(|r| r.gold).collect::<Vec<_>>(),
        recs.iter().map(|r| r.gold).collect::<Vec<_>>()
    );
    let Some((ckpt, tok)) = smollm2() else { return };
    let medqa_def = eval::tasks::TASKS
        .iter()
        .find(|t| t.name == "medqa")
        .unwrap();
    let a = eval::tasks::build_requests(medqa_def, &recs, &tok, 2048).unwrap();
    let b = eval::tasks::build_requests(&eval::tasks::custom::CUSTOM, &mine, &tok, 2048).unwrap();
    assert_eq!(a, b, "the task file's prompts differ from medqa's");
    let res = run_tasks(
        &ckpt,
        &tok,
        &["medqa".into()],
        std::slice::from_ref(&file),
        Some(&s.0),
        None,
        model::default_device(),
        |_, _, _| {},
    )
    .unwrap();
    let (built_in, own) = (&res["medqa"], &res["my_medqa"]);
    assert_eq!(own.n, MEDQA_ITEMS.len());
    assert_eq!(
        (built_in.acc, built_in.acc_norm, built_in.n),
        (own.acc, own.acc_norm, own.n)
    );
}

/// Bad task files: each an error naming the file and line (or the file).
#[test]
fn bad_task_files_name_file_line_and_problem() {
    let s = Scratch::new("custom-bad");
    let load = |name: &str, text: &str| {
        s.write(name, text);
        err_of(eval::tasks::custom::load_task_file(&s.0.join(name)))
    };
    let ok = r#"{"question": "q?", "choices": ["a", "b"], "answer": 1}"#;
    for (text, needles) in [
        (
            format!(
                "{ok}\n{{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 0, \"gold\": 1}}\n"
            ),
            vec![":2:", "unknown field `gold`"],
        ),
        (
            r#"{"question": "q", "choices": ["a", "b"], "answer": 2}"#.to_string(),
            vec![":1:", "`answer` 2 is out of range (0 to 1)"],
        ),
        (
            r#"{"question": "q", "choices": ["a", "b", "c"], "answer": "D"}"#.to_string(),
            vec![":1:", "not a letter from A to C"],
        ),
        (
            r#"{"question": "q", "choices": ["a"], "answer": 0}"#.to_string(),
            vec![":1:", "`choices` has 1 entries"],
        ),
        (
            format!("{ok}\n\n{{\"choices\": [\"a\", \"b\"], \"answer\": 0}}\n"),
            vec![":3:", "missing field `question`"],
        ),
        (format!("{ok}\nnot json\n"), vec![":2:"]),
        ("\n\n".to_string(), vec!["no items"]),
    ] {
        let e = load("t.jsonl", &text);
        assert!(e.contains("t.jsonl"), "{e}");
        for n in needles {
            assert!(e.contains(n), "{n} not in: {e}");
        }
    }
    let e = err_of(eval::tasks::custom::task_file_name(Path::new(
        "x/medqa.jsonl",
    )));
    assert!(e.contains("built-in task"), "{e}");
    // Unlettered items score the option texts after a context line.
    s.write(
        "plain.jsonl",
        r#"{"question": "q?", "choices": ["yes", "no"], "answer": "B", "context": "Abstract: x", "lettered": false}"#,
    );
    let r = &eval::tasks::custom::load_task_file(&s.0.join("plain.jsonl")).unwrap()[0];
    assert_eq!(r.gold, 1);
    assert_eq!(
        eval::tasks::custom::custom_text(r),
        "Abstract: x\nQuestion: q?\nAnswer:"
    );
    assert_eq!(eval::tasks::custom::custom_choices(r), vec!["yes", "no"]);
}
