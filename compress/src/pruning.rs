//! `compress prune MODEL --method magnitude|wanda|sparsegpt (--sparsity S | --pattern N:M)`:
//! unstructured or semi-structured pruning of every linear layer in the decoder blocks, on
//! the layer-by-layer engine; pruned weights become exact zeros. `compress prune MODEL
//! --structured heads|channels|layers (--ratio R | --count N | --target-params P)`: whole
//! heads, channels or layers removed, written as a smaller model.

use anyhow::{Context, bail};

pub use prune::method::Method;

/// Units removed by structured pruning.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Whole KV groups of attention heads (the same count in every layer).
    Heads,
    /// MLP intermediate channels (the same count in every layer).
    Channels,
    /// Whole decoder layers.
    Layers,
}

/// How structured pruning ranks units.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    /// From calibration activations (Minitron for heads and channels, ShortGPT's block
    /// influence for layers).
    Activation,
    /// Data-free: weight norms (no calibration text needed).
    Magnitude,
}

pub use crate::formats::Format;

/// Arguments of `prune`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF folder or a .gguf file (the teacher; never modified).
    pub model: crate::Path,
    /// Unstructured / N:M method.
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// Unstructured: fraction of each linear's weights set to zero, in [0, 1).
    #[arg(long, allow_negative_numbers = true)]
    pub sparsity: Option<f64>,
    /// Semi-structured N:M (e.g. 2:4): at most N of every M consecutive input weights kept.
    #[arg(long, value_name = "N:M")]
    pub pattern: Option<String>,
    /// Unstructured: outlier-weighted layer-wise sparsity (OWL, Yin et al., 2024): blocks
    /// with more activation outliers keep more weights, the overall sparsity unchanged.
    #[arg(long)]
    pub owl: bool,
    /// OWL: largest deviation of a block's sparsity from the target (lambda; 0.08 in the paper).
    #[arg(long, default_value_t = 0.08)]
    pub owl_lambda: f64,
    /// OWL: a weight is an outlier when its Wanda score exceeds M times its layer's mean (5 in the paper).
    #[arg(long, default_value_t = 5.0)]
    pub owl_m: f64,
    /// SparseGPT: dampening as a fraction of the mean Hessian diagonal (0.01).
    #[arg(long)]
    pub damp: Option<f64>,
    /// SparseGPT N:M: how each group's pruned weights are chosen. exact (default): the subset
    /// that adds the least reconstruction error, every subset tried (up to 4096 per group,
    /// above that as saliency); saliency: the paper's per-column score w² / [H⁻¹]_cc².
    #[arg(long, value_enum)]
    pub nm_select: Option<prune::method::NmSelect>,
    /// Calibrated methods: prune a block's linears in true-sequential order (q/k/v, then o_proj
    /// on the pruned q/k/v's outputs, ...) instead of taking every linear's statistics from the
    /// unpruned block in one pass (the default, as the Wanda and SparseGPT papers and llm-compressor).
    #[arg(long)]
    pub true_sequential: bool,
    /// Unstructured / N:M: after each linear's mask is chosen, refit its kept weights to the
    /// least-squares reconstruction of its outputs on the calibration inputs, with this many
    /// conjugate-gradient steps (0: keep the method's weights; needs --calib, also for magnitude).
    /// Default: 3 for sparsegpt (its sweep only approximates these weights), 0 otherwise.
    #[arg(long)]
    pub refit: Option<usize>,
    /// Structured pruning: the unit removed.
    #[arg(long, value_enum)]
    pub structured: Option<Unit>,
    /// Structured: fraction of units removed.
    #[arg(long, allow_negative_numbers = true)]
    pub ratio: Option<f64>,
    /// Structured: number of units removed (per layer for heads and channels).
    #[arg(long)]
    pub count: Option<usize>,
    /// Structured: remove units until the model has at most this many parameters (e.g. 100M, 1.5B).
    #[arg(long)]
    pub target_params: Option<String>,
    /// Structured: how units are ranked.
    #[arg(long, value_enum, default_value = "activation")]
    pub importance: Importance,
    /// Calibration text: plain text, or JSONL with a `text` field.
    #[arg(long)]
    pub calib: Option<crate::Path>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 128)]
    pub calib_samples: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 512)]
    pub calib_len: usize,
    /// Seed for drawing calibration sequences.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the calibration token ids drawn (JSON: a list of lists) to this file, so another
    /// tool can be run on exactly the same tokens.
    #[arg(long)]
    pub dump_calib: Option<crate::Path>,
    /// Calibration rows kept per linear for the error report.
    #[arg(long, default_value_t = 512)]
    pub sample_rows: usize,
    /// Storage type of the dense output's weights (bf16 halves the bytes; f32 keeps
    /// SparseGPT's reconstructed weights unrounded).
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: crate::hf_folder::Dtype,
    /// Output formats, comma-separated: `dense` (HF folder, safetensors of `--dtype` with exact
    /// zeros) and/or `sparse` (compressed-tensors `sparse-bitmask`: OUT/sparse beside a dense
    /// model, or OUT; unstructured and N:M only).
    #[arg(long, value_delimiter = ',', default_value = "dense")]
    pub format: Vec<Format>,
    /// Output folder.
    #[arg(long)]
    pub out: crate::Path,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Args {
    /// Whether the method calibrates: structured pruning by activation importance, Wanda and
    /// SparseGPT, and magnitude with a refit.
    pub(crate) fn calibrates(&self) -> bool {
        if self.structured.is_some() {
            return self.importance == Importance::Activation;
        }
        self.method.is_some_and(|m| m != Method::Magnitude) || self.refit.is_some_and(|r| r > 0)
    }
}

/// Parses a parameter budget: `100M`, `1.5B`, `250000`.
pub fn parse_params(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('B') | Some('G') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .with_context(|| {
            format!("--target-params `{s}`: expected a positive count such as 100M")
        })?;
    let p = v * mult;
    if p >= 1e15 {
        bail!("--target-params `{s}` is absurdly large");
    }
    Ok(p.round() as u64)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    crate::set_threads(a.threads);
    if let Some(unit) = a.structured {
        for (set, name) in [
            (a.method.is_some(), "--method"),
            (a.sparsity.is_some(), "--sparsity"),
            (a.pattern.is_some(), "--pattern"),
            (a.owl, "--owl"),
            (a.damp.is_some(), "--damp"),
            (a.true_sequential, "--true-sequential"),
            (a.refit.is_some(), "--refit"),
            (a.format.contains(&Format::Sparse), "--format sparse"),
        ] {
            if set {
                bail!("{name} does not apply to --structured (it removes whole units)");
            }
        }
        crate::formats::check(&a.format, |f| *f == Format::Dense, "--structured", "dense")?;
        return crate::prune_structured::run(&a, unit);
    }
    crate::prune_unstructured::run(a)
}
