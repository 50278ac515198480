//! Zero-shot multiple-choice tasks with the lm-evaluation-harness protocol: PIQA, ARC-Easy,
//! MedQA (4 options), PubMedQA and the six medical MMLU subsets. Each document's choices are
//! scored by the log-likelihood of `" " + choice` after the prompt; `acc` takes the most
//! likely choice and `acc_norm` the most likely per character. See `docs/tasks.md`.

pub mod custom;
pub mod data;
pub mod scoring;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use model::engine::{Head, LayerEngine};
use model::{Checkpoint, Device, Tokenizer};
use rayon::prelude::*;
use serde::Serialize;

pub use data::{GROUPS, Record, TASKS, TaskDef};
pub use scoring::{
    GROUP_TOKENS, Request, encode_request, mean_stderr, predictions, score_requests,
};

use crate::perplexity::EvalError;

/// Task names accepted by [`run_tasks`] (each MMLU subset, e.g. `mmlu_anatomy`, is accepted
/// too; `mmlu_medical` runs all six and adds their macro average).
pub const KNOWN_TASKS: &[&str] = &["piqa", "arc_easy", "medqa", "pubmedqa", "mmlu_medical"];

/// The scores of one task (or the macro average of a group).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskResult {
    /// Fraction of documents whose most likely choice is the gold one.
    pub acc: f64,
    /// Standard error of `acc`, sqrt(p(1-p)/(n-1)).
    pub acc_stderr: f64,
    /// As `acc`, with each log-likelihood divided by the choice's length in characters.
    pub acc_norm: f64,
    /// Standard error of `acc_norm`.
    pub acc_norm_stderr: f64,
    /// Documents scored.
    pub n: usize,
    /// Wall time (loading, tokenizing and scoring).
    pub seconds: f64,
}

/// The shared data folder for a workspace root: `$ROOT/../shared/data`.
pub fn default_data_dir(root: &Path) -> PathBuf {
    root.join("../shared/data")
}

fn find_task(name: &str) -> Option<&'static TaskDef> {
    TASKS.iter().find(|t| t.name == name)
}

/// Expands task names into task definitions (groups into their members), in order and
/// without repeats, plus the groups asked for. Unknown names are an error listing the known.
pub fn resolve(names: &[String]) -> Result<(Vec<&'static TaskDef>, Vec<&'static str>), EvalError> {
    let mut tasks: Vec<&'static TaskDef> = Vec::new();
    let mut groups = Vec::new();
    let push = |t: &'static TaskDef, tasks: &mut Vec<&'static TaskDef>| {
        if !tasks.iter().any(|x| x.name == t.name) {
            tasks.push(t);
        }
    };
    for name in names {
        let name = name.trim();
        if let Some(t) = find_task(name) {
            push(t, &mut tasks);
        } else if let Some((g, members)) = GROUPS.iter().find(|(g, _)| *g == name) {
            for m in *members {
                push(find_task(m).expect("group members are tasks"), &mut tasks);
            }
            if !groups.contains(g) {
                groups.push(*g);
            }
        } else {
            let subsets: Vec<&str> = TASKS
                .iter()
                .map(|t| t.name)
                .filter(|n| !KNOWN_TASKS.contains(n))
                .collect();
            return Err(EvalError::Input(format!(
                "unknown task `{name}` (known: {}; or one MMLU subset: {})",
                KNOWN_TASKS.join(", "),
                subsets.join(", ")
            )));
        }
    }
    if tasks.is_empty() {
        return Err(EvalError::Input(format!(
            "no task given (known: {})",
            KNOWN_TASKS.join(", ")
        )));
    }
    Ok((tasks, groups))
}

/// Reads a task's records, keeping the first `limit`.
pub fn load_task(
    def: &TaskDef,
    data_dir: &Path,
    limit: Option<usize>,
) -> Result<Vec<Record>, EvalError> {
    let mut recs = (def.load)(data_dir, def.arg)?;
    if let Some(n) = limit {
        recs.truncate(n);
    }
    if recs.is_empty() {
        return Err(EvalError::Input(format!(
            "task {}: no documents in {}",
            def.name,
            data_dir.display()
        )));
    }
    Ok(recs)
}

/// Tokenizes every record of a task into a [`Request`] (in parallel).
pub fn build_requests(
    def: &TaskDef,
    records: &[Record],
    tok: &Tokenizer,
    max_len: usize,
) -> Result<Vec<Request>, EvalError> {
    records
        .par_iter()
        .map(|r| {
            let conts: Vec<String> = (def.choices)(r).iter().map(|c| format!(" {c}")).collect();
            encode_request(tok, &(def.text)(r), &conts, max_len)
                .map_err(|e| EvalError::Input(format!("{}: {e}", r.source)))
        })
        .collect()
}

/// Scores records already loaded; `progress(done, total)` as in [`score_requests`].
pub fn evaluate_records(
    engine: &LayerEngine<'_>,
    head: &Head,
    tok: &Tokenizer,
    def: &TaskDef,
    records: &[Record],
    progress: impl FnMut(u64, u64),
) -> Result<TaskResult, EvalError> {
    let start = Instant::now();
    let max_len = engine.checkpoint().config().max_position_embeddings;
    let reqs = build_requests(def, records, tok, max_len)?;
    let lls = score_requests(engine, head, &reqs, GROUP_TOKENS, progress)?;
    Ok(result_of(def, records, &lls, start))
}

/// Scores from the log-likelihoods of each record's choices.
fn result_of(def: &TaskDef, records: &[Record], lls: &[Vec<f64>], start: Instant) -> TaskResult {
    let (mut hits, mut hits_norm) = (
        Vec::with_capacity(records.len()),
        Vec::with_capacity(records.len()),
    );
    for (r, ll) in records.iter().zip(lls) {
        let (p, pn) = predictions(ll, &(def.choices)(r));
        hits.push(p == r.gold);
        hits_norm.push(pn == r.gold);
    }
    let (acc, acc_stderr) = mean_stderr(&hits);
    let (acc_norm, acc_norm_stderr) = mean_stderr(&hits_norm);
    TaskResult {
        acc,
        acc_stderr,
        acc_norm,
        acc_norm_stderr,
        n: records.len(),
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Macro average of member results: the mean of the scores, stderr sqrt(sum se^2)/k, the
/// documents and seconds summed.
pub fn macro_average(parts: &[&TaskResult]) -> TaskResult {
    let k = parts.len().max(1) as f64;
    let mean = |f: fn(&TaskResult) -> f64| parts.iter().map(|r| f(r)).sum::<f64>() / k;
    let pooled =
        |f: fn(&TaskResult) -> f64| parts.iter().map(|r| f(r).powi(2)).sum::<f64>().sqrt() / k;
    TaskResult {
        acc: mean(|r| r.acc),
        acc_stderr: pooled(|r| r.acc_stderr),
        acc_norm: mean(|r| r.acc_norm),
        acc_norm_stderr: pooled(|r| r.acc_norm_stderr),
        n: parts.iter().map(|r| r.n).sum(),
        seconds: parts.iter().map(|r| r.seconds).sum(),
    }
}

/// Runs the named tasks (see [`KNOWN_TASKS`]) on `ckpt`, reading their data from `data_dir`,
/// and the user's task `files` ([`custom`], each reported under its file stem), the first
/// `limit` documents of each task (of each subset for a group). `progress(task, done, total)`
/// is told as each task advances. Results are keyed by task name; a group adds its macro
/// average under its own name next to its members (`mmlu_anatomy`, ...).
#[allow(clippy::too_many_arguments)]
pub fn run_tasks(
    ckpt: &Checkpoint,
    tok: &Tokenizer,
    names: &[String],
    files: &[PathBuf],
    data_dir: Option<&Path>,
    limit: Option<usize>,
    device: Device,
    mut progress: impl FnMut(&str, u64, u64),
) -> Result<BTreeMap<String, TaskResult>, EvalError> {
    let (tasks, groups) = if names.is_empty() && !files.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        resolve(names)?
    };
    if limit == Some(0) {
        return Err(EvalError::Input("--limit must be at least 1".into()));
    }
    // Read every task before the model runs, so a bad file fails fast.
    let mut loaded: Vec<(String, &TaskDef, Vec<Record>)> = Vec::new();
    if !tasks.is_empty() {
        let dir = data_dir.ok_or_else(|| {
            EvalError::Input("the built-in tasks need the task data folder".into())
        })?;
        for &t in &tasks {
            loaded.push((t.name.to_string(), t, load_task(t, dir, limit)?));
        }
    }
    for f in files {
        let name = custom::task_file_name(f)?;
        if loaded.iter().any(|(n, _, _)| *n == name) {
            return Err(EvalError::Input(format!(
                "--task-file {}: another task file is also named `{name}`",
                f.display()
            )));
        }
        let mut recs = custom::load_task_file(f)?;
        if let Some(n) = limit {
            recs.truncate(n);
        }
        loaded.push((name, &custom::CUSTOM, recs));
    }
    let cfg = ckpt.config();
    let mut head: Option<Head> = None;
    let mut out = BTreeMap::new();
    for (name, def, records) in loaded {
        let start = Instant::now();
        let reqs = build_requests(def, &records, tok, cfg.max_position_embeddings)?;
        let longest = reqs.iter().map(|r| r.context.len()).max().unwrap_or(1);
        let engine = LayerEngine::new(ckpt, device.clone(), longest.max(1));
        if head.is_none() {
            head = Some(engine.load_head()?);
        }
        let head = head.as_ref().expect("loaded");
        let lls = score_requests(&engine, head, &reqs, GROUP_TOKENS, |d, t| {
            progress(&name, d, t)
        })?;
        out.insert(name, result_of(def, &records, &lls, start));
    }
    for g in groups {
        let members = GROUPS.iter().find(|(n, _)| *n == g).expect("known group").1;
        let parts: Vec<&TaskResult> = members.iter().filter_map(|m| out.get(*m)).collect();
        let avg = macro_average(&parts);
        out.insert(g.to_string(), avg);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_task_lists_known_ones() {
        let e = resolve(&["piqa".into(), "hellaswag".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown task `hellaswag`"), "{e}");
        for k in KNOWN_TASKS {
            assert!(e.contains(k), "{e}");
        }
    }

    #[test]
    fn groups_expand_to_members() {
        let (t, g) =
            resolve(&["mmlu_medical".into(), "mmlu_anatomy".into(), "piqa".into()]).unwrap();
        let names: Vec<&str> = t.iter().map(|t| t.name).collect();
        assert_eq!(names.len(), 7);
        assert_eq!(names[0], "mmlu_anatomy");
        assert_eq!(names[6], "piqa");
        assert_eq!(g, vec!["mmlu_medical"]);
    }

    #[test]
    fn macro_average_of_two() {
        let a = TaskResult {
            acc: 0.5,
            acc_stderr: 0.03,
            acc_norm: 0.4,
            acc_norm_stderr: 0.04,
            n: 10,
            seconds: 1.0,
        };
        let b = TaskResult {
            acc: 0.7,
            acc_stderr: 0.04,
            acc_norm: 0.6,
            acc_norm_stderr: 0.03,
            n: 30,
            seconds: 2.0,
        };
        let m = macro_average(&[&a, &b]);
        assert!((m.acc - 0.6).abs() < 1e-12 && (m.acc_norm - 0.5).abs() < 1e-12);
        assert!((m.acc_stderr - 0.025).abs() < 1e-12);
        assert_eq!((m.n, m.seconds), (40, 3.0));
    }
}
