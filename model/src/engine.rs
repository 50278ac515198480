//! The layer-by-layer engine: every window goes through block 0, then every window through
//! block 1, and so on, with only one block's weights in memory. Evaluation, calibration and
//! pruning all drive it; a caller sees each block and its inputs through a callback.

use burn::nn::RmsNorm;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::transformer::{DecoderLayer, Rope, WindowLayout, rms_norm_from, tensor_from};

/// Tokens of the windows that [`LayerEngine::run_blocks_with`] runs through a block together:
/// enough rows for the matrix products to use every core, few enough to keep the
/// intermediate activations (`tokens x intermediate_size` floats) small.
pub const BATCH_TOKENS: usize = 1024;

/// Activations of all windows between blocks, one `[1, seq, hidden]` tensor per window.
pub type States = Vec<Tensor<3>>;

/// The final norm and the output projection.
#[derive(Debug)]
pub struct Head {
    norm: RmsNorm,
    /// `[hidden, vocab]`.
    lm_head: Tensor<2>,
    vocab: usize,
}

impl Head {
    /// Logits `[n, vocab]` (row-major, f32) for positions `from..seq` of one window state.
    pub fn logits(&self, state: &Tensor<3>, from: usize) -> Vec<f32> {
        let [_, seq, hidden] = state.dims();
        let x = state
            .clone()
            .slice([0..1, from..seq, 0..hidden])
            .reshape([seq - from, hidden]);
        let x = self.norm.forward(x);
        let out = x.matmul(self.lm_head.clone());
        out.into_data().try_into_vec::<f32>().expect("f32 logits")
    }

    /// Logits `[n, vocab]` (row-major, f32) of `n` final states `[n, hidden]`.
    pub fn logits_rows(&self, x: Tensor<2>) -> Vec<f32> {
        let out = self.norm.forward(x).matmul(self.lm_head.clone());
        out.into_data().try_into_vec::<f32>().expect("f32 logits")
    }

    /// Logits `[rows.len(), vocab]` (row-major, f32) for the listed positions of one window
    /// state, in the order given (multiple-choice scoring needs a few scattered positions).
    pub fn logits_at(&self, state: &Tensor<3>, rows: &[usize]) -> Vec<f32> {
        let [_, seq, hidden] = state.dims();
        assert!(
            rows.iter().all(|&r| r < seq),
            "logits_at: a row is outside the window of {seq}"
        );
        if rows.is_empty() {
            return Vec::new();
        }
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &state.device());
        self.logits_rows(state.clone().reshape([seq, hidden]).select(0, idx))
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
}

/// Drives a checkpoint one block at a time.
pub struct LayerEngine<'a> {
    ckpt: &'a Checkpoint,
    device: Device,
    rope: Rope,
}

impl<'a> LayerEngine<'a> {
    /// An engine for windows of at most `max_len` tokens.
    pub fn new(ckpt: &'a Checkpoint, device: Device, max_len: usize) -> Self {
        let rope = Rope::new(ckpt.config(), max_len, &device);
        Self { ckpt, device, rope }
    }

    /// The checkpoint.
    pub fn checkpoint(&self) -> &Checkpoint {
        self.ckpt
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The RoPE tables.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Embeds token windows (reading the embedding matrix once, then dropping it).
    pub fn embed(&self, windows: &[Vec<u32>]) -> Result<States> {
        let c = self.ckpt.config();
        let (v, h) = (c.vocab_size, c.hidden_size);
        let table = self.ckpt.read("model.embed_tokens.weight", &[v, h])?;
        windows
            .iter()
            .map(|w| {
                let mut x = Vec::with_capacity(w.len() * h);
                for &t in w {
                    let t = t as usize;
                    if t >= v {
                        return Err(ModelError::format(
                            self.ckpt.path(),
                            format!("token id {t} is outside the vocabulary of {v} (tokenizer and model disagree)"),
                        ));
                    }
                    x.extend_from_slice(&table[t * h..(t + 1) * h]);
                }
                Ok(tensor_from(x, [1, w.len(), h], &self.device))
            })
            .collect()
    }

    /// Loads block `l`.
    pub fn load_block(&self, l: usize) -> Result<DecoderLayer> {
        DecoderLayer::load(self.ckpt, l, &self.device)
    }

    /// Runs every block over `states` in place. `on_block(l, block, inputs)` runs before
    /// block `l` is applied (calibration hooks read or even replace the block there), and
    /// `progress` is told after each window of each block.
    pub fn run_blocks(
        &self,
        states: &mut States,
        on_block: impl FnMut(usize, &mut DecoderLayer, &States) -> Result<()>,
        progress: impl FnMut(),
    ) -> Result<()> {
        self.run_blocks_with(states, None, on_block, progress)
    }

    /// As [`Self::run_blocks`], with one [`WindowLayout`] per window (explicit positions and
    /// masks, e.g. several answer continuations packed after one shared context).
    pub fn run_blocks_with(
        &self,
        states: &mut States,
        layouts: Option<&[WindowLayout]>,
        mut on_block: impl FnMut(usize, &mut DecoderLayer, &States) -> Result<()>,
        mut progress: impl FnMut(),
    ) -> Result<()> {
        for l in 0..self.ckpt.config().num_hidden_layers {
            let mut block = self.load_block(l)?;
            on_block(l, &mut block, states)?;
            // Windows go through in batches of about BATCH_TOKENS tokens.
            let mut start = 0;
            while start < states.len() {
                let mut end = start + 1;
                let mut tokens = states[start].dims()[1];
                while end < states.len() && tokens + states[end].dims()[1] <= BATCH_TOKENS {
                    tokens += states[end].dims()[1];
                    end += 1;
                }
                let xs: Vec<Tensor<3>> = states[start..end].to_vec();
                let ls = layouts.map(|ls| &ls[start..end]);
                for (s, y) in states[start..end]
                    .iter_mut()
                    .zip(block.forward_windows(xs, ls, &self.rope))
                {
                    *s = y;
                    progress();
                }
                start = end;
            }
        }
        Ok(())
    }

    /// Loads the final norm and lm_head (the embedding when tied).
    pub fn load_head(&self) -> Result<Head> {
        let c = self.ckpt.config();
        let (v, h) = (c.vocab_size, c.hidden_size);
        let norm = rms_norm_from(
            self.ckpt.read("model.norm.weight", &[h])?,
            c.rms_norm_eps,
            &self.device,
        );
        let name = if c.tie_word_embeddings && !self.ckpt.has("lm_head.weight") {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let w = self.ckpt.read(name, &[v, h])?;
        let w = crate::transformer::transpose(&w, v, h);
        Ok(Head {
            norm,
            lm_head: tensor_from(w, [h, v], &self.device),
            vocab: v,
        })
    }
}

pub use crate::decode::Generator;

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
