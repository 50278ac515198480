//! `compress distill --student MODEL [--teacher MODEL] --data FILE --out DIR`: trains the
//! student on windows of the data with a white-box KD loss against the teacher's logits
//! (forward/reverse KL, JSD; optionally mixed with CE), or with plain CE (`--loss ce`, no
//! teacher), and writes the trained student as an HF folder with its training log.

use std::time::Instant;

use anyhow::{Context, bail};
use distill::schedule::Schedule;
use distill::{AdamWOptions, CausalLm, HiddenLoss, LoraOptions, LossSpec, QatOptions, Trainer};
use model::Checkpoint;
use model::safetensors_io::{StoreDtype, StreamingWriter};
use model::transformer::Rope;
use quant::nf4::BnbScheme;
use serde_json::json;

use crate::distill_checkpoints as ckpts;
use crate::distill_loop::{self as lp, Items, Live, Run, Source};
use crate::distill_options::{
    base_options, check_flags, check_numbers, hidden_options, lora_init, lora_options,
};
use crate::hf_folder::Dtype;
use crate::output::{TempGuard, check_output, commit, temp_sibling};
use distill::cache::TeacherCache;

pub use crate::distill_args::{Args, BaseScheme, LoraInitArg, LoraSave, Mode};

/// Opens a model and checks that its tensors match its config.
pub(crate) fn open(path: &crate::Path, role: &str) -> anyhow::Result<Checkpoint> {
    let ckpt = Checkpoint::open(path).with_context(|| format!("cannot open {role}"))?;
    ckpt.check_shapes()
        .with_context(|| format!("cannot open {role}"))?;
    Ok(ckpt)
}

/// Refuses a window longer than a model's context.
pub(crate) fn check_context(ckpt: &Checkpoint, seq_len: usize, role: &str) -> anyhow::Result<()> {
    let max = ckpt.config().max_position_embeddings;
    if seq_len > max {
        bail!(
            "--seq-len {seq_len} is beyond the {role}'s context of {max} tokens ({})",
            ckpt.path().display()
        );
    }
    Ok(())
}

/// What a training run works with, checked before any model is loaded.
struct Plan {
    student: Checkpoint,
    teacher: Option<Checkpoint>,
    tok: model::Tokenizer,
    spec: LossSpec,
    lora: Option<LoraOptions>,
    base: Option<BnbScheme>,
    /// How QLoRA's adapters start.
    init: distill::loftq::LoraInit,
    hidden: Option<(HiddenLoss, bool)>,
    items: Items,
    n_tokens: usize,
    per_step: usize,
    sched: Schedule,
}

/// Every check of the options, models and data, then the data itself and the schedule.
fn plan(a: &Args, student_path: &crate::Path, out: &crate::Path) -> anyhow::Result<Plan> {
    let spec = check_flags(a)?;
    let student = open(student_path, "student")?;
    let teacher = a.teacher.as_ref().map(|t| open(t, "teacher")).transpose()?;
    let inputs = [
        Some(student_path),
        a.teacher.as_ref(),
        a.teacher_cache.as_ref(),
        Some(&a.data),
    ];
    for input in inputs.into_iter().flatten() {
        check_output(input, out, a.force)?;
    }
    let tok =
        model::tokenizer::load_checked(&student).context("cannot build the student's tokenizer")?;
    check_context(&student, a.seq_len, "student")?;
    let lora = lora_options(a, student.config())?;
    let base = base_options(a, student.config())?;
    let init = lora_init(a)?;
    let hidden = hidden_options(a, student.config(), teacher.as_ref().map(|t| t.config()))?;
    if let Some(t) = &teacher {
        let ttok = model::load_tokenizer(t).context("cannot build the teacher's tokenizer")?;
        eval::kld::check_same_vocab(t, &student, &ttok, &tok)?;
        check_context(t, a.seq_len, "teacher")?;
    }
    let (n_tokens, items) = match a.mode {
        Mode::Whitebox => {
            let (n, w) = lp::data_windows(a, &tok)?;
            (n, Items::Windows(w))
        }
        Mode::Blackbox => {
            let (n, p) = lp::data_pairs(a, &tok)?;
            (n, Items::Pairs(p))
        }
    };
    let (per_step, sched) = lp::schedule(a, &items)?;
    Ok(Plan {
        student,
        teacher,
        tok,
        spec,
        lora,
        base,
        init,
        hidden,
        items,
        n_tokens,
        per_step,
        sched,
    })
}

/// The student on the autodiff `device`, with its LoRA adapters, fake quantization and
/// projections, in a trainer.
fn trainer(
    a: &Args,
    p: &Plan,
    device: &model::Device,
    qat: Option<(&QatOptions, Option<&crate::qat_init::PtqStart>)>,
) -> anyhow::Result<Trainer> {
    let mut student = CausalLm::load(&p.student, device).context("cannot load the student")?;
    match (&p.lora, &p.base) {
        (Some(l), Some(b)) => student = student.with_4bit_lora_init(l, b, p.init)?,
        (Some(l), None) => student = student.with_lora(l),
        _ => {}
    }
    match qat {
        Some((q, Some(start))) => student = student.with_fake_quant_from(q, &start.params)?,
        Some((q, None)) => student = student.with_fake_quant(q)?,
        None => {}
    }
    if let Some((h, true)) = &p.hidden {
        let width = p.teacher.as_ref().map_or(0, |t| t.config().hidden_size);
        student = student.with_projections(&vec![width; h.map.len()]);
    }
    let adamw = AdamWOptions {
        weight_decay: a.weight_decay,
        ..AdamWOptions::default()
    };
    let clip = (a.clip > 0.0).then_some(a.clip);
    let mut t = Trainer::new(
        student,
        p.student.config(),
        a.seq_len,
        adamw,
        p.spec,
        clip,
        device,
    );
    if let Some((h, _)) = &p.hidden {
        t = t.with_hidden(h.clone());
    }
    Ok(t)
}

/// A fresh start (refused over an earlier run's checkpoints unless --force) or, with
/// --resume, the newest checkpoint's state; returns the log so far.
fn begin(
    a: &Args,
    out: &crate::Path,
    print: &serde_json::Value,
    trainer: &mut Trainer,
) -> anyhow::Result<Vec<String>> {
    let root = ckpts::root_for(out);
    if a.resume {
        let (step, dir) = ckpts::resumable(out, print)?;
        trainer
            .restore(&dir.join("state"))
            .with_context(|| format!("{}", dir.display()))?;
        let text = std::fs::read_to_string(dir.join("train_log.jsonl"))
            .with_context(|| format!("{}", dir.display()))?;
        eprintln!("resuming from {} (step {step})", dir.display());
        return Ok(text.lines().map(|l| format!("{l}\n")).collect());
    }
    if root.exists() {
        if !a.force {
            bail!(
                "{}: checkpoints of an earlier run (continue it with --resume, or start over with --force)",
                root.display()
            );
        }
        std::fs::remove_dir_all(&root).with_context(|| format!("{}", root.display()))?;
    }
    Ok(Vec::new())
}

/// Writes the trained student into `dir`: the merged model, or LoRA adapters, or both.
fn write_student(
    a: &Args,
    p: &Plan,
    trained: CausalLm,
    student_path: &crate::Path,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let save = a.lora_save.unwrap_or(LoraSave::Merged);
    if let Some(l) = &p.lora
        && save != LoraSave::Merged
    {
        let sub = if save == LoraSave::Both {
            "adapter"
        } else {
            ""
        };
        let at = dir.join(sub);
        // The adapters trained against the dequantized 4-bit base, not --student: that base
        // goes beside them, in base/ (named by its final path).
        let base = match (&p.base, &a.out) {
            (Some(_), Some(out)) => {
                std::fs::create_dir_all(at.join("base"))?;
                let cfg = crate::hf_folder::write_config(
                    &p.student,
                    StoreDtype::from(a.dtype),
                    &at.join("base"),
                    None,
                )?;
                let mut tensors = trained.hf_tensors();
                tensors.extend(trained.base_4bit_weights());
                write_tensors(&tensors, &cfg, &at.join("base/model.safetensors"), a.dtype)?;
                crate::hf_folder::write_aux(&p.student, &p.tok, &cfg, &at.join("base"))?;
                std::path::absolute(out.join(sub).join("base"))?
            }
            _ => student_path.clone(),
        };
        crate::peft::write_adapters(&trained, l, &base, &at)?;
    }
    if p.lora.is_none() || save != LoraSave::Adapters {
        let student = trained.merged();
        let cfg = crate::hf_folder::write_config(&p.student, StoreDtype::from(a.dtype), dir, None)?;
        write_weights(&student, &cfg, &dir.join("model.safetensors"), a.dtype)?;
        crate::hf_folder::write_aux(&p.student, &p.tok, &cfg, dir)?;
    }
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    run_with(a, None)
}

/// Trains as `distill` does, with the student's linears behind fake quantization when `qat`
/// is given (then `quant_report.json` is written beside the model).
pub(crate) fn run_with(a: Args, qat: Option<&crate::qat::Plan>) -> anyhow::Result<()> {
    let start = Instant::now();
    let threads = crate::set_threads(a.threads);
    check_numbers(&a)?;
    let requant = crate::requant::plan(&a)?;
    let plain = a.device.device()?;
    if a.cache_teacher.is_some() {
        return crate::distill_cache::write(&a);
    }
    let (Some(student_path), Some(out)) = (&a.student, &a.out) else {
        bail!(
            "training needs --student MODEL and --out DIR (or --cache-teacher FILE to only write a teacher cache)"
        );
    };
    check_flags(&a)?;
    if crate::checks_done() {
        return Ok(());
    }
    let manifest = crate::manifest::Run::start(if qat.is_some() { "qat" } else { "distill" })
        .input("student", Some(student_path))
        .input("teacher", a.teacher.as_deref())
        .input("teacher_cache", a.teacher_cache.as_deref())
        .input("data", Some(&a.data))
        .input("calibration", qat.and_then(|q| q.calib.calib.as_deref()))
        .seed(a.seed);
    let mut p = plan(&a, student_path, out)?;
    // QAT from GPTQ/AWQ: the PTQ start, once every option and input has been checked.
    let (ptq, _ptq_guard) = match qat {
        Some(q) => q.start(&a, student_path, out, &mut p.student)?,
        None => (None, TempGuard(None)),
    };
    plain.seed(a.seed);
    let device = plain.clone().autodiff();
    let (teacher, rope, cache) = teacher_parts(&a, &p, &plain)?;
    let mut trainer = trainer(&a, &p, &device, qat.map(|q| (&q.opts, ptq.as_ref())))?;
    let options = options_json(&a, &p, cache.as_ref(), qat)?;
    let bytes = trainer.student().base_4bit_bytes();
    let print = ckpts::fingerprint(&p.student, p.teacher.as_ref(), &a.data, options.clone())?;
    let mut log = begin(&a, out, &print, &mut trainer)?;
    let saver = (a.save_every > 0).then(|| ckpts::Saver {
        root: ckpts::root_for(out),
        student: &p.student,
        tok: &p.tok,
        fingerprint: &print,
        dtype: a.dtype,
        limit: a.save_limit.unwrap_or(1),
    });

    let tmp = temp_sibling(out);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    let source = match (&teacher, &rope, &cache) {
        (Some(t), Some(r), _) => Source::Live(Live {
            model: t,
            rope: r,
            top_k: a.top_k,
            temperature: p.spec.temperature,
            taps: p
                .hidden
                .as_ref()
                .map_or(Vec::new(), |(h, _)| h.map.iter().map(|m| m.1).collect()),
        }),
        (_, _, Some(c)) => Source::Cache(c, plain.clone()),
        _ => Source::None,
    };
    let run = Run {
        a: &a,
        teacher: source,
        items: &p.items,
        per_step: p.per_step,
        sched: &p.sched,
        saver: saver.as_ref(),
    };
    let (last, train_secs, here) = run.train(&mut trainer, &mut log)?;
    std::fs::write(tmp.join("train_log.jsonl"), log.concat())?;
    let trained = trainer.into_student();
    if let Some(q) = qat {
        let ptq_summary = ptq.as_ref().map(|s| &s.summary);
        crate::qat::write_outputs(
            q,
            &a,
            &p.student,
            &p.tok,
            &trained,
            train_secs,
            ptq_summary,
            &tmp,
        )?;
    }
    let mut requantized = None;
    if let Some(rq) = requant {
        let merged = tmp.join(".merged");
        std::fs::create_dir_all(&merged)?;
        write_student(&a, &p, trained, student_path, &merged)?;
        requantized = Some(rq.run(&merged, &tmp)?);
    } else if qat.is_none_or(|q| q.dense) {
        write_student(&a, &p, trained, student_path, &tmp)?;
    }
    let mut report = json!({
        "student": student_path, "teacher": a.teacher, "data": a.data, "options": options,
        "dtype": a.dtype, "threads": threads, "resumed": a.resume, "mode": a.mode,
        "data_tokens": p.n_tokens, "items": p.items.len(), "steps": p.sched.total,
        "tokens_trained": last.tokens, "final_step": last, "train_seconds": train_secs,
        "tokens_this_process": here, "tokens_per_second": here as f64 / train_secs,
        "seconds": start.elapsed().as_secs_f64(),
    });
    if let Some(r) = requantized {
        report["requant"] = r;
    }
    if let Some(b) = p.base {
        report["base"] = json!({
            "scheme": b, "scheme_label": b.label(), "linears": bytes.linears,
            "params": bytes.params, "resident_bytes": bytes.resident_bytes,
            "f32_bytes": bytes.f32_bytes, "bits_per_weight": bytes.bits_per_weight(),
        });
    }
    std::fs::write(
        tmp.join("distill_report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let metrics = json!({"report": "distill_report.json", "tokens_trained": last.tokens, "final_loss": last.loss});
    manifest.write(&tmp, metrics)?;
    commit(&tmp, out)?;
    guard.0 = None;
    if a.save_every > 0 && !a.keep_checkpoints {
        std::fs::remove_dir_all(ckpts::root_for(out)).ok();
        if let Some(s) = &ptq {
            std::fs::remove_dir_all(&s.dir).ok();
        }
    }
    announce(
        qat,
        student_path,
        out,
        &p,
        (&last, train_secs, here),
        &bytes,
    );
    Ok(())
}

/// Prints what a finished run did: the trained model, its steps and tokens, and for QAT the
/// report, for a 4-bit base its resident size.
fn announce(
    qat: Option<&crate::qat::Plan>,
    student_path: &crate::Path,
    out: &crate::Path,
    p: &Plan,
    (last, train_secs, here): (&distill::StepLog, f64, u64),
    bytes: &distill::qlora::BaseBytes,
) {
    let verb = qat.map_or("distilled".to_string(), |q| {
        format!("quantization-aware trained ({})", q.opts.scheme.label())
    });
    println!(
        "{verb} {} -> {}: {} steps, {} tokens{} in {:.0} s ({:.0} tok/s), final loss {:.4}",
        student_path.display(),
        out.display(),
        p.sched.total,
        crate::grouped(last.tokens),
        if here < last.tokens {
            format!(" ({} after resuming)", crate::grouped(here))
        } else {
            String::new()
        },
        train_secs,
        here as f64 / train_secs,
        last.loss
    );
    if qat.is_some() {
        println!("report: {}", out.join("quant_report.json").display());
    }
    if let Some(b) = p.base {
        println!(
            "base: {} held in {} bytes ({:.3} bits per weight; {} bytes in f32)",
            b.label(),
            crate::grouped(bytes.resident_bytes),
            bytes.bits_per_weight(),
            crate::grouped(bytes.f32_bytes),
        );
    }
}

/// The run's options as recorded in the report and fingerprinted for `--resume`.
fn options_json(
    a: &Args,
    p: &Plan,
    cache: Option<&TeacherCache>,
    qat: Option<&crate::qat::Plan>,
) -> anyhow::Result<serde_json::Value> {
    let mut options = json!({
        "loss": p.spec, "seq_len": a.seq_len, "batch_tokens": p.per_step * a.seq_len,
        "micro_batch": a.micro_batch, "schedule": p.sched, "clip": (a.clip > 0.0).then_some(a.clip),
        "weight_decay": a.weight_decay, "seed": a.seed, "lora": p.lora, "top_k": a.top_k,
        "hidden": p.hidden.as_ref().map(|(h, pr)| json!({"loss": h, "projection": pr})),
        "teacher_cache": cache.map(|c| &c.header),
    });
    // Only present for QLoRA, so that earlier runs' checkpoints keep their fingerprint.
    if let Some(b) = &p.base {
        options["base_scheme"] = serde_json::to_value(b)?;
        if p.init != distill::loftq::LoraInit::Gaussian {
            options["lora_init"] = serde_json::to_value(p.init)?;
        }
    }
    if let Some(q) = qat {
        options["qat"] = serde_json::to_value(q.opts)?;
        // Only when set, so that earlier runs' checkpoints keep their fingerprint.
        if q.calib.gptq_latent {
            options["qat_start"] = json!("gptq unrounded");
        }
    }
    Ok(options)
}

/// The live teacher and its rotary tables, or the offline teacher cache (checked against
/// the run's data, vocabulary and temperature).
#[allow(clippy::type_complexity)]
fn teacher_parts(
    a: &Args,
    p: &Plan,
    plain: &model::Device,
) -> anyhow::Result<(Option<CausalLm>, Option<Rope>, Option<TeacherCache>)> {
    let teacher = p
        .teacher
        .as_ref()
        .map(|t| CausalLm::load(t, plain))
        .transpose()
        .context("cannot load the teacher")?;
    let rope = p
        .teacher
        .as_ref()
        .map(|t| Rope::new(t.config(), a.seq_len, plain));
    let cache = match &a.teacher_cache {
        Some(path) => {
            let c = TeacherCache::load(path)?;
            let w = p
                .items
                .windows()
                .context("--teacher-cache needs text --data")?;
            c.check_run(path, w, p.student.config().vocab_size, p.spec.temperature)?;
            Some(c)
        }
        None => None,
    };
    Ok((teacher, rope, cache))
}

/// Writes the student's tensors in checkpoint order.
pub(crate) fn write_weights(
    student: &CausalLm,
    cfg: &model::Config,
    path: &std::path::Path,
    dtype: Dtype,
) -> anyhow::Result<()> {
    write_tensors(&student.hf_tensors(), cfg, path, dtype)
}

/// Writes HF-named tensors in checkpoint order.
fn write_tensors(
    tensors: &std::collections::BTreeMap<String, Vec<f32>>,
    cfg: &model::Config,
    path: &std::path::Path,
    dtype: Dtype,
) -> anyhow::Result<()> {
    let plan: Vec<_> = model::checkpoint::expected_tensors(cfg)
        .into_iter()
        .map(|(n, s)| (n, s, StoreDtype::from(dtype)))
        .collect();
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut w = StreamingWriter::create(path, plan.clone(), &meta)?;
    for (name, _, _) in &plan {
        let data = tensors
            .get(name)
            .with_context(|| format!("trained model has no tensor {name}"))?;
        w.write_next(name, data)?;
    }
    w.finish()?;
    Ok(())
}
