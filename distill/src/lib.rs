//! Training and knowledge distillation on burn autodiff: the whole model as one module
//! ([`lm::CausalLm`], built from the engine's own decoder blocks), distillation losses
//! ([`loss`]), learning-rate schedules ([`schedule`]), training windows ([`data`]) and the
//! loop ([`train::Trainer`]: AdamW, accumulation to a token budget, global-norm clipping),
//! optionally on LoRA adapters only ([`lora`]) or with fake-quantized linears
//! (quantization-aware training, [`qat`]), or LoRA on a 4-bit NF4 base (QLoRA, [`qlora`]).

pub mod adamw;
pub mod cache;
pub mod checkpoint;
pub mod data;
pub mod lm;
pub mod loftq;
pub mod lora;
pub mod loss;
pub mod pairs;
pub mod qat;
pub mod qlora;
pub mod schedule;
pub mod train;

pub use lm::CausalLm;
pub use lora::{LoraOptions, LoraTarget};
pub use loss::{Divergence, LossSpec, Teacher, TeacherOut};
pub use qat::{QatInit, QatOptions};
pub use train::{AdamWOptions, HiddenLoss, MicroBatch, StepLog, Trainer};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    /// Reading a model failed.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// Teacher and student cannot be paired, or an option does not fit the models.
    #[error("{0}")]
    Invalid(String),
    /// A step's loss or gradient was NaN or infinite; the step was not applied.
    #[error("step {step}: the {what} is not finite (NaN or infinity); the step was not applied")]
    NonFinite {
        /// The optimizer step that failed (1-based, as logged).
        step: usize,
        /// `loss` or `gradient norm`.
        what: &'static str,
    },
}

/// This crate's result.
pub type Result<T> = std::result::Result<T, DistillError>;
