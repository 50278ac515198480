//! `gguf:auto`: per-tensor GGUF types chosen under a size budget (`compress quant --format
//! gguf:auto --target-bpw 5.4 | --target-bytes N`), where the presets fix one rule per
//! tensor kind. No peer allocates bits for GGUF this way.
//!
//! * **Sensitivity** ([`measure`]): the teacher runs block by block over the calibration
//!   windows (one block resident) and each decoder linear's input statistics E[x_j²] are
//!   captured, as for importance rounding. For every candidate type whose block divides the
//!   row ([`AUTO_TYPES`]), the linear is rounded with that importance and its cost is the
//!   predicted output error on the calibration inputs, Σ_r Σ_j E[x_j²] (w_rj − q_rj)² (the
//!   diagonal of tr(E Σ Eᵀ)): cheap (one quantization per candidate), and the same measure
//!   importance rounding minimises.
//! * **Allocation** ([`allocate`]): one candidate per linear, minimising the summed cost with
//!   the total bytes within the budget: every linear starts at its smallest type, then the
//!   upgrade with the largest cost decrease per extra byte that still fits is applied until
//!   none fits (the greedy path of the Lagrangian relaxation of this multiple-choice
//!   knapsack). The budget is never exceeded; a budget below the smallest choice is refused.
//! * The tensors outside the decoder linears (embeddings, output, norms) keep the `q4_k_m`
//!   preset's types (llama.cpp's choice for them) and their bytes count against the budget.

use model::engine::LayerEngine;
use model::gguf::GgmlType;
use model::transformer::Tap;
use model::{Checkpoint, Device};

use crate::QuantError;
use crate::block::{BlockWeights, CaptureSpec, LINEARS, capture};
use crate::blocks::{dequantize, floor_importance, quantize};
use crate::gguf_export::{TypePlan, TypeRule, hf_to_gguf_name};

/// The types `gguf:auto` chooses among for a decoder linear (those whose block divides its
/// rows), from 3.44 to 16 bits per weight (F16 fits any row).
pub const AUTO_TYPES: &[GgmlType] = &[
    GgmlType::Q3_K,
    GgmlType::IQ4_NL,
    GgmlType::Q4_0,
    GgmlType::Q4_K,
    GgmlType::Q5_0,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_0,
    GgmlType::F16,
];

/// One candidate type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The type.
    pub ty: GgmlType,
    /// The tensor's bytes in it.
    pub bytes: u64,
    /// Its predicted cost (lower is better).
    pub cost: f64,
}

/// A decoder linear and its candidates.
#[derive(Debug, Clone)]
pub struct LinearCosts {
    /// GGUF name (`blk.3.attn_q.weight`).
    pub name: String,
    /// Every candidate type, in [`AUTO_TYPES`]' order.
    pub candidates: Vec<Candidate>,
}

/// Why no allocation fits.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AllocError {
    /// Even the smallest type of every tensor exceeds the budget.
    #[error("a budget of {budget} bytes is below the smallest choice, {min} bytes")]
    TooSmall {
        /// The budget.
        budget: u64,
        /// The smallest total.
        min: u64,
    },
    /// A tensor has no candidate.
    #[error("tensor {0} has no candidate type")]
    NoCandidate(usize),
}

/// One candidate index per tensor, minimising the summed cost with the summed bytes at most
/// `budget` (see the module documentation); the total never exceeds the budget.
pub fn allocate(tensors: &[Vec<Candidate>], budget: u64) -> Result<Vec<usize>, AllocError> {
    let mut pick = Vec::with_capacity(tensors.len());
    for (i, c) in tensors.iter().enumerate() {
        let smallest = (0..c.len())
            .min_by(|&a, &b| {
                (c[a].bytes, c[a].cost)
                    .partial_cmp(&(c[b].bytes, c[b].cost))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .ok_or(AllocError::NoCandidate(i))?;
        pick.push(smallest);
    }
    let mut used: u64 = tensors.iter().zip(&pick).map(|(c, &k)| c[k].bytes).sum();
    if used > budget {
        return Err(AllocError::TooSmall { budget, min: used });
    }
    loop {
        // The fitting upgrade with the largest cost decrease per extra byte (a decrease at no
        // extra byte first).
        let mut best: Option<(f64, usize, usize)> = None;
        for (i, c) in tensors.iter().enumerate() {
            let cur = c[pick[i]];
            for (k, cand) in c.iter().enumerate() {
                let gain = cur.cost - cand.cost;
                if gain.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
                    || used - cur.bytes + cand.bytes > budget
                {
                    continue;
                }
                let extra = cand.bytes.saturating_sub(cur.bytes);
                let rate = if extra == 0 {
                    f64::INFINITY
                } else {
                    gain / extra as f64
                };
                if best.is_none_or(|(r, _, _)| rate > r) {
                    best = Some((rate, i, k));
                }
            }
        }
        let Some((_, i, k)) = best else {
            return Ok(pick);
        };
        used = used - tensors[i][pick[i]].bytes + tensors[i][k].bytes;
        pick[i] = k;
    }
}

/// Bytes of a `[rows, cols]` linear in its smallest [`AUTO_TYPES`] type (what the budget must
/// at least hold for it), known before any measurement.
pub fn smallest_bytes(rows: usize, cols: usize) -> u64 {
    AUTO_TYPES
        .iter()
        .filter_map(|t| t.block_layout())
        .filter(|(b, _)| cols % b == 0)
        .map(|(b, size)| (rows * cols / b * size) as u64)
        .min()
        .unwrap_or(u64::MAX)
}

/// Measures every decoder linear's candidates on `windows` (see the module documentation);
/// `progress(done, blocks)` after each block.
pub fn measure(
    ckpt: &Checkpoint,
    windows: &[Vec<u32>],
    device: Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LinearCosts>, QuantError> {
    if windows.is_empty() {
        return Err(QuantError::Input(
            "gguf:auto needs calibration data (--calib FILE)".into(),
        ));
    }
    let cfg = ckpt.config().clone();
    let max_len = windows.iter().map(Vec::len).max().unwrap_or(1);
    let engine = LayerEngine::new(ckpt, device.clone(), max_len);
    let mut states = engine.embed(windows)?;
    let taps = [Tap::QkvInput, Tap::OInput, Tap::GateUpInput, Tap::DownInput];
    let mut out = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let weights = BlockWeights::read(ckpt, l)?;
        let block = weights.build(&cfg, &device);
        let spec = CaptureSpec {
            xtx: false,
            sample_rows: 0,
        };
        let (st, outputs) = capture(&block, engine.rope(), &states, &taps, spec);
        drop(block);
        states = outputs;
        for (name, tap) in LINEARS {
            let hf = format!("model.layers.{l}.{name}.weight");
            let g = hf_to_gguf_name(&hf)
                .ok_or_else(|| QuantError::Input(format!("no GGUF name for `{hf}`")))?;
            let s = &st[&tap];
            if s.sq_mean.iter().any(|v| !v.is_finite()) {
                return Err(QuantError::Input(format!(
                    "calibration activations at {tap:?} of block {l} contain NaN or Inf"
                )));
            }
            let imp = floor_importance(&s.sq_mean.iter().map(|&v| v as f32).collect::<Vec<_>>());
            let t = weights.get(&format!("{name}.weight"));
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let mut candidates = Vec::new();
            for &ty in AUTO_TYPES {
                let Some((blk, size)) = ty.block_layout().filter(|(b, _)| cols % b == 0) else {
                    continue;
                };
                let bytes = quantize(ty, &t.data, cols, Some(&imp))
                    .map_err(|e| QuantError::Input(format!("{g}: {e}")))?;
                let q = dequantize(ty, &bytes, rows * cols);
                let cost: f64 = t
                    .data
                    .iter()
                    .zip(&q)
                    .enumerate()
                    .map(|(i, (&w, &v))| imp[i % cols] as f64 * ((w - v) as f64).powi(2))
                    .sum();
                candidates.push(Candidate {
                    ty,
                    bytes: (rows * cols / blk * size) as u64,
                    cost,
                });
            }
            out.push(LinearCosts {
                name: g,
                candidates,
            });
        }
        progress(l + 1, cfg.num_hidden_layers);
    }
    Ok(out)
}

/// The plan `gguf:auto` writes: `base` (the `q4_k_m` preset) for every tensor but the
/// decoder linears, each of which gets its chosen type by an exact-name rule.
pub fn auto_plan(base: TypePlan, linears: &[LinearCosts], pick: &[usize]) -> TypePlan {
    let mut plan = base;
    plan.name = "auto".into();
    let mut counts: Vec<(GgmlType, usize)> = Vec::new();
    for (l, &k) in linears.iter().zip(pick) {
        let ty = l.candidates[k].ty;
        plan.rules.insert(
            0,
            TypeRule {
                pattern: l.name.clone(),
                ty,
            },
        );
        match counts.iter_mut().find(|(t, _)| *t == ty) {
            Some((_, n)) => *n += 1,
            None => counts.push((ty, 1)),
        }
    }
    if let Some((ty, _)) = counts.iter().max_by_key(|(_, n)| *n) {
        plan.file_type = crate::gguf_export::file_type_of(*ty);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cands(v: &[(u64, f64)]) -> Vec<Candidate> {
        v.iter()
            .map(|&(bytes, cost)| Candidate {
                ty: GgmlType::Q4_0,
                bytes,
                cost,
            })
            .collect()
    }

    /// A small case by hand: the budget goes to the tensor whose upgrade buys the most.
    #[test]
    fn the_budget_goes_where_it_buys_the_most() {
        let t = vec![
            cands(&[(10, 100.0), (20, 10.0)]),
            cands(&[(10, 100.0), (20, 90.0)]),
        ];
        assert_eq!(allocate(&t, 30).unwrap(), vec![1, 0]);
        assert_eq!(allocate(&t, 40).unwrap(), vec![1, 1]);
        assert_eq!(allocate(&t, 20).unwrap(), vec![0, 0]);
        assert_eq!(
            allocate(&t, 19),
            Err(AllocError::TooSmall {
                budget: 19,
                min: 20
            })
        );
    }

    proptest! {
        /// The allocator never exceeds the budget, and with a budget that holds every
        /// tensor's costliest-in-bytes choice it reaches the lowest cost of each tensor.
        #[test]
        fn the_allocator_never_exceeds_the_budget(
            t in prop::collection::vec(
                prop::collection::vec((1u64..1000, 0.0f64..1000.0), 1..6), 1..30),
            frac in 0.0f64..1.2,
        ) {
            let tensors: Vec<Vec<Candidate>> = t.iter().map(|c| cands(c)).collect();
            let min: u64 = tensors.iter().map(|c| c.iter().map(|x| x.bytes).min().unwrap()).sum();
            let max: u64 = tensors.iter().map(|c| c.iter().map(|x| x.bytes).max().unwrap()).sum();
            let budget = min + ((max - min) as f64 * frac) as u64;
            let pick = allocate(&tensors, budget).unwrap();
            let used: u64 = tensors.iter().zip(&pick).map(|(c, &k)| c[k].bytes).sum();
            prop_assert!(used <= budget, "used {} > budget {}", used, budget);
            if budget >= max {
                for (c, &k) in tensors.iter().zip(&pick) {
                    let best = c.iter().map(|x| x.cost).fold(f64::INFINITY, f64::min);
                    prop_assert_eq!(c[k].cost, best);
                }
            }
            if min > 0 {
                prop_assert!(allocate(&tensors, min - 1).is_err());
            }
        }
    }
}
