//! `compress eval MODEL`: perplexity, divergence from a teacher, speed, energy and size, as a
//! table on stdout and a JSON report.

use anyhow::{Context, bail};
use comfy_table::Table;
use eval::energy::{DEFAULT_GRID_G_PER_KWH, DEFAULT_WATTS_PER_CORE, EnergyMeter};
use eval::{PplOptions, Protocol, SizeReport, SpeedReport};
use model::Checkpoint;
use serde_json::{Value, json};

use crate::output::write_atomic;

/// Arguments of `eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF folder or a .gguf file.
    model: crate::Path,
    /// Text file for perplexity (e.g. wikitext-2 wiki.test.raw).
    #[arg(long)]
    ppl: Option<crate::Path>,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Evaluate at most this many chunks (default: all).
    #[arg(long)]
    chunks: Option<usize>,
    /// `llama` (llama.cpp's llama-perplexity: second half of each chunk scored) or `hf`
    /// (every token scored, as in the AWQ/GPTQ papers).
    #[arg(long, value_enum, default_value = "llama")]
    protocol: Protocol,
    /// Teacher model: also report KL(teacher ‖ student) over the --ppl chunks.
    #[arg(long)]
    teacher: Option<crate::Path>,
    /// With --teacher: also save the teacher's top-k log-probabilities here for reuse.
    #[arg(long, requires = "teacher")]
    save_teacher_logits: Option<crate::Path>,
    /// Saved teacher log-probabilities to measure divergence against instead of --teacher
    /// (KL over the top-k tokens plus one bucket for the rest: a lower bound).
    #[arg(long, conflicts_with = "teacher")]
    teacher_logits: Option<crate::Path>,
    /// Tokens kept per position by --save-teacher-logits.
    #[arg(long, default_value_t = 64)]
    top_k: usize,
    /// Zero-shot multiple-choice tasks, comma-separated: piqa, arc_easy, medqa, pubmedqa,
    /// mmlu_medical (or one MMLU subset, e.g. mmlu_anatomy).
    #[arg(long)]
    tasks: Option<String>,
    /// Your own multiple-choice task: a JSONL file, one item per line
    /// ({"question", "choices", "answer": index or letter, optional "context" and "lettered"};
    /// docs/tasks.md), scored as the built-in tasks and reported under the file's stem.
    /// Repeatable; needs no data folder.
    #[arg(long, value_name = "FILE.jsonl")]
    task_file: Vec<crate::Path>,
    /// Score only the first N documents of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Folder with the task data, laid out as scripts/get-data.sh writes it (default:
    /// $COMPRESS_DATA, else ../shared/data).
    #[arg(long)]
    data_dir: Option<crate::Path>,
    /// Measure prompt processing and greedy generation speed with a KV cache.
    #[arg(long)]
    speed: bool,
    /// Prompt tokens for --speed.
    #[arg(long, default_value_t = 512)]
    pp: usize,
    /// Generated tokens for --speed.
    #[arg(long, default_value_t = 128)]
    tg: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<crate::Path>,
    /// Replace existing --json and --save-teacher-logits files.
    #[arg(long)]
    force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Watts per busy core for the energy estimate when RAPL counters are absent.
    #[arg(long, default_value_t = DEFAULT_WATTS_PER_CORE)]
    watts_per_core: f64,
    /// Grid carbon intensity in g CO2e per kWh.
    #[arg(long, default_value_t = DEFAULT_GRID_G_PER_KWH)]
    grid_intensity: f64,
}

/// The text used for speed prompts when no --ppl file is given: fixed, so runs compare.
const SPEED_TEXT: &str = "The patient is a 67-year-old man with a history of hypertension and type 2 diabetes \
who presents with two days of progressive shortness of breath and bilateral leg swelling. ";

pub(crate) fn read_text(path: &crate::Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", path.display()))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let threads = crate::set_threads(a.threads);
    if a.ppl.is_none() && !a.speed && a.tasks.is_none() && a.task_file.is_empty() {
        bail!(
            "nothing to evaluate: give --ppl TEXT_FILE, --tasks LIST, --task-file FILE and/or --speed"
        );
    }
    if (a.teacher.is_some() || a.teacher_logits.is_some()) && a.ppl.is_none() {
        bail!(
            "--teacher needs --ppl TEXT_FILE (divergence is measured over the perplexity chunks)"
        );
    }
    if a.chunks == Some(0) {
        bail!("--chunks must be at least 1");
    }
    if !(a.watts_per_core > 0.0 && a.grid_intensity >= 0.0) {
        bail!("--watts-per-core must be positive and --grid-intensity non-negative");
    }
    // The task data folder, checked before any work.
    let task_dir = match &a.tasks {
        Some(_) => {
            let dir: crate::Path = a
                .data_dir
                .clone()
                .or_else(|| std::env::var_os("COMPRESS_DATA").map(Into::into))
                .unwrap_or_else(|| "../shared/data".into());
            if !dir.is_dir() {
                bail!(
                    "{}: task data folder not found; set COMPRESS_DATA (or --data-dir) to the folder scripts/get-data.sh fills",
                    dir.display()
                );
            }
            Some(dir)
        }
        None => None,
    };
    // Task files, read (and so checked) before any work.
    for f in &a.task_file {
        eval::tasks::custom::task_file_name(f)?;
        eval::tasks::custom::load_task_file(f)?;
    }
    if crate::checks_done() {
        return Ok(());
    }
    // Outputs never replace an input, nor an existing file without --force.
    let inputs: Vec<&std::path::Path> = [
        Some(&a.model),
        a.ppl.as_ref(),
        a.teacher.as_ref(),
        a.teacher_logits.as_ref(),
        a.data_dir.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| p.as_path())
    .collect();
    for (out, flag) in [
        (&a.json, "--json"),
        (&a.save_teacher_logits, "--save-teacher-logits"),
    ] {
        if let Some(o) = out {
            crate::output::check_output_file(o, flag, &inputs, a.force)?;
        }
    }
    if a.json.is_some() && a.json == a.save_teacher_logits {
        bail!("--json and --save-teacher-logits name the same file");
    }
    let meter = EnergyMeter::start();
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    ckpt.check_shapes().context("cannot open model")?;
    let max_ctx = ckpt.config().max_position_embeddings;
    if a.ppl.is_some() && (a.ctx < 2 || a.ctx > max_ctx) {
        bail!(
            "--ctx {} is outside 2..={max_ctx} (the model's context length)",
            a.ctx
        );
    }
    let tok = model::load_tokenizer(&ckpt).context("cannot build the tokenizer")?;
    let device = model::default_device();
    let size = SizeReport::of(&ckpt);
    let mut report = json!({"model": a.model, "format": ckpt.format(), "size": size});
    let mut tokens_processed = 0u64;
    let mut rows: Vec<(String, String)> = vec![
        ("model".into(), a.model.display().to_string()),
        (
            "bytes / params / bpw".into(),
            format!(
                "{} / {} / {:.3}",
                crate::grouped(size.bytes),
                crate::grouped(size.params),
                size.bits_per_weight
            ),
        ),
    ];

    if let Some(ppl_path) = &a.ppl {
        let text = read_text(ppl_path)?;
        let tokens = tok.encode(&text)?;
        let opts = PplOptions {
            ctx: a.ctx,
            chunks: a.chunks,
            protocol: a.protocol,
        };
        let pb = crate::progress_bar(
            if a.teacher.is_some() {
                "kld"
            } else {
                "perplexity"
            },
            1,
        );
        let progress = |done: u64, total: u64| {
            pb.set_length(total);
            pb.set_position(done);
        };
        let ctx_err = |e: eval::EvalError| anyhow::anyhow!("{}: {e}", ppl_path.display());
        let kld_rows =
            |t: &eval::PplResult, k: &eval::KldResult, rows: &mut Vec<(String, String)>| {
                rows.push((
                    "teacher ppl".into(),
                    format!("{:.4} ± {:.4}", t.value, t.stderr),
                ));
                rows.push((
                    "KLD mean ± se".into(),
                    format!("{:.6} ± {:.6}", k.mean, k.stderr),
                ));
                rows.push((
                    "KLD median / p90 / p99".into(),
                    format!("{:.6} / {:.6} / {:.6}", k.median, k.p90, k.p99),
                ));
                rows.push((
                    "same top token".into(),
                    format!("{:.2} ± {:.2} %", k.top1_agreement, k.top1_agreement_stderr),
                ));
                rows.push(("RMS Δp".into(), format!("{:.3} %", k.rms_delta_p)));
            };
        let res = if let Some(tpath) = &a.teacher {
            let teacher = Checkpoint::open(tpath).context("cannot open teacher")?;
            let ttok =
                model::load_tokenizer(&teacher).context("cannot build the teacher's tokenizer")?;
            eval::kld::check_same_vocab(&teacher, &ckpt, &ttok, &tok)?;
            if let Some(save) = &a.save_teacher_logits {
                if a.top_k == 0 {
                    bail!("--top-k must be at least 1");
                }
                let saved = eval::kld::teacher_logits(
                    &teacher,
                    &tok,
                    &tokens,
                    &opts,
                    a.top_k,
                    device.clone(),
                    |_, _| {},
                )
                .map_err(ctx_err)?;
                saved
                    .save(save)
                    .with_context(|| format!("{}", save.display()))?;
                tokens_processed += (saved.header.chunks * a.ctx) as u64;
            }
            let (s, t, k) = eval::kl_divergence(
                &teacher,
                &ckpt,
                &tok,
                &tokens,
                &opts,
                device.clone(),
                progress,
            )
            .map_err(ctx_err)?;
            kld_rows(&t, &k, &mut rows);
            report["teacher"] = json!({"model": tpath, "perplexity": t});
            report["kld"] = serde_json::to_value(&k)?;
            tokens_processed += 2 * s.tokens_processed as u64;
            s
        } else if let Some(lpath) = &a.teacher_logits {
            let saved = eval::kld::TeacherLogits::load(lpath)?;
            // Every field of the file against this run, before the student runs; the
            // errors name the logits file, not the text.
            let (windows, first) =
                eval::perplexity::make_windows(&tokens, &tok, &opts).map_err(ctx_err)?;
            saved.check_run(ckpt.config().vocab_size, &windows, first, &opts)?;
            drop(windows);
            let (s, t, k) = eval::kld::kl_from_saved(
                &saved,
                &ckpt,
                &tok,
                &tokens,
                &opts,
                device.clone(),
                progress,
            )
            .map_err(ctx_err)?;
            kld_rows(&t, &k, &mut rows);
            report["teacher"] = json!({"logits": lpath, "model": saved.header.model, "top_k": saved.header.k, "perplexity": t});
            report["kld"] = serde_json::to_value(&k)?;
            report["kld"]["approximation"] =
                json!("top-k of the teacher plus one bucket for the rest (lower bound)");
            tokens_processed += s.tokens_processed as u64;
            s
        } else {
            let r = eval::perplexity(&ckpt, &tok, &tokens, &opts, device.clone(), progress)
                .map_err(ctx_err)?;
            tokens_processed += r.tokens_processed as u64;
            r
        };
        pb.finish_and_clear();
        let speed = SpeedReport {
            tokens_per_second: res.tokens_processed as f64 / res.wall_seconds,
            wall_seconds: res.wall_seconds,
            threads,
        };
        rows.insert(
            1,
            (
                "perplexity".into(),
                format!(
                    "{:.4} ± {:.4} ({} x {}, {})",
                    res.value,
                    res.stderr,
                    res.chunks,
                    res.ctx,
                    a.protocol.name()
                ),
            ),
        );
        rows.push((
            "eval tok/s".into(),
            format!("{:.1} ({threads} threads)", speed.tokens_per_second),
        ));
        report["text"] = json!(ppl_path);
        report["perplexity"] = serde_json::to_value(&res)?;
        report["speed"] = serde_json::to_value(&speed)?;
    }

    if a.tasks.is_some() || !a.task_file.is_empty() {
        let names: Vec<String> = a
            .tasks
            .iter()
            .flat_map(|list| list.split(','))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        let pb = crate::progress_bar("tasks", 1);
        let results = eval::run_tasks(
            &ckpt,
            &tok,
            &names,
            &a.task_file,
            task_dir.as_deref(),
            a.limit,
            device.clone(),
            |name, done, total| {
                pb.set_message(name.to_string());
                pb.set_length(total);
                pb.set_position(done);
            },
        )?;
        pb.finish_and_clear();
        for (name, r) in &results {
            rows.push((
                format!("{name} (n={})", r.n),
                format!(
                    "acc {:.2} ± {:.2} %, acc_norm {:.2} ± {:.2} %",
                    100.0 * r.acc,
                    100.0 * r.acc_stderr,
                    100.0 * r.acc_norm,
                    100.0 * r.acc_norm_stderr
                ),
            ));
        }
        report["tasks"] = serde_json::to_value(&results)?;
    }

    if a.speed {
        let text = match &a.ppl {
            Some(p) => read_text(p)?,
            None => SPEED_TEXT.repeat(1 + a.pp / 20),
        };
        let mut prompt = tok.encode(&text)?;
        if prompt.len() < a.pp {
            bail!(
                "the speed prompt has only {} tokens, fewer than --pp {}",
                prompt.len(),
                a.pp
            );
        }
        prompt.truncate(a.pp.max(1));
        let g = eval::speed::measure(&ckpt, &prompt, a.tg)?;
        rows.push((
            "prompt tok/s".into(),
            format!("{:.1} ({} tokens)", g.pp_tokens_per_second, g.prompt_tokens),
        ));
        rows.push((
            "generation tok/s".into(),
            format!(
                "{:.2} ({} tokens, greedy, KV cache)",
                g.tg_tokens_per_second, g.generated_tokens
            ),
        ));
        tokens_processed += (g.prompt_tokens + g.generated_tokens) as u64;
        let speed = report
            .get_mut("speed")
            .and_then(Value::as_object_mut)
            .map(|m| m.clone())
            .unwrap_or_default();
        let mut speed = Value::Object(speed);
        for (k, v) in serde_json::to_value(&g)?.as_object().expect("object") {
            speed[k] = v.clone();
        }
        speed["threads"] = json!(threads);
        report["speed"] = speed;
    }

    let peak = eval::speed::peak_rss_bytes();
    report["speed"]["peak_rss_bytes"] = json!(peak);
    let energy = meter.finish(tokens_processed, a.watts_per_core, a.grid_intensity);
    rows.push((
        "peak RSS".into(),
        peak.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
            .unwrap_or_else(|| "n/a".into()),
    ));
    rows.push((
        format!("energy ({})", energy.source),
        if energy.tokens > 0 {
            format!(
                "{:.1} J/1k tokens, {:.3} g CO2e/1k tokens at {} g/kWh",
                energy.joules_per_1k_tokens,
                energy.g_co2e_per_1k_tokens,
                energy.grid_g_co2e_per_kwh
            )
        } else {
            format!(
                "{:.1} J, {:.3} g CO2e in all at {} g/kWh",
                energy.joules, energy.g_co2e, energy.grid_g_co2e_per_kwh
            )
        },
    ));
    report["energy"] = serde_json::to_value(&energy)?;

    let mut t = Table::new();
    t.set_header(vec!["measure", "value"]);
    for (k, v) in rows {
        t.add_row(vec![k, v]);
    }
    println!("{t}");
    if let Some(out) = &a.json {
        write_atomic(out, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("report: {}", out.display());
    }
    Ok(())
}
