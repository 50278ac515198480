//! `compress distill --student MODEL [--teacher MODEL] --data FILE --out DIR`: trains the
//! student on windows of the data with a white-box KD loss against the teacher's logits
//! (forward/reverse KL, JSD; optionally mixed with CE), or with plain CE (`--loss ce`, no
//! teacher), and writes the trained student as an HF folder with its training log.

use std::time::Instant;

use anyhow::{Context, bail};
use distill::loss::LossKind;
use distill::schedule::Decay;
use distill::schedule::Schedule;
use distill::{
    AdamWOptions, CausalLm, HiddenLoss, LoraOptions, LoraTarget, LossSpec, QatOptions, Trainer,
};
use model::Checkpoint;
use model::safetensors_io::{StoreDtype, StreamingWriter};
use model::transformer::Rope;
use quant::nf4::BnbScheme;
use serde_json::json;

use crate::distill_checkpoints as ckpts;
use crate::distill_loop::{self as lp, Items, Live, Run, Source};
use crate::distill_options::{
    base_options, check_numbers, hidden_options, lora_options, loss_spec,
};
use crate::hf_folder::Dtype;
use crate::output::{TempGuard, check_output, commit, temp_sibling};
use distill::cache::TeacherCache;

/// The device of `--device`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// burn's Flex CPU backend.
    Cpu,
    /// burn's CUDA backend, GPU 0.
    Cuda,
}

impl DeviceKind {
    /// The burn device, or an error when this build lacks the backend.
    pub fn device(self) -> anyhow::Result<model::Device> {
        match self {
            Self::Cpu => Ok(model::Device::flex()),
            #[cfg(feature = "cuda")]
            Self::Cuda => Ok(model::Device::cuda(0)),
            #[cfg(not(feature = "cuda"))]
            Self::Cuda => bail!(
                "--device cuda: this build has no CUDA backend (build with `cargo build --release -p compress --features cuda`)"
            ),
        }
    }
}

/// What a LoRA run writes.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraSave {
    /// The student with the adapters merged into its weights.
    Merged,
    /// The adapters alone, in HF PEFT's layout.
    Adapters,
    /// The merged student, and the adapters in OUT/adapter.
    Both,
}

/// `--base-scheme`: the 4-bit scheme a QLoRA base is held in.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseScheme {
    /// NormalFloat-4 (QLoRA), as `compress quant --scheme nf4`.
    Nf4,
}

/// What `--data` holds and how it is trained on.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Text; KD from the teacher's logits, or CE.
    Whitebox,
    /// JSONL (prompt, response) pairs; CE on the responses.
    Blackbox,
}

impl Args {
    /// The loss asked for, or the mode's default.
    pub fn loss(&self) -> LossKind {
        self.loss.unwrap_or(match self.mode {
            Mode::Whitebox => LossKind::Fkl,
            Mode::Blackbox => LossKind::Ce,
        })
    }
}

/// Arguments of `distill`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The student to train: an HF folder or a .gguf file (never modified), e.g. a pruned
    /// model of the teacher's family.
    #[arg(long)]
    pub student: Option<crate::Path>,
    /// The teacher (same tokenizer), run live beside the student: needed by the KD losses
    /// unless --teacher-cache is given; refused with --loss ce.
    #[arg(long)]
    pub teacher: Option<crate::Path>,
    /// Only write a teacher cache to FILE and exit: the teacher's --top-k log-probabilities
    /// at --temperature for every window of --data (no --student, no --out).
    #[arg(long, value_name = "FILE")]
    pub cache_teacher: Option<crate::Path>,
    /// Distill from a teacher cache written by --cache-teacher instead of a live teacher
    /// (same data, --seq-len and --temperature).
    #[arg(long, value_name = "FILE")]
    pub teacher_cache: Option<crate::Path>,
    /// KD against the teacher's K most probable tokens per position plus one bucket for the
    /// rest (what a cache stores) [default: all tokens live; 64 for --cache-teacher].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Training text (UTF-8), cut into windows of --seq-len tokens.
    #[arg(long)]
    pub data: crate::Path,
    /// Output folder (HF layout: config.json, model.safetensors, tokenizer, train_log.jsonl,
    /// distill_report.json).
    #[arg(long)]
    pub out: Option<crate::Path>,
    /// What the data is: text for white-box KD (the teacher's logits) or CE, or, for
    /// black-box distillation, JSONL (prompt, response) pairs (e.g. from `compress generate`
    /// or a hosted model) trained on with CE on the response tokens only.
    #[arg(long, value_enum, default_value_t = Mode::Whitebox)]
    pub mode: Mode,
    /// The loss: KD from the teacher's logits (fkl, rkl, jsd) or plain CE on the data
    /// [default: fkl; ce with --mode blackbox].
    #[arg(long, value_enum)]
    pub loss: Option<LossKind>,
    /// KD: softmax temperature of teacher and student (the KD term is scaled by T²) [default: 1].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// JSD: the teacher's share of the mixture, in (0, 1) [default: 0.5].
    #[arg(long)]
    pub jsd_beta: Option<f64>,
    /// KD: weight of cross-entropy on the data, added to the KD term [default: 0].
    #[arg(long)]
    pub ce_weight: Option<f64>,
    /// Tokens to train on (predicted positions), rounded up to whole optimizer steps
    /// [default: one pass over the data].
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Tokens per training window.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Tokens per optimizer step (whole windows; gradients accumulate over micro-batches).
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    /// Windows per forward/backward pass (memory grows with it).
    #[arg(long, default_value_t = 1)]
    pub micro_batch: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Warmup as a fraction of the optimizer steps.
    #[arg(long, default_value_t = 0.05)]
    pub warmup: f64,
    /// Decay after warmup.
    #[arg(long, value_enum, default_value_t = Decay::Cosine)]
    pub decay: Decay,
    /// Final learning rate as a fraction of the peak.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Seed of the window order: the same seed and options give the same weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Add a hidden-state loss with this weight: squared error between student and teacher
    /// block outputs (per token, mean over the hidden dimension, summed over --hidden-layers);
    /// needs a live --teacher.
    #[arg(long)]
    pub hidden_weight: Option<f64>,
    /// Hidden-state loss: STUDENT:TEACHER block pairs, 0-based (e.g. 0:1,1:3) [default: every
    /// student block, mapped to the teacher block at the same relative depth].
    #[arg(long, value_name = "S:T,...")]
    pub hidden_layers: Option<String>,
    /// Hidden-state loss between different widths: learn a linear projection of each mapped
    /// student block to the teacher's width (needed when widths differ, refused otherwise).
    #[arg(long)]
    pub hidden_projection: bool,
    /// LoRA: train rank-R adapters on --lora-targets only, every other weight frozen; the
    /// adapters are merged into the written model.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA: scale numerator (updates are scaled by alpha / rank) [default: 2 x rank].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA: the adapted linears of every block [default: q_proj,v_proj, PEFT's for Llama].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub lora_targets: Option<Vec<LoraTarget>>,
    /// LoRA: what OUT holds: the merged model, the adapters alone in HF PEFT's layout
    /// (adapter_config.json, adapter_model.safetensors; the base is --student, which PEFT
    /// loads when it is an HF folder), or both (adapters in OUT/adapter) [default: merged].
    #[arg(long, value_enum)]
    pub lora_save: Option<LoraSave>,
    /// QLoRA: hold the frozen student's decoder linears in this 4-bit scheme (packed codes and
    /// per-block absmax, dequantized on the fly in every forward pass) while the LoRA adapters
    /// train in f32; needs --lora-rank.
    #[arg(long, value_enum)]
    pub base_scheme: Option<BaseScheme>,
    /// --base-scheme: values per absmax block (32, 64, ..., 4096; every input width has to be
    /// a multiple of it) [default: 64].
    #[arg(long)]
    pub block: Option<usize>,
    /// --base-scheme: QLoRA double quantization (the absmax values to 8 bits in blocks of 256).
    #[arg(long)]
    pub double_quant: bool,
    /// Save a checkpoint every N optimizer steps into OUT.checkpoints/checkpoint-STEP (an HF
    /// model plus the training state); 0: none.
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Checkpoints kept, the newest (0: all).
    #[arg(long)]
    pub save_limit: Option<usize>,
    /// Keep OUT.checkpoints after the run completes (by default it is removed).
    #[arg(long)]
    pub keep_checkpoints: bool,
    /// Continue from the newest checkpoint in OUT.checkpoints; refused when the student,
    /// teacher, data or training options differ from the checkpointed run.
    #[arg(long)]
    pub resume: bool,
    /// Storage type of the written weights.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// Where to train: the CPU (burn's Flex backend) or the first CUDA GPU (a build with the
    /// `cuda` feature: `cargo build --release -p compress --features cuda`).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
}

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
    hidden: Option<(HiddenLoss, bool)>,
    items: Items,
    n_tokens: usize,
    per_step: usize,
    sched: Schedule,
}

/// Every check of the options, models and data, then the data itself and the schedule.
fn plan(a: &Args, student_path: &crate::Path, out: &crate::Path) -> anyhow::Result<Plan> {
    let spec = loss_spec(a)?;
    if a.top_k == Some(0) {
        bail!("--top-k must be at least 1");
    }
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
    qat: Option<&QatOptions>,
) -> anyhow::Result<Trainer> {
    let mut student = CausalLm::load(&p.student, device).context("cannot load the student")?;
    match (&p.lora, &p.base) {
        (Some(l), Some(b)) => student = student.with_4bit_lora(l, b)?,
        (Some(l), None) => student = student.with_lora(l),
        _ => {}
    }
    if let Some(q) = qat {
        student = student.with_fake_quant(q)?;
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
    let plain = a.device.device()?;
    if a.cache_teacher.is_some() {
        return crate::distill_cache::write(&a);
    }
    let (Some(student_path), Some(out)) = (&a.student, &a.out) else {
        bail!(
            "training needs --student MODEL and --out DIR (or --cache-teacher FILE to only write a teacher cache)"
        );
    };
    let p = plan(&a, student_path, out)?;
    plain.seed(a.seed);
    let device = plain.clone().autodiff();
    let teacher = p
        .teacher
        .as_ref()
        .map(|t| CausalLm::load(t, &plain))
        .transpose();
    let teacher = teacher.context("cannot load the teacher")?;
    let rope = p
        .teacher
        .as_ref()
        .map(|t| Rope::new(t.config(), a.seq_len, &plain));
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
    let mut trainer = trainer(&a, &p, &device, qat.map(|q| &q.opts))?;
    let mut options = json!({
        "loss": p.spec, "seq_len": a.seq_len, "batch_tokens": p.per_step * a.seq_len,
        "micro_batch": a.micro_batch, "schedule": p.sched, "clip": (a.clip > 0.0).then_some(a.clip),
        "weight_decay": a.weight_decay, "seed": a.seed, "lora": p.lora, "top_k": a.top_k,
        "hidden": p.hidden.as_ref().map(|(h, pr)| json!({"loss": h, "projection": pr})),
        "teacher_cache": cache.as_ref().map(|c| &c.header),
    });
    // Only present for QLoRA, so that earlier runs' checkpoints keep their fingerprint.
    if let Some(b) = &p.base {
        options["base_scheme"] = serde_json::to_value(b)?;
    }
    let bytes = trainer.student().base_4bit_bytes();
    let base_bytes = p.base.map(|b| {
        json!({
            "scheme": b, "scheme_label": b.label(), "linears": bytes.linears,
            "params": bytes.params, "resident_bytes": bytes.resident_bytes,
            "f32_bytes": bytes.f32_bytes, "bits_per_weight": bytes.bits_per_weight(),
        })
    });
    if let Some(q) = qat {
        options["qat"] = serde_json::to_value(q.opts)?;
    }
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
        crate::qat::write_outputs(q, &a, &p.student, &p.tok, &trained, train_secs, &tmp)?;
    }
    if qat.is_none_or(|q| q.dense) {
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
    if let Some(b) = base_bytes {
        report["base"] = b;
    }
    std::fs::write(
        tmp.join("distill_report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    commit(&tmp, out)?;
    guard.0 = None;
    if a.save_every > 0 && !a.keep_checkpoints {
        std::fs::remove_dir_all(ckpts::root_for(out)).ok();
    }
    let resumed = if here < last.tokens {
        format!(" ({} after resuming)", crate::grouped(here))
    } else {
        String::new()
    };
    let verb = qat.map_or("distilled".to_string(), |q| {
        format!("quantization-aware trained ({})", q.opts.scheme.label())
    });
    println!(
        "{verb} {} -> {}: {} steps, {} tokens{resumed} in {:.0} s ({:.0} tok/s), final loss {:.4}",
        student_path.display(),
        out.display(),
        p.sched.total,
        crate::grouped(last.tokens),
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
    Ok(())
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
