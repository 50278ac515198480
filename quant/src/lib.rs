//! Post-training quantization. GGUF block quantizers (the formats themselves are declared in
//! `model::gguf::blocks`, which the reader needs), and the weight-only methods (RTN, AWQ,
//! GPTQ) behind one small trait, and the data-free bitsandbytes schemes (NF4, FP4, int8-absmax).

pub mod block;
pub mod blocks;
pub mod calib;
pub mod gguf_auto;
pub mod gguf_calib;
pub mod gguf_export;
pub mod gguf_grid;
pub mod gguf_meta;
pub mod gguf_plan;
pub mod hessian;
pub mod method;
pub mod nf4;
pub mod pack;
pub mod pipeline;
pub mod scheme;
pub mod staged;

/// Errors of quantization.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// From the model crate (files, tensors).
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The scheme cannot be applied.
    #[error(transparent)]
    Scheme(#[from] scheme::SchemeError),
    /// A bad option or input.
    #[error("{0}")]
    Input(String),
    /// A numerical failure (non-finite values, a Hessian that cannot be factored).
    #[error("{0}")]
    Numerical(String),
}
