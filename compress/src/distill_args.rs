//! The arguments of `compress distill` (and, through it, `compress qat`): one typed clap
//! struct and the enums its options take.

use anyhow::bail;
use distill::LoraTarget;
use distill::loss::LossKind;
use distill::schedule::Decay;

use crate::hf_folder::Dtype;

/// The device of `--device`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// burn's Flex CPU backend.
    Cpu,
    /// burn's CUDA backend, GPU 0.
    Cuda,
}

impl DeviceKind {
    /// The burn device, or an error when this build lacks the backend.
    pub fn device(self) -> anyhow::Result<model::Device> {
        match self {
            Self::Cpu => Ok(model::Device::flex()),
            #[cfg(feature = "cuda")]
            Self::Cuda => Ok(model::Device::cuda(0)),
            #[cfg(not(feature = "cuda"))]
            Self::Cuda => bail!(
                "--device cuda: this build has no CUDA backend (build with `cargo build --release -p compress --features cuda`)"
            ),
        }
    }
}

/// What a LoRA run writes.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraSave {
    /// The student with the adapters merged into its weights.
    Merged,
    /// The adapters alone, in HF PEFT's layout.
    Adapters,
    /// The merged student, and the adapters in OUT/adapter.
    Both,
}

/// `--base-scheme`: the 4-bit scheme a QLoRA base is held in.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseScheme {
    /// NormalFloat-4 (QLoRA), as `compress quant --scheme nf4`.
    Nf4,
}

/// `--lora-init`: how QLoRA adapters start.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInitArg {
    /// A random, B zero (LoRA's start).
    Gaussian,
    /// LoftQ (Li et al., 2023).
    Loftq,
}

/// What `--data` holds and how it is trained on.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Text; KD from the teacher's logits, or CE.
    Whitebox,
    /// JSONL (prompt, response) pairs; CE on the responses.
    Blackbox,
}

impl Args {
    /// The loss asked for, or the mode's default.
    pub fn loss(&self) -> LossKind {
        self.loss.unwrap_or(match self.mode {
            Mode::Whitebox => LossKind::Fkl,
            Mode::Blackbox => LossKind::Ce,
        })
    }
}

/// Arguments of `distill`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The student to train: an HF folder or a .gguf file (never modified), e.g. a pruned
    /// model of the teacher's family.
    #[arg(long)]
    pub student: Option<crate::Path>,
    /// The teacher (same tokenizer), run live beside the student: needed by the KD losses
    /// unless --teacher-cache is given; refused with --loss ce.
    #[arg(long)]
    pub teacher: Option<crate::Path>,
    /// Only write a teacher cache to FILE and exit: the teacher's --top-k log-probabilities
    /// at --temperature for every window of --data (no --student, no --out).
    #[arg(long, value_name = "FILE")]
    pub cache_teacher: Option<crate::Path>,
    /// Distill from a teacher cache written by --cache-teacher instead of a live teacher
    /// (same data, --seq-len and --temperature).
    #[arg(long, value_name = "FILE")]
    pub teacher_cache: Option<crate::Path>,
    /// KD against the teacher's K most probable tokens per position plus one bucket for the
    /// rest (what a cache stores) [default: all tokens live; 64 for --cache-teacher].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Training text (UTF-8), cut into windows of --seq-len tokens.
    #[arg(long)]
    pub data: crate::Path,
    /// Output folder (HF layout: config.json, model.safetensors, tokenizer, train_log.jsonl,
    /// distill_report.json).
    #[arg(long)]
    pub out: Option<crate::Path>,
    /// What the data is: text for white-box KD (the teacher's logits) or CE, or, for
    /// black-box distillation, JSONL (prompt, response) pairs (e.g. from `compress generate`
    /// or a hosted model) trained on with CE on the response tokens only.
    #[arg(long, value_enum, default_value_t = Mode::Whitebox)]
    pub mode: Mode,
    /// The loss: KD from the teacher's logits (fkl, rkl, jsd) or plain CE on the data
    /// [default: fkl; ce with --mode blackbox].
    #[arg(long, value_enum)]
    pub loss: Option<LossKind>,
    /// KD: softmax temperature of teacher and student (the KD term is scaled by T²) [default: 1].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// JSD: the teacher's share of the mixture, in (0, 1) [default: 0.5].
    #[arg(long)]
    pub jsd_beta: Option<f64>,
    /// KD: weight of cross-entropy on the data, added to the KD term [default: 0].
    #[arg(long)]
    pub ce_weight: Option<f64>,
    /// Tokens to train on (predicted positions), rounded up to whole optimizer steps
    /// [default: one pass over the data].
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Tokens per training window.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Tokens per optimizer step (whole windows; gradients accumulate over micro-batches).
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    /// Windows per forward/backward pass (memory grows with it).
    #[arg(long, default_value_t = 1)]
    pub micro_batch: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Warmup as a fraction of the optimizer steps.
    #[arg(long, default_value_t = 0.05)]
    pub warmup: f64,
    /// Decay after warmup.
    #[arg(long, value_enum, default_value_t = Decay::Cosine)]
    pub decay: Decay,
    /// Final learning rate as a fraction of the peak.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Seed of the window order: the same seed and options give the same weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Add a hidden-state loss with this weight: squared error between student and teacher
    /// block outputs (per token, mean over the hidden dimension, summed over --hidden-layers);
    /// needs a live --teacher.
    #[arg(long)]
    pub hidden_weight: Option<f64>,
    /// Hidden-state loss: STUDENT:TEACHER block pairs, 0-based (e.g. 0:1,1:3) [default: every
    /// student block, mapped to the teacher block at the same relative depth].
    #[arg(long, value_name = "S:T,...")]
    pub hidden_layers: Option<String>,
    /// Hidden-state loss between different widths: learn a linear projection of each mapped
    /// student block to the teacher's width (needed when widths differ, refused otherwise).
    #[arg(long)]
    pub hidden_projection: bool,
    /// LoRA: train rank-R adapters on --lora-targets only, every other weight frozen; the
    /// adapters are merged into the written model.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA: scale numerator (updates are scaled by alpha / rank) [default: 2 x rank].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA: the adapted linears of every block [default: q_proj,v_proj, PEFT's for Llama].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub lora_targets: Option<Vec<LoraTarget>>,
    /// LoRA: what OUT holds: the merged model, the adapters alone in HF PEFT's layout
    /// (adapter_config.json, adapter_model.safetensors; the base is --student, which PEFT
    /// loads when it is an HF folder), or both (adapters in OUT/adapter) [default: merged].
    #[arg(long, value_enum)]
    pub lora_save: Option<LoraSave>,
    /// QLoRA: hold the frozen student's decoder linears in this 4-bit scheme (packed codes and
    /// per-block absmax, dequantized on the fly in every forward pass) while the LoRA adapters
    /// train in f32; needs --lora-rank.
    #[arg(long, value_enum)]
    pub base_scheme: Option<BaseScheme>,
    /// --base-scheme: how the adapters start: `gaussian` (as LoRA: A random, B zero, so
    /// training starts at the 4-bit base) or `loftq` (LoftQ, PEFT's
    /// init_lora_weights="loftq": base and adapters chosen together so that their sum
    /// approximates the student's weights) [default: gaussian].
    #[arg(long, value_enum)]
    pub lora_init: Option<LoraInitArg>,
    /// --lora-init loftq: alternations of 4-bit quantization and truncated SVD, 1 to 16
    /// (PEFT's loftq_iter) [default: 1].
    #[arg(long)]
    pub loftq_iter: Option<usize>,
    /// --base-scheme: values per absmax block (32, 64, ..., 4096; every input width has to be
    /// a multiple of it) [default: 64].
    #[arg(long)]
    pub block: Option<usize>,
    /// --base-scheme: QLoRA double quantization (the absmax values to 8 bits in blocks of 256).
    #[arg(long)]
    pub double_quant: bool,
    /// Quantize the trained student again with `compress quant --method METHOD` (adapters
    /// merged first; e.g. after QLoRA): OUT then holds the quantized model (quant's default
    /// format: packed for 2, 4 and 8 bits, else dense) and its quant_report.json; gptq and awq
    /// calibrate on --data in windows of --seq-len.
    #[arg(long, value_enum, value_name = "METHOD")]
    pub requant: Option<quant::method::MethodKind>,
    /// --requant: bits per weight code [default: 4].
    #[arg(long)]
    pub requant_bits: Option<u8>,
    /// --requant: input channels per scale [default: 128].
    #[arg(long)]
    pub requant_group: Option<usize>,
    /// --requant: symmetric (no zero point).
    #[arg(long)]
    pub requant_sym: bool,
    /// Save a checkpoint every N optimizer steps into OUT.checkpoints/checkpoint-STEP (an HF
    /// model plus the training state); 0: none.
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Checkpoints kept, the newest (0: all).
    #[arg(long)]
    pub save_limit: Option<usize>,
    /// Keep OUT.checkpoints after the run completes (by default it is removed).
    #[arg(long)]
    pub keep_checkpoints: bool,
    /// Continue from the newest checkpoint in OUT.checkpoints; refused when the student,
    /// teacher, data or training options differ from the checkpointed run.
    #[arg(long)]
    pub resume: bool,
    /// Storage type of the written weights.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// Where to train: the CPU (burn's Flex backend) or the first CUDA GPU (a build with the
    /// `cuda` feature: `cargo build --release -p compress --features cuda`).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
}
