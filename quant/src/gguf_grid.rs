//! An integer method's grid written into GGUF (`compress quant --method gptq --format
//! gguf:q4_0`): where the type's blocks are the method's groups (32 consecutive input columns,
//! one f16 scale, and for Q4_1/Q5_1 one f16 minimum), every decoder linear is stored from its
//! codes, so GPTQ's column-by-column error feedback survives into a plain GGUF file that
//! llama.cpp runs; no peer writes GPTQ into GGUF. Only the scales (and minimums) are rounded
//! to the f16 the format holds.
//!
//! [`grid_scheme`] gives the integer scheme every decoder linear's type holds; [`GridSink`]
//! takes the pipeline's output block by block (the codes encoded at once, so only the
//! compressed linears and the blocks' small tensors are kept); [`export_grid`] writes the
//! file, reading the tensors outside the blocks from the checkpoint (no method changes them).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use model::Checkpoint;
use model::config::Config;
use model::gguf::GgmlType;

use crate::QuantError;
use crate::block::LINEARS;
use crate::blocks::legacy::encode_on_grid;
use crate::gguf_export::{
    ExportError, ExportReport, Progress, Source, TypePlan, export_from, hf_to_gguf_name,
};
use crate::pipeline::OutputSink;
use crate::scheme::{QuantScheme, QuantizedLinear};

/// The integer grid of a GGUF block type, when its blocks are groups of 32 with one scale
/// (bits, symmetric): Q8_0, Q4_0, Q5_0 (symmetric), Q4_1, Q5_1 (scale and minimum).
pub fn type_grid(ty: GgmlType) -> Option<(u8, bool)> {
    Some(match ty {
        GgmlType::Q8_0 => (8, true),
        GgmlType::Q4_0 => (4, true),
        GgmlType::Q5_0 => (5, true),
        GgmlType::Q4_1 => (4, false),
        GgmlType::Q5_1 => (5, false),
        _ => return None,
    })
}

/// The one integer scheme (groups of 32) that the types `plan` gives every decoder linear of
/// a model with `cfg` hold; an error naming the tensor when a type is not such a block type
/// (K-quants, IQ4_NL, floats) or two linears get different ones.
pub fn grid_scheme(plan: &TypePlan, cfg: &Config) -> Result<QuantScheme, QuantError> {
    let mut found: Option<(GgmlType, (u8, bool))> = None;
    for l in 0..cfg.num_hidden_layers {
        for (name, shape) in model::checkpoint::block_tensors(cfg, l) {
            if shape.len() != 2
                || !LINEARS
                    .iter()
                    .any(|(n, _)| name.ends_with(&format!("{n}.weight")))
            {
                continue;
            }
            let g = hf_to_gguf_name(&name)
                .ok_or_else(|| QuantError::Input(format!("no GGUF name for `{name}`")))?;
            let ty = plan.type_for(&g, &shape);
            let Some(grid) = type_grid(ty) else {
                return Err(QuantError::Input(format!(
                    "{g} would be {}: an integer grid goes into q8_0, q4_0, q5_0, q4_1 or q5_1 blocks only (K-quants and iq4_nl are not supported with this method yet)",
                    ty.name()
                )));
            };
            match found {
                None => found = Some((ty, grid)),
                Some((t, _)) if t != ty => {
                    return Err(QuantError::Input(format!(
                        "{g} would be {} but other linears {}: one integer grid needs one type for every linear",
                        ty.name(),
                        t.name()
                    )));
                }
                _ => {}
            }
        }
    }
    let (_, (bits, sym)) =
        found.ok_or_else(|| QuantError::Input("the model has no decoder linears".into()))?;
    Ok(QuantScheme::new(bits, Some(32), sym)?.on_llama_grid())
}

/// What a [`GridSink`] collected: each decoder linear encoded in its type (or its dequantized
/// values where the grid did not fit, to be rounded by the type's quantizer), and the blocks'
/// other tensors.
#[derive(Debug, Default)]
pub struct GridStore {
    /// Encoded linears by HF name.
    pub encoded: HashMap<String, Vec<u8>>,
    /// Values of the blocks' other tensors, and of linears whose grid the type cannot hold.
    pub values: HashMap<String, Vec<f32>>,
    /// Linears written from values (re-rounded), by HF name.
    pub rerounded: Vec<String>,
}

/// An [`OutputSink`] that encodes each quantized linear in the type `plan` gives it.
pub struct GridSink {
    plan: TypePlan,
    store: Arc<Mutex<GridStore>>,
}

impl GridSink {
    /// A sink for `plan`, and the store it fills (read once the pipeline has finished).
    pub fn new(plan: TypePlan) -> (Self, Arc<Mutex<GridStore>>) {
        let store = Arc::new(Mutex::new(GridStore::default()));
        (
            Self {
                plan,
                store: store.clone(),
            },
            store,
        )
    }
}

/// `q`'s codes as the bytes of `ty`, when its groups are 32 consecutive input columns (GPTQ's
/// activation order without static groups is not) and `ty`'s blocks hold its grid.
pub fn encode_linear(ty: GgmlType, q: &QuantizedLinear) -> Option<Vec<u8>> {
    let consecutive_32 = q
        .g_idx
        .iter()
        .enumerate()
        .all(|(c, &k)| k as usize == c / 32);
    let params: Vec<(f32, i32)> = q.params.iter().map(|p| (p.scale, p.zero)).collect();
    consecutive_32
        .then(|| encode_on_grid(ty, &q.codes, &params, q.cols))
        .flatten()
}

impl OutputSink for GridSink {
    fn plain(&mut self, name: &str, data: &[f32], _shape: &[usize]) -> Result<(), QuantError> {
        if name.starts_with("model.layers.") {
            let mut s = self.store.lock().expect("not poisoned");
            s.values.insert(name.to_string(), data.to_vec());
        }
        Ok(())
    }

    fn linear(
        &mut self,
        name: &str,
        q: &QuantizedLinear,
        dequantized: &[f32],
    ) -> Result<(), QuantError> {
        let g = hf_to_gguf_name(name)
            .ok_or_else(|| QuantError::Input(format!("no GGUF name for `{name}`")))?;
        let ty = self.plan.type_for(&g, &[q.rows, q.cols]);
        let encoded = encode_linear(ty, q);
        let mut s = self.store.lock().expect("not poisoned");
        match encoded {
            Some(e) => {
                s.encoded.insert(name.to_string(), e);
            }
            None => {
                s.values.insert(name.to_string(), dequantized.to_vec());
                s.rerounded.push(name.to_string());
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), QuantError> {
        Ok(())
    }
}

/// Writes `ckpt` as GGUF at `out` with `plan`'s types: the linears from `store` as encoded,
/// the blocks' other tensors from its values, everything else from the checkpoint.
pub fn export_grid(
    ckpt: &Checkpoint,
    out: &Path,
    plan: &TypePlan,
    mut store: GridStore,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ExportReport, ExportError> {
    let mut source = |hf: &str, _g: &str, shape: &[usize]| -> Result<Source, ExportError> {
        if let Some(e) = store.encoded.remove(hf) {
            return Ok(Source {
                data: Vec::new(),
                importance: None,
                encoded: Some(e),
            });
        }
        let data = match store.values.remove(hf) {
            Some(v) => v,
            None if hf.starts_with("model.layers.") => {
                return Err(ExportError::Input(format!(
                    "tensor `{hf}` was not produced by the quantization"
                )));
            }
            None => ckpt.read(hf, shape)?,
        };
        Ok(Source {
            data,
            importance: None,
            encoded: None,
        })
    };
    export_from(ckpt, out, plan, &mut source, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let c = model::testkit::tiny_config().to_string();
        Config::from_json_str(&c, Path::new("config.json")).unwrap()
    }

    #[test]
    fn the_grid_is_the_types_own_and_one_for_all_linears() {
        let c = cfg();
        let plan = |name: &str| TypePlan::for_model(name, &c, false).unwrap();
        for (name, bits, sym) in [("q4_0", 4, true), ("q4_1", 4, false), ("q8_0", 8, true)] {
            let s = grid_scheme(&plan(name), &c).unwrap();
            assert_eq!((s.bits, s.group, s.sym), (bits, Some(32), sym), "{name}");
        }
        // A codebook type has no integer grid; q4_k_m mixes types (and on these 64-wide rows
        // its K types fall back to Q5_0 / Q8_0, as in llama.cpp).
        let nl = grid_scheme(&plan("iq4_nl"), &c).unwrap_err().to_string();
        assert!(
            nl.to_lowercase().contains("iq4_nl") && nl.contains("q4_0"),
            "{nl}"
        );
        assert!(grid_scheme(&plan("q4_k_m"), &c).is_err());
        let mixed = plan("q4_0").with_rule("ffn_down=q8_0").unwrap();
        let m = grid_scheme(&mixed, &c).unwrap_err().to_string();
        assert!(m.contains("one type for every linear"), "{m}");
    }

    /// With H = I no column's error is pushed onto another, so GPTQ into Q4_0 / Q5_0 is the
    /// block quantizer's own importance rounding under uniform importance, block for block.
    /// (Q8_0 is left out: GPTQ's grid also has the code -128, which ggml never writes.)
    #[test]
    fn gptq_with_an_identity_hessian_is_the_block_rounding() {
        use crate::method::gptq::{Gptq, gptq_linear};
        let (rows, cols) = (16, 96);
        let mut rng = crate::blocks::testutil::Rng(7);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * 0.05).collect();
        let mut h = vec![0f32; cols * cols];
        for j in 0..cols {
            h[j * cols + j] = 1.0;
        }
        for (ty, bits) in [(GgmlType::Q4_0, 4), (GgmlType::Q5_0, 5)] {
            let scheme = QuantScheme::new(bits, Some(32), true)
                .unwrap()
                .on_llama_grid();
            let q = gptq_linear(&scheme, "w", &w, rows, cols, &h, &Gptq::default()).unwrap();
            let ours = encode_linear(ty, &q).unwrap();
            let blocks = crate::blocks::quantize(ty, &w, cols, Some(&vec![1.0; cols])).unwrap();
            assert_eq!(ours, blocks, "{ty:?}");
            // And the search mattered: plain reference rounding is a different file.
            assert_ne!(
                ours,
                crate::blocks::quantize(ty, &w, cols, None).unwrap(),
                "{ty:?}"
            );
        }
    }
}
