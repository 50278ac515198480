//! The compressed-tensors `pack-quantized` format (`quant_method: "compressed-tensors"`), the
//! integer layout vLLM's WNA16 kernels (Marlin, Machete, ...) and transformers load.
//!
//! Per quantized linear `X` (`[rows, cols]`) the file holds
//! - `X.weight_packed`, I32 `[rows, ceil(cols * bits / 32)]`: each row's codes as one dense
//!   little-endian bit stream, code `c` at bits `c * bits ..`, 32 bits per word;
//! - `X.weight_scale`, F32 `[rows, groups]` (`groups = 1` per channel);
//! - `X.weight_zero_point`, I32 `[ceil(rows * bits / 32), groups]`, asymmetric only: each
//!   column of zero points packed like a row of codes (along the output dimension);
//! - `X.weight_shape`, I64 `[2]`: `[rows, cols]`;
//! - `X.weight_g_idx`, I32 `[cols]`, GPTQ activation order only: the group of every column.
//!
//! compressed-tensors keeps signed codes `q` in `[-2^(b-1), 2^(b-1))` with value
//! `(q - zp) * scale`, and packs `q + 2^(b-1)`, the zero point likewise. Our codes are those
//! unsigned fields already (`code = q + 2^(b-1)`, `zero = zp + 2^(b-1)`; symmetric means
//! `zero = 2^(b-1)`, i.e. `zp = 0`, and no zero point is stored), so they are packed as they are.
//!
//! compressed-tensors and vLLM need every group to hold exactly `group_size` columns; our
//! schemes give a short last group when the group size does not divide the width (576 with
//! g128 = 4 x 128 + 64). Such a layer is stored with groups of `gcd(group, cols)` columns (64),
//! each repeating its group's scale and zero point, which dequantizes to the same values.
//! Scales are f32 so that the dequantized weights equal the dense output's bit for bit
//! (vLLM casts them to the model dtype on load). The model crate reads the format back
//! (`model::compressed`), so every command takes a packed folder as input.

use std::collections::BTreeMap;
use std::path::Path;

use model::safetensors_io::{PlanDtype, StoreDtype, StreamingWriter};
use serde_json::{Value, json};

use crate::QuantError;
use crate::block::LINEARS;
use crate::pipeline::OutputSink;
use crate::scheme::{QuantScheme, QuantizedLinear};

/// Code widths the packed format is written for (those the model crate reads back); vLLM's
/// kernels load 4 and 8.
pub use model::compressed::PACKED_BITS;
// The bit stream of codes is the model crate's, which reads it back.
use model::compressed::{pack_codes, packed_words};

/// Errors unless the packed format can store `scheme`.
pub fn check_scheme(scheme: &QuantScheme) -> Result<(), QuantError> {
    if !PACKED_BITS.contains(&scheme.bits) {
        return Err(QuantError::Input(format!(
            "--format packed supports --bits 2, 4 or 8, not {} (compressed-tensors versions disagree on how \
             3/5/6/7-bit codes are packed; vLLM loads 4 and 8)",
            scheme.bits
        )));
    }
    Ok(())
}

/// How one linear weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearLayout {
    /// Output channels.
    pub rows: usize,
    /// Input channels.
    pub cols: usize,
    /// Columns of our groups (`cols` per channel).
    pub group_len: usize,
    /// Columns per stored scale: `gcd(group_len, cols)` for groups, `cols` per channel.
    pub group: usize,
    /// Per-channel (`strategy: "channel"`) rather than groups.
    pub channel: bool,
    /// Whether `weight_g_idx` is stored (GPTQ activation order with groups).
    pub g_idx: bool,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl LinearLayout {
    /// The layout of weight `name` (`[rows, cols]`); `act_order` when its groups may be in
    /// any column order.
    pub fn new(
        scheme: &QuantScheme,
        name: &str,
        rows: usize,
        cols: usize,
        act_order: bool,
    ) -> Result<Self, QuantError> {
        let group_len = scheme.group_len(name, cols)?;
        let channel = scheme.group.is_none();
        let group = if channel { cols } else { gcd(group_len, cols) };
        Ok(Self {
            rows,
            cols,
            group_len,
            group,
            channel,
            g_idx: act_order && !channel,
        })
    }

    /// Stored scales per row.
    pub fn groups(&self) -> usize {
        self.cols / self.group
    }

    /// The safetensors plan entries of module `module`.
    fn plan(&self, module: &str, scheme: &QuantScheme) -> Vec<(String, Vec<usize>, PlanDtype)> {
        let mut p = vec![
            (
                format!("{module}.weight_packed"),
                vec![self.rows, packed_words(self.cols, scheme.bits)],
                PlanDtype::I32,
            ),
            (
                format!("{module}.weight_scale"),
                vec![self.rows, self.groups()],
                PlanDtype::Float(StoreDtype::F32),
            ),
        ];
        if !scheme.sym {
            p.push((
                format!("{module}.weight_zero_point"),
                vec![packed_words(self.rows, scheme.bits), self.groups()],
                PlanDtype::I32,
            ));
        }
        p.push((format!("{module}.weight_shape"), vec![2], PlanDtype::I64));
        if self.g_idx {
            p.push((
                format!("{module}.weight_g_idx"),
                vec![self.cols],
                PlanDtype::I32,
            ));
        }
        p
    }

    /// The `weights` block of this layout's config group.
    fn weights_args(&self, scheme: &QuantScheme) -> Value {
        let mut w = json!({
            "num_bits": scheme.bits,
            "type": "int",
            "symmetric": scheme.sym,
            "strategy": if self.channel { "channel" } else { "group" },
            "group_size": if self.channel { Value::Null } else { json!(self.group) },
            "dynamic": false,
        });
        if self.g_idx {
            w["actorder"] = json!("group");
        }
        w
    }
}

/// One linear in packed form.
#[derive(Debug, Clone)]
pub struct PackedLinear {
    /// `[rows, packed_words(cols)]`.
    pub packed: Vec<i32>,
    /// `[rows, groups]`.
    pub scale: Vec<f32>,
    /// `[packed_words(rows), groups]`, asymmetric only.
    pub zero_point: Option<Vec<i32>>,
    /// `[cols]`, activation order only.
    pub g_idx: Option<Vec<i32>>,
}

/// Packs `q` in layout `lay`.
pub fn pack_linear(
    scheme: &QuantScheme,
    lay: &LinearLayout,
    name: &str,
    q: &QuantizedLinear,
) -> Result<PackedLinear, QuantError> {
    let bad = |what: String| {
        QuantError::Input(format!("`{name}`: cannot write the packed format: {what}"))
    };
    let (rows, cols) = (lay.rows, lay.cols);
    if q.rows != rows || q.cols != cols || q.codes.len() != rows * cols || q.g_idx.len() != cols {
        return Err(bad(format!(
            "shape [{}, {}] differs from the expected [{rows}, {cols}]",
            q.rows, q.cols
        )));
    }
    let (gl, s) = (lay.group_len, lay.group);
    if q.groups != cols.div_ceil(gl) || q.params.len() != rows * q.groups {
        return Err(bad(format!(
            "{} groups for {cols} columns of group length {gl}",
            q.groups
        )));
    }
    // Our group k -> stored groups k*m .. (the last one may be short: fewer stored groups).
    // Within a group, columns take stored groups in increasing column order, s at a time.
    let m = gl / s;
    let mut seen = vec![0usize; q.groups];
    let mut sub = vec![0i32; cols];
    for (c, &g) in q.g_idx.iter().enumerate() {
        let g = g as usize;
        if g >= q.groups {
            return Err(bad(format!("column {c} is in group {g} of {}", q.groups)));
        }
        sub[c] = (g * m + seen[g] / s) as i32;
        seen[g] += 1;
    }
    for (k, &n) in seen.iter().enumerate() {
        let want = if k + 1 < q.groups {
            gl
        } else {
            cols - (q.groups - 1) * gl
        };
        if n != want {
            return Err(bad(format!("group {k} holds {n} columns, not {want}")));
        }
    }
    if !lay.g_idx && sub.iter().enumerate().any(|(c, &j)| j as usize != c / s) {
        return Err(bad(
            "its groups are not contiguous column ranges (activation order needs `weight_g_idx`)"
                .into(),
        ));
    }
    let groups = lay.groups();
    let param = |r: usize, j: usize| q.params[r * q.groups + j / m];
    if scheme.sym {
        let z = 1i32 << (scheme.bits - 1);
        if q.params.iter().any(|p| p.zero != z) {
            return Err(bad(format!(
                "a symmetric scheme with a zero point other than {z}"
            )));
        }
    }
    let qmax = scheme.qmax();
    if q.params.iter().any(|p| p.zero < 0 || p.zero > qmax) {
        return Err(bad(format!("a zero point outside 0..={qmax}")));
    }
    let pw = packed_words(cols, scheme.bits);
    let mut packed = vec![0i32; rows * pw];
    {
        use rayon::prelude::*;
        packed
            .par_chunks_mut(pw)
            .zip(q.codes.par_chunks(cols))
            .for_each(|(out, codes)| {
                pack_codes(codes.iter().copied(), scheme.bits, out);
            });
    }
    let scale = (0..rows)
        .flat_map(|r| (0..groups).map(move |j| (r, j)))
        .map(|(r, j)| param(r, j).scale)
        .collect();
    let zero_point = (!scheme.sym).then(|| {
        let zw = packed_words(rows, scheme.bits);
        let mut out = vec![0i32; zw * groups];
        let mut col = vec![0i32; zw];
        for j in 0..groups {
            pack_codes(
                (0..rows).map(|r| param(r, j).zero as u8),
                scheme.bits,
                &mut col,
            );
            for (w, &v) in col.iter().enumerate() {
                out[w * groups + j] = v;
            }
        }
        out
    });
    Ok(PackedLinear {
        packed,
        scale,
        zero_point,
        g_idx: lay.g_idx.then_some(sub),
    })
}

/// `model.layers.N.<linear>` for the weight of a quantized linear.
fn linear_module(name: &str) -> Option<&str> {
    let module = name.strip_suffix(".weight")?;
    let rest = module.strip_prefix("model.layers.")?;
    let (l, suffix) = rest.split_once('.')?;
    (l.parse::<usize>().is_ok() && LINEARS.iter().any(|(n, _)| *n == suffix)).then_some(module)
}

/// Layouts of every quantized linear of a model, by weight name.
fn layouts(
    cfg: &model::Config,
    scheme: &QuantScheme,
    act_order: bool,
) -> Result<BTreeMap<String, LinearLayout>, QuantError> {
    let mut out = BTreeMap::new();
    for l in 0..cfg.num_hidden_layers {
        for (name, shape) in model::checkpoint::block_tensors(cfg, l) {
            if linear_module(&name).is_some() && shape.len() == 2 {
                out.insert(
                    name.clone(),
                    LinearLayout::new(scheme, &name, shape[0], shape[1], act_order)?,
                );
            }
        }
    }
    Ok(out)
}

/// The `quantization_config` block of `config.json` for a model written by [`PackedSink`].
/// One config group per distinct layout: targets `["Linear"]` when there is one, else
/// anchored regexes on the linears' names (`re:.*\.self_attn\.q_proj$`).
pub fn quantization_config(
    cfg: &model::Config,
    scheme: &QuantScheme,
    act_order: bool,
) -> Result<Value, QuantError> {
    check_scheme(scheme)?;
    let lays = layouts(cfg, scheme, act_order)?;
    let key = |l: &LinearLayout| (l.channel, if l.channel { 0 } else { l.group }, l.g_idx);
    // Distinct layouts, each with the suffixes (or, if a suffix's layers differ, names) it covers.
    let mut by_key: BTreeMap<(bool, usize, bool), (LinearLayout, Vec<String>)> = BTreeMap::new();
    let mut suffix_keys: BTreeMap<&str, Vec<(bool, usize, bool)>> = BTreeMap::new();
    for (name, l) in &lays {
        let module = linear_module(name).expect("a linear");
        let suffix = module.splitn(4, '.').nth(3).expect("model.layers.N.suffix");
        suffix_keys
            .entry(LINEARS.iter().find(|(n, _)| *n == suffix).expect("known").0)
            .or_default()
            .push(key(l));
        by_key.entry(key(l)).or_insert((*l, Vec::new()));
    }
    let single = by_key.len() == 1;
    for (name, l) in &lays {
        let module = linear_module(name).expect("a linear");
        let suffix = module.splitn(4, '.').nth(3).expect("suffix");
        let ks = &suffix_keys[suffix];
        let target = if ks.iter().all(|k| *k == ks[0]) {
            format!("re:.*\\.{}$", suffix.replace('.', "\\."))
        } else {
            module.to_string()
        };
        let targets = &mut by_key.get_mut(&key(l)).expect("inserted").1;
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    let mut groups = serde_json::Map::new();
    for (i, (lay, targets)) in by_key.values().enumerate() {
        let targets = if single {
            vec!["Linear".to_string()]
        } else {
            targets.clone()
        };
        groups.insert(
            format!("group_{i}"),
            json!({
                "targets": targets,
                "weights": lay.weights_args(scheme),
                "input_activations": null,
                "output_activations": null,
                "format": "pack-quantized",
            }),
        );
    }
    Ok(json!({
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ["lm_head"],
        "kv_cache_scheme": null,
    }))
}

/// Writes the packed format as one safetensors file: quantized linears as above, every other
/// tensor (embeddings, norms, biases, lm_head) as bf16 like the dense output.
pub struct PackedSink {
    writer: StreamingWriter,
    scheme: QuantScheme,
    layouts: BTreeMap<String, LinearLayout>,
}

impl PackedSink {
    /// A sink writing `path` for a model of this config; `act_order` when the method may
    /// order groups by activation (GPTQ `--act-order`), which stores `weight_g_idx`.
    pub fn create(
        path: &Path,
        cfg: &model::Config,
        scheme: QuantScheme,
        act_order: bool,
    ) -> Result<Self, QuantError> {
        check_scheme(&scheme)?;
        let layouts = layouts(cfg, &scheme, act_order)?;
        let mut plan = Vec::new();
        for (name, shape) in model::checkpoint::expected_tensors(cfg) {
            match (layouts.get(&name), linear_module(&name)) {
                (Some(lay), Some(module)) => plan.extend(lay.plan(module, &scheme)),
                _ => plan.push((name, shape, PlanDtype::Float(StoreDtype::BF16))),
            }
        }
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        Ok(Self {
            writer: StreamingWriter::create_with(path, plan, &meta)?,
            scheme,
            layouts,
        })
    }
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl OutputSink for PackedSink {
    fn plain(&mut self, name: &str, data: &[f32], _: &[usize]) -> Result<(), QuantError> {
        Ok(self.writer.write_next(name, data)?)
    }

    fn linear(&mut self, name: &str, q: &QuantizedLinear, deq: &[f32]) -> Result<(), QuantError> {
        let lay = *self.layouts.get(name).ok_or_else(|| {
            QuantError::Input(format!(
                "`{name}` is not a quantized linear of the packed format"
            ))
        })?;
        crate::pipeline::check_reproduces(name, "integer", &q.dequantize(), deq)?;
        let p = pack_linear(&self.scheme, &lay, name, q)?;
        let module = name.strip_suffix(".weight").expect("a weight");
        self.writer
            .write_next_raw(&format!("{module}.weight_packed"), &i32_bytes(&p.packed))?;
        self.writer
            .write_next(&format!("{module}.weight_scale"), &p.scale)?;
        if let Some(z) = &p.zero_point {
            self.writer
                .write_next_raw(&format!("{module}.weight_zero_point"), &i32_bytes(z))?;
        }
        let shape: Vec<u8> = [lay.rows as i64, lay.cols as i64]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        self.writer
            .write_next_raw(&format!("{module}.weight_shape"), &shape)?;
        if let Some(g) = &p.g_idx {
            self.writer
                .write_next_raw(&format!("{module}.weight_g_idx"), &i32_bytes(g))?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), QuantError> {
        Ok(self.writer.finish()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::{GroupParams, quantize_rtn};

    /// Dequantizes a packed linear with the model crate's reader.
    fn dequant(scheme: &QuantScheme, lay: &LinearLayout, p: &PackedLinear) -> Vec<f32> {
        model::compressed::dequantize_packed(&model::compressed::PackedParts {
            bits: scheme.bits,
            rows: lay.rows,
            cols: lay.cols,
            group: (!lay.channel).then_some(lay.group),
            packed: &p.packed,
            scale: &p.scale,
            zero_point: p.zero_point.as_deref(),
            g_idx: p.g_idx.as_deref(),
        })
        .unwrap()
    }

    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0 + (i % 3) as f32 * 0.1)
            .collect()
    }

    #[test]
    fn a_partial_last_group_is_split_into_equal_groups() {
        for sym in [false, true] {
            let s = QuantScheme::new(4, Some(8), sym).unwrap();
            let (rows, cols) = (5, 12); // groups 8 + 4 -> stored as 3 groups of 4
            let q = quantize_rtn(&s, "w", &weights(rows, cols), rows, cols).unwrap();
            let lay = LinearLayout::new(&s, "w", rows, cols, false).unwrap();
            assert_eq!((lay.group, lay.groups()), (4, 3));
            let p = pack_linear(&s, &lay, "w", &q).unwrap();
            assert_eq!(p.packed.len(), rows * 2);
            assert_eq!(p.zero_point.as_ref().map(|z| z.len()), (!sym).then_some(3));
            assert_eq!(dequant(&s, &lay, &p), q.dequantize());
        }
    }

    #[test]
    fn activation_order_groups_are_kept_in_g_idx() {
        let s = QuantScheme::new(8, Some(4), false).unwrap();
        let (rows, cols) = (3, 6); // groups of 4 + 2 in a permuted column order
        let perm = [4usize, 1, 5, 0, 2, 3];
        let mut g_idx = vec![0u32; cols];
        for (i, &c) in perm.iter().enumerate() {
            g_idx[c] = (i / 4) as u32;
        }
        let params: Vec<GroupParams> = (0..rows * 2)
            .map(|i| GroupParams {
                scale: 0.01 * (i + 1) as f32,
                zero: 100 + i as i32,
            })
            .collect();
        let codes: Vec<u8> = (0..rows * cols).map(|i| (i * 53 % 256) as u8).collect();
        let q = QuantizedLinear {
            rows,
            cols,
            codes,
            params,
            groups: 2,
            g_idx,
            latent: None,
            blocks: None,
        };
        let lay = LinearLayout::new(&s, "w", rows, cols, true).unwrap();
        let p = pack_linear(&s, &lay, "w", &q).unwrap();
        assert_eq!(p.g_idx.as_deref(), Some(&[0, 0, 2, 2, 1, 1][..]));
        assert_eq!(dequant(&s, &lay, &p), q.dequantize());
        // Without activation order the layout refuses groups that are not column ranges.
        let plain = LinearLayout::new(&s, "w", rows, cols, false).unwrap();
        assert!(pack_linear(&s, &plain, "w", &q).is_err());
    }

    #[test]
    fn unsupported_bits_are_refused() {
        assert!(
            check_scheme(&QuantScheme::new(3, Some(128), true).unwrap())
                .unwrap_err()
                .to_string()
                .contains("--bits 2, 4 or 8")
        );
        assert!(check_scheme(&QuantScheme::new(4, None, false).unwrap()).is_ok());
    }
}
