//! The options of `compress distill` checked and turned into the library's settings: the
//! loss, the numeric ranges, LoRA and the hidden-state loss. Options that do not apply to
//! the chosen mode or loss are refused, naming them.

use anyhow::bail;
use distill::loss::LossKind;
use distill::{Divergence, HiddenLoss, LoraOptions, LoraTarget, LossSpec};

use quant::nf4::{BnbScheme, BnbType};

use crate::distilling::{Args, BaseScheme, LoraInitArg, Mode};
use distill::loftq::LoraInit;

/// The loss the options describe; options that do not apply to the loss are refused.
pub fn loss_spec(a: &Args) -> anyhow::Result<LossSpec> {
    if a.mode == Mode::Blackbox && a.loss() != LossKind::Ce {
        bail!(
            "--mode blackbox trains with CE on the responses; --loss {:?} needs the teacher's logits (--mode whitebox)",
            a.loss()
        );
    }
    if a.loss() == LossKind::Ce {
        for (given, name) in [
            (a.teacher.is_some(), "--teacher"),
            (a.teacher_cache.is_some(), "--teacher-cache"),
            (a.top_k.is_some(), "--top-k"),
            (a.temperature.is_some(), "--temperature"),
            (a.jsd_beta.is_some(), "--jsd-beta"),
            (a.ce_weight.is_some(), "--ce-weight"),
        ] {
            if given {
                bail!("{name} does not apply to --loss ce (cross-entropy on the data alone)");
            }
        }
        return Ok(LossSpec {
            divergence: None,
            temperature: 1.0,
            kd_weight: 0.0,
            ce_weight: 1.0,
        });
    }
    match (&a.teacher, &a.teacher_cache) {
        (None, None) => bail!(
            "--loss {:?} needs --teacher MODEL or --teacher-cache FILE (or use --loss ce)",
            a.loss()
        ),
        (Some(_), Some(_)) => bail!("give --teacher or --teacher-cache, not both"),
        (None, Some(_)) if a.top_k.is_some() => {
            bail!("--top-k does not apply to --teacher-cache (the cache fixes k)")
        }
        _ => {}
    }
    if a.jsd_beta.is_some() && a.loss() != LossKind::Jsd {
        bail!("--jsd-beta applies to --loss jsd only");
    }
    let t = a.temperature.unwrap_or(1.0);
    if !(t.is_finite() && t > 0.0 && t <= 100.0) {
        bail!("--temperature must be in (0, 100], got {t}");
    }
    let ce = a.ce_weight.unwrap_or(0.0);
    if !(ce.is_finite() && (0.0..=1e3).contains(&ce)) {
        bail!("--ce-weight must be in [0, 1000], got {ce}");
    }
    let divergence = match a.loss() {
        LossKind::Fkl => Divergence::Fkl,
        LossKind::Rkl => Divergence::Rkl,
        LossKind::Jsd => {
            let beta = a.jsd_beta.unwrap_or(0.5);
            if !(beta > 0.0 && beta < 1.0) {
                bail!(
                    "--jsd-beta must be in (0, 1), got {beta} (use --loss fkl or rkl for the ends)"
                );
            }
            Divergence::Jsd { beta }
        }
        LossKind::Ce => unreachable!("handled above"),
    };
    Ok(LossSpec {
        divergence: Some(divergence),
        temperature: t,
        kd_weight: 1.0,
        ce_weight: ce,
    })
}

/// Range checks of the numeric options, before anything is read.
pub fn check_numbers(a: &Args) -> anyhow::Result<()> {
    let bad = |ok: bool, what: String| {
        if ok {
            Ok(())
        } else {
            Err(anyhow::anyhow!(what))
        }
    };
    bad(
        a.seq_len >= 2,
        format!("--seq-len must be at least 2, got {}", a.seq_len),
    )?;
    bad(
        a.batch_tokens >= a.seq_len,
        format!(
            "--batch-tokens ({}) must be at least --seq-len ({})",
            a.batch_tokens, a.seq_len
        ),
    )?;
    bad(
        a.micro_batch >= 1,
        "--micro-batch must be at least 1".into(),
    )?;
    bad(
        a.max_tokens != Some(0),
        "--max-tokens must be at least 1".into(),
    )?;
    bad(
        a.lr.is_finite() && a.lr > 0.0 && a.lr <= 1.0,
        format!("--lr must be in (0, 1], got {}", a.lr),
    )?;
    bad(
        (0.0..1.0).contains(&a.warmup),
        format!(
            "--warmup is a fraction of the steps in [0, 1), got {}",
            a.warmup
        ),
    )?;
    bad(
        (0.0..=1.0).contains(&a.min_lr_ratio),
        format!("--min-lr-ratio must be in [0, 1], got {}", a.min_lr_ratio),
    )?;
    bad(
        (0.0..=1.0).contains(&a.weight_decay),
        format!("--weight-decay must be in [0, 1], got {}", a.weight_decay),
    )?;
    bad(
        a.save_every > 0 || (a.save_limit.is_none() && !a.keep_checkpoints),
        "--save-limit and --keep-checkpoints need --save-every N".into(),
    )?;
    bad(
        a.clip.is_finite() && a.clip >= 0.0,
        format!("--clip must be a norm >= 0 (0: off), got {}", a.clip),
    )?;
    Ok(())
}

/// The checks that need no model: the loss, --top-k, and the LoRA, QLoRA and hidden-state
/// options against each other (their widths are checked once the models are open, by
/// [`lora_options`], [`base_options`] and [`hidden_options`], which count on this first).
pub fn check_flags(a: &Args) -> anyhow::Result<LossSpec> {
    let spec = loss_spec(a)?;
    if a.top_k == Some(0) {
        bail!("--top-k must be at least 1");
    }
    if a.lora_rank.is_none()
        && (a.lora_alpha.is_some() || a.lora_targets.is_some() || a.lora_save.is_some())
    {
        bail!("--lora-alpha, --lora-targets and --lora-save need --lora-rank R");
    }
    match a.base_scheme {
        None if a.block.is_some() || a.double_quant || a.lora_init.is_some() => bail!(
            "--block, --double-quant and --lora-init need --base-scheme nf4 (and --lora-rank R)"
        ),
        None if a.loftq_iter.is_some() => {
            bail!("--loftq-iter needs --base-scheme nf4 --lora-init loftq")
        }
        Some(s) if a.lora_rank.is_none() => bail!(
            "--base-scheme {} holds the frozen base under LoRA adapters; it needs --lora-rank R",
            base_type(s).name()
        ),
        _ => {}
    }
    lora_init(a)?;
    match a.hidden_weight {
        None if a.hidden_layers.is_some() || a.hidden_projection => {
            bail!("--hidden-layers and --hidden-projection need --hidden-weight W")
        }
        Some(w) if !(w.is_finite() && w > 0.0 && w <= 1e3) => {
            bail!("--hidden-weight must be in (0, 1000], got {w}")
        }
        Some(_) if a.teacher.is_none() => {
            bail!("--hidden-weight needs a live --teacher (a teacher cache holds no hidden states)")
        }
        _ => {}
    }
    Ok(spec)
}

/// The LoRA settings, if --lora-rank is given (after [`check_flags`]).
pub fn lora_options(a: &Args, cfg: &model::Config) -> anyhow::Result<Option<LoraOptions>> {
    let Some(rank) = a.lora_rank else {
        return Ok(None);
    };
    let narrowest = cfg
        .hidden_size
        .min(cfg.intermediate_size)
        .min(cfg.num_kv_heads() * cfg.head_dim());
    if rank == 0 || rank > narrowest {
        bail!("--lora-rank must be in 1..={narrowest} (the narrowest adapted width), got {rank}");
    }
    let alpha = a.lora_alpha.unwrap_or(2.0 * rank as f64);
    if !(alpha.is_finite() && alpha > 0.0 && alpha <= 1e4) {
        bail!("--lora-alpha must be in (0, 10000], got {alpha}");
    }
    let targets = a
        .lora_targets
        .clone()
        .unwrap_or(vec![LoraTarget::QProj, LoraTarget::VProj]);
    Ok(Some(LoraOptions {
        rank,
        alpha,
        targets,
    }))
}

/// The code book of a --base-scheme.
fn base_type(s: BaseScheme) -> BnbType {
    match s {
        BaseScheme::Nf4 => BnbType::Nf4,
    }
}

/// The 4-bit scheme of a QLoRA base (`None` without --base-scheme), checked against the
/// student's widths (after [`check_flags`]).
pub fn base_options(a: &Args, cfg: &model::Config) -> anyhow::Result<Option<BnbScheme>> {
    let Some(s) = a.base_scheme else {
        return Ok(None);
    };
    let scheme = BnbScheme::new(base_type(s), a.block, a.double_quant)?;
    quant::nf4::stage::check_model(&scheme, cfg)?;
    Ok(Some(scheme))
}

/// How QLoRA's adapters start (--lora-init, --loftq-iter; checked after [`base_options`]).
pub fn lora_init(a: &Args) -> anyhow::Result<LoraInit> {
    match (a.lora_init, a.loftq_iter) {
        (Some(LoraInitArg::Loftq), iters) => {
            let iters = iters.unwrap_or(1);
            if !(1..=16).contains(&iters) {
                bail!("--loftq-iter must be in 1..=16, got {iters}");
            }
            Ok(LoraInit::Loftq { iters })
        }
        (_, Some(_)) => bail!("--loftq-iter needs --lora-init loftq"),
        _ => Ok(LoraInit::Gaussian),
    }
}

/// The hidden-state loss the options describe (`None` without --hidden-weight), and whether
/// the student needs projections; checked against both models (after [`check_flags`]).
pub fn hidden_options(
    a: &Args,
    student: &model::Config,
    teacher: Option<&model::Config>,
) -> anyhow::Result<Option<(HiddenLoss, bool)>> {
    let (Some(weight), Some(teacher)) = (a.hidden_weight, teacher) else {
        return Ok(None);
    };
    let (ls, lt) = (student.num_hidden_layers, teacher.num_hidden_layers);
    let map: Vec<(usize, usize)> = match &a.hidden_layers {
        None => (0..ls).map(|i| (i, ((i + 1) * lt).div_ceil(ls) - 1)).collect(),
        Some(text) => text
            .split(',')
            .map(|pair| {
                let parsed = pair
                    .split_once(':')
                    .and_then(|(x, y)| Some((x.trim().parse().ok()?, y.trim().parse().ok()?)));
                match parsed {
                    Some((x, y)) if x < ls && y < lt => Ok((x, y)),
                    _ => Err(anyhow::anyhow!(
                        "--hidden-layers: `{pair}` is not STUDENT:TEACHER with blocks below {ls} and {lt}"
                    )),
                }
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let (hs, ht) = (student.hidden_size, teacher.hidden_size);
    if hs != ht && !a.hidden_projection {
        bail!(
            "--hidden-weight between widths {hs} (student) and {ht} (teacher) needs --hidden-projection"
        );
    }
    if hs == ht && a.hidden_projection {
        bail!("--hidden-projection does not apply: student and teacher are both {hs} wide");
    }
    Ok(Some((HiddenLoss { weight, map }, a.hidden_projection)))
}
