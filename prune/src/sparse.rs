//! The compressed-tensors `sparse-bitmask` format for pruned models: each decoder linear
//! weight is stored as its non-zero values plus a bitmask of where they sit, so a 50%-sparse
//! bf16 model takes about 56% of the dense bytes (a bit per weight plus the kept half).
//!
//! Layout, for the weight `P.weight` of every decoder linear (`model.layers.N.self_attn.
//! {q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`) of `rows` x `cols`:
//!
//! * `P.compressed`: the non-zero weights in row-major order, 1-D, in the dense tensor's
//!   dtype, copied bit for bit (a weight is zero when it compares equal to 0, so -0.0 is
//!   dropped and comes back as +0.0);
//! * `P.bitmask`: U8 `[rows, ceil(cols / 8)]`, bit `c % 8` (least significant first) of byte
//!   `c / 8` of row `r` set when weight `(r, c)` is kept, the tail of a row's last byte zero
//!   (numpy's `packbits(..., axis=-1, bitorder="little")`);
//! * `P.row_offsets`: I64 `[rows]`, the index in `P.compressed` of each row's first value;
//! * `P.shape`: I64 `[2]`, `[rows, cols]`.
//!
//! Every other tensor (embeddings, norms, biases, `lm_head`) is copied as stored. `config.json`
//! gets a `quantization_config` holding only a `sparsity_config`, which compressed-tensors'
//! `ModelCompressor` reads (the linears are targeted as `Linear`, `lm_head` ignored).
//!
//! Two passes over the memory-mapped dense model, one tensor at a time: the first counts each
//! linear's non-zeros so the header (which holds every size) can be written first, the second
//! writes the tensors.

use std::collections::BTreeMap;
use std::path::Path;

use model::safetensors_io::{Dtype, PlanDtype, SafetensorsSet, StoreDtype, StreamingWriter};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};

use crate::{Pattern, PruneError};

/// The decoder linears whose weights are compressed, as `model.layers.N.<suffix>`.
pub const SPARSE_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Files beside the weights that are copied when the dense folder has them.
const AUX_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
];

/// What [`write_sparse_bitmask`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct SparseReport {
    /// `sparsity_structure` of the config: `unstructured` or `N:M`.
    pub structure: String,
    /// Bytes of the dense safetensors file(s).
    pub dense_bytes: u64,
    /// Bytes of the sparse `model.safetensors`.
    pub sparse_bytes: u64,
    /// Linear weights stored compressed.
    pub compressed_linears: usize,
    /// Weights of those linears.
    pub linear_params: u64,
    /// Non-zero weights among them (the length of all `.compressed` tensors together).
    pub linear_nonzeros: u64,
    /// Fraction of zeros among the compressed linears' weights.
    pub linear_sparsity: f64,
    /// Parameters of the whole model.
    pub model_params: u64,
    /// Non-zero parameters of the whole model.
    pub model_nonzeros: u64,
    /// Fraction of zeros over the whole model: the config's `global_sparsity`.
    pub global_sparsity: f64,
    /// Negative zeros among the compressed weights, which the format restores as +0.0.
    pub negative_zeros: u64,
}

/// A compressed linear of the plan.
struct Linear {
    /// The weight's name, `P.weight`.
    weight: String,
    /// `P`.
    module: String,
    dtype: StoreDtype,
    rows: usize,
    cols: usize,
    nonzeros: u64,
}

/// `model.layers.N.<linear>` for the 2-D weight of a compressed linear.
fn sparse_module(name: &str, shape: &[usize]) -> Option<String> {
    let module = name.strip_suffix(".weight")?;
    let (layer, suffix) = module.strip_prefix("model.layers.")?.split_once('.')?;
    (shape.len() == 2 && layer.parse::<usize>().is_ok() && SPARSE_LINEARS.contains(&suffix))
        .then(|| module.to_string())
}

/// The float dtypes a compressed weight may have.
fn float_dtype(dt: Dtype) -> Option<StoreDtype> {
    match dt {
        Dtype::F32 => Some(StoreDtype::F32),
        Dtype::F16 => Some(StoreDtype::F16),
        Dtype::BF16 => Some(StoreDtype::BF16),
        _ => None,
    }
}

/// The plan dtype that stores a copied tensor as it is.
fn copy_dtype(dt: Dtype) -> Option<PlanDtype> {
    match dt {
        Dtype::U8 => Some(PlanDtype::U8),
        Dtype::I32 => Some(PlanDtype::I32),
        Dtype::I64 => Some(PlanDtype::I64),
        other => float_dtype(other).map(PlanDtype::Float),
    }
}

/// Bytes per element of a float dtype.
fn elem_size(dt: StoreDtype) -> usize {
    match dt {
        StoreDtype::F32 => 4,
        StoreDtype::F16 | StoreDtype::BF16 => 2,
    }
}

/// Per element: is it non-zero (-0.0 counts as zero, NaN as non-zero), is it -0.0.
fn classify(dt: StoreDtype, e: &[u8]) -> (bool, bool) {
    let (bits, sign) = match dt {
        StoreDtype::F32 => (u32::from_le_bytes([e[0], e[1], e[2], e[3]]), 1u32 << 31),
        StoreDtype::F16 | StoreDtype::BF16 => (u16::from_le_bytes([e[0], e[1]]) as u32, 1 << 15),
    };
    (bits & !sign != 0, bits == sign)
}

/// Non-zeros and negative zeros of a float tensor's bytes (any dtype, for the whole-model count).
fn count_nonzeros(dt: StoreDtype, bytes: &[u8]) -> (u64, u64) {
    bytes
        .par_chunks_exact(elem_size(dt))
        .map(|e| {
            let (nz, neg) = classify(dt, e);
            (nz as u64, neg as u64)
        })
        .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// Checks that among every `m` consecutive weights of a row (the last group may be shorter)
/// at most `n` are non-zero.
fn check_nm(lin: &Linear, bytes: &[u8], n: usize, m: usize) -> Result<(), PruneError> {
    let es = elem_size(lin.dtype);
    let bad = bytes
        .par_chunks_exact(lin.cols * es)
        .enumerate()
        .find_map_any(|(r, row)| {
            row.chunks(m * es).enumerate().find_map(|(g, group)| {
                let kept = group
                    .chunks_exact(es)
                    .filter(|e| classify(lin.dtype, e).0)
                    .count();
                (kept > n).then_some((r, g * m, kept))
            })
        });
    match bad {
        Some((r, c, kept)) => Err(PruneError::Input(format!(
            "`{}` is not {n}:{m} sparse: row {r}, columns {c}..{} keep {kept} weights",
            lin.weight,
            (c + m).min(lin.cols)
        ))),
        None => Ok(()),
    }
}

/// One compressed linear: its packed bitmask, row offsets and non-zero values (raw bytes).
struct Compressed {
    bitmask: Vec<u8>,
    row_offsets: Vec<i64>,
    values: Vec<u8>,
}

/// Compresses a `rows` x `cols` weight from its stored bytes.
fn compress(lin: &Linear, bytes: &[u8]) -> Compressed {
    let es = elem_size(lin.dtype);
    let row_bytes = lin.cols.div_ceil(8);
    let mut bitmask = vec![0u8; lin.rows * row_bytes];
    // Bitmask and per-row counts, rows in parallel.
    let counts: Vec<usize> = bitmask
        .par_chunks_mut(row_bytes)
        .zip(bytes.par_chunks_exact(lin.cols * es))
        .map(|(mask, row)| {
            let mut kept = 0;
            for (c, e) in row.chunks_exact(es).enumerate() {
                if classify(lin.dtype, e).0 {
                    mask[c / 8] |= 1 << (c % 8);
                    kept += 1;
                }
            }
            kept
        })
        .collect();
    let mut row_offsets = Vec::with_capacity(lin.rows);
    let mut total = 0usize;
    for k in &counts {
        row_offsets.push(total as i64);
        total += k;
    }
    // Values: each row fills its own slice of the output, starting at its offset.
    let mut values = vec![0u8; total * es];
    let mut slots = Vec::with_capacity(lin.rows);
    let mut rest = values.as_mut_slice();
    for k in &counts {
        let (head, tail) = rest.split_at_mut(k * es);
        slots.push(head);
        rest = tail;
    }
    slots
        .into_par_iter()
        .zip(bytes.par_chunks_exact(lin.cols * es))
        .for_each(|(out, row)| {
            let kept = row.chunks_exact(es).filter(|e| classify(lin.dtype, e).0);
            for (o, e) in out.chunks_exact_mut(es).zip(kept) {
                o.copy_from_slice(e);
            }
        });
    Compressed {
        bitmask,
        row_offsets,
        values,
    }
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Parses `unstructured` or `N:M` into the config's string and the group to check, if any.
fn parse_structure(structure: &str) -> Result<(String, Option<(usize, usize)>), PruneError> {
    let s = structure.trim();
    if s.eq_ignore_ascii_case("unstructured") {
        return Ok(("unstructured".into(), None));
    }
    match Pattern::parse_nm(s) {
        Ok(Pattern::NofM { n, m }) => Ok((format!("{n}:{m}"), Some((n, m)))),
        _ => Err(PruneError::Input(format!(
            "sparsity structure `{structure}`: expected `unstructured` or N:M (e.g. 2:4)"
        ))),
    }
}

/// The `quantization_config` block of `config.json` for a sparse-bitmask model: no
/// quantization, only a `sparsity_config`.
pub fn sparsity_quantization_config(structure: &str, global_sparsity: f64) -> Value {
    json!({
        "quant_method": "compressed-tensors",
        "sparsity_config": {
            "format": "sparse-bitmask",
            "global_sparsity": global_sparsity,
            "sparsity_structure": structure,
            "targets": ["Linear"],
            "ignore": ["lm_head"],
        },
    })
}

/// Writes `out_dir` (created if needed) as the compressed-tensors `sparse-bitmask` form of the
/// dense HF folder `dense_dir`: `model.safetensors` laid out as in the module docs, `config.json`
/// with the `sparsity_config`, and copies of the tokenizer files and `generation_config.json`.
/// `structure` is `unstructured` or `N:M`; an N:M structure is checked against the weights.
/// The dense weights may be bf16, f16 or f32 and are reproduced bit for bit (but for -0.0).
pub fn write_sparse_bitmask(
    dense_dir: &Path,
    out_dir: &Path,
    structure: &str,
) -> Result<SparseReport, PruneError> {
    let (structure, nm) = parse_structure(structure)?;
    let io = |p: &Path, e| PruneError::Model(model::ModelError::io(p, e));
    std::fs::create_dir_all(out_dir).map_err(|e| io(out_dir, e))?;
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if same(dense_dir, out_dir) {
        return Err(PruneError::Input(format!(
            "the sparse output {} must not be the dense folder",
            out_dir.display()
        )));
    }
    let cfg_path = dense_dir.join("config.json");
    let cfg_text = model::io::read_side_file(&cfg_path)?;
    let mut config: Value = serde_json::from_str(&cfg_text).map_err(|e| {
        PruneError::Model(model::ModelError::format(
            &cfg_path,
            format!("invalid JSON: {e}"),
        ))
    })?;
    if config.get("quantization_config").is_some() {
        return Err(PruneError::Input(format!(
            "{} already has a quantization_config; the sparse format takes a dense model",
            cfg_path.display()
        )));
    }

    let set = SafetensorsSet::open(dense_dir)?;
    let missing = |name: &str| {
        PruneError::Model(model::ModelError::format(
            dense_dir,
            format!("tensor `{name}` vanished"),
        ))
    };

    // Planning pass: non-zeros of every tensor, the header's sizes.
    let mut plan: Vec<(String, Vec<usize>, PlanDtype)> = Vec::new();
    let mut linears: BTreeMap<String, Linear> = BTreeMap::new();
    let (mut model_params, mut model_nonzeros, mut negative_zeros) = (0u64, 0u64, 0u64);
    for (name, e) in set.entries() {
        let numel: usize = e.shape.iter().product();
        model_params += numel as u64;
        let float = float_dtype(e.dtype);
        let (nonzeros, neg) = match float {
            Some(dt) => set
                .with_bytes(name, |b| count_nonzeros(dt, b))
                .ok_or_else(|| missing(name))?,
            None => (numel as u64, 0),
        };
        model_nonzeros += nonzeros;
        match (sparse_module(name, &e.shape), float) {
            (Some(module), Some(dtype)) => {
                let lin = Linear {
                    weight: name.clone(),
                    module,
                    dtype,
                    rows: e.shape[0],
                    cols: e.shape[1],
                    nonzeros,
                };
                if let Some((n, m)) = nm {
                    set.with_bytes(name, |b| check_nm(&lin, b, n, m))
                        .ok_or_else(|| missing(name))??;
                }
                negative_zeros += neg;
                let p = &lin.module;
                plan.push((
                    format!("{p}.bitmask"),
                    vec![lin.rows, lin.cols.div_ceil(8)],
                    PlanDtype::U8,
                ));
                plan.push((
                    format!("{p}.compressed"),
                    vec![nonzeros as usize],
                    PlanDtype::Float(dtype),
                ));
                plan.push((format!("{p}.row_offsets"), vec![lin.rows], PlanDtype::I64));
                plan.push((format!("{p}.shape"), vec![2], PlanDtype::I64));
                linears.insert(name.clone(), lin);
            }
            (Some(_), None) => {
                return Err(PruneError::Input(format!(
                    "linear weight `{name}` is {:?}; the sparse format takes f32, f16 or bf16",
                    e.dtype
                )));
            }
            (None, _) => {
                let dt = copy_dtype(e.dtype).ok_or_else(|| {
                    PruneError::Input(format!(
                        "tensor `{name}` has unsupported dtype {:?}",
                        e.dtype
                    ))
                })?;
                plan.push((name.clone(), e.shape.clone(), dt));
            }
        }
    }
    if linears.is_empty() {
        return Err(PruneError::Input(format!(
            "{} has no decoder linear weights to compress",
            dense_dir.display()
        )));
    }

    // Writing pass, in plan order.
    let st_path = out_dir.join("model.safetensors");
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut w = StreamingWriter::create_with(&st_path, plan, &meta)?;
    for name in set.entries().keys() {
        if let Some(lin) = linears.get(name) {
            let c = set
                .with_bytes(name, |b| compress(lin, b))
                .ok_or_else(|| missing(name))?;
            // The header was sized by the planning pass; the file must not have changed since.
            if c.values.len() != lin.nonzeros as usize * elem_size(lin.dtype) {
                return Err(PruneError::Model(model::ModelError::format(
                    dense_dir,
                    format!("tensor `{name}` changed while it was being compressed"),
                )));
            }
            let p = &lin.module;
            w.write_next_raw(&format!("{p}.bitmask"), &c.bitmask)?;
            w.write_next_raw(&format!("{p}.compressed"), &c.values)?;
            w.write_next_raw(&format!("{p}.row_offsets"), &i64_bytes(&c.row_offsets))?;
            w.write_next_raw(
                &format!("{p}.shape"),
                &i64_bytes(&[lin.rows as i64, lin.cols as i64]),
            )?;
        } else {
            set.with_bytes(name, |b| w.write_next_raw(name, b))
                .ok_or_else(|| missing(name))??;
        }
    }
    w.finish()?;

    let linear_params: u64 = linears.values().map(|l| (l.rows * l.cols) as u64).sum();
    let linear_nonzeros: u64 = linears.values().map(|l| l.nonzeros).sum();
    let frac = |zeros: u64, all: u64| {
        if all == 0 {
            0.0
        } else {
            zeros as f64 / all as f64
        }
    };
    let global_sparsity = frac(model_params - model_nonzeros, model_params);
    // Rounded so the config reads well; the report keeps the exact figure.
    let rounded = (global_sparsity * 1e6).round() / 1e6;
    config["quantization_config"] = sparsity_quantization_config(&structure, rounded);
    let out_cfg = out_dir.join("config.json");
    std::fs::write(
        &out_cfg,
        serde_json::to_string_pretty(&config).expect("serializable"),
    )
    .map_err(|e| io(&out_cfg, e))?;
    for f in AUX_FILES {
        let src = dense_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, out_dir.join(f)).map_err(|e| io(&src, e))?;
        }
    }
    let sparse_bytes = std::fs::metadata(&st_path)
        .map_err(|e| io(&st_path, e))?
        .len();
    Ok(SparseReport {
        structure,
        dense_bytes: set.bytes_on_disk(),
        sparse_bytes,
        compressed_linears: linears.len(),
        linear_params,
        linear_nonzeros,
        linear_sparsity: frac(linear_params - linear_nonzeros, linear_params),
        model_params,
        model_nonzeros,
        global_sparsity,
        negative_zeros,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_parse() {
        assert_eq!(parse_structure("Unstructured").unwrap().0, "unstructured");
        assert_eq!(
            parse_structure("2:4").unwrap(),
            ("2:4".into(), Some((2, 4)))
        );
        assert!(parse_structure("4:2").is_err());
        assert!(parse_structure("dense").is_err());
    }

    #[test]
    fn only_decoder_linears_are_compressed() {
        assert!(sparse_module("model.layers.3.mlp.down_proj.weight", &[4, 8]).is_some());
        assert!(sparse_module("model.layers.3.self_attn.q_proj.bias", &[4]).is_none());
        assert!(sparse_module("model.layers.3.input_layernorm.weight", &[4]).is_none());
        assert!(sparse_module("lm_head.weight", &[4, 8]).is_none());
        assert!(sparse_module("model.embed_tokens.weight", &[4, 8]).is_none());
    }

    #[test]
    fn known_bitmask_bytes() {
        // numpy.packbits(mask, axis=-1, bitorder="little") of these rows.
        let rows: [[f32; 10]; 2] = [
            [1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 6.0],
        ];
        let bytes: Vec<u8> = rows
            .iter()
            .flatten()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let lin = Linear {
            weight: "w".into(),
            module: "m".into(),
            dtype: StoreDtype::BF16,
            rows: 2,
            cols: 10,
            nonzeros: 5,
        };
        let c = compress(&lin, &bytes);
        assert_eq!(
            c.bitmask,
            [0b0000_1001, 0b0000_0001, 0b1000_0000, 0b0000_0010]
        );
        assert_eq!(c.row_offsets, [0, 3]);
        let vals: Vec<f32> = c
            .values
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        assert_eq!(vals, [1.0, 2.0, 3.0, 5.0, 6.0]);
    }

    #[test]
    fn negative_zero_is_zero_and_nan_is_kept() {
        let bf = |v: f32| half::bf16::from_f32(v).to_le_bytes();
        assert_eq!(classify(StoreDtype::BF16, &bf(-0.0)), (false, true));
        assert_eq!(classify(StoreDtype::BF16, &bf(0.0)), (false, false));
        assert!(classify(StoreDtype::BF16, &bf(f32::NAN)).0);
        assert_eq!(
            classify(StoreDtype::F32, &1e-45f32.to_le_bytes()),
            (true, false)
        );
    }
}
