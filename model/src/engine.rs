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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_rejects_out_of_range_and_empty_input() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::testkit::tiny_config();
        cfg["num_hidden_layers"] = 1.into();
        crate::testkit::write_hf(dir.path(), &cfg, 7, |_, _| {});
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let engine = LayerEngine::new(&ckpt, crate::default_device(), 8);
        let mut g = Generator::load(&engine, 8).unwrap();
        let v = ckpt.config().vocab_size as u32;
        for bad in [vec![v], vec![3, v + 7], vec![u32::MAX]] {
            let e = g.forward(&bad).unwrap_err().to_string();
            assert!(
                e.contains("outside the vocabulary of 300")
                    && e.contains(&dir.path().display().to_string()),
                "{e}"
            );
            // Checked before anything ran: the cache is untouched.
            assert_eq!(g.cached(), 0);
        }
        assert!(g.forward(&[]).is_err());
        assert!(g.generate(&[2, v], 3).is_err());
        // In range still works, and the last id of the vocabulary is in range.
        assert_eq!(g.forward(&[2, v - 1]).unwrap().len(), v as usize);
        assert_eq!(g.generate(&[2, 3], 3).unwrap().len(), 3);
    }

    #[test]
    fn decoding_token_by_token_gives_the_prefills_logits() {
        // tiny_config has 4 query heads on 2 key/value heads: decoding takes the grouped path.
        let dir = tempfile::tempdir().unwrap();
        crate::testkit::write_hf(dir.path(), &crate::testkit::tiny_config(), 9, |_, _| {});
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let engine = LayerEngine::new(&ckpt, crate::default_device(), 16);
        let mut g = Generator::load(&engine, 16).unwrap();
        let seq = [3u32, 77, 150, 9, 299, 42, 8];
        let prefill = g.forward(&seq).unwrap();
        g.reset();
        let mut step = Vec::new();
        for &t in &seq {
            step = g.forward(&[t]).unwrap();
        }
        let diff = prefill
            .iter()
            .zip(&step)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-4,
            "decoded logits differ from the prefill's by {diff}"
        );
    }

    #[test]
    fn batched_decoding_gives_each_sequence_its_own_logits() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::testkit::tiny_config();
        crate::testkit::write_hf(dir.path(), &cfg, 7, |_, _| {});
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let engine = LayerEngine::new(&ckpt, crate::default_device(), 8);
        let mut g = Generator::load(&engine, 8).unwrap();
        let seqs = [[5u32, 9, 200, 3], [17, 17, 4, 250], [1, 2, 3, 4]];
        let single: Vec<Vec<f32>> = seqs
            .iter()
            .map(|s| {
                g.reset();
                s.iter().map(|&t| g.forward(&[t]).unwrap()).last().unwrap()
            })
            .collect();
        g.reset();
        let mut batched = Vec::new();
        for step in 0..4 {
            let col: Vec<u32> = seqs.iter().map(|s| s[step]).collect();
            batched = g.forward_batch(&col).unwrap();
        }
        let v = ckpt.config().vocab_size;
        assert_eq!(batched.len(), 3 * v);
        for (i, one) in single.iter().enumerate() {
            let diff = one
                .iter()
                .zip(&batched[i * v..(i + 1) * v])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "sequence {i}: batched logits differ by {diff}");
        }
        // A batch of another size on this cache is refused.
        assert!(g.forward_batch(&[1, 2]).is_err());
    }
}
