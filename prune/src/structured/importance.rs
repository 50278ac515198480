//! Unit scores. Higher means more important; [`super::select`] removes the lowest.
//!
//! Activation scores run the teacher block by block over calibration windows on the
//! layer-by-layer engine (one block resident, every block seeing the teacher's own
//! activations, as Minitron scores everything in one teacher pass):
//! * heads: for every query head, the L2 norm over the hidden dimension of what the head
//!   adds to the residual stream (its slice of the attention context, the `OInput` tap,
//!   times its `o_proj` columns), averaged over tokens; a KV group's score is the sum over
//!   its query heads. Minitron (Muralidharan et al., 2024) takes the norm of the context
//!   slice itself; going through `o_proj` also sees heads whose output projection is small
//!   and costs one extra product of the size of `o_proj`.
//! * channels: mean over tokens of |silu(gate)·up| (the `DownInput` tap, Minitron's neuron
//!   activation) times the L2 norm of the channel's `down_proj` column, i.e. the mean norm
//!   of the channel's rank-one contribution to the residual stream (the activation-times-
//!   weight product that Wanda showed ranks better than either factor alone).
//! * layers: ShortGPT's block influence (Men et al., 2024), BI = 1 - mean over tokens of
//!   cos(block input, block output): a block that barely turns the residual stream matters
//!   little.
//!
//! Magnitude scores read weights only:
//! * heads: ‖W_v rows of the group‖_F · ‖W_o columns of the group's query heads‖_F (the
//!   two matrices that scale a head's output; q and k only shape the softmax pattern);
//! * channels: ‖gate row‖₂ · ‖up row‖₂ · ‖down column‖₂;
//! * layers: refused; weight norms say nothing about how much a block turns the residual
//!   stream, whose scale they do not see.

use model::Tensor;
use model::engine::LayerEngine;
use model::transformer::{DecoderLayer, Rope, Tap};
use model::{Checkpoint, Device};

use super::{Scores, Unit};
use crate::PruneError;

/// Scores from calibration windows (token ids), running the teacher one block at a time;
/// `progress(l)` is told after each block.
pub fn activation_scores(
    ckpt: &Checkpoint,
    unit: Unit,
    windows: &[Vec<u32>],
    device: Device,
    mut progress: impl FnMut(usize),
) -> Result<Scores, PruneError> {
    let max_len = windows.iter().map(Vec::len).max().unwrap_or(0);
    if max_len < 2 {
        return Err(PruneError::Input(
            "activation importance needs calibration windows of at least 2 tokens".into(),
        ));
    }
    let engine = LayerEngine::new(ckpt, device, max_len);
    let mut states = engine.embed(windows)?;
    let layers = ckpt.config().num_hidden_layers;
    let mut scores = Vec::with_capacity(layers);
    for l in 0..layers {
        let block = engine.load_block(l)?;
        let s = match unit {
            Unit::Heads => head_scores(&block, engine.rope(), &mut states),
            Unit::Channels => channel_scores(&block, engine.rope(), &mut states),
            Unit::Layers => vec![block_influence(&block, engine.rope(), &mut states)],
        };
        check_finite(&s, l)?;
        scores.push(s);
        progress(l + 1);
    }
    Ok(Scores(scores))
}

fn check_finite(s: &[f64], layer: usize) -> Result<(), PruneError> {
    if s.iter().any(|v| !v.is_finite()) {
        return Err(PruneError::Numerical(format!(
            "layer {layer}: non-finite importance scores (non-finite activations?)"
        )));
    }
    Ok(())
}

fn add<const D: usize>(acc: Option<Tensor<D>>, t: Tensor<D>) -> Option<Tensor<D>> {
    Some(match acc {
        Some(a) => a + t,
        None => t,
    })
}

fn to_f64(t: Tensor<1>) -> Vec<f64> {
    t.into_data()
        .try_into_vec::<f32>()
        .expect("f32 tensor")
        .into_iter()
        .map(f64::from)
        .collect()
}

/// KV-group scores of one block; runs the block over `states` in place.
fn head_scores(block: &DecoderLayer, rope: &Rope, states: &mut [Tensor<3>]) -> Vec<f64> {
    let a = &block.self_attn;
    let (nh, nkv, hd) = (a.n_heads, a.n_kv_heads, a.head_dim);
    // burn stores o_proj as [in, out] = [heads * head_dim, hidden]: head h owns rows
    // h*hd..(h+1)*hd, so the weight splits into one [hd, hidden] matrix per head.
    let wo = a.o_proj.weight.val();
    let hidden = wo.dims()[1];
    let wo = wo.reshape([nh, hd, hidden]);
    let mut sum: Option<Tensor<1>> = None;
    let mut tokens = 0usize;
    for x in states.iter_mut() {
        let out = block.forward_tapped(x.clone(), rope, &mut |tap, ctx| {
            if tap != Tap::OInput {
                return;
            }
            let s = ctx.dims()[1];
            // [nh, s, hd] x [nh, hd, hidden]: every head's contribution to the residual.
            let per_head = ctx.clone().reshape([s, nh, hd]).swap_dims(0, 1);
            let contrib = per_head.matmul(wo.clone());
            let norms = contrib.square().sum_dim(2).sqrt().sum_dim(1).reshape([nh]);
            sum = add(sum.take(), norms);
            tokens += s;
        });
        *x = out;
    }
    let per_head: Vec<f64> = sum
        .map(to_f64)
        .unwrap_or_else(|| vec![0.0; nh])
        .into_iter()
        .map(|v| v / tokens.max(1) as f64)
        .collect();
    let per_group = nh / nkv;
    per_head.chunks(per_group).map(|g| g.iter().sum()).collect()
}

/// Channel scores of one block; runs the block over `states` in place.
fn channel_scores(block: &DecoderLayer, rope: &Rope, states: &mut [Tensor<3>]) -> Vec<f64> {
    let mut sum: Option<Tensor<1>> = None;
    let mut tokens = 0usize;
    for x in states.iter_mut() {
        let out = block.forward_tapped(x.clone(), rope, &mut |tap, h| {
            if tap != Tap::DownInput {
                return;
            }
            let [_, s, width] = h.dims();
            sum = add(sum.take(), h.clone().abs().sum_dim(1).reshape([width]));
            tokens += s;
        });
        *x = out;
    }
    // burn stores down_proj as [intermediate, hidden]: row i is HF's column i.
    let down = block.mlp.down_proj.weight.val();
    let width = down.dims()[0];
    let col_norms = to_f64(down.square().sum_dim(1).sqrt().reshape([width]));
    let abs_sum = sum.map(to_f64).unwrap_or_else(|| vec![0.0; width]);
    abs_sum
        .iter()
        .zip(&col_norms)
        .map(|(a, n)| a / tokens.max(1) as f64 * n)
        .collect()
}

/// ShortGPT's block influence of one block; runs the block over `states` in place.
fn block_influence(block: &DecoderLayer, rope: &Rope, states: &mut [Tensor<3>]) -> f64 {
    let (mut cos_sum, mut tokens) = (0.0f64, 0usize);
    for x in states.iter_mut() {
        let out = block.forward(x.clone(), rope);
        let [_, s, h] = x.dims();
        let a = x.clone().into_data().try_into_vec::<f32>().expect("f32");
        let b = out.clone().into_data().try_into_vec::<f32>().expect("f32");
        for (u, v) in a.chunks_exact(h).zip(b.chunks_exact(h)) {
            cos_sum += cosine(u, v);
        }
        tokens += s;
        *x = out;
    }
    1.0 - cos_sum / tokens.max(1) as f64
}

/// cos(u, v) in f64; 1 for two zero vectors (nothing changed), 0 when only one is zero.
fn cosine(u: &[f32], v: &[f32]) -> f64 {
    let (mut uv, mut uu, mut vv) = (0.0f64, 0.0f64, 0.0f64);
    for (&a, &b) in u.iter().zip(v) {
        let (a, b) = (a as f64, b as f64);
        uv += a * b;
        uu += a * a;
        vv += b * b;
    }
    if uu == 0.0 && vv == 0.0 {
        1.0
    } else if uu == 0.0 || vv == 0.0 {
        0.0
    } else {
        uv / (uu.sqrt() * vv.sqrt())
    }
}

/// Data-free scores from weight norms (heads and channels); `progress(l)` is told after each
/// block. Layers have no such score and get a one-line error.
pub fn magnitude_scores(
    ckpt: &Checkpoint,
    unit: Unit,
    mut progress: impl FnMut(usize),
) -> Result<Scores, PruneError> {
    if unit == Unit::Layers {
        return Err(PruneError::Input(MAGNITUDE_LAYERS.into()));
    }
    let c = ckpt.config();
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let (nh, nkv) = (c.num_attention_heads, c.num_kv_heads());
    let mut scores = Vec::with_capacity(c.num_hidden_layers);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let s: Vec<f64> = match unit {
            Unit::Heads => {
                let v = ckpt.read(&format!("{p}.self_attn.v_proj.weight"), &[nkv * hd, h])?;
                let o = ckpt.read(&format!("{p}.self_attn.o_proj.weight"), &[h, nh * hd])?;
                let v_rows = row_sq_norms(&v, h);
                let o_cols = col_sq_norms(&o, nh * hd);
                let group_w = nh / nkv * hd;
                (0..nkv)
                    .map(|g| {
                        let vn: f64 = v_rows[g * hd..(g + 1) * hd].iter().sum();
                        let on: f64 = o_cols[g * group_w..(g + 1) * group_w].iter().sum();
                        (vn * on).sqrt()
                    })
                    .collect()
            }
            _ => {
                let gate = ckpt.read(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?;
                let up = ckpt.read(&format!("{p}.mlp.up_proj.weight"), &[i, h])?;
                let down = ckpt.read(&format!("{p}.mlp.down_proj.weight"), &[h, i])?;
                let (g, u, d) = (
                    row_sq_norms(&gate, h),
                    row_sq_norms(&up, h),
                    col_sq_norms(&down, i),
                );
                (0..i).map(|j| (g[j] * u[j] * d[j]).sqrt()).collect()
            }
        };
        check_finite(&s, l)?;
        scores.push(s);
        progress(l + 1);
    }
    Ok(Scores(scores))
}

/// The error for `--importance magnitude` with `--structured layers`.
pub const MAGNITUDE_LAYERS: &str = "--importance magnitude has no data-free score for whole layers; use --importance activation with --calib FILE (ShortGPT block influence)";

/// Squared L2 norm of every row of a row-major matrix with `cols` columns.
fn row_sq_norms(w: &[f32], cols: usize) -> Vec<f64> {
    w.chunks_exact(cols)
        .map(|r| r.iter().map(|&x| (x as f64) * (x as f64)).sum())
        .collect()
}

/// Squared L2 norm of every column of a row-major matrix with `cols` columns.
fn col_sq_norms(w: &[f32], cols: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; cols];
    for r in w.chunks_exact(cols) {
        for (o, &x) in out.iter_mut().zip(r) {
            *o += (x as f64) * (x as f64);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_of_parallel_and_orthogonal_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[0.0, 0.0]), 1.0);
    }

    #[test]
    fn column_norms_follow_row_major_layout() {
        // [[1, 2], [3, 4]]
        let w = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(row_sq_norms(&w, 2), vec![5.0, 25.0]);
        assert_eq!(col_sq_norms(&w, 2), vec![10.0, 20.0]);
    }
}
