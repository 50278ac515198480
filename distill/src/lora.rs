//! LoRA (Hu et al., 2021) on the student's linear layers, with burn's own adapters: every
//! existing tensor frozen, each targeted weight `W` trained as `W + (alpha/r)·A·B` (`A`
//! Gaussian, `B` zero, so training starts at the student), merged into dense weights when
//! the model is written.

use burn::module::{Lora, Module, ParamGroup, ParamId};
use serde::{Deserialize, Serialize};

use crate::lm::CausalLm;

/// A linear layer of every decoder block that LoRA can adapt (PEFT's `target_modules` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    /// `self_attn.q_proj`.
    #[cfg_attr(feature = "clap", value(name = "q_proj"))]
    QProj,
    /// `self_attn.k_proj`.
    #[cfg_attr(feature = "clap", value(name = "k_proj"))]
    KProj,
    /// `self_attn.v_proj`.
    #[cfg_attr(feature = "clap", value(name = "v_proj"))]
    VProj,
    /// `self_attn.o_proj`.
    #[cfg_attr(feature = "clap", value(name = "o_proj"))]
    OProj,
    /// `mlp.gate_proj`.
    #[cfg_attr(feature = "clap", value(name = "gate_proj"))]
    GateProj,
    /// `mlp.up_proj`.
    #[cfg_attr(feature = "clap", value(name = "up_proj"))]
    UpProj,
    /// `mlp.down_proj`.
    #[cfg_attr(feature = "clap", value(name = "down_proj"))]
    DownProj,
}

/// LoRA settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraOptions {
    /// Rank `r` of the adapters.
    pub rank: usize,
    /// `alpha`: the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// The adapted linears, in every block.
    pub targets: Vec<LoraTarget>,
}

impl CausalLm {
    /// The weight ids of the targeted linears of every block.
    pub(crate) fn target_ids(&self, targets: &[LoraTarget]) -> Vec<ParamId> {
        let mut ids = Vec::new();
        for layer in &self.layers {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            for t in targets {
                let lin = match t {
                    LoraTarget::QProj => &a.q_proj,
                    LoraTarget::KProj => &a.k_proj,
                    LoraTarget::VProj => &a.v_proj,
                    LoraTarget::OProj => &a.o_proj,
                    LoraTarget::GateProj => &m.gate_proj,
                    LoraTarget::UpProj => &m.up_proj,
                    LoraTarget::DownProj => &m.down_proj,
                };
                ids.push(lin.weight.id);
            }
        }
        ids
    }

    /// Freezes every tensor and attaches trainable adapters to the targeted weights (the
    /// factors drawn from the device's seeded generator).
    pub fn with_lora(self, opts: &LoraOptions) -> Self {
        let ids = self.target_ids(&opts.targets);
        self.apply_lora(Lora::new(opts.rank, opts.alpha).set_param_group(ParamGroup::from_ids(ids)))
    }

    /// Folds adapters into dense weights (a no-op without adapters).
    pub fn merged(self) -> Self {
        self.materialize()
    }
}
