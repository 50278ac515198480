//! A user's own multiple-choice task (`compress eval --task-file FILE.jsonl`), scored with the
//! same lm-eval protocol as the built-in tasks, so a clinical team can evaluate on its own
//! questions offline. One JSON object per line (`docs/tasks.md` "Your own task"):
//!
//! `{"question": "...", "choices": ["...", "..."], "answer": 2, "context": "...", "lettered": true}`
//!
//! - `question` (string) and `choices` (2 to 26 strings) are required; `answer` is the
//!   0-based index of the correct choice or its letter (`"C"`);
//! - `context` (optional) is printed on its own line before the question (an abstract, a
//!   case description);
//! - `lettered` (optional, default true): the prompt lists the options as `A. text` lines and
//!   the letters are the scored continuations (as MedQA and MMLU); false: the option texts
//!   themselves are scored (as PIQA and ARC).
//!
//! The prompt is `[{context}\n]Question: {question}\n[A. {choice}\n...]Answer:`, so a MedQA
//! item written in this schema gives exactly the built-in `medqa` prompt and score.

use std::path::Path;

use serde::Deserialize;

use super::data::{Record, TASKS, TaskDef};
use crate::perplexity::EvalError;

/// Most choices a lettered item may have (the letters A to Z).
const MAX_CHOICES: usize = 26;

/// The templates of a task file; its records come from [`load_task_file`].
pub const CUSTOM: TaskDef = TaskDef {
    name: "task-file",
    arg: "",
    load: no_data_dir,
    text: custom_text,
    choices: custom_choices,
};

fn no_data_dir(_: &Path, _: &str) -> Result<Vec<Record>, EvalError> {
    Err(EvalError::Input(
        "a task file is read with load_task_file, not from the data folder".into(),
    ))
}

/// `[{context}\n]Question: {question}\n[A. {choice}\n...]Answer:`.
pub fn custom_text(r: &Record) -> String {
    let mut s = String::new();
    if !r.extra.is_empty() {
        s.push_str(&r.extra);
        s.push('\n');
    }
    s.push_str(&format!("Question: {}\n", r.question));
    for (l, o) in r.labels.iter().zip(&r.options) {
        s.push_str(&format!("{l}. {o}\n"));
    }
    s.push_str("Answer:");
    s
}

/// The letters when the item is lettered, else the option texts.
pub fn custom_choices(r: &Record) -> Vec<String> {
    if r.labels.is_empty() {
        r.options.clone()
    } else {
        r.labels.clone()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    question: String,
    choices: Vec<String>,
    answer: Answer,
    #[serde(default)]
    context: Option<String>,
    #[serde(default = "lettered_default")]
    lettered: bool,
}

fn lettered_default() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Answer {
    Index(u64),
    Letter(String),
}

/// The name a task file reports under: its file stem, which must not be a built-in task's.
pub fn task_file_name(path: &Path) -> Result<String, EvalError> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| EvalError::Input(format!("--task-file {}: no file name", path.display())))?;
    if TASKS.iter().any(|t| t.name == stem) || super::KNOWN_TASKS.contains(&stem) {
        return Err(EvalError::Input(format!(
            "--task-file {}: `{stem}` is the name of a built-in task; rename the file",
            path.display()
        )));
    }
    Ok(stem.to_string())
}

/// Reads a task file into records; every problem names the file and line.
pub fn load_task_file(path: &Path) -> Result<Vec<Record>, EvalError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EvalError::Input(format!("--task-file {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let loc = format!("{}:{}", path.display(), i + 1);
        let bad = |msg: String| EvalError::Input(format!("{loc}: {msg}"));
        let item: Item = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let n = item.choices.len();
        if n < 2 || (item.lettered && n > MAX_CHOICES) {
            return Err(bad(format!(
                "`choices` has {n} entries (2 to {MAX_CHOICES} for a lettered item)"
            )));
        }
        if item.question.trim().is_empty() || item.choices.iter().any(|c| c.trim().is_empty()) {
            return Err(bad("`question` and every choice must be non-empty".into()));
        }
        let labels: Vec<String> = if item.lettered {
            (0..n)
                .map(|k| char::from(b'A' + k as u8).to_string())
                .collect()
        } else {
            Vec::new()
        };
        let gold = match &item.answer {
            Answer::Index(k) if (*k as usize) < n => *k as usize,
            Answer::Letter(l)
                if l.len() == 1 && (b'A'..b'A' + n as u8).contains(&l.as_bytes()[0]) =>
            {
                (l.as_bytes()[0] - b'A') as usize
            }
            Answer::Index(k) => {
                return Err(bad(format!(
                    "`answer` {k} is out of range (0 to {})",
                    n - 1
                )));
            }
            Answer::Letter(l) => {
                return Err(bad(format!(
                    "`answer` `{l}` is not a letter from A to {}",
                    char::from(b'A' + n as u8 - 1)
                )));
            }
        };
        out.push(Record {
            question: item.question,
            options: item.choices,
            labels,
            gold,
            extra: item.context.unwrap_or_default(),
            source: loc,
        });
    }
    if out.is_empty() {
        return Err(EvalError::Input(format!(
            "--task-file {}: no items (one JSON object per line)",
            path.display()
        )));
    }
    Ok(out)
}
