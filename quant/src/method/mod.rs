//! Quantization methods, one file each behind [`QuantMethod`]. Adding a method is a new file,
//! a [`MethodKind`] variant and its line in [`MethodKind::build`]; the pipeline never matches
//! on the method.

pub mod awq;
pub mod gptq;
pub mod rtn;

use std::collections::BTreeMap;

use model::config::Config;
use model::engine::States;
use model::transformer::Rope;
use model::{Device, Tensor};

use crate::QuantError;
use crate::block::{BlockWeights, TapStats};
use crate::scheme::{QuantScheme, QuantizedLinear};

/// Everything a method sees of one decoder block.
pub struct BlockJob<'a> {
    /// Model configuration.
    pub cfg: &'a Config,
    /// The block's tensors; a method leaves the dequantized weights here (and may rescale
    /// norms or other tensors, keeping the block's function).
    pub weights: &'a mut BlockWeights,
    /// Calibration inputs of the block (empty without calibration).
    pub inputs: &'a States,
    /// RoPE tables.
    pub rope: &'a Rope,
    /// Compute device.
    pub device: &'a Device,
    /// Index of the block in the model.
    pub layer: usize,
    /// The scheme.
    pub scheme: QuantScheme,
    /// Rows of inputs to keep for search objectives and error reports.
    pub sample_rows: usize,
}

/// Block outputs a method computed on the way, so the pipeline need not run the block again.
pub enum Outputs {
    /// None computed.
    None,
    /// The teacher block's outputs.
    Teacher(Vec<Tensor<3>>),
    /// The quantized block's outputs.
    Quantized(Vec<Tensor<3>>),
}

/// What a method returns for a block.
pub struct BlockResult {
    /// Integer form of every linear, by HF suffix (`self_attn.q_proj`).
    pub linears: BTreeMap<String, QuantizedLinear>,
    /// Each linear's weight just before rounding (after any function-preserving rescaling),
    /// the reference its quantization error is measured against.
    pub reference: BTreeMap<String, Vec<f32>>,
    /// Input statistics each linear was quantized against, in the same basis.
    pub stats: BTreeMap<String, TapStats>,
    /// Outputs computed on the way.
    pub outputs: Outputs,
}

/// A weight-only post-training quantization method.
pub trait QuantMethod: Send + Sync {
    /// Its name on the command line.
    fn name(&self) -> &'static str;
    /// Whether it needs calibration data.
    fn needs_calibration(&self) -> bool;
    /// Where block inputs come from by default: `true` for the quantized blocks before it
    /// (GPTQ, as in its paper), `false` for the teacher (AWQ, as llm-awq).
    fn propagate_quantized(&self) -> bool {
        true
    }
    /// Whether [`QuantMethod::quantize_block`] always returns the teacher block's outputs
    /// ([`Outputs::Teacher`]), so the pipeline need not keep a copy of the teacher block.
    fn returns_teacher_outputs(&self) -> bool {
        false
    }
    /// Quantizes one block.
    fn quantize_block(&self, job: &mut BlockJob<'_>) -> Result<BlockResult, QuantError>;
}

/// Options that select and tune a method.
#[derive(Debug, Clone, Default)]
pub struct MethodOptions {
    /// GPTQ: activation order.
    pub act_order: bool,
    /// GPTQ: dampening fraction.
    pub damp: Option<f64>,
    /// GPTQ: group parameters from the original weights ([`gptq::Gptq::static_groups`]).
    pub static_groups: bool,
    /// GPTQ: keep the unrounded weights ([`gptq::Gptq::keep_latent`]).
    pub keep_latent: bool,
    /// GPTQ: weight of each window's first position in H ([`gptq::Gptq::sink_weight`]).
    pub sink_weight: Option<f32>,
    /// GPTQ: the GGUF types to write into ([`gptq::Gptq::gguf`]; set by `--format gguf:*`).
    pub gguf: Option<crate::gguf_export::TypePlan>,
    /// AWQ: skip the scale search.
    pub no_awq_scale: bool,
    /// AWQ: run llm-awq's clipping search (off by default: on SmolLM2 W4 g64 it raised
    /// perplexity from 26.31 to 29.56, BENCHMARKS.md "AWQ without the clipping search").
    pub awq_clip: bool,
    /// AWQ: the grid's candidates (default [`awq::AwqGrid::Act`]).
    pub awq_grid: Option<awq::AwqGrid>,
    /// AWQ: the search objective (default [`awq::AwqObjective::Module`]).
    pub awq_objective: Option<awq::AwqObjective>,
}

/// A post-training quantization method: `--method` of `compress quant` and `compress qat`,
/// `--requant` of `compress distill`, and its name in reports and recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum MethodKind {
    /// Round to nearest (min/max per group).
    Rtn,
    /// AWQ: activation-aware scales and clipping, calibrated.
    Awq,
    /// GPTQ: column-by-column rounding with second-order error feedback, calibrated.
    Gptq,
}

impl MethodKind {
    /// Every method, in `--method`'s order.
    pub const ALL: [MethodKind; 3] = [Self::Rtn, Self::Awq, Self::Gptq];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rtn => "rtn",
            Self::Awq => "awq",
            Self::Gptq => "gptq",
        }
    }

    /// Errors when `o` sets an option of another method (`--damp` with RTN, `--awq-clip`
    /// with GPTQ): an option that does not apply is refused, never ignored.
    pub fn check_options(self, o: &MethodOptions) -> Result<(), QuantError> {
        let gptq = [
            (o.act_order, "--act-order"),
            (o.damp.is_some(), "--damp"),
            (o.static_groups, "--static-groups"),
            (o.keep_latent, "--gptq-latent"),
            (o.sink_weight.is_some(), "--sink-weight"),
            (o.gguf.is_some(), "GPTQ into GGUF"),
        ];
        let awq = [
            (o.no_awq_scale, "--no-awq-scale"),
            (o.awq_clip, "--awq-clip"),
            (o.awq_grid.is_some(), "--awq-grid"),
            (o.awq_objective.is_some(), "--awq-objective"),
        ];
        for (owner, opts) in [(Self::Gptq, &gptq[..]), (Self::Awq, &awq[..])] {
            if let Some((_, flag)) = opts.iter().find(|(set, _)| *set)
                && self != owner
            {
                return Err(QuantError::Input(format!(
                    "{flag} applies to --method {} only, not {}",
                    owner.name(),
                    self.name()
                )));
            }
        }
        Ok(())
    }

    /// The method with options `o` (refused by [`MethodKind::check_options`] when one belongs
    /// to another method).
    pub fn build(self, o: &MethodOptions) -> Result<Box<dyn QuantMethod>, QuantError> {
        self.check_options(o)?;
        Ok(match self {
            Self::Rtn => Box::new(rtn::Rtn),
            Self::Awq => Box::new(awq::Awq::from_options(o)),
            Self::Gptq => Box::new(gptq::Gptq {
                act_order: o.act_order,
                damp: o.damp.unwrap_or(0.01),
                static_groups: o.static_groups,
                keep_latent: o.keep_latent,
                sink_weight: o.sink_weight.unwrap_or(gptq::SINK_WEIGHT),
                gguf: o.gguf.clone(),
                ..gptq::Gptq::default()
            }),
        })
    }
}
