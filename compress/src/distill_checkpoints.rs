//! Checkpoints of `compress distill` (`--save-every N`): `OUT.checkpoints/checkpoint-STEP/`,
//! each a readable HF model (`config.json`, `model.safetensors`, tokenizer) plus the
//! training state (`state/`), the log so far and the run's fingerprint. `--resume` continues
//! from the newest one when the fingerprint (student, teacher, data, options) matches.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use distill::Trainer;
use model::safetensors_io::StoreDtype;
use model::{Checkpoint, Tokenizer};
use serde_json::{Value, json};

use crate::hf_folder::Dtype;
use crate::output::{commit, temp_sibling};

/// The checkpoint folder of an output.
pub fn root_for(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!("{name}.checkpoints"))
}

/// The completed checkpoints under `root`, oldest first, as (step, folder).
pub fn list(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// FNV-1a of a file's bytes: whether the data changed between a run and its resume.
fn file_hash(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    Ok(format!("{:016x}", model::hash::fnv1a(bytes)))
}

/// What a model contributes to the fingerprint: where it is, its bytes and its config.
fn model_print(ckpt: &Checkpoint) -> Value {
    let path = ckpt
        .path()
        .canonicalize()
        .unwrap_or_else(|_| ckpt.path().to_path_buf());
    json!({
        "path": path,
        "bytes": ckpt.bytes_on_disk(),
        "config": ckpt.config(),
    })
}

/// The identity of a run: a resume must match it exactly.
pub fn fingerprint(
    student: &Checkpoint,
    teacher: Option<&Checkpoint>,
    data: &Path,
    options: Value,
) -> anyhow::Result<Value> {
    Ok(json!({
        "student": model_print(student),
        "teacher": teacher.map(model_print),
        "data": {"bytes": std::fs::metadata(data)?.len(), "fnv1a": file_hash(data)?},
        "options": options,
    }))
}

/// The first key where two fingerprints differ (`options.lr`, `teacher`, ...).
fn first_difference(saved: &Value, now: &Value, prefix: &str) -> Option<String> {
    match (saved, now) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) if prefix.is_empty() => first_difference(x, y, &p),
                    (Some(x), Some(y)) if x == y => None,
                    _ => Some(p),
                }
            })
        }
        _ => (saved != now).then(|| prefix.to_string()),
    }
}

/// The newest checkpoint to resume from, after checking its fingerprint against `now`.
pub fn resumable(out: &Path, now: &Value) -> anyhow::Result<(usize, PathBuf)> {
    let root = root_for(out);
    let Some((step, dir)) = list(&root).pop() else {
        bail!(
            "{}: no checkpoint to resume from (--resume needs a run saved with --save-every)",
            root.display()
        );
    };
    let f = dir.join("fingerprint.json");
    let text = std::fs::read_to_string(&f).with_context(|| format!("{}", f.display()))?;
    let saved: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", f.display()))?;
    if let Some(key) = first_difference(&saved, now, "") {
        bail!(
            "{}: --resume refused: `{key}` differs from the checkpointed run (start over with --force)",
            dir.display()
        );
    }
    Ok((step, dir))
}

/// What a checkpoint needs besides the trainer.
pub struct Saver<'a> {
    /// The checkpoint folder.
    pub root: PathBuf,
    /// The student as read (config, tokenizer files).
    pub student: &'a Checkpoint,
    /// Its tokenizer.
    pub tok: &'a Tokenizer,
    /// The run's fingerprint.
    pub fingerprint: &'a Value,
    /// Storage type of the checkpoint's model weights.
    pub dtype: Dtype,
    /// Checkpoints kept (0: all).
    pub limit: usize,
}

impl Saver<'_> {
    /// Writes `checkpoint-STEP` under a temporary name, renames it into place, then removes
    /// checkpoints beyond the limit.
    pub fn save(&self, trainer: &Trainer, log: &[String]) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.root).with_context(|| format!("{}", self.root.display()))?;
        let dir = self.root.join(format!("checkpoint-{}", trainer.steps()));
        let tmp = temp_sibling(&dir);
        std::fs::create_dir_all(&tmp).with_context(|| format!("{}", tmp.display()))?;
        trainer.save(&tmp.join("state"))?;
        let model = trainer.student().clone().merged();
        let cfg =
            crate::hf_folder::write_config(self.student, StoreDtype::from(self.dtype), &tmp, None)?;
        crate::distilling::write_weights(&model, &cfg, &tmp.join("model.safetensors"), self.dtype)?;
        crate::hf_folder::write_aux(self.student, self.tok, &cfg, &tmp)?;
        std::fs::write(tmp.join("train_log.jsonl"), log.concat())?;
        std::fs::write(
            tmp.join("fingerprint.json"),
            serde_json::to_string_pretty(self.fingerprint)?,
        )?;
        commit(&tmp, &dir)?;
        if self.limit > 0 {
            let all = list(&self.root);
            for (_, old) in all.iter().take(all.len().saturating_sub(self.limit)) {
                std::fs::remove_dir_all(old).ok();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_difference_names_the_key() {
        let a = json!({"options": {"lr": 1e-4, "seed": 0}, "teacher": {"path": "/t", "bytes": 3}});
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b, ""), None);
        b["options"]["lr"] = json!(2e-4);
        assert_eq!(first_difference(&a, &b, "").as_deref(), Some("options.lr"));
        let mut c = a.clone();
        c["teacher"]["bytes"] = json!(4);
        assert_eq!(
            first_difference(&a, &c, "").as_deref(),
            Some("teacher.bytes")
        );
        let mut d = a.clone();
        d["teacher"] = Value::Null;
        assert_eq!(first_difference(&a, &d, "").as_deref(), Some("teacher"));
    }
}
