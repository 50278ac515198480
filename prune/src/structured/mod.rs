//! Structured pruning: whole KV groups of attention heads, MLP intermediate channels or
//! decoder layers are removed, and the result is a smaller dense model whose config says so
//! (fewer `num_key_value_heads` / `num_attention_heads`, a smaller `intermediate_size`, fewer
//! `num_hidden_layers`), loadable by HF transformers and convertible to GGUF.
//!
//! The work is split in four steps, one file each:
//! * [`amount`]: how many units go (`--ratio`, `--count` or `--target-params`), checked
//!   against the config before any heavy work, and the config of the pruned model;
//! * [`importance`]: a score per unit, from calibration activations on the layer-by-layer
//!   engine (heads and channels: the mean norm of what the unit adds to the residual
//!   stream, after Minitron; layers: ShortGPT's block influence) or from weight norms;
//! * [`select`]: the lowest-scoring units, the same count in every layer for heads and
//!   channels (HF and llama.cpp configs are global), the lowest layers for layers;
//! * [`apply`]: the teacher's tensors sliced (q/k/v rows, o_proj columns, gate/up rows,
//!   down_proj columns) and layers renumbered, streamed one tensor at a time.

pub mod amount;
pub mod apply;
pub mod importance;
pub mod select;

use serde::Serialize;

pub use amount::{pruned_config, resolve_removal, units_per_layer};
pub use apply::write_weights;
pub use importance::{activation_scores, magnitude_scores};
pub use select::{Plan, select};

/// What structured pruning removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Whole KV groups: one key/value head and every query head that shares it, so the
    /// grouping (`num_attention_heads / num_key_value_heads`) is unchanged.
    Heads,
    /// MLP intermediate channels (a gate_proj row, an up_proj row, a down_proj column).
    Channels,
    /// Whole decoder blocks.
    Layers,
}

impl Unit {
    /// The unit's name in messages (`KV group`, `channel`, `layer`), plural when `n != 1`.
    pub fn noun(self, n: usize) -> &'static str {
        match (self, n == 1) {
            (Self::Heads, true) => "KV group",
            (Self::Heads, false) => "KV groups",
            (Self::Channels, true) => "channel",
            (Self::Channels, false) => "channels",
            (Self::Layers, true) => "layer",
            (Self::Layers, false) => "layers",
        }
    }
}

/// How units are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportanceKind {
    /// From calibration activations.
    Activation,
    /// From weight norms only (heads and channels; no data-free score exists for layers).
    Magnitude,
}

/// How much to remove; exactly one is given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Amount {
    /// A fraction in (0, 1) of the units (of each layer's for heads and channels).
    Ratio(f64),
    /// A number of units: per layer for heads and channels, in total for layers.
    Count(usize),
    /// The smallest removal that brings the parameter count to at most this.
    TargetParams(u64),
}

/// A score per unit, indexed by layer: `scores[l][u]` for KV group or channel `u` of layer
/// `l`; for layers, `scores[l]` holds the single score of layer `l`. Higher means more
/// important; the lowest are removed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores(pub Vec<Vec<f64>>);
