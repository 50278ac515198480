//! The layout HF transformers loads with bitsandbytes (`quant_method: "bitsandbytes"`,
//! `load_in_4bit`), as `Linear4bit` saves it (`QuantState.as_dict(packed=True)` in
//! bitsandbytes' `functional.py`, read back by `QuantState.from_dict`).
//!
//! Per quantized linear `X` (`[rows, cols]`, `n = rows * cols`, `blocks = n / block`):
//! - `X.weight`, U8 `[n / 2, 1]`: the row-major 4-bit codes, two per byte, the first of each
//!   pair in the high nibble;
//! - `X.weight.absmax`, F32 `[blocks]`, or with double quantization U8 `[blocks]` (codes into
//!   the dynamic map);
//! - `X.weight.quant_map`, F32 `[16]`: the codebook in code order;
//! - double quantization only: `X.weight.nested_absmax`, F32 `[ceil(blocks / 256)]`, and
//!   `X.weight.nested_quant_map`, F32 `[256]`: the dynamic map;
//! - `X.weight.quant_state.bitsandbytes__nf4` (or `__fp4`), U8: the UTF-8 JSON of the other
//!   fields (`quant_type`, `blocksize`, `dtype`, `shape`, and `nested_blocksize`,
//!   `nested_dtype`, `nested_offset`), padded with spaces to a fixed length because the file's
//!   header is written before the offset is known (JSON allows trailing whitespace).
//!
//! int8-absmax is LLM.int8's weight format (`load_in_8bit`, as `Linear8bitLt` saves it):
//! - `X.weight`, I8 `[rows, cols]`: the codes `round(127 w / absmax)`;
//! - `X.SCB`, F32 `[rows]`: each row's absmax;
//! - `X.weight_format`, U8 scalar: 0 (`"row"`, the only layout bitsandbytes still reads).
//!
//! Every other tensor (embeddings, norms, lm_head) is bf16, as in the dense output.

use std::collections::BTreeMap;
use std::path::Path;

use model::safetensors_io::{PlanDtype, StoreDtype, StreamingWriter};
use serde_json::{Value, json};

use super::{Absmax, BnbLinear, BnbScheme, BnbType, NESTED_BLOCK, dynamic_map};
use crate::QuantError;
use crate::block::LINEARS;
use crate::pipeline::OutputSink;

/// The dtype the quantized weights dequantize to and compute in (`bnb_4bit_compute_dtype`,
/// the quant state's `dtype`): the dense output's bf16.
const DTYPE: StoreDtype = StoreDtype::BF16;

/// Room for the `nested_offset` number in the quant-state JSON (serde_json writes an f64 in
/// at most 24 characters, e.g. `-2.2250738585072014e-308`).
const OFFSET_WIDTH: usize = 24;

/// The `quantization_config` block of `config.json` (transformers' `BitsAndBytesConfig`).
/// The `llm_int8_*` fields keep transformers' defaults: the outlier threshold acts on
/// activations at inference and does not change what is stored.
pub fn quantization_config(scheme: &BnbScheme) -> Value {
    let int8 = scheme.ty == BnbType::Int8Absmax;
    let four_bit_type = if int8 { "fp4" } else { scheme.ty.name() };
    json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": !int8,
        "load_in_8bit": int8,
        "bnb_4bit_quant_type": four_bit_type,
        "bnb_4bit_use_double_quant": scheme.double_quant,
        "bnb_4bit_compute_dtype": DTYPE.torch_name(),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
    })
}

/// The quant-state JSON of a `[rows, cols]` weight (as `json.dumps` writes it), padded to
/// the length it has for any offset.
fn quant_state_json(scheme: &BnbScheme, rows: usize, cols: usize, offset: Option<f32>) -> String {
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{rows}, {cols}]",
        scheme.ty.name(),
        scheme.block.unwrap_or(cols),
        DTYPE.torch_name()
    );
    if scheme.double_quant {
        let off = offset.map_or_else(String::new, |o| {
            serde_json::to_string(&(o as f64)).expect("finite")
        });
        s += &format!(
            ", \"nested_blocksize\": {NESTED_BLOCK}, \"nested_dtype\": \"float32\", \"nested_offset\": {off}"
        );
        s += &" ".repeat(OFFSET_WIDTH.saturating_sub(off.len()));
    }
    s.push('}');
    s
}

fn quant_state_name(scheme: &BnbScheme) -> String {
    format!("weight.quant_state.bitsandbytes__{}", scheme.ty.name())
}

/// Writes the bitsandbytes layout as one safetensors file.
pub struct BnbSink {
    writer: StreamingWriter,
    scheme: BnbScheme,
    linears: BTreeMap<String, [usize; 2]>,
}

impl BnbSink {
    /// A sink writing `path` for a model of this config.
    pub fn create(path: &Path, cfg: &model::Config, scheme: BnbScheme) -> Result<Self, QuantError> {
        super::stage::check_model(&scheme, cfg)?;
        let mut plan = Vec::new();
        let mut linears = BTreeMap::new();
        for (name, shape) in model::checkpoint::expected_tensors(cfg) {
            let is_linear = shape.len() == 2
                && name.starts_with("model.layers.")
                && LINEARS
                    .iter()
                    .any(|(n, _)| name.ends_with(&format!(".{n}.weight")));
            if !is_linear {
                plan.push((name, shape, PlanDtype::Float(DTYPE)));
                continue;
            }
            let (rows, cols) = (shape[0], shape[1]);
            let module = name.strip_suffix(".weight").expect("a weight").to_string();
            match scheme.block {
                None => int8_plan(&mut plan, &name, &module, rows, cols),
                Some(block) => four_bit_plan(&mut plan, &scheme, block, &name, &module, rows, cols),
            }
            linears.insert(name, [rows, cols]);
        }
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        Ok(Self {
            writer: StreamingWriter::create_with(path, plan, &meta)?,
            scheme,
            linears,
        })
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

type Plan = Vec<(String, Vec<usize>, PlanDtype)>;

/// The tensors `Linear8bitLt` saves for one int8 linear.
fn int8_plan(plan: &mut Plan, name: &str, module: &str, rows: usize, cols: usize) {
    plan.push((name.to_string(), vec![rows, cols], PlanDtype::I8));
    let f32 = PlanDtype::Float(StoreDtype::F32);
    plan.push((format!("{module}.SCB"), vec![rows], f32));
    plan.push((format!("{module}.weight_format"), vec![], PlanDtype::U8));
}

/// The tensors `Linear4bit` saves for one 4-bit linear (`QuantState.as_dict(packed=True)`).
fn four_bit_plan(
    plan: &mut Plan,
    scheme: &BnbScheme,
    block: usize,
    name: &str,
    module: &str,
    rows: usize,
    cols: usize,
) {
    let n = rows * cols;
    let blocks = n / block;
    plan.push((name.to_string(), vec![n.div_ceil(2), 1], PlanDtype::U8));
    let f32 = PlanDtype::Float(StoreDtype::F32);
    let absmax_dt = if scheme.double_quant {
        PlanDtype::U8
    } else {
        f32
    };
    plan.push((format!("{module}.weight.absmax"), vec![blocks], absmax_dt));
    plan.push((format!("{module}.weight.quant_map"), vec![16], f32));
    if scheme.double_quant {
        plan.push((
            format!("{module}.weight.nested_absmax"),
            vec![blocks.div_ceil(NESTED_BLOCK)],
            f32,
        ));
        plan.push((format!("{module}.weight.nested_quant_map"), vec![256], f32));
    }
    let json_len = quant_state_json(scheme, rows, cols, None).len();
    plan.push((
        format!("{module}.{}", quant_state_name(scheme)),
        vec![json_len],
        PlanDtype::U8,
    ));
}

impl OutputSink for BnbSink {
    fn plain(&mut self, name: &str, data: &[f32], _: &[usize]) -> Result<(), QuantError> {
        Ok(self.writer.write_next(name, data)?)
    }

    fn linear(
        &mut self,
        name: &str,
        _: &crate::scheme::QuantizedLinear,
        _: &[f32],
    ) -> Result<(), QuantError> {
        Err(QuantError::Input(format!(
            "`{name}`: the bitsandbytes format holds nf4, fp4 and int8-absmax weights, not integer groups"
        )))
    }

    fn bnb_linear(&mut self, name: &str, q: &BnbLinear, deq: &[f32]) -> Result<(), QuantError> {
        if q.scheme != self.scheme || self.linears.get(name) != Some(&[q.rows, q.cols]) {
            return Err(QuantError::Input(format!(
                "`{name}` is not a {} linear of this bitsandbytes file",
                self.scheme.label()
            )));
        }
        crate::pipeline::check_reproduces(name, self.scheme.ty.name(), &q.dequantize(), deq)?;
        let module = name.strip_suffix(".weight").expect("a weight");
        let w = &mut self.writer;
        if self.scheme.block.is_none() {
            w.write_next_raw(name, &q.codes)?;
            w.write_next_raw(&format!("{module}.SCB"), &f32_bytes(&q.scales()))?;
            return Ok(w.write_next_raw(&format!("{module}.weight_format"), &[0])?);
        }
        w.write_next_raw(name, &q.packed()?)?;
        let table = self.scheme.ty.codebook().expect("4-bit");
        let absmax = match &q.absmax {
            Absmax::Plain(a) => f32_bytes(a),
            Absmax::Double(d) => d.codes.clone(),
        };
        w.write_next_raw(&format!("{module}.weight.absmax"), &absmax)?;
        w.write_next_raw(&format!("{module}.weight.quant_map"), &f32_bytes(table))?;
        let offset = match &q.absmax {
            Absmax::Plain(_) => None,
            Absmax::Double(d) => {
                w.write_next_raw(
                    &format!("{module}.weight.nested_absmax"),
                    &f32_bytes(&d.nested_absmax),
                )?;
                w.write_next_raw(
                    &format!("{module}.weight.nested_quant_map"),
                    &f32_bytes(&dynamic_map()),
                )?;
                Some(d.offset)
            }
        };
        let js = quant_state_json(&self.scheme, q.rows, q.cols, offset);
        w.write_next_raw(
            &format!("{module}.{}", quant_state_name(&self.scheme)),
            js.as_bytes(),
        )?;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), QuantError> {
        Ok(self.writer.finish()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_state_json_has_a_fixed_length_and_parses() {
        let s = BnbScheme::new(BnbType::Nf4, Some(64), true).unwrap();
        let empty = quant_state_json(&s, 576, 1536, None);
        for off in [0.0f32, 1.234_567_9e-5, -2.5e-38, 0.012_345_678] {
            let js = quant_state_json(&s, 576, 1536, Some(off));
            assert_eq!(js.len(), empty.len());
            let v: Value = serde_json::from_str(&js).unwrap();
            assert_eq!(v["nested_offset"].as_f64().unwrap() as f32, off);
            assert_eq!(v["shape"], json!([576, 1536]));
            assert_eq!(v["blocksize"], 64);
            assert_eq!(v["quant_type"], "nf4");
            assert_eq!(v["dtype"], "bfloat16");
        }
        let plain = BnbScheme::new(BnbType::Fp4, Some(128), false).unwrap();
        let v: Value = serde_json::from_str(&quant_state_json(&plain, 8, 256, None)).unwrap();
        assert!(v.get("nested_offset").is_none());
        assert_eq!(
            quant_state_name(&plain),
            "weight.quant_state.bitsandbytes__fp4"
        );
    }

    #[test]
    fn config_names_the_scheme() {
        let s = BnbScheme::new(BnbType::Fp4, None, true).unwrap();
        let c = quantization_config(&s);
        assert_eq!(c["quant_method"], "bitsandbytes");
        assert_eq!(c["load_in_4bit"], true);
        assert_eq!(c["bnb_4bit_quant_type"], "fp4");
        assert_eq!(c["bnb_4bit_use_double_quant"], true);
        assert_eq!(c["load_in_8bit"], false);
        let i8 = BnbScheme::new(BnbType::Int8Absmax, None, false).unwrap();
        let c = quantization_config(&i8);
        assert_eq!(c["load_in_8bit"], true);
        assert_eq!(c["load_in_4bit"], false);
    }
}
