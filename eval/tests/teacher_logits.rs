//! Saved teacher logits, at the library level: a file round-trips through save and load; a
//! damaged file is refused by `TeacherLogits::parse` with an error naming the file and what
//! is wrong; a file that does not fit the run (protocol, ctx, chunks, vocabulary, tokens) is
//! refused by `check_run` and `kl_from_saved` with both values, never compared at the wrong
//! positions nor panicking; and with every token kept the saved divergence equals the live one.

use std::path::Path;

use eval::kld::{TeacherLogits, kl_from_saved, teacher_logits};
use eval::perplexity::make_windows;
use eval::{PplOptions, Protocol, kl_divergence};
use model::testkit::{calib_text, tiny_config, write_hf};
use model::{Checkpoint, Tokenizer};

/// A tiny teacher and student (one block each, vocabulary 300) and the tokens of some text.
struct Fixture {
    _dir: tempfile::TempDir,
    teacher: Checkpoint,
    student: Checkpoint,
    tok: Tokenizer,
    tokens: Vec<u32>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg["num_hidden_layers"] = 1.into();
    write_hf(&dir.path().join("t"), &cfg, 3, |_, _| {});
    write_hf(&dir.path().join("s"), &cfg, 4, |_, _| {});
    let teacher = Checkpoint::open(&dir.path().join("t")).unwrap();
    let student = Checkpoint::open(&dir.path().join("s")).unwrap();
    let tok = model::load_tokenizer(&teacher).unwrap();
    let tokens = tok.encode(&calib_text(300)).unwrap();
    Fixture {
        _dir: dir,
        teacher,
        student,
        tok,
        tokens,
    }
}

fn opts(ctx: usize, chunks: usize, protocol: Protocol) -> PplOptions {
    PplOptions {
        ctx,
        chunks: Some(chunks),
        protocol,
    }
}

fn saved(f: &Fixture, o: &PplOptions, k: usize) -> TeacherLogits {
    teacher_logits(
        &f.teacher,
        &f.tok,
        &f.tokens,
        o,
        k,
        model::default_device(),
        |_, _| {},
    )
    .unwrap()
}

/// The header line and the records of a saved file.
fn split(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
    (
        serde_json::from_slice(&bytes[..nl]).unwrap(),
        bytes[nl + 1..].to_vec(),
    )
}

fn join(header: &serde_json::Value, body: &[u8]) -> Vec<u8> {
    let mut b = header.to_string().into_bytes();
    b.push(b'\n');
    b.extend_from_slice(body);
    b
}

fn parse_err(bytes: &[u8]) -> String {
    let e = TeacherLogits::parse(bytes, Path::new("bad.logits"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("bad.logits: ") && !e.contains('\n') && e.len() <= 300,
        "not one short line naming the file: {e}"
    );
    e
}

#[test]
fn round_trip_and_damaged_files() {
    let f = fixture();
    let o = opts(16, 2, Protocol::Llama);
    let s = saved(&f, &o, 5);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.logits");
    s.save(&path).unwrap();
    let back = TeacherLogits::load(&path).unwrap();
    assert_eq!(back.header, s.header);
    assert_eq!(back.rows, s.rows);
    assert_eq!(back.path, path);
    assert_eq!((s.header.positions, s.header.first), (2 * 7, 8));

    let bytes = std::fs::read(&path).unwrap();
    let (h, body) = split(&bytes);
    let rec = 5 * 8 + 4;
    let f32_at =
        |body: &mut Vec<u8>, o: usize, v: f32| body[o..o + 4].copy_from_slice(&v.to_le_bytes());
    // Values: NaN, infinities, all -inf, positive log-probabilities, unsorted, duplicates.
    type Edit<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;
    let cases: Vec<(Edit<'_>, &str)> = vec![
        (
            Box::new(|b| f32_at(b, 4, f32::NAN)),
            "record 0: log-probability NaN",
        ),
        (
            Box::new(|b| f32_at(b, rec + 5 * 8, f32::NAN)),
            "record 1: log-probability NaN of the correct",
        ),
        (
            Box::new(|b| f32_at(b, 12, f32::INFINITY)),
            "record 0: log-probability inf",
        ),
        (Box::new(|b| f32_at(b, 4, 0.5)), "not a finite value <= 0"),
        (
            Box::new(|b| {
                for r in 0..b.len() / rec {
                    for j in 0..=5 {
                        f32_at(b, r * rec + 8 * j + 4 * (j < 5) as usize, f32::NEG_INFINITY);
                    }
                }
            }),
            "log-probability -inf",
        ),
        (Box::new(|b| f32_at(b, 4, -30.0)), "not sorted"),
        (
            Box::new(|b| {
                let id: [u8; 4] = b[0..4].try_into().unwrap();
                b[8..12].copy_from_slice(&id);
            }),
            "appears twice",
        ),
        (
            Box::new(|b| {
                for j in 0..5 {
                    f32_at(b, 8 * j + 4, -0.01);
                }
            }),
            "sum to",
        ),
        (
            Box::new(|b| b[0..4].copy_from_slice(&300u32.to_le_bytes())),
            "token id 300 is outside the vocabulary of 300",
        ),
        (
            Box::new(|b| b[rec..rec + 4].copy_from_slice(&u32::MAX.to_le_bytes())),
            "record 1: token id 4294967295",
        ),
        (Box::new(|b| b.truncate(b.len() - 1)), "the file has"),
        (Box::new(|b| b.truncate(rec)), "the file has 44"),
        (Box::new(|b| b.clear()), "the file has 0"),
        (Box::new(|b| b.extend_from_slice(&[0; 4])), "the file has"),
    ];
    for (edit, needle) in &cases {
        let mut b = body.clone();
        edit(&mut b);
        let e = parse_err(&join(&h, &b));
        assert!(e.contains(needle), "expected `{needle}`: {e}");
    }
    // Header fields: types, ranges, consistency with each other and with the size.
    let header_cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("k", (-1).into(), "field `k` is -1"),
        ("k", "5".into(), "field `k` is \"5\""),
        ("k", 0.into(), "field `k` is 0"),
        ("k", 301.into(), "field `k` is 301, outside 1..=300"),
        ("k", (1u64 << 61).into(), "field `k`"),
        ("positions", (1u64 << 60).into(), "field `positions`"),
        ("positions", 15.into(), "field `positions` is 15"),
        ("chunks", (1u64 << 40).into(), "field `positions`"),
        ("chunks", 0.into(), "field `chunks` is 0"),
        ("first", 0.into(), "field `first` is 0"),
        ("protocol", "hf".into(), "field `first` is 8"),
        ("protocol", "gpt".into(), "field `protocol`"),
        ("ctx", 1.into(), "field `ctx`"),
        ("ctx", 1e300.into(), "field `ctx`"),
        ("vocab", 0.into(), "field `vocab` is 0"),
        ("format", "other".into(), "field `format`"),
        ("tokens_fnv1a", "xyz".into(), "field `tokens_fnv1a`"),
        ("model", 3.into(), "field `model`"),
    ];
    for (field, value, needle) in header_cases {
        let mut hh = h.clone();
        hh[field] = value;
        let e = parse_err(&join(&hh, &body));
        assert!(e.contains(needle), "{field}: expected `{needle}`: {e}");
    }
    // Chunks and positions both huge but consistent: refused by size, nothing allocated.
    let mut hh = h.clone();
    hh["chunks"] = (1u64 << 50).into();
    hh["positions"] = ((1u64 << 50) * 7).into();
    assert!(parse_err(&join(&hh, &body)).contains("the file has 616"));
    let mut hh = h.clone();
    hh.as_object_mut().unwrap().remove("vocab");
    assert!(parse_err(&join(&hh, &body)).contains("lacks field `vocab`"));
    assert!(parse_err(b"").contains("the file is empty"));
    assert!(parse_err(b"{\"k\": 1").contains("no header line"));
    assert!(parse_err(b"[1, 2]\n").contains("not a JSON object"));
    assert!(parse_err(b"{nope\n").contains("not JSON"));
    // load refuses a lying header from its size before reading the rest.
    let mut hh = h.clone();
    hh["chunks"] = (1u64 << 50).into();
    hh["positions"] = ((1u64 << 50) * 7).into();
    std::fs::write(&path, join(&hh, &body)).unwrap();
    let e = TeacherLogits::load(&path).err().unwrap().to_string();
    assert!(e.contains("t.logits") && e.contains("`positions`"), "{e}");
}

#[test]
fn rows_for_another_run_are_refused_with_both_values() {
    let f = fixture();
    let llama = opts(16, 2, Protocol::Llama);
    let s = saved(&f, &llama, 300);
    let vocab = f.student.config().vocab_size;
    let check = |s: &TeacherLogits, o: &PplOptions, vocab: usize| {
        let (w, first) = make_windows(&f.tokens, &f.tok, o).unwrap();
        s.check_run(vocab, &w, first, o)
            .err()
            .map(|e| e.to_string())
    };
    assert_eq!(check(&s, &llama, vocab), None);
    let cases = [
        (
            opts(16, 2, Protocol::Hf),
            300,
            "saved with protocol llama, this run has protocol hf",
        ),
        (
            opts(32, 2, Protocol::Llama),
            300,
            "saved with ctx 16, this run has ctx 32",
        ),
        (
            opts(16, 3, Protocol::Llama),
            300,
            "saved with chunks 2, this run has chunks 3",
        ),
        (
            opts(16, 1, Protocol::Llama),
            300,
            "saved with chunks 2, this run has chunks 1",
        ),
        (
            llama.clone(),
            320,
            "saved with vocab 300, this run has vocab 320",
        ),
    ];
    for (o, v, needle) in cases {
        let e = check(&s, &o, v).expect("refused");
        assert!(e.contains(needle), "expected `{needle}`: {e}");
    }
    // Other text, same counts: the token hash differs.
    let other = {
        let mut t = f.tokens.clone();
        t[20] = if t[20] == 5 { 6 } else { 5 };
        t
    };
    let (w, first) = make_windows(&other, &f.tok, &llama).unwrap();
    let e = s
        .check_run(vocab, &w, first, &llama)
        .unwrap_err()
        .to_string();
    assert!(e.contains("saved with tokens_fnv1a"), "{e}");
    // A correct-token log-probability that disagrees with its top-k entry.
    let mut swapped = s.clone();
    swapped.rows[0].target_logp = swapped.rows[3].target_logp - 0.5;
    assert!(check(&swapped, &llama, vocab).unwrap().contains("record 0"));
    // Rows built in memory that lie about their count: an error, not an index panic.
    let mut short = s.clone();
    short.rows.truncate(5);
    let e = kl_from_saved(
        &short,
        &f.student,
        &f.tok,
        &f.tokens,
        &llama,
        model::default_device(),
        |_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("5 records, header field `positions` is 14"),
        "{e}"
    );
    // Saved as hf and read as llama (both self-consistent): refused, not misaligned.
    let hf = saved(&f, &opts(16, 2, Protocol::Hf), 8);
    assert_eq!(hf.header.positions, 30);
    let e = check(&hf, &llama, vocab).unwrap();
    assert!(
        e.contains("protocol hf") && e.contains("protocol llama"),
        "{e}"
    );
}

#[test]
fn every_token_kept_gives_the_live_divergence() {
    let f = fixture();
    for o in [opts(16, 2, Protocol::Llama), opts(16, 2, Protocol::Hf)] {
        let s = saved(&f, &o, 1000); // capped at the vocabulary: exact KL
        assert_eq!(s.header.k, 300);
        let dev = model::default_device();
        let (_, t_live, k_live) = kl_divergence(
            &f.teacher,
            &f.student,
            &f.tok,
            &f.tokens,
            &o,
            dev.clone(),
            |_, _| {},
        )
        .unwrap();
        let (_, t_saved, k_saved) =
            kl_from_saved(&s, &f.student, &f.tok, &f.tokens, &o, dev, |_, _| {}).unwrap();
        assert_eq!(k_live.n, k_saved.n);
        assert!(
            (k_live.mean - k_saved.mean).abs() <= 1e-4 * k_live.mean.abs() + 1e-6,
            "{} vs {}",
            k_live.mean,
            k_saved.mean
        );
        assert!((t_live.value - t_saved.value).abs() <= 1e-4 * t_live.value);
        assert_eq!(k_live.top1_agreement, k_saved.top1_agreement);
    }
}
