//! Unstructured and N:M pruning methods, one file each behind [`PruneMethod`]. Adding a
//! method is a new file, a variant of [`Method`] and one line in [`Method::build`]; the
//! pipeline never matches on the method.

pub mod magnitude;
pub mod sparsegpt;
pub mod wanda;

use quant::block::TapStats;
use quant::hessian::Prepared;
use serde::Serialize;

use crate::{Pattern, PruneError};

/// The methods, as named on the command line and in recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// |W|, compared within each output row (data-free).
    Magnitude,
    /// |W| · ‖X_j‖₂ (Sun et al., 2023), compared within each output row.
    Wanda,
    /// Optimal brain surgeon with weight reconstruction (Frantar & Alistarh, 2023).
    Sparsegpt,
}

/// How SparseGPT chooses which `M − N` weights of an N:M group to prune.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum NmSelect {
    /// The subset whose pruning adds the least reconstruction error in the sweep, counting
    /// how pruning one column of the group changes the later ones (every subset is tried
    /// where there are at most [`sparsegpt::MAX_SUBSETS`]; above that, as `saliency`).
    #[default]
    Exact,
    /// The paper's rule: the `M − N` lowest w² / [H⁻¹]_cc², each column scored alone at
    /// the start of the group (SparseGPT's reference code, llm-compressor).
    Saliency,
}

/// Options that tune a method.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MethodOptions {
    /// SparseGPT: dampening added to diag(H), as a fraction of its mean.
    pub damp: f64,
    /// SparseGPT: columns per block (mask selection and lazy updates).
    pub block: usize,
    /// SparseGPT: N:M group selection.
    pub nm_select: NmSelect,
}

impl Default for MethodOptions {
    fn default() -> Self {
        Self {
            damp: 0.01,
            block: 128,
            nm_select: NmSelect::Exact,
        }
    }
}

impl Method {
    /// The method's implementation.
    pub fn build(self, o: &MethodOptions) -> Box<dyn PruneMethod> {
        match self {
            Self::Magnitude => Box::new(magnitude::Magnitude),
            Self::Wanda => Box::new(wanda::Wanda),
            Self::Sparsegpt => Box::new(sparsegpt::SparseGpt {
                damp: o.damp,
                block: o.block,
                nm_select: o.nm_select,
            }),
        }
    }
}

/// One linear layer to prune.
pub struct LinearJob<'a> {
    /// HF name of the weight (for errors).
    pub name: &'a str,
    /// `[rows, cols]` weight, pruned in place (and updated, for reconstructing methods).
    pub weight: &'a mut [f32],
    /// Output channels.
    pub rows: usize,
    /// Input channels.
    pub cols: usize,
    /// Statistics of the layer's calibration inputs (absent without calibration).
    pub stats: Option<&'a TapStats>,
    /// The factored Hessian of those inputs (only for methods that ask for it).
    pub hessian: Option<&'a Prepared>,
    /// Which weights may be kept.
    pub pattern: Pattern,
}

/// A pruning method for one linear layer at a time.
pub trait PruneMethod: Send + Sync {
    /// Its name.
    fn name(&self) -> &'static str;
    /// Whether it needs calibration inputs.
    fn needs_calibration(&self) -> bool;
    /// Whether it needs the factored Hessian of the inputs ([`LinearJob::hessian`]).
    fn needs_hessian(&self) -> bool {
        false
    }
    /// The Hessian dampening it wants (methods that need one).
    fn damp(&self) -> f64 {
        0.01
    }
    /// Conjugate-gradient refit steps it runs by default once a linear's mask is chosen
    /// ([`crate::refit`]; 0: none, the method's own weights are kept).
    fn default_refit(&self) -> usize {
        0
    }
    /// Prunes one linear layer in place.
    fn prune_linear(&self, job: LinearJob<'_>) -> Result<(), PruneError>;
}
