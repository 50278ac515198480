//! How many units to remove, checked against the config before any heavy work, and the
//! config of the pruned model. Everything here depends on the config only, never on scores,
//! so every bad request fails in milliseconds.

use model::Config;

use super::{Amount, Unit};
use crate::PruneError;

/// Kept MLP widths are multiples of this when `--ratio` or `--target-params` choose them
/// (and the teacher's width is one too): GGUF's 32-wide block types (q4_0, q8_0, ...)
/// quantize `down_proj` along its input, the intermediate dimension, in blocks of 32; any
/// other width makes the exporter fall back to a wider type for every `down_proj`.
pub const CHANNEL_ALIGN: usize = 32;

/// Units per layer (KV groups, channels) or layers in the model.
pub fn units_per_layer(cfg: &Config, unit: Unit) -> usize {
    match unit {
        Unit::Heads => cfg.num_kv_heads(),
        Unit::Channels => cfg.intermediate_size,
        Unit::Layers => cfg.num_hidden_layers,
    }
}

/// The step in which `--ratio` and `--target-params` remove channels: [`CHANNEL_ALIGN`] when
/// the teacher's width is a multiple of it, else 1 (alignment would be lost anyway).
pub fn step(cfg: &Config, unit: Unit) -> usize {
    if unit == Unit::Channels && cfg.intermediate_size.is_multiple_of(CHANNEL_ALIGN) {
        CHANNEL_ALIGN
    } else {
        1
    }
}

/// The config of the model left after removing `removed` units (per layer for heads and
/// channels). `removed` must be below [`units_per_layer`].
pub fn pruned_config(cfg: &Config, unit: Unit, removed: usize) -> Config {
    let mut c = cfg.clone();
    match unit {
        Unit::Heads => {
            let hd = cfg.head_dim();
            let kv = cfg.num_kv_heads();
            let per_group = cfg.num_attention_heads / kv;
            c.num_key_value_heads = Some(kv - removed);
            c.num_attention_heads = (kv - removed) * per_group;
            // HF and our config derive head_dim as hidden / heads when it is absent; once
            // heads are gone that quotient is wrong, so the width is written out.
            if c.num_attention_heads * hd != c.hidden_size {
                c.head_dim = Some(hd);
            }
        }
        Unit::Channels => c.intermediate_size -= removed,
        Unit::Layers => c.num_hidden_layers -= removed,
    }
    c
}

/// The number of units to remove (per layer for heads and channels, in total for layers)
/// for `amount`, or a one-line error when the request is out of range or unreachable.
pub fn resolve_removal(cfg: &Config, unit: Unit, amount: Amount) -> Result<usize, PruneError> {
    let n = units_per_layer(cfg, unit);
    let what = match unit {
        Unit::Heads => format!("{n} KV groups per layer"),
        Unit::Channels => format!("{n} MLP channels per layer"),
        Unit::Layers => format!("{n} layers"),
    };
    let k = match amount {
        Amount::Ratio(r) => {
            if !(r > 0.0 && r < 1.0) {
                return Err(PruneError::Input(format!("--ratio {r} is outside (0, 1)")));
            }
            let s = step(cfg, unit);
            // The kept count is rounded to the nearest multiple of the step.
            let kept = ((1.0 - r) * n as f64 / s as f64).round() as usize * s;
            let k = n.saturating_sub(kept);
            if k == 0 {
                return Err(PruneError::Input(format!(
                    "--ratio {r} of {what} removes nothing once rounded; use a larger ratio or --count"
                )));
            }
            k
        }
        Amount::Count(k) => {
            if k == 0 {
                return Err(PruneError::Input("--count must be at least 1".into()));
            }
            k
        }
        Amount::TargetParams(p) => return by_target(cfg, unit, p),
    };
    if k >= n {
        return Err(PruneError::Input(format!(
            "removing {k} of {what} would leave none; remove fewer"
        )));
    }
    Ok(k)
}

/// The smallest removal (in steps of [`step`]) whose pruned config has at most `target`
/// parameters.
fn by_target(cfg: &Config, unit: Unit, target: u64) -> Result<usize, PruneError> {
    let n = units_per_layer(cfg, unit);
    let before = cfg.num_params();
    if before <= target {
        return Err(PruneError::Input(format!(
            "--target-params {target}: the model already has {before} parameters; nothing to remove"
        )));
    }
    let s = step(cfg, unit);
    let (mut smallest, mut most) = (before, 0);
    for k in (s..n).step_by(s) {
        let p = pruned_config(cfg, unit, k).num_params();
        if p <= target {
            return Ok(k);
        }
        (smallest, most) = (p, k);
    }
    Err(PruneError::Input(format!(
        "--target-params {target} is unreachable by removing {}: removing {most} of {n} still leaves {smallest} parameters",
        unit.noun(2)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let v = model::testkit::tiny_config();
        Config::from_json_str(&v.to_string(), std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn ratio_rounds_channels_to_the_alignment() {
        let c = cfg();
        // 256 channels: keeping 0.7 * 256 = 179.2 rounds to 192 kept, 64 removed.
        assert_eq!(
            resolve_removal(&c, Unit::Channels, Amount::Ratio(0.3)).unwrap(),
            64
        );
        assert_eq!(
            resolve_removal(&c, Unit::Layers, Amount::Ratio(0.34)).unwrap(),
            1
        );
        assert!(resolve_removal(&c, Unit::Heads, Amount::Ratio(0.1)).is_err());
        assert!(resolve_removal(&c, Unit::Heads, Amount::Ratio(1.0)).is_err());
    }

    #[test]
    fn counts_that_remove_everything_are_refused() {
        let c = cfg();
        assert!(resolve_removal(&c, Unit::Heads, Amount::Count(2)).is_err());
        assert!(resolve_removal(&c, Unit::Layers, Amount::Count(3)).is_err());
        assert!(resolve_removal(&c, Unit::Channels, Amount::Count(0)).is_err());
        assert_eq!(
            resolve_removal(&c, Unit::Channels, Amount::Count(7)).unwrap(),
            7
        );
    }

    #[test]
    fn head_pruning_writes_head_dim_when_it_no_longer_follows() {
        let c = cfg();
        let p = pruned_config(&c, Unit::Heads, 1);
        assert_eq!((p.num_attention_heads, p.num_kv_heads()), (2, 1));
        assert_eq!(p.head_dim, Some(16));
        assert_eq!(p.head_dim(), c.head_dim());
    }
}
