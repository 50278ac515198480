//! Prompt/response pairs for black-box distillation: JSONL files of prompts (what
//! `compress generate` reads) and of (prompt, response) pairs (what it writes), and the
//! training windows of pairs, with only the response's tokens in the loss.

use std::path::Path;

use serde_json::Value;

use crate::train::MicroBatch;
use crate::{DistillError, Result};

/// Largest JSONL file read (bytes).
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// Most records (non-blank lines) read from one JSONL file.
pub const MAX_RECORDS: usize = 1_000_000;

/// The non-empty `prompt` string of every non-blank line of a JSONL file, with its 1-based
/// line number (other fields are ignored).
pub fn read_prompts(path: &Path) -> Result<Vec<(usize, String)>> {
    let records = read_records(path, &["prompt"])?;
    let mut out = Vec::with_capacity(records.len());
    for (line, mut fields) in records {
        let prompt = fields.remove(0);
        if prompt.is_empty() {
            return Err(at(path, line, "empty prompt"));
        }
        out.push((line, prompt));
    }
    if out.is_empty() {
        return Err(DistillError::Invalid(format!(
            "{}: no prompts (expected one JSON object per line with a string field `prompt`)",
            path.display()
        )));
    }
    Ok(out)
}

/// The `prompt` and `response` strings of every non-blank line of a JSONL file (the output
/// of `compress generate`; other fields are ignored).
pub fn read_pairs(path: &Path) -> Result<Vec<(String, String)>> {
    let records = read_records(path, &["prompt", "response"])?;
    if records.is_empty() {
        return Err(DistillError::Invalid(format!(
            "{}: no pairs (expected one JSON object per line with string fields `prompt` and `response`)",
            path.display()
        )));
    }
    Ok(records
        .into_iter()
        .map(|(_, mut f)| {
            let response = f.pop().expect("two fields");
            let prompt = f.pop().expect("two fields");
            (prompt, response)
        })
        .collect())
}

/// One training window per pair: BOS when the tokenizer adds one, the prompt's tokens, then
/// the response's (encoded separately, so the boundary is exact), cut to at most
/// `seq_len + 1` tokens, with a mask that counts a predicted position only when its target
/// token belongs to the response.
/// Pairs with no response token left to predict are skipped; none left at all is an error.
pub fn pair_batches(
    pairs: &[(String, String)],
    tok: &model::Tokenizer,
    seq_len: usize,
) -> Result<Vec<MicroBatch>> {
    if seq_len == 0 {
        return Err(DistillError::Invalid(
            "pair windows need a sequence length of at least 1".into(),
        ));
    }
    let mut out = Vec::with_capacity(pairs.len());
    for (prompt, response) in pairs {
        // BOS first when the tokenizer adds one, as `compress generate` conditioned on it.
        let mut ids: Vec<u32> = match tok.bos_id {
            Some(b) if tok.add_bos => vec![b],
            _ => Vec::new(),
        };
        ids.extend(tok.encode(prompt)?);
        let n_prompt = ids.len();
        ids.extend(tok.encode(response)?);
        ids.truncate(seq_len + 1);
        // Position j predicts token j + 1.
        let mask: Vec<f32> = (1..ids.len())
            .map(|t| if t >= n_prompt { 1.0 } else { 0.0 })
            .collect();
        if mask.iter().all(|&w| w == 0.0) {
            continue;
        }
        out.push(MicroBatch {
            windows: vec![ids],
            mask: Some(mask),
            index: Vec::new(),
        });
    }
    if out.is_empty() {
        return Err(DistillError::Invalid(format!(
            "none of the {} pairs has a response token to train on within a window of {seq_len} tokens",
            pairs.len()
        )));
    }
    Ok(out)
}

/// An error at a line of a file.
fn at(path: &Path, line: usize, msg: impl std::fmt::Display) -> DistillError {
    DistillError::Invalid(format!("{}: line {line}: {msg}", path.display()))
}

/// The string `fields` of every non-blank line, with 1-based line numbers; each line must be
/// a JSON object holding every field as a string.
fn read_records(path: &Path, fields: &[&str]) -> Result<Vec<(usize, Vec<String>)>> {
    let text = model::io::read_text(path, MAX_FILE_BYTES)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        if out.len() == MAX_RECORDS {
            return Err(at(
                path,
                n,
                format!("more than {MAX_RECORDS} records, the most one file may hold"),
            ));
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| at(path, n, format!("invalid JSON ({e})")))?;
        let Value::Object(obj) = value else {
            return Err(at(path, n, "not a JSON object"));
        };
        let mut got = Vec::with_capacity(fields.len());
        for f in fields {
            match obj.get(*f) {
                Some(Value::String(s)) => got.push(s.clone()),
                Some(_) => return Err(at(path, n, format!("field `{f}` is not a string"))),
                None => return Err(at(path, n, format!("missing field `{f}`"))),
            }
        }
        out.push((n, got));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer(dir: &Path) -> model::Tokenizer {
        model::testkit::write_byte_tokenizer(dir, 300);
        model::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap()
    }

    fn pair(p: &str, r: &str) -> (String, String) {
        (p.into(), r.into())
    }

    #[test]
    fn the_mask_counts_exactly_the_response_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path());
        let (p, r) = ("Question: why?", " Because.");
        let (np, nr) = (tok.encode(p).unwrap().len(), tok.encode(r).unwrap().len());
        let b = pair_batches(&[pair(p, r)], &tok, 512).unwrap();
        assert_eq!(b.len(), 1);
        let w = &b[0].windows[0];
        assert_eq!(w.len(), np + nr);
        assert_eq!(&w[..np], &tok.encode(p).unwrap()[..]);
        assert_eq!(&w[np..], &tok.encode(r).unwrap()[..]);
        let mask = b[0].mask.as_ref().unwrap();
        assert_eq!(mask.len(), w.len() - 1);
        // Position j predicts token j + 1: the first counted one predicts the response's
        // first token.
        for (j, &m) in mask.iter().enumerate() {
            assert_eq!(m, if j + 1 >= np { 1.0 } else { 0.0 }, "position {j}");
        }
        assert_eq!(b[0].counted(), nr as f64);
    }

    #[test]
    fn windows_are_cut_and_pairs_without_a_response_token_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path());
        // Byte-level: one token per character here.
        let pairs = [
            pair("abcd", "efgh"),     // 8 tokens
            pair("abcdefgh", "ijkl"), // the response is cut away entirely
            pair("abcdef", "gh"),     // one response token survives
        ];
        let b = pair_batches(&pairs, &tok, 6).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].windows[0].len(), 7);
        assert_eq!(
            b[0].mask.as_deref().unwrap(),
            &[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
        );
        assert_eq!(b[1].windows[0], tok.encode("abcdefg").unwrap());
        assert_eq!(
            b[1].mask.as_deref().unwrap(),
            &[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        );
        // An empty prompt: the response's first token has nothing before it.
        let b = pair_batches(&[pair("", "ab")], &tok, 6).unwrap();
        assert_eq!(b[0].mask.as_deref().unwrap(), &[1.0]);
        let e = pair_batches(&[pair("abcdefgh", "x"), pair("", "y")], &tok, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none of the 2 pairs"), "{e}");
    }

    #[test]
    fn pairs_read_back_and_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pairs.jsonl");
        std::fs::write(
            &f,
            "{\"prompt\": \"a\", \"response\": \"b\", \"stop\": \"eos\"}\n\n  \r\n{\"response\": \"\", \"prompt\": \"c\\nd\"}\r\n",
        )
        .unwrap();
        assert_eq!(
            read_pairs(&f).unwrap(),
            vec![pair("a", "b"), pair("c\nd", "")]
        );
        let name = f.display().to_string();
        for (text, needle) in [
            (
                "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\"}\n",
                "line 2: missing field `response`",
            ),
            (
                "\n{\"prompt\": 3, \"response\": \"b\"}\n",
                "line 2: field `prompt` is not a string",
            ),
            (
                "{\"prompt\": \"a\", \"response\": \"b\"}\n\n{\"prompt\": \"a\",\n",
                "line 3: invalid JSON",
            ),
            ("[1, 2]\n", "line 1: not a JSON object"),
            ("\n  \n", "no pairs"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = read_pairs(&f).unwrap_err().to_string();
            assert!(e.contains(&name) && e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn prompts_keep_their_line_numbers_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("prompts.jsonl");
        std::fs::write(&f, "\n{\"prompt\": \"x\", \"id\": 7}\n{\"prompt\": \"y\"}").unwrap();
        assert_eq!(
            read_prompts(&f).unwrap(),
            vec![(2, "x".to_string()), (3, "y".to_string())]
        );
        std::fs::write(&f, "{\"prompt\": \"x\"}\n{\"prompt\": \"\"}\n").unwrap();
        let e = read_prompts(&f).unwrap_err().to_string();
        assert!(e.contains("line 2: empty prompt"), "{e}");
        std::fs::write(&f, "").unwrap();
        let e = read_prompts(&f).unwrap_err().to_string();
        assert!(e.contains("no prompts"), "{e}");
        let e = read_prompts(&dir.path().join("absent.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.jsonl"), "{e}");
    }
}
