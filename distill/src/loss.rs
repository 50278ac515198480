//! Distillation losses on logits: forward KL, reverse KL and generalized JSD between
//! temperature-scaled teacher and student distributions, and cross-entropy on the data,
//! mixed by weights. Every loss is summed over rows here; the training loop scales by the
//! tokens of an optimizer step so accumulated micro-batches average correctly.

use burn::tensor::{Int, Tensor};
use model::fused::log_softmax;
use serde::{Deserialize, Serialize};

/// The divergence between teacher and student distributions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Divergence {
    /// KL(teacher ‖ student): mode-covering, Hinton's KD.
    Fkl,
    /// KL(student ‖ teacher): mode-seeking (MiniLLM).
    Rkl,
    /// Generalized Jensen-Shannon (GKD): with m = β·p_T + (1−β)·p_S,
    /// β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m); β in (0, 1), 0.5 is the symmetric JSD.
    Jsd {
        /// The teacher's share of the mixture.
        beta: f64,
    },
}

/// What a training step minimizes, per token:
/// `kd_weight · T² · D(teacher/T, student/T) + ce_weight · CE(student, data)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossSpec {
    /// The KD term; `None` trains on the data alone (plain CE fine-tuning).
    pub divergence: Option<Divergence>,
    /// Softmax temperature of the KD term (T² keeps its gradient scale, as in Hinton et al.).
    pub temperature: f64,
    /// Weight of the KD term.
    pub kd_weight: f64,
    /// Weight of cross-entropy on the next token of the data.
    pub ce_weight: f64,
}

/// A loss to backpropagate and its parts, as per-token means for the log.
pub struct LossParts {
    /// `scale ·` the weighted sum over rows: the value to call `backward` on.
    pub total: Tensor<1>,
    /// Mean divergence per counted row (without T² and weight), if any.
    pub kd: Option<f64>,
    /// Mean cross-entropy per counted row.
    pub ce: f64,
    /// Rows counted (weight > 0).
    pub rows: f64,
}

impl LossSpec {
    /// The loss of student logits `[n, vocab]` against the teacher (ignored without a
    /// divergence) and the next tokens `targets` `[n]`; `weights` `[n]` (0 or 1) leaves rows
    /// out (a prompt's tokens), and the sum is multiplied by `scale`.
    pub fn compute(
        &self,
        student: Tensor<2>,
        teacher: Option<Teacher>,
        targets: Tensor<1, Int>,
        weights: Option<Tensor<1>>,
        scale: f64,
    ) -> LossParts {
        let n = student.dims()[0];
        let device = student.device();
        let w = weights.unwrap_or_else(|| Tensor::ones([n], &device));
        let rows = w.clone().sum().into_scalar::<f64>();
        let logp = log_softmax(student.clone());
        let ce_rows = logp
            .clone()
            .gather(1, targets.unsqueeze_dim(1))
            .reshape([n])
            .neg()
            * w.clone();
        let ce_sum = ce_rows.sum();
        let ce = ce_sum.clone().into_scalar::<f64>() / rows.max(1.0);
        let mut total = ce_sum.mul_scalar(self.ce_weight);
        let mut kd = None;
        if let (Some(div), Some(teacher)) = (self.divergence, teacher) {
            let t = self.temperature;
            // At T = 1 the CE term's log-probabilities are the KD term's: computed once.
            let s_log = if t == 1.0 {
                logp
            } else {
                log_softmax(student.div_scalar(t))
            };
            let (s_log, t_log) = match teacher {
                Teacher::Logits(z) => (s_log, log_softmax(z.div_scalar(t)).detach()),
                Teacher::TopK { ids, logp } => bucketed(s_log, ids, logp.detach()),
            };
            let d_rows = divergence_rows(div, s_log, t_log) * w;
            let d_sum = d_rows.sum();
            kd = Some(d_sum.clone().into_scalar::<f64>() / rows.max(1.0));
            total = total + d_sum.mul_scalar(self.kd_weight * t * t);
        }
        LossParts {
            total: total.mul_scalar(scale),
            kd,
            ce,
            rows,
        }
    }
}

/// What a teacher gives a micro-batch: its targets, and the outputs of the blocks a
/// hidden-state loss maps (`[rows, width]` each; empty without one).
pub struct TeacherOut {
    /// The distribution targets.
    pub target: Teacher,
    /// Mapped block outputs, in map order.
    pub hidden: Vec<Tensor<2>>,
}

impl From<Teacher> for TeacherOut {
    fn from(target: Teacher) -> Self {
        Self {
            target,
            hidden: Vec::new(),
        }
    }
}

/// What the student is distilled towards, row by row.
// Both variants hold tensor handles; the size difference is a few words, not data.
#[allow(clippy::large_enum_variant)]
pub enum Teacher {
    /// Full logits `[n, vocab]` (a live teacher).
    Logits(Tensor<2>),
    /// The teacher's `k` most probable tokens per row, `ids` `[n, k]`, with their
    /// log-probabilities at the loss temperature, `logp` `[n, k]`; the other tokens are one
    /// bucket (so the divergence is that of the coarsened distributions, a lower bound).
    TopK {
        /// Token ids.
        ids: Tensor<2, Int>,
        /// Log-probabilities at the temperature.
        logp: Tensor<2>,
    },
}

impl Teacher {
    /// The same targets as constants of an autodiff graph.
    pub fn autodiff(self) -> Self {
        match self {
            Self::Logits(z) => Self::Logits(z.autodiff()),
            Self::TopK { ids, logp } => Self::TopK {
                ids: ids.autodiff(),
                logp: logp.autodiff(),
            },
        }
    }

    /// Reduces live logits `[n, vocab]` to their top `k` at temperature `t`: the same
    /// coarsening a teacher cache stores, so a live run can use exactly a cached run's loss.
    pub fn top_k_of(logits: Tensor<2>, k: usize, t: f64) -> Self {
        let (logp, ids) = log_softmax(logits.div_scalar(t)).topk_with_indices(k, 1);
        Self::TopK { ids, logp }
    }
}

/// Student and teacher log-probabilities over the teacher's top-k tokens plus one bucket for
/// the rest, `[n, k + 1]` each (no bucket when k covers the vocabulary).
fn bucketed(s_log: Tensor<2>, ids: Tensor<2, Int>, t_top: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
    let vocab = s_log.dims()[1];
    let s_top = s_log.gather(1, ids.clone());
    if ids.dims()[1] >= vocab {
        return (s_top, t_top);
    }
    // Mass below f32 resolution is not a bucket: clamped so 0 · log 0 stays 0.
    let rest = |top: &Tensor<2>| {
        top.clone()
            .exp()
            .sum_dim(1)
            .neg()
            .add_scalar(1.0)
            .clamp_min(1e-30)
            .log()
    };
    let (s_rest, t_rest) = (rest(&s_top), rest(&t_top));
    (
        Tensor::cat(vec![s_top, s_rest], 1),
        Tensor::cat(vec![t_top, t_rest], 1),
    )
}

/// The divergence of each row `[n]` from log-probabilities of student and teacher.
fn divergence_rows(div: Divergence, s_log: Tensor<2>, t_log: Tensor<2>) -> Tensor<1> {
    let n = s_log.dims()[0];
    let kl = |p_log: Tensor<2>, q_log: Tensor<2>| {
        (p_log.clone().exp() * (p_log - q_log))
            .sum_dim(1)
            .reshape([n])
    };
    match div {
        Divergence::Fkl => kl(t_log, s_log),
        Divergence::Rkl => kl(s_log, t_log),
        Divergence::Jsd { beta } => {
            // log m = logsumexp(log β + log p_T, log(1−β) + log p_S), computed stably.
            let a = t_log.clone().add_scalar(beta.ln());
            let b = s_log.clone().add_scalar((1.0 - beta).ln());
            let hi = a.clone().max_pair(b.clone());
            let m_log = hi.clone() + ((a - hi.clone()).exp() + (b - hi).exp()).log();
            kl(t_log, m_log.clone()).mul_scalar(beta) + kl(s_log, m_log).mul_scalar(1.0 - beta)
        }
    }
}

/// The loss a user picks (`--loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Forward KL from the teacher (white-box KD).
    Fkl,
    /// Reverse KL.
    Rkl,
    /// Generalized Jensen-Shannon divergence (`--jsd-beta`).
    Jsd,
    /// Cross-entropy on the data only: plain fine-tuning, no teacher.
    Ce,
}
