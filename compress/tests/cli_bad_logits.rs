//! `compress eval --teacher-logits FILE` on a hostile corpus of saved teacher logits, through
//! the real binary: NaN and infinite values, token ids outside the vocabulary, truncated files,
//! headers claiming huge counts, and files saved for another protocol, first scored position,
//! ctx, chunk count, vocabulary or text. Each exits 2 with one `error:` line of at most 300
//! characters naming the file, no panic, and nothing written. A valid file still gives the
//! live teacher's divergence.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use model::testkit::{calib_text, tiny_config, write_hf};
use serde_json::Value;

fn compress(args: &[PathBuf]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_compress"))
        .args(args)
        .output()
        .unwrap()
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

/// Runs `compress args` and checks: exit code 2, one `error:` line of at most 300 characters
/// naming `file` and containing every needle, no panic, and no change under `root`.
fn refused(root: &Path, args: &[PathBuf], file: &str, needles: &[&str]) {
    let refs: Vec<&Path> = args.iter().map(PathBuf::as_path).collect();
    let err = common::fails(root, &refs, file, needles);
    assert!(err.trim_end().len() <= 300, "error line too long: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Saves teacher logits for `student` with `extra` options (e.g. `--protocol hf`).
fn save(root: &Path, name: &str, text: &Path, extra: &[&str]) -> PathBuf {
    let out_path = root.join(name);
    let mut args = vec![
        p("eval"),
        root.join("student"),
        p("--ppl"),
        text.to_path_buf(),
        p("--teacher"),
        root.join("teacher"),
        p("--save-teacher-logits"),
        out_path.clone(),
    ];
    args.extend(extra.iter().map(|s| p(s)));
    let out = compress(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out_path
}

/// Header and records of a saved file.
fn split(path: &Path) -> (Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
    (
        serde_json::from_slice(&bytes[..nl]).unwrap(),
        bytes[nl + 1..].to_vec(),
    )
}

fn join(h: &Value, body: &[u8]) -> Vec<u8> {
    let mut b = h.to_string().into_bytes();
    b.push(b'\n');
    b.extend_from_slice(body);
    b
}

fn put_f32(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Teacher and student (vocabulary 300), a student with vocabulary 320, two texts.
fn setup(root: &Path) -> (PathBuf, PathBuf) {
    write_hf(&root.join("teacher"), &tiny_config(), 9, |_, _| {});
    write_hf(&root.join("student"), &tiny_config(), 10, |_, _| {});
    let mut wide = tiny_config();
    wide["vocab_size"] = 320.into();
    write_hf(&root.join("student320"), &wide, 10, |_, _| {});
    let text = root.join("text.txt");
    std::fs::write(&text, calib_text(2000)).unwrap();
    let other = root.join("other.txt");
    std::fs::write(&other, calib_text(2000).to_uppercase()).unwrap();
    (text, other)
}

/// The base options of every run here: ctx 32, 2 chunks, the llama protocol.
const BASE: [&str; 4] = ["--ctx", "32", "--chunks", "2"];

#[test]
fn hostile_teacher_logits_exit_2_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (text, other) = setup(root);
    let good = save(
        root,
        "good.bin",
        &text,
        &[&BASE[..], &["--top-k", "8"]].concat(),
    );
    let full = save(
        root,
        "full.bin",
        &text,
        &[&BASE[..], &["--top-k", "300"]].concat(),
    );
    let hf = save(
        root,
        "hf.bin",
        &text,
        &[&BASE[..], &["--top-k", "8", "--protocol", "hf"]].concat(),
    );
    let ctx16 = save(root, "ctx16.bin", &text, &["--ctx", "16", "--chunks", "2"]);
    let chunks3 = save(
        root,
        "chunks3.bin",
        &text,
        &["--ctx", "32", "--chunks", "3"],
    );
    let other_text = save(root, "other_text.bin", &other, &BASE);

    let (h, body) = split(&good);
    let rec = 8 * 8 + 4;
    let n = body.len() / rec;
    assert_eq!((n, h["first"].as_u64()), (2 * 15, Some(16)));
    let floats = move |b: &mut Vec<u8>, rows: std::ops::Range<usize>, v: f32| {
        for r in rows {
            for j in 0..8 {
                put_f32(b, r * rec + 8 * j + 4, v);
            }
            put_f32(b, r * rec + 64, v);
        }
    };
    type Edit = Box<dyn Fn(&mut Value, &mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        // NaN.
        (
            "nan_first.bin",
            Box::new(|_, b| put_f32(b, 4, f32::NAN)),
            &["record 0", "NaN"],
        ),
        (
            "nan_target.bin",
            Box::new(move |_, b| put_f32(b, (n - 1) * rec + 64, f32::NAN)),
            &["record 29", "NaN", "correct token"],
        ),
        (
            "nan_all.bin",
            Box::new(move |_, b| floats(b, 0..n, f32::NAN)),
            &["NaN"],
        ),
        // All -inf.
        (
            "neginf_all.bin",
            Box::new(move |_, b| floats(b, 0..n, f32::NEG_INFINITY)),
            &["-inf"],
        ),
        (
            "neginf_row.bin",
            Box::new(move |_, b| floats(b, 5..6, f32::NEG_INFINITY)),
            &["record 5", "-inf"],
        ),
        (
            "neginf_target.bin",
            Box::new(|_, b| put_f32(b, 64, f32::NEG_INFINITY)),
            &["-inf", "correct token"],
        ),
        // +inf.
        (
            "posinf_top.bin",
            Box::new(move |_, b| put_f32(b, 2 * rec + 28, f32::INFINITY)),
            &["record 2", "inf"],
        ),
        (
            "posinf_target.bin",
            Box::new(|_, b| put_f32(b, 64, f32::INFINITY)),
            &["inf", "correct token"],
        ),
        (
            "positive.bin",
            Box::new(|_, b| put_f32(b, 4, 2.0)),
            &["record 0", "log-probability 2"],
        ),
        // Distributions that are not.
        (
            "unsorted.bin",
            Box::new(|_, b| put_f32(b, 4, -60.0)),
            &["record 0", "not sorted"],
        ),
        (
            "duplicate.bin",
            Box::new(|_, b| {
                let id: [u8; 4] = b[0..4].try_into().unwrap();
                b[8..12].copy_from_slice(&id);
            }),
            &["record 0", "appears twice"],
        ),
        (
            "mass.bin",
            Box::new(move |_, b| floats(b, 3..4, -0.01)),
            &["record 3", "sum to"],
        ),
        // Token ids outside the vocabulary.
        (
            "id300.bin",
            Box::new(|_, b| b[0..4].copy_from_slice(&300u32.to_le_bytes())),
            &["token id 300", "vocabulary of 300"],
        ),
        (
            "idmax.bin",
            Box::new(move |_, b| {
                let at = (n - 1) * rec + 56;
                b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            }),
            &["record 29", "token id 4294967295"],
        ),
        (
            "vocab400.bin",
            Box::new(|h, _| h["vocab"] = 400.into()),
            &["vocab 400", "vocab 300"],
        ),
        (
            "vocab4.bin",
            Box::new(|h, _| h["vocab"] = 4.into()),
            &["`k` is 8", "`vocab`"],
        ),
        // Truncated.
        (
            "trunc1.bin",
            Box::new(|_, b| {
                b.pop();
            }),
            &["the file has 2039"],
        ),
        (
            "trunc_half.bin",
            Box::new(|_, b| b.truncate(b.len() / 2)),
            &["the file has 1020"],
        ),
        (
            "trunc_body.bin",
            Box::new(|_, b| b.clear()),
            &["the file has 0"],
        ),
        (
            "long.bin",
            Box::new(|_, b| b.extend_from_slice(&[0; 68])),
            &["the file has 2108"],
        ),
        // Headers claiming huge counts.
        (
            "huge_positions.bin",
            Box::new(|h, _| h["positions"] = (1u64 << 62).into()),
            &["`positions` is 4611686018427387904"],
        ),
        (
            "huge_consistent.bin",
            Box::new(|h, _| {
                h["chunks"] = (1u64 << 50).into();
                h["positions"] = ((1u64 << 50) * 15).into();
            }),
            &["`positions`", "the file has 2040"],
        ),
        (
            "huge_k.bin",
            Box::new(|h, _| h["k"] = (1u64 << 61).into()),
            &["`k` is 2305843009213693952"],
        ),
        (
            "huge_k_vocab.bin",
            Box::new(|h, _| {
                h["k"] = (1u64 << 40).into();
                h["vocab"] = (1u64 << 40).into();
            }),
            &["`k` 1099511627776", "the file has 2040"],
        ),
        (
            "huge_ctx.bin",
            Box::new(|h, _| h["ctx"] = (1u64 << 60).into()),
            &["`first` is 16"],
        ),
        (
            "negative_k.bin",
            Box::new(|h, _| h["k"] = (-8).into()),
            &["`k` is -8"],
        ),
        (
            "float_chunks.bin",
            Box::new(|h, _| h["chunks"] = 2.5.into()),
            &["`chunks` is 2.5"],
        ),
        // Protocol and first scored position inconsistent with each other.
        (
            "protocol_only.bin",
            Box::new(|h, _| h["protocol"] = "hf".into()),
            &["`first` is 16", "protocol hf"],
        ),
        (
            "protocol_gpt.bin",
            Box::new(|h, _| h["protocol"] = "gpt".into()),
            &["`protocol` is \"gpt\""],
        ),
        (
            "first0.bin",
            Box::new(|h, _| h["first"] = 0.into()),
            &["`first` is 0", "from position 16"],
        ),
        (
            "first15.bin",
            Box::new(|h, _| h["first"] = 15.into()),
            &["`first` is 15"],
        ),
        (
            "positions29.bin",
            Box::new(|h, _| h["positions"] = 29.into()),
            &["`positions` is 29", "make 30"],
        ),
        (
            "positions62.bin",
            Box::new(|h, _| h["positions"] = 62.into()),
            &["`positions` is 62"],
        ),
        (
            "hf_header_llama_body.bin",
            Box::new(|h, _| {
                h["protocol"] = "hf".into();
                h["first"] = 0.into();
                h["positions"] = 62.into();
            }),
            &["`positions` 62", "the file has 2040"],
        ),
        // Other header damage.
        (
            "format.bin",
            Box::new(|h, _| h["format"] = "other-v9".into()),
            &["`format`"],
        ),
        (
            "hash.bin",
            Box::new(|h, _| h["tokens_fnv1a"] = "zz".into()),
            &["`tokens_fnv1a`"],
        ),
        (
            "no_k.bin",
            Box::new(|h, _| {
                h.as_object_mut().unwrap().remove("k");
            }),
            &["lacks field `k`"],
        ),
    ];
    let bad = root.join("bad");
    std::fs::create_dir(&bad).unwrap();
    let mut files = Vec::new();
    for (name, edit, needles) in &cases {
        let (mut hh, mut b) = (h.clone(), body.clone());
        edit(&mut hh, &mut b);
        let f = bad.join(name);
        std::fs::write(&f, join(&hh, &b)).unwrap();
        files.push((f, *name, needles.to_vec()));
    }
    // Bytes that are not a header at all.
    for (name, bytes, needle) in [
        ("empty.bin", b"".to_vec(), "the file is empty"),
        (
            "cut_header.bin",
            std::fs::read(&good).unwrap()[..20].to_vec(),
            "no header line",
        ),
        ("not_json.bin", b"{nope\n\x01\x02".to_vec(), "not JSON"),
        ("array.bin", b"[1, 2]\n".to_vec(), "not a JSON object"),
        ("no_newline.bin", vec![b'{'; 70_000], "no header line"),
    ] {
        let f = bad.join(name);
        std::fs::write(&f, bytes).unwrap();
        files.push((f, name, vec![needle]));
    }
    // The run's correct token disagrees with its entry (every token kept: always listed).
    let (hf_full, mut b) = split(&full);
    let rec300 = 300 * 8 + 4;
    let t0 = f32::from_le_bytes(b[rec300 - 4..rec300].try_into().unwrap());
    put_f32(&mut b, rec300 - 4, t0 - 1.0);
    let swapped = bad.join("swapped_target.bin");
    std::fs::write(&swapped, join(&hf_full, &b)).unwrap();
    files.push((
        swapped,
        "swapped_target.bin",
        vec!["record 0", "correct token"],
    ));

    let json = root.join("report.json");
    // `opts` replace the base options (clap refuses a repeated option).
    let run = |model: &str, logits: &Path, opts: &[&str]| {
        let opts = if opts.is_empty() { &BASE[..] } else { opts };
        let mut a = vec![p("eval"), root.join(model), p("--ppl"), text.clone()];
        a.extend(opts.iter().map(|s| p(s)));
        a.extend([
            p("--teacher-logits"),
            logits.to_path_buf(),
            p("--json"),
            json.clone(),
        ]);
        a
    };
    for (f, name, needles) in &files {
        refused(root, &run("student", f, &[]), name, needles);
    }
    // Files saved for another run: each field named with both values.
    let (vocab400, missing) = (bad.join("vocab400.bin"), root.join("missing.bin"));
    // (logits file, model, options, name in the error, needles)
    type FieldCase<'a> = (&'a Path, &'a str, &'a [&'a str], &'a str, &'a [&'a str]);
    let field_cases: Vec<FieldCase> = vec![
        (
            &hf,
            "student",
            &[],
            "hf.bin",
            &["protocol hf", "protocol llama", "--protocol"],
        ),
        (
            &good,
            "student",
            &["--ctx", "32", "--chunks", "2", "--protocol", "hf"],
            "good.bin",
            &["protocol llama", "protocol hf"],
        ),
        (
            &ctx16,
            "student",
            &[],
            "ctx16.bin",
            &["ctx 16", "ctx 32", "--ctx"],
        ),
        (
            &good,
            "student",
            &["--ctx", "16", "--chunks", "2"],
            "good.bin",
            &["ctx 32", "ctx 16"],
        ),
        (
            &chunks3,
            "student",
            &[],
            "chunks3.bin",
            &["chunks 3", "chunks 2", "--chunks"],
        ),
        (
            &good,
            "student",
            &["--ctx", "32", "--chunks", "3"],
            "good.bin",
            &["chunks 2", "chunks 3"],
        ),
        (
            &good,
            "student320",
            &[],
            "good.bin",
            &["vocab 300", "vocab 320"],
        ),
        (
            &other_text,
            "student",
            &[],
            "other_text.bin",
            &["tokens_fnv1a", "--ppl text"],
        ),
        (
            &vocab400,
            "student",
            &[],
            "vocab400.bin",
            &["vocab 400", "vocab 300"],
        ),
        (
            &missing,
            "student",
            &[],
            "missing.bin",
            &["cannot read teacher logits", "No such file"],
        ),
        (&bad, "student", &[], "bad", &["directory"]),
    ];
    for (file, model, extra, name, needles) in field_cases {
        refused(root, &run(model, file, extra), name, needles);
    }
}

/// `kld.mean` and the teacher's perplexity from a report.
fn kld_of(json: &Path) -> (f64, f64, u64) {
    let r: Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    (
        r["kld"]["mean"].as_f64().unwrap(),
        r["teacher"]["perplexity"]["value"].as_f64().unwrap(),
        r["kld"]["n"].as_u64().unwrap(),
    )
}

#[test]
fn saved_logits_give_the_live_divergence() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (text, _) = setup(root);
    for protocol in ["llama", "hf"] {
        let live_json = root.join(format!("live-{protocol}.json"));
        let opts = [&BASE[..], &["--protocol", protocol]].concat();
        let full = root.join(format!("full-{protocol}.bin"));
        let top8 = root.join(format!("top8-{protocol}.bin"));
        save(
            root,
            full.file_name().unwrap().to_str().unwrap(),
            &text,
            &[
                &opts[..],
                &["--top-k", "300", "--json", live_json.to_str().unwrap()],
            ]
            .concat(),
        );
        save(
            root,
            top8.file_name().unwrap().to_str().unwrap(),
            &text,
            &[&opts[..], &["--top-k", "8"]].concat(),
        );
        let (live, live_ppl, live_n) = kld_of(&live_json);
        for (logits, exact) in [(&full, true), (&top8, false)] {
            let json = root.join("saved.json");
            let mut args = vec![p("eval"), root.join("student"), p("--ppl"), text.clone()];
            args.extend(opts.iter().map(|s| p(s)));
            args.extend([
                p("--teacher-logits"),
                logits.clone(),
                p("--json"),
                json.clone(),
                p("--force"),
            ]);
            let out = compress(&args);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (kld, ppl, n) = kld_of(&json);
            assert_eq!(n, live_n);
            assert!(
                (ppl - live_ppl).abs() <= 1e-4 * live_ppl,
                "{protocol}: {ppl} vs {live_ppl}"
            );
            if exact {
                assert!(
                    (kld - live).abs() <= 1e-4 * live + 1e-6,
                    "{protocol}: saved {kld} vs live {live}"
                );
            } else {
                // Top 8 of 300 and one bucket: a lower bound, and not a trivial one.
                assert!(
                    kld <= live + 1e-6 && kld > 0.0,
                    "{protocol}: {kld} vs {live}"
                );
            }
        }
    }
}
