//! Pruning of decoder-only language models. Unstructured and N:M sparsity (magnitude, Wanda,
//! SparseGPT: one file each behind [`method::PruneMethod`]) keep every tensor's shape and set
//! pruned weights to exact zeros; structured pruning ([`structured`]) removes whole attention
//! heads (KV groups), MLP channels or decoder layers and writes a smaller model whose config
//! matches its tensors. Both run on the layer-by-layer engine, one block resident.

pub mod mask;
pub mod method;
pub mod owl;
pub mod pipeline;
pub mod refit;
pub mod sparse;
pub mod structured;

use serde::Serialize;

/// Errors of pruning.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// From the model crate (files, tensors).
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// From the quantization crate (calibration, shared statistics, sinks).
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
    /// A bad option or input.
    #[error("{0}")]
    Input(String),
    /// A numerical failure (non-finite values, a Hessian that cannot be factored).
    #[error("{0}")]
    Numerical(String),
}

/// Which weights of a linear layer may be kept.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Pattern {
    /// A fraction of each linear's weights set to zero, anywhere.
    Unstructured {
        /// Fraction pruned, in [0, 1).
        sparsity: f64,
    },
    /// Semi-structured: among every `m` consecutive input weights of a row at most `n` are
    /// kept (2:4 is what sparse tensor cores run).
    NofM {
        /// Kept per group.
        n: usize,
        /// Group length.
        m: usize,
    },
}

impl Pattern {
    /// Unstructured sparsity, checked to lie in [0, 1).
    pub fn unstructured(sparsity: f64) -> Result<Self, PruneError> {
        if !(0.0..1.0).contains(&sparsity) {
            return Err(PruneError::Input(format!(
                "--sparsity {sparsity} is outside [0, 1)"
            )));
        }
        Ok(Self::Unstructured { sparsity })
    }

    /// Parses `N:M` (e.g. `2:4`), with 1 <= N < M <= 64.
    pub fn parse_nm(s: &str) -> Result<Self, PruneError> {
        let bad = || {
            PruneError::Input(format!(
                "--pattern `{s}`: expected N:M with 1 <= N < M <= 64, e.g. 2:4"
            ))
        };
        let (n, m) = s.split_once(':').ok_or_else(bad)?;
        let (n, m): (usize, usize) = (
            n.trim().parse().map_err(|_| bad())?,
            m.trim().parse().map_err(|_| bad())?,
        );
        if n == 0 || n >= m || m > 64 {
            return Err(bad());
        }
        Ok(Self::NofM { n, m })
    }

    /// The fraction of weights this pattern removes.
    pub fn sparsity(&self) -> f64 {
        match *self {
            Self::Unstructured { sparsity } => sparsity,
            Self::NofM { n, m } => 1.0 - n as f64 / m as f64,
        }
    }

    /// Checks that a linear of `cols` inputs can take the pattern (M divides the width).
    pub fn check_width(&self, tensor: &str, cols: usize) -> Result<(), PruneError> {
        if let Self::NofM { n, m } = *self
            && !cols.is_multiple_of(m)
        {
            return Err(PruneError::Input(format!(
                "--pattern {n}:{m}: M does not divide the {cols} input channels of `{tensor}`"
            )));
        }
        Ok(())
    }

    /// A short label: `50%` or `2:4`.
    pub fn label(&self) -> String {
        match *self {
            Self::Unstructured { sparsity } => format!("{:.0}%", sparsity * 100.0),
            Self::NofM { n, m } => format!("{n}:{m}"),
        }
    }
}
