//! Evaluation: perplexity with llama.cpp's `llama-perplexity` protocol (or the HF protocol
//! of the AWQ/GPTQ papers) on the layer-by-layer engine, plus size and speed figures and the
//! JSON report every stage writes.

pub mod perplexity;
pub mod report;

pub use perplexity::{PplOptions, PplResult, Protocol, perplexity};
pub use report::{SizeReport, SpeedReport};
