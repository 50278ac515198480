//! Evaluation: perplexity with llama.cpp's `llama-perplexity` protocol (or the HF protocol
//! of the AWQ/GPTQ papers) on the layer-by-layer engine, plus size and speed figures and the
//! JSON report every stage writes.

pub mod energy;
pub mod kld;
pub mod perplexity;
pub mod report;
pub mod speed;
pub mod tasks;

pub use kld::{KldResult, kl_divergence};
pub use perplexity::{EvalError, PplOptions, PplResult, Protocol, perplexity};
pub use report::{SizeReport, SpeedReport};
pub use tasks::{KNOWN_TASKS, TaskResult, run_tasks};
