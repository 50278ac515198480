//! Training state on disk, for `--resume`: the trainable tensors by module path, burn's
//! AdamW record, and the step counters. Parameter ids are derived from module paths (burn
//! draws them at random), so an optimizer record saved by one process finds its parameters
//! in the next.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::lm::{CausalLm, values};
use crate::{DistillError, Result};

/// Tensors by name: shape and f32 values.
pub type NamedTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Tracks the module path during a traversal.
#[derive(Default)]
struct PathStack(Vec<String>);

impl PathStack {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn path(&self) -> String {
        self.0.join(".")
    }
}

/// A stable 64-bit parameter id: FNV-1a of the module path.
fn path_id(path: &str) -> ParamId {
    ParamId::from(model::hash::fnv1a(path.bytes()))
}

struct StableIds(PathStack);

impl ModuleMapper for StableIds {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.0.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.0.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (_, value, mapper) = param.consume();
        Param::from_mapped_value(path_id(&self.0.path()), value, mapper)
    }
}

/// Every trainable tensor by module path.
struct Collect {
    path: PathStack,
    out: NamedTensors,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.base();
        if t.is_require_grad() {
            self.out
                .insert(self.path.path(), (t.dims().to_vec(), values(t)));
        }
    }
}

/// Replaces trainable tensors by module path.
struct Restore {
    path: PathStack,
    tensors: NamedTensors,
    missing: Vec<String>,
}

impl ModuleMapper for Restore {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !param.base().is_require_grad() {
            return param;
        }
        let path = self.path.path();
        let Some((shape, data)) = self.tensors.remove(&path) else {
            self.missing.push(path);
            return param;
        };
        let dims = param.base().dims();
        if shape != dims {
            self.missing
                .push(format!("{path} (shape {shape:?}, expected {dims:?})"));
            return param;
        }
        param.map(|t| {
            let device = t.device();
            let shape: [usize; D] = dims;
            Tensor::<D>::from_data(TensorData::new(data, shape), &device).require_grad()
        })
    }
}

impl CausalLm {
    /// Gives every parameter (LoRA factors included) an id derived from its module path.
    pub fn with_stable_ids(self) -> Self {
        self.map(&mut StableIds(PathStack::default()))
    }

    /// Every tensor that trains, by module path: shape and values.
    pub fn trainable(&self) -> NamedTensors {
        let mut v = Collect {
            path: PathStack::default(),
            out: BTreeMap::new(),
        };
        self.visit(&mut v);
        v.out
    }

    /// Sets every trainable tensor from `tensors` (by module path); all must be there with
    /// their shapes, and nothing else.
    pub fn with_trainable(self, tensors: NamedTensors, source: &Path) -> Result<Self> {
        let mut r = Restore {
            path: PathStack::default(),
            tensors,
            missing: Vec::new(),
        };
        let m = self.map(&mut r);
        if let Some(first) = r.missing.first() {
            return Err(DistillError::Invalid(format!(
                "{}: no saved value for the trainable tensor {first} ({} missing)",
                source.display(),
                r.missing.len()
            )));
        }
        if let Some(extra) = r.tensors.keys().next() {
            return Err(DistillError::Invalid(format!(
                "{}: saved tensor {extra} is not trainable in this model",
                source.display()
            )));
        }
        Ok(m)
    }
}

/// Step counters saved beside the tensors.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Optimizer steps done.
    pub steps: usize,
    /// Tokens trained on.
    pub tokens: u64,
}

/// Writes `tensors` as one safetensors file (f32).
pub fn save_tensors(path: &Path, tensors: &NamedTensors) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (shape, data))| {
            let bytes: &[u8] = bytemuck::cast_slice(data);
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map_err(|e| io_err(path, e))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| io_err(path, e))
}

/// Reads a file written by [`save_tensors`] (f32 tensors only; shapes checked).
pub fn load_tensors(path: &Path) -> Result<NamedTensors> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| io_err(path, e))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(io_err(path, format!("{name} is not f32")));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok(out)
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> DistillError {
    DistillError::Invalid(format!("{}: {e}", path.display()))
}
