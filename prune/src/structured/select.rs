//! Which units go: the `removed` lowest-scoring ones. Heads and channels remove the same
//! count in every layer (the config has one `num_key_value_heads` and one
//! `intermediate_size`), each layer choosing its own by its own scores; layers remove the
//! lowest-scoring blocks of the whole model.

use model::Config;
use serde::Serialize;

use super::amount::{pruned_config, units_per_layer};
use super::{Scores, Unit};
use crate::PruneError;

/// What to keep, and the config of the model that results.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The unit removed.
    pub unit: Unit,
    /// Units removed: per layer for heads and channels, in total for layers.
    pub removed: usize,
    /// The pruned model's config.
    pub config: Config,
    /// The teacher's index of every layer kept, in order (new layer `j` is teacher layer
    /// `kept_layers[j]`).
    pub kept_layers: Vec<usize>,
    /// For heads and channels: per kept layer (new index), the teacher's indices of the KV
    /// groups or channels kept, ascending. Empty for layers.
    pub kept_units: Vec<Vec<usize>>,
    /// For heads and channels: per teacher layer, the indices removed, ascending. For
    /// layers: one list, the teacher layers removed.
    pub removed_units: Vec<Vec<usize>>,
}

/// Indices of the `k` lowest scores, ascending by index (ties go to the lower index).
fn lowest(scores: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut out = order[..k].to_vec();
    out.sort_unstable();
    out
}

/// The complement of `removed` in `0..n`.
fn complement(n: usize, removed: &[usize]) -> Vec<usize> {
    let mut keep = vec![true; n];
    for &r in removed {
        keep[r] = false;
    }
    (0..n).filter(|&i| keep[i]).collect()
}

/// Chooses the `removed` lowest-scoring units (per layer for heads and channels) and builds
/// the plan; checks that the scores match the config.
pub fn select(
    cfg: &Config,
    unit: Unit,
    removed: usize,
    scores: &Scores,
) -> Result<Plan, PruneError> {
    let layers = cfg.num_hidden_layers;
    let n = units_per_layer(cfg, unit);
    if removed == 0 || removed >= n {
        return Err(PruneError::Input(format!(
            "cannot remove {removed} of {n} {}",
            unit.noun(n)
        )));
    }
    let per_layer = if unit == Unit::Layers { 1 } else { n };
    if scores.0.len() != layers || scores.0.iter().any(|s| s.len() != per_layer) {
        return Err(PruneError::Input(format!(
            "importance scores do not match the model ({layers} layers of {per_layer})"
        )));
    }
    let config = pruned_config(cfg, unit, removed);
    if unit == Unit::Layers {
        let bi: Vec<f64> = scores.0.iter().map(|s| s[0]).collect();
        let gone = lowest(&bi, removed);
        return Ok(Plan {
            unit,
            removed,
            config,
            kept_layers: complement(layers, &gone),
            kept_units: Vec::new(),
            removed_units: vec![gone],
        });
    }
    let removed_units: Vec<Vec<usize>> = scores.0.iter().map(|s| lowest(s, removed)).collect();
    Ok(Plan {
        unit,
        removed,
        config,
        kept_layers: (0..layers).collect(),
        kept_units: removed_units.iter().map(|r| complement(n, r)).collect(),
        removed_units,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_breaks_ties_by_index_and_returns_sorted() {
        assert_eq!(lowest(&[3.0, 1.0, 1.0, 0.5], 2), vec![1, 3]);
        assert_eq!(lowest(&[2.0, 2.0, 2.0], 2), vec![0, 1]);
        assert_eq!(complement(4, &[1, 3]), vec![0, 2]);
    }
}
