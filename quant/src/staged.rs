//! A decoder block run stage by stage over every calibration window, so the inputs of each
//! group of linear layers come from the layers already transformed (quantized or pruned)
//! before it: the "true-sequential" order of GPTQ and SparseGPT.

use model::Tensor;
use model::transformer::{Positions, Tap};

use crate::block::{TapStats, capture_stage};

/// Runs a block stage by stage over all windows, so each stage's inputs come from the
/// layers already quantized, computing every intermediate once.
pub struct StagedRun {
    x: Vec<Tensor<3>>,
    h: Vec<Tensor<3>>,
    n: Vec<Tensor<3>>,
    /// Attention context of the current block (o_proj's input), once q/k/v are final.
    ctx: Vec<Tensor<3>>,
}

impl StagedRun {
    /// Starts from the block inputs.
    pub fn new(x: Vec<Tensor<3>>) -> Self {
        Self {
            x,
            h: Vec::new(),
            n: Vec::new(),
            ctx: Vec::new(),
        }
    }

    /// Computes the inputs of `tap` with `block` (whose earlier layers are final) and their
    /// statistics.
    pub fn advance(
        &mut self,
        block: &model::transformer::DecoderLayer,
        rope: &model::transformer::Rope,
        tap: Tap,
        xtx: Option<f32>,
        sample_rows: usize,
    ) -> TapStats {
        let inputs: Vec<Tensor<3>> = match tap {
            Tap::QkvInput => {
                self.n = self
                    .x
                    .iter()
                    .map(|x| block.input_layernorm.forward(x.clone()))
                    .collect();
                self.n.clone()
            }
            Tap::OInput => {
                // q/k/v are final here, so the attention context is too: kept for the next stage.
                self.ctx = self
                    .n
                    .iter()
                    .map(|n| block.self_attn.context(n.clone(), Positions::Causal(rope)))
                    .collect();
                self.ctx.clone()
            }
            Tap::GateUpInput => {
                if self.ctx.len() != self.x.len() {
                    self.ctx = self
                        .n
                        .iter()
                        .map(|n| block.self_attn.context(n.clone(), Positions::Causal(rope)))
                        .collect();
                }
                self.h = self
                    .x
                    .iter()
                    .zip(std::mem::take(&mut self.ctx))
                    .map(|(x, c)| x.clone() + block.self_attn.o_proj.forward(c))
                    .collect();
                self.n = self
                    .h
                    .iter()
                    .map(|h| block.post_attention_layernorm.forward(h.clone()))
                    .collect();
                self.n.clone()
            }
            Tap::DownInput => self
                .n
                .iter()
                .map(|n| {
                    burn_silu(block.mlp.gate_proj.forward(n.clone()))
                        * block.mlp.up_proj.forward(n.clone())
                })
                .collect(),
        };
        capture_stage(&inputs, xtx, sample_rows)
    }

    /// The block outputs once every layer is final.
    pub fn finish(
        self,
        block: &model::transformer::DecoderLayer,
        _rope: &model::transformer::Rope,
    ) -> Vec<Tensor<3>> {
        self.h
            .into_iter()
            .zip(self.n)
            .map(|(h, n)| {
                let act = burn_silu(block.mlp.gate_proj.forward(n.clone()))
                    * block.mlp.up_proj.forward(n);
                h + block.mlp.down_proj.forward(act)
            })
            .collect()
    }
}

fn burn_silu(x: Tensor<3>) -> Tensor<3> {
    model::transformer::silu(x)
}
