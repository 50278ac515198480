//! `compress distill --teacher MODEL --data FILE --cache-teacher FILE [--top-k K]`: writes
//! the offline teacher cache (`distill::cache`) for every training window of the data, so
//! later runs distill with `--teacher-cache FILE` without the teacher in memory.

use anyhow::{Context, bail};
use distill::cache::TeacherCache;
use distill::loss::LossKind;

use crate::distilling::Args;
use crate::output::{TempGuard, check_output_file, commit, temp_sibling};

/// Tokens kept per position when --top-k is not given.
const DEFAULT_K: usize = 64;

/// Refuses what does not apply to writing a cache.
fn check_args(a: &Args) -> anyhow::Result<()> {
    for (given, name) in [
        (a.student.is_some(), "--student"),
        (a.out.is_some(), "--out"),
        (a.teacher_cache.is_some(), "--teacher-cache"),
        (a.lora_rank.is_some(), "--lora-rank"),
        (a.max_tokens.is_some(), "--max-tokens"),
        (a.ce_weight.is_some(), "--ce-weight"),
        (a.jsd_beta.is_some(), "--jsd-beta"),
        (a.resume, "--resume"),
        (a.save_every > 0, "--save-every"),
    ] {
        if given {
            bail!("{name} does not apply to --cache-teacher (it only writes the teacher's cache)");
        }
    }
    if a.loss() == LossKind::Ce || a.mode == crate::distilling::Mode::Blackbox {
        bail!(
            "--cache-teacher is for white-box KD (--loss ce and --mode blackbox need no teacher logits)"
        );
    }
    if a.teacher.is_none() {
        bail!("--cache-teacher needs --teacher MODEL");
    }
    Ok(())
}

/// Writes the cache (under a temporary name, renamed when complete).
pub fn write(a: &Args) -> anyhow::Result<()> {
    check_args(a)?;
    if crate::checks_done() {
        return Ok(());
    }
    let (Some(path), Some(tpath)) = (&a.cache_teacher, &a.teacher) else {
        unreachable!("checked above");
    };
    check_output_file(path, "--cache-teacher", &[tpath, &a.data], a.force)?;
    let teacher = crate::distilling::open(tpath, "teacher")?;
    let vocab = teacher.config().vocab_size;
    let k = a.top_k.unwrap_or(DEFAULT_K.min(vocab));
    if k == 0 || k > vocab {
        bail!("--top-k must be in 1..={vocab} (the teacher's vocabulary), got {k}");
    }
    let t = a.temperature.unwrap_or(1.0);
    if !(t.is_finite() && t > 0.0 && t <= 100.0) {
        bail!("--temperature must be in (0, 100], got {t}");
    }
    crate::distilling::check_context(&teacher, a.seq_len, "teacher")?;
    let tok =
        model::tokenizer::load_checked(&teacher).context("cannot build the teacher's tokenizer")?;
    let (_, windows) = crate::distill_loop::data_windows(a, &tok)?;
    let bytes = (windows.len() * a.seq_len * k * 8) as u64;
    let tmp = temp_sibling(path);
    let mut guard = TempGuard(Some(tmp.clone()));
    let pb = crate::progress_bar("teacher", windows.len() as u64);
    TeacherCache::write(
        &teacher,
        &windows,
        k,
        t,
        &tmp,
        a.device.device()?,
        |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    commit(&tmp, path)?;
    guard.0 = None;
    println!(
        "wrote {}: top {k} of {vocab} tokens at temperature {t} for {} windows of {} tokens ({} bytes)",
        path.display(),
        windows.len(),
        a.seq_len,
        crate::grouped(bytes)
    );
    Ok(())
}
