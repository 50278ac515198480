//! Writes the pruned weights: every tensor the pruned config implies, in file order, each
//! read from the teacher (one at a time), sliced and stored. Heads: q rows of the kept query
//! heads, k/v rows of the kept KV groups (biases alike), o_proj columns of the kept query
//! heads. Channels: gate/up rows (and biases) and down_proj columns of the kept channels.
//! Layers: kept blocks renumbered 0..n. Embeddings, norms, biases of o_proj/down_proj and
//! the head are copied.

use std::collections::BTreeMap;
use std::path::Path;

use model::Checkpoint;
use model::checkpoint::{block_tensors, expected_tensors};
use model::safetensors_io::{StoreDtype, StreamingWriter};

use super::{Plan, Unit};
use crate::PruneError;

/// Which rows or columns of a teacher tensor survive.
enum Slice {
    /// Unchanged.
    All,
    /// These rows (of a matrix, or entries of a vector).
    Rows(Vec<usize>),
    /// These columns of a matrix.
    Cols(Vec<usize>),
}

/// Row indices `u*width..(u+1)*width` of every unit `u`, in order.
fn spans(units: &[usize], width: usize) -> Vec<usize> {
    units
        .iter()
        .flat_map(|&u| u * width..(u + 1) * width)
        .collect()
}

/// How tensor `suffix` (`self_attn.q_proj.weight`, ...) of a layer keeping `kept` units
/// is sliced.
fn slice_for(plan: &Plan, teacher: &model::Config, suffix: &str, kept: &[usize]) -> Slice {
    match plan.unit {
        Unit::Layers => Slice::All,
        Unit::Heads => {
            let hd = teacher.head_dim();
            let per_group = teacher.num_attention_heads / teacher.num_kv_heads();
            // Query heads g*per_group..(g+1)*per_group share KV head g (HF's repeat_kv).
            let q_rows = spans(kept, per_group * hd);
            let kv_rows = spans(kept, hd);
            match suffix {
                "self_attn.q_proj.weight" | "self_attn.q_proj.bias" => Slice::Rows(q_rows),
                "self_attn.k_proj.weight"
                | "self_attn.k_proj.bias"
                | "self_attn.v_proj.weight"
                | "self_attn.v_proj.bias" => Slice::Rows(kv_rows),
                "self_attn.o_proj.weight" => Slice::Cols(q_rows),
                _ => Slice::All,
            }
        }
        Unit::Channels => match suffix {
            "mlp.gate_proj.weight"
            | "mlp.gate_proj.bias"
            | "mlp.up_proj.weight"
            | "mlp.up_proj.bias" => Slice::Rows(kept.to_vec()),
            "mlp.down_proj.weight" => Slice::Cols(kept.to_vec()),
            _ => Slice::All,
        },
    }
}

/// Applies a slice to a row-major tensor of `shape`.
fn apply_slice(data: Vec<f32>, shape: &[usize], slice: &Slice) -> Vec<f32> {
    let cols = if shape.len() == 2 { shape[1] } else { 1 };
    match slice {
        Slice::All => data,
        Slice::Rows(rows) => rows
            .iter()
            .flat_map(|&r| &data[r * cols..(r + 1) * cols])
            .copied()
            .collect(),
        Slice::Cols(keep) => data
            .chunks_exact(cols)
            .flat_map(|row| keep.iter().map(move |&c| row[c]))
            .collect(),
    }
}

/// The teacher tensor behind pruned tensor `name` (teacher name, teacher shape, slice).
fn source(
    ckpt: &Checkpoint,
    plan: &Plan,
    name: &str,
    shape: &[usize],
) -> Result<(String, Vec<usize>, Slice), PruneError> {
    let teacher = ckpt.config();
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return Ok((name.to_string(), shape.to_vec(), Slice::All));
    };
    let (j, suffix) = rest
        .split_once('.')
        .and_then(|(j, s)| Some((j.parse::<usize>().ok()?, s)))
        .ok_or_else(|| PruneError::Input(format!("unexpected tensor name `{name}`")))?;
    let l = plan.kept_layers[j];
    let teacher_name = format!("model.layers.{l}.{suffix}");
    let teacher_shape = block_tensors(teacher, l)
        .into_iter()
        .find(|(n, _)| *n == teacher_name)
        .map(|(_, s)| s)
        .ok_or_else(|| PruneError::Input(format!("the teacher has no `{teacher_name}`")))?;
    let kept = plan.kept_units.get(j).map_or(&[][..], Vec::as_slice);
    let slice = slice_for(plan, teacher, suffix, kept);
    Ok((teacher_name, teacher_shape, slice))
}

/// Writes the pruned model's weights to the safetensors file `path` in `dtype`, one tensor
/// at a time, in the order [`expected_tensors`] gives for `plan.config`; `progress(i)` is
/// told after tensor `i`. Returns the number of tensors written.
pub fn write_weights(
    ckpt: &Checkpoint,
    plan: &Plan,
    path: &Path,
    dtype: StoreDtype,
    mut progress: impl FnMut(usize),
) -> Result<usize, PruneError> {
    let tensors = expected_tensors(&plan.config);
    let layout: Vec<(String, Vec<usize>, StoreDtype)> = tensors
        .iter()
        .map(|(n, s)| (n.clone(), s.clone(), dtype))
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut w = StreamingWriter::create(path, layout, &meta)?;
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let (src, src_shape, slice) = source(ckpt, plan, name, shape)?;
        let data = apply_slice(ckpt.read(&src, &src_shape)?, &src_shape, &slice);
        // The slice must produce exactly the shape the pruned config implies.
        if data.len() != shape.iter().product::<usize>() {
            return Err(PruneError::Input(format!(
                "`{name}`: sliced {} values from `{src}` {src_shape:?}, expected shape {shape:?}",
                data.len()
            )));
        }
        w.write_next(name, &data)?;
        progress(i + 1);
    }
    w.finish()?;
    Ok(tensors.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_rows_and_columns() {
        // [[0, 1, 2], [3, 4, 5]]
        let d: Vec<f32> = (0..6).map(|v| v as f32).collect();
        assert_eq!(
            apply_slice(d.clone(), &[2, 3], &Slice::Rows(vec![1])),
            vec![3.0, 4.0, 5.0]
        );
        assert_eq!(
            apply_slice(d, &[2, 3], &Slice::Cols(vec![0, 2])),
            vec![0.0, 2.0, 3.0, 5.0]
        );
        assert_eq!(spans(&[0, 2], 2), vec![0, 1, 4, 5]);
    }
}
