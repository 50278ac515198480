//! Task data: the loaders (one per file format), the prompt templates and the task list.
//! Every loader turns its file into [`Record`]s and names the file and line of any problem.
//! Templates follow lm-evaluation-harness (see `docs/tasks.md` for the exact strings).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::perplexity::EvalError;

/// One multiple-choice document, whatever file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The question (PIQA goal, ARC stem, MedQA/PubMedQA/MMLU question).
    pub question: String,
    /// Answer options, in order (PIQA solutions, ARC choice texts, MedQA/MMLU option texts).
    pub options: Vec<String>,
    /// Option labels where the prompt shows them (`A`, `B`, ...); empty otherwise.
    pub labels: Vec<String>,
    /// Index of the correct option.
    pub gold: usize,
    /// Extra prompt text: the PubMedQA abstract, the MMLU subject.
    pub extra: String,
    /// `file:line` of the record, for messages.
    pub source: String,
}

/// A task is data: where its records come from and how they become a prompt and choices.
#[derive(Debug, Clone, Copy)]
pub struct TaskDef {
    /// Name on the command line and in reports.
    pub name: &'static str,
    /// Argument for the loader (the MMLU subject).
    pub arg: &'static str,
    /// Reads the records from the data directory.
    pub load: fn(data_dir: &Path, arg: &str) -> Result<Vec<Record>, EvalError>,
    /// The context string (everything before the answer).
    pub text: fn(&Record) -> String,
    /// The answer choices, without the `" "` delimiter the scorer puts before each.
    pub choices: fn(&Record) -> Vec<String>,
}

const fn mmlu(name: &'static str, subject: &'static str) -> TaskDef {
    TaskDef {
        name,
        arg: subject,
        load: load_mmlu,
        text: mmlu_text,
        choices: label_choices,
    }
}

/// Every task. Adding one is a loader (or an existing one) plus a line here.
pub const TASKS: &[TaskDef] = &[
    TaskDef {
        name: "piqa",
        arg: "",
        load: load_piqa,
        text: question_answer,
        choices: option_choices,
    },
    TaskDef {
        name: "arc_easy",
        arg: "",
        load: load_arc,
        text: question_answer,
        choices: option_choices,
    },
    TaskDef {
        name: "medqa",
        arg: "",
        load: load_medqa,
        text: medqa_text,
        choices: label_choices,
    },
    TaskDef {
        name: "pubmedqa",
        arg: "",
        load: load_pubmedqa,
        text: pubmedqa_text,
        choices: option_choices,
    },
    mmlu("mmlu_anatomy", "anatomy"),
    mmlu("mmlu_clinical_knowledge", "clinical_knowledge"),
    mmlu("mmlu_college_biology", "college_biology"),
    mmlu("mmlu_college_medicine", "college_medicine"),
    mmlu("mmlu_medical_genetics", "medical_genetics"),
    mmlu("mmlu_professional_medicine", "professional_medicine"),
];

/// Groups reported as the macro average of their members.
pub const GROUPS: &[(&str, &[&str])] = &[(
    "mmlu_medical",
    &[
        "mmlu_anatomy",
        "mmlu_clinical_knowledge",
        "mmlu_college_biology",
        "mmlu_college_medicine",
        "mmlu_medical_genetics",
        "mmlu_professional_medicine",
    ],
)];

// ---------------------------------------------------------------------------------------------
// Templates

/// `Question: {question}\nAnswer:` (PIQA, ARC).
pub fn question_answer(r: &Record) -> String {
    format!("Question: {}\nAnswer:", r.question)
}

/// The options themselves are the choices (PIQA, ARC, PubMedQA).
pub fn option_choices(r: &Record) -> Vec<String> {
    r.options.clone()
}

/// The option letters are the choices (MedQA, MMLU).
pub fn label_choices(r: &Record) -> Vec<String> {
    r.labels.clone()
}

fn lettered(r: &Record) -> String {
    r.labels
        .iter()
        .zip(&r.options)
        .map(|(l, o)| format!("{l}. {o}\n"))
        .collect()
}

/// lm-eval `medqa_4options`: `Question: {q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:`.
pub fn medqa_text(r: &Record) -> String {
    format!("Question: {}\n{}Answer:", r.question, lettered(r))
}

/// lm-eval `pubmedqa`: `Abstract: {contexts joined by \n}\nQuestion: {q}\nAnswer:`.
pub fn pubmedqa_text(r: &Record) -> String {
    format!("Abstract: {}\nQuestion: {}\nAnswer:", r.extra, r.question)
}

/// lm-eval `mmlu` (zero-shot): the subject description, then the lettered question.
pub fn mmlu_text(r: &Record) -> String {
    format!(
        "The following are multiple choice questions (with answers) about {}.\n\n{}\n{}Answer:",
        r.extra,
        r.question.trim(),
        lettered(r)
    )
}

// ---------------------------------------------------------------------------------------------
// Loaders

fn input(msg: String) -> EvalError {
    EvalError::Input(msg)
}

fn read(path: &Path) -> Result<String, EvalError> {
    std::fs::read_to_string(path).map_err(|e| input(format!("{}: {e}", path.display())))
}

/// Non-empty lines of a JSONL file as (line number, value).
fn jsonl(path: &Path) -> Result<Vec<(usize, Value)>, EvalError> {
    let text = read(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| input(format!("{}:{}: invalid JSON: {e}", path.display(), i + 1)))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

/// The value at a dotted `path` of fields (`question.stem`).
fn field<'a>(v: &'a Value, path: &str, loc: &str) -> Result<&'a Value, EvalError> {
    let mut cur = v;
    for key in path.split('.') {
        cur = cur
            .get(key)
            .ok_or_else(|| input(format!("{loc}: missing field `{path}`")))?;
    }
    Ok(cur)
}

fn string(v: &Value, path: &str, loc: &str) -> Result<String, EvalError> {
    match field(v, path, loc)? {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(input(format!(
            "{loc}: field `{path}` should be a string, found {other}"
        ))),
    }
}

/// `path:line`.
fn at(path: &Path, line: usize) -> String {
    format!("{}:{line}", path.display())
}

/// Index of `key` in `labels`, or an error naming them.
fn gold_of(labels: &[String], key: &str, what: &str, loc: &str) -> Result<usize, EvalError> {
    labels.iter().position(|l| l == key).ok_or_else(|| {
        input(format!(
            "{loc}: {what} `{key}` is out of range (expected one of {})",
            labels.join(", ")
        ))
    })
}

/// PIQA: `piqa/valid.jsonl` (goal, sol1, sol2) with one label (0 or 1) per line in
/// `piqa/valid-labels.lst`.
pub fn load_piqa(dir: &Path, _: &str) -> Result<Vec<Record>, EvalError> {
    let path = dir.join("piqa/valid.jsonl");
    let labels_path = dir.join("piqa/valid-labels.lst");
    let docs = jsonl(&path)?;
    let labels_text = read(&labels_path)?;
    let labels: Vec<(usize, &str)> = labels_text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.trim()))
        .collect();
    if labels.len() != docs.len() {
        return Err(input(format!(
            "{}: {} labels for {} documents in {}",
            labels_path.display(),
            labels.len(),
            docs.len(),
            path.display()
        )));
    }
    let mut out = Vec::with_capacity(docs.len());
    for ((line, v), (lline, label)) in docs.iter().zip(labels) {
        let loc = at(&path, *line);
        let gold = match label.parse::<usize>() {
            Ok(g @ (0 | 1)) => g,
            _ => {
                return Err(input(format!(
                    "{}: label `{label}` is out of range (expected 0 or 1)",
                    at(&labels_path, lline)
                )));
            }
        };
        out.push(Record {
            question: string(v, "goal", &loc)?,
            options: vec![string(v, "sol1", &loc)?, string(v, "sol2", &loc)?],
            labels: Vec::new(),
            gold,
            extra: String::new(),
            source: loc,
        });
    }
    Ok(out)
}

/// ARC-Easy: `arc/arc_easy_test.jsonl` (question.stem, question.choices[{text, label}],
/// answerKey; labels A-E or 1-5). The non-standard `para` field is ignored.
pub fn load_arc(dir: &Path, _: &str) -> Result<Vec<Record>, EvalError> {
    let path = dir.join("arc/arc_easy_test.jsonl");
    let mut out = Vec::new();
    for (line, v) in jsonl(&path)? {
        let loc = at(&path, line);
        let choices = field(&v, "question.choices", &loc)?
            .as_array()
            .ok_or_else(|| {
                input(format!(
                    "{loc}: field `question.choices` should be an array"
                ))
            })?;
        if choices.len() < 2 {
            return Err(input(format!(
                "{loc}: `question.choices` has {} entries (at least 2)",
                choices.len()
            )));
        }
        let mut options = Vec::with_capacity(choices.len());
        let mut labels = Vec::with_capacity(choices.len());
        for (i, c) in choices.iter().enumerate() {
            options.push(string(c, "text", &format!("{loc}: choice {}", i + 1))?);
            labels.push(string(c, "label", &format!("{loc}: choice {}", i + 1))?);
        }
        let key = string(&v, "answerKey", &loc)?;
        let gold = gold_of(&labels, &key, "answerKey", &loc)?;
        out.push(Record {
            question: string(&v, "question.stem", &loc)?,
            options,
            // The ARC prompt does not show the labels; the choices are the texts.
            labels: Vec::new(),
            gold,
            extra: String::new(),
            source: loc,
        });
    }
    Ok(out)
}

/// MedQA (USMLE): `medqa/test.jsonl` (question, options {A: .., B: .., ...}, answer_idx).
pub fn load_medqa(dir: &Path, _: &str) -> Result<Vec<Record>, EvalError> {
    let path = dir.join("medqa/test.jsonl");
    let mut out = Vec::new();
    for (line, v) in jsonl(&path)? {
        let loc = at(&path, line);
        let opts = field(&v, "options", &loc)?
            .as_object()
            .ok_or_else(|| input(format!("{loc}: field `options` should be an object")))?;
        let mut pairs: Vec<(String, String)> = Vec::with_capacity(opts.len());
        for (k, val) in opts {
            let text = val
                .as_str()
                .ok_or_else(|| input(format!("{loc}: option `{k}` should be a string")))?;
            pairs.push((k.clone(), text.to_string()));
        }
        pairs.sort();
        if pairs.len() < 2 {
            return Err(input(format!(
                "{loc}: `options` has {} entries (at least 2)",
                pairs.len()
            )));
        }
        let (labels, options): (Vec<String>, Vec<String>) = pairs.into_iter().unzip();
        let key = string(&v, "answer_idx", &loc)?;
        let gold = gold_of(&labels, &key, "answer_idx", &loc)?;
        out.push(Record {
            question: string(&v, "question", &loc)?,
            options,
            labels,
            gold,
            extra: String::new(),
            source: loc,
        });
    }
    Ok(out)
}

/// A JSON object's entries in file order.
fn ordered_entries<T: DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<Vec<(String, T)>, EvalError> {
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: DeserializeOwned> Visitor<'de> for V<T> {
        type Value = Vec<(String, T)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(kv) = m.next_entry::<String, T>()? {
                out.push(kv);
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(V(std::marker::PhantomData))
        .map_err(|e| input(format!("{}: {e}", path.display())))
}

/// Line (1-based) of the first occurrence of `"key"` in `text`, or 1.
fn line_of_key(text: &str, key: &str) -> usize {
    text.find(&format!("\"{key}\""))
        .map_or(1, |p| text[..p].matches('\n').count() + 1)
}

/// PubMedQA (PQA-L): the questions of `pubmedqa/ori_pqal.json` ({PMID: {QUESTION, CONTEXTS,
/// ...}}) whose PMIDs are in `pubmedqa/test_ground_truth.json` ({PMID: yes|no|maybe}, the
/// gold), in the order of `ori_pqal.json` (the ground-truth file is sorted by answer, which
/// would make `--limit` see only "yes").
pub fn load_pubmedqa(dir: &Path, _: &str) -> Result<Vec<Record>, EvalError> {
    let gt_path = dir.join("pubmedqa/test_ground_truth.json");
    let ori_path = dir.join("pubmedqa/ori_pqal.json");
    let gt_text = read(&gt_path)?;
    let answers: Vec<String> = ["yes", "no", "maybe"].map(String::from).to_vec();
    let mut gold: HashMap<String, usize> = HashMap::new();
    for (pmid, label) in ordered_entries::<String>(&gt_text, &gt_path)? {
        let gt_loc = at(&gt_path, line_of_key(&gt_text, &pmid));
        gold.insert(
            pmid.clone(),
            gold_of(&answers, &label, &format!("label of PMID {pmid}"), &gt_loc)?,
        );
    }
    let ori_text = read(&ori_path)?;
    let ori = ordered_entries::<Value>(&ori_text, &ori_path)?;
    let mut out = Vec::with_capacity(gold.len());
    for (pmid, doc) in &ori {
        let Some(&g) = gold.get(pmid) else { continue };
        let loc = format!(
            "{} (PMID {pmid})",
            at(&ori_path, line_of_key(&ori_text, pmid))
        );
        let contexts = field(doc, "CONTEXTS", &loc)?
            .as_array()
            .ok_or_else(|| input(format!("{loc}: field `CONTEXTS` should be an array")))?
            .iter()
            .map(|c| {
                c.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| input(format!("{loc}: `CONTEXTS` holds a non-string")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push(Record {
            question: string(doc, "QUESTION", &loc)?,
            options: answers.clone(),
            labels: Vec::new(),
            gold: g,
            extra: contexts.join("\n"),
            source: loc,
        });
    }
    if out.len() != gold.len() {
        let have: std::collections::HashSet<&str> = ori.iter().map(|(k, _)| k.as_str()).collect();
        let mut missing: Vec<&str> = gold
            .keys()
            .map(String::as_str)
            .filter(|k| !have.contains(k))
            .collect();
        missing.sort();
        let first = missing.first().copied().unwrap_or("?");
        return Err(input(format!(
            "{}: {} PMIDs of {} are missing, e.g. PMID {first} (listed at {})",
            ori_path.display(),
            missing.len(),
            gt_path.display(),
            at(&gt_path, line_of_key(&gt_text, first))
        )));
    }
    Ok(out)
}

/// The CSV file of an MMLU subset.
pub fn mmlu_path(dir: &Path, subject: &str) -> PathBuf {
    dir.join(format!("mmlu-medical/{subject}_test.csv"))
}

/// MMLU: `mmlu-medical/{subject}_test.csv`, rows `question,A,B,C,D,answer` (no header, as
/// in the original release; a header row with those names is skipped).
pub fn load_mmlu(dir: &Path, subject: &str) -> Result<Vec<Record>, EvalError> {
    let path = mmlu_path(dir, subject);
    let text = read(&path)?;
    let rows =
        parse_csv(&text).map_err(|(line, msg)| input(format!("{}: {msg}", at(&path, line))))?;
    let labels: Vec<String> = ["A", "B", "C", "D"].map(String::from).to_vec();
    let mut out = Vec::with_capacity(rows.len());
    for (i, (line, row)) in rows.into_iter().enumerate() {
        let loc = at(&path, line);
        if i == 0
            && row
                .iter()
                .map(|s| s.trim().to_ascii_lowercase())
                .eq(["question", "a", "b", "c", "d", "answer"])
        {
            continue;
        }
        if row.len() != 6 {
            return Err(input(format!(
                "{loc}: {} columns, expected 6 (question,A,B,C,D,answer)",
                row.len()
            )));
        }
        let gold = gold_of(&labels, row[5].trim(), "answer", &loc)?;
        let mut row = row.into_iter();
        let question = row.next().unwrap_or_default();
        let options: Vec<String> = row.by_ref().take(4).collect();
        out.push(Record {
            question,
            options,
            labels: labels.clone(),
            gold,
            extra: subject.replace('_', " "),
            source: loc,
        });
    }
    Ok(out)
}

/// A CSV record and the line it starts on.
pub type CsvRow = (usize, Vec<String>);

/// Parses CSV (RFC 4180: quoted fields may hold commas, doubled quotes and newlines; CRLF or
/// LF line ends). Returns each record with the line it starts on; blank lines are skipped.
/// An error is (line, message).
pub fn parse_csv(text: &str) -> Result<Vec<CsvRow>, (usize, String)> {
    let mut rows = Vec::new();
    let mut row: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut line = 1;
    let mut start = 1;
    let mut quoted = false; // inside a quoted field
    let mut was_quoted = false; // the current field was quoted (text after it is an error)
    let mut chars = text.chars().peekable();
    let mut quote_line = 1;
    let end_row =
        |row: &mut Vec<String>, field: &mut String, rows: &mut Vec<CsvRow>, start: usize| {
            row.push(std::mem::take(field));
            let r = std::mem::take(row);
            if !(r.len() == 1 && r[0].is_empty()) {
                rows.push((start, r));
            }
        };
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !was_quoted => {
                quoted = true;
                was_quoted = true;
                quote_line = line;
            }
            ',' => {
                row.push(std::mem::take(&mut field));
                was_quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                end_row(&mut row, &mut field, &mut rows, start);
                was_quoted = false;
                line += 1;
                start = line;
            }
            _ if was_quoted => {
                return Err((
                    line,
                    format!("text after the closing quote of a field: `{c}`"),
                ));
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err((quote_line, "a quoted field is never closed".into()));
    }
    if !field.is_empty() || !row.is_empty() || was_quoted {
        end_row(&mut row, &mut field, &mut rows, start);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_handles_quotes_commas_newlines() {
        let text = "q1,a,b,c,d,A\r\n\"x, \"\"y\"\"\nz\",\"\",b,c,d,B\n\nlast,1,2,3,4,D";
        let rows = parse_csv(text).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0],
            (
                1,
                vec!["q1", "a", "b", "c", "d", "A"]
                    .into_iter()
                    .map(String::from)
                    .collect()
            )
        );
        assert_eq!(rows[1].0, 2);
        assert_eq!(rows[1].1[0], "x, \"y\"\nz");
        assert_eq!(rows[1].1[1], "");
        assert_eq!(rows[2].0, 5);
        assert_eq!(rows[2].1[5], "D");
    }

    #[test]
    fn csv_reports_unclosed_quote_and_stray_text() {
        assert_eq!(parse_csv("a,b\n\"open,c\n").unwrap_err().0, 2);
        assert_eq!(parse_csv("a,\"b\"x,c").unwrap_err().0, 1);
    }

    #[test]
    fn templates_match_lm_eval() {
        let r = Record {
            question: " What is it? ".into(),
            options: vec!["one".into(), "two".into(), "three".into(), "four".into()],
            labels: vec!["A".into(), "B".into(), "C".into(), "D".into()],
            gold: 0,
            extra: "clinical knowledge".into(),
            source: String::new(),
        };
        assert_eq!(
            mmlu_text(&r),
            "The following are multiple choice questions (with answers) about clinical knowledge.\n\n\
             What is it?\nA. one\nB. two\nC. three\nD. four\nAnswer:"
        );
        assert_eq!(
            medqa_text(&r),
            "Question:  What is it? \nA. one\nB. two\nC. three\nD. four\nAnswer:"
        );
        assert_eq!(question_answer(&r), "Question:  What is it? \nAnswer:");
        let p = Record {
            extra: "c1\nc2".into(),
            question: "Q?".into(),
            ..r
        };
        assert_eq!(pubmedqa_text(&p), "Abstract: c1\nc2\nQuestion: Q?\nAnswer:");
    }

    #[test]
    fn task_names_are_unique() {
        let mut names: Vec<&str> = TASKS
            .iter()
            .map(|t| t.name)
            .chain(GROUPS.iter().map(|g| g.0))
            .collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len());
    }
}
