//! The training loop of `compress distill`: what a step trains on (windows of text, or
//! prompt-masked pairs for black-box distillation), where KD targets come from (a live
//! teacher, reduced to its top k or not, or a teacher cache), the schedule for a token
//! budget, and the steps with their log and checkpoints.

use std::time::Instant;

use anyhow::{Context, bail};
use distill::cache::TeacherCache;
use distill::schedule::Schedule;
use distill::{CausalLm, MicroBatch, StepLog, Teacher, TeacherOut, Trainer};
use model::transformer::Rope;

use crate::distill_checkpoints as ckpts;
use crate::distilling::Args;

/// What the run trains on.
pub enum Items {
    /// Windows of `seq_len + 1` tokens of text, every position counted.
    Windows(Vec<Vec<u32>>),
    /// One masked window per (prompt, response) pair: only response tokens counted.
    Pairs(Vec<MicroBatch>),
}

impl Items {
    /// Items in the data.
    pub fn len(&self) -> usize {
        match self {
            Self::Windows(w) => w.len(),
            Self::Pairs(p) => p.len(),
        }
    }

    /// Counted tokens in one pass over the data.
    fn tokens(&self) -> u64 {
        match self {
            Self::Windows(w) => w.iter().map(|x| x.len() as u64 - 1).sum(),
            Self::Pairs(p) => p.iter().map(|m| m.counted() as u64).sum(),
        }
    }

    /// The windows, when the data is text.
    pub fn windows(&self) -> Option<&[Vec<u32>]> {
        match self {
            Self::Windows(w) => Some(w),
            Self::Pairs(_) => None,
        }
    }

    /// The micro-batches of items `idx` (windows grouped by `micro`, pairs one by one).
    fn micro_batches(&self, idx: &[usize], micro: usize) -> Vec<MicroBatch> {
        match self {
            Self::Windows(w) => idx
                .chunks(micro)
                .map(|i| MicroBatch::indexed(i.iter().map(|&j| w[j].clone()).collect(), i.to_vec()))
                .collect(),
            Self::Pairs(p) => idx.iter().map(|&j| p[j].clone()).collect(),
        }
    }
}

/// The data's token count and its training windows; refuses data shorter than one window.
pub fn data_windows(a: &Args, tok: &model::Tokenizer) -> anyhow::Result<(usize, Vec<Vec<u32>>)> {
    let text = crate::evaluate::read_text(&a.data)?;
    let tokens = tok.encode(&text).context("cannot tokenize the data")?;
    let windows = distill::data::windows(&tokens, a.seq_len);
    if windows.is_empty() {
        bail!(
            "{}: {} tokens, fewer than one window of --seq-len {} + 1",
            a.data.display(),
            tokens.len(),
            a.seq_len
        );
    }
    Ok((tokens.len(), windows))
}

/// Black-box: the (prompt, response) pairs of the JSONL --data, as prompt-masked windows;
/// returns the response tokens trained on per pass and the pairs.
pub fn data_pairs(a: &Args, tok: &model::Tokenizer) -> anyhow::Result<(usize, Vec<MicroBatch>)> {
    let pairs = distill::pairs::read_pairs(&a.data)?;
    let batches = distill::pairs::pair_batches(&pairs, tok, a.seq_len)
        .with_context(|| format!("{}", a.data.display()))?;
    let n = batches.iter().map(|m| m.counted() as usize).sum();
    Ok((n, batches))
}

/// Items per optimizer step (`--batch-tokens / --seq-len` windows or pairs), and the
/// learning rate of every step for the token budget (`--max-tokens`, default one pass).
pub fn schedule(a: &Args, items: &Items) -> anyhow::Result<(usize, Schedule)> {
    let per_step = a.batch_tokens / a.seq_len;
    let pass = items.tokens().max(1);
    let budget = a.max_tokens.unwrap_or(pass);
    // Counted tokens per step, on average over the data (exact for text windows).
    let per_step_tokens = (pass as f64 * per_step as f64 / items.len() as f64).max(1.0);
    let steps = (budget as f64 / per_step_tokens).ceil();
    if steps > 1e8 {
        bail!("--max-tokens {budget}: {steps} optimizer steps is beyond any run this tool plans");
    }
    let steps = steps as usize;
    Ok((
        per_step,
        Schedule {
            peak: a.lr,
            warmup: (a.warmup * steps as f64).round() as usize,
            total: steps,
            decay: a.decay,
            min_ratio: a.min_lr_ratio,
        },
    ))
}

/// Where the KD targets come from.
pub enum Source<'a> {
    /// No teacher (`--loss ce`, black-box).
    None,
    /// A live teacher, reduced to its top k when asked, at the loss temperature.
    Live(Live<'a>),
    /// A teacher cache, its tensors built on the device.
    Cache(&'a TeacherCache, model::Device),
}

/// A teacher run beside the student.
pub struct Live<'a> {
    /// The teacher.
    pub model: &'a CausalLm,
    /// Its rotary tables.
    pub rope: &'a Rope,
    /// Reduce its distribution to the top k tokens (plus a bucket).
    pub top_k: Option<usize>,
    /// The loss temperature.
    pub temperature: f64,
    /// Blocks whose outputs a hidden-state loss compares, in map order.
    pub taps: Vec<usize>,
}

impl Source<'_> {
    /// The targets of a micro-batch (`inputs` are its windows without their last token).
    fn of(&self, mb: &MicroBatch, inputs: &[Vec<u32>]) -> Option<TeacherOut> {
        match self {
            Self::None => None,
            Self::Live(t) => {
                let (logits, hidden) = t.model.logits_and_hidden(inputs, t.rope, &t.taps);
                let target = match t.top_k {
                    Some(k) => Teacher::top_k_of(logits, k, t.temperature),
                    None => Teacher::Logits(logits),
                };
                Some(TeacherOut { target, hidden })
            }
            Self::Cache(c, device) => Some(c.teacher(&mb.index, device).into()),
        }
    }
}

/// The fixed inputs of the training loop.
pub struct Run<'a> {
    /// The command's options.
    pub a: &'a Args,
    /// Where KD targets come from.
    pub teacher: Source<'a>,
    /// What the run trains on.
    pub items: &'a Items,
    /// Items per optimizer step.
    pub per_step: usize,
    /// Learning rate per step, and the step count.
    pub sched: &'a Schedule,
    /// Writes checkpoints, when asked.
    pub saver: Option<&'a ckpts::Saver<'a>>,
}

impl Run<'_> {
    /// Where a failed run can be continued from: the newest checkpoint, if any.
    fn last_good(&self) -> String {
        let Some(saver) = self.saver else {
            return " (no checkpoint kept: --save-every N keeps them)".into();
        };
        match crate::distill_checkpoints::list(&saver.root).last() {
            Some((step, dir)) => format!(
                "; the last good checkpoint is {} (step {step}; kept)",
                dir.display()
            ),
            None => " (no checkpoint written yet)".into(),
        }
    }

    /// Every optimizer step from the trainer's current one to the end, each appended to
    /// `log` (JSON lines) and shown on the progress bar, with checkpoints as asked; returns
    /// the last step's record, and the seconds and tokens this process trained.
    pub fn train(
        &self,
        trainer: &mut Trainer,
        log: &mut Vec<String>,
    ) -> anyhow::Result<(StepLog, f64, u64)> {
        crate::alloc::keep_freed_memory();
        let (a, per_step) = (self.a, self.per_step);
        let order = distill::data::Order::new(self.items.len(), a.seed);
        let pb = crate::progress_bar("distill", self.sched.total as u64);
        pb.set_position(trainer.steps() as u64);
        let (start, tokens0) = (Instant::now(), trainer.tokens());
        for s in trainer.steps()..self.sched.total {
            let idx = order.take((s * per_step) as u64, per_step);
            let micro = self.items.micro_batches(&idx, a.micro_batch);
            let mut teacher_fn = |mb: &MicroBatch, inputs: &[Vec<u32>]| self.teacher.of(mb, inputs);
            let rec = match trainer.step(&micro, self.sched.lr(s), &mut teacher_fn) {
                Ok(r) => r,
                Err(e) => {
                    pb.finish_and_clear();
                    bail!("{e}{}", self.last_good());
                }
            };
            log.push(format!("{}\n", serde_json::to_string(&rec)?));
            let tok_s = (rec.tokens - tokens0) as f64 / start.elapsed().as_secs_f64();
            pb.set_message(format!("loss {:.4} {:.0} tok/s", rec.loss, tok_s));
            pb.set_position(rec.step as u64);
            if let Some(saver) = self.saver
                && rec.step.is_multiple_of(a.save_every)
                && rec.step < self.sched.total
            {
                saver.save(trainer, log)?;
            }
        }
        pb.finish_and_clear();
        let last = log.last().context("no optimizer step ran")?;
        let last: StepLog = serde_json::from_str(last.trim()).context("the training log")?;
        let here = trainer.tokens() - tokens0;
        Ok((last, start.elapsed().as_secs_f64(), here))
    }
}
