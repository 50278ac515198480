//! GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
//! Pre-trained Transformers"): quantize one input column at a time and push each column's
//! rounding error onto the columns not yet quantized, weighted by the inverse Hessian
//! H = 2 X Xᵀ of the layer's calibration inputs. Columns go in blocks of 128 with lazy
//! updates, optionally in activation order (largest diag(H) first), and the linear layers of
//! a block are quantized in true-sequential order: q/k/v, then o, then gate/up, then down,
//! each with inputs produced by the layers already quantized.

use std::collections::BTreeMap;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par, Side};
use model::Tensor;
use model::transformer::{Positions, Tap};

use super::{BlockJob, BlockResult, Outputs, QuantMethod};
use crate::QuantError;
use crate::block::{TapStats, capture_stage};
use crate::scheme::{GroupParams, QuantScheme, QuantizedLinear};

/// GPTQ's options.
#[derive(Debug, Clone)]
pub struct Gptq {
    /// Dampening added to diag(H), as a fraction of its mean (0.01 in the paper's code).
    pub damp: f64,
    /// Columns per lazy-update block.
    pub block: usize,
    /// Quantize columns in order of decreasing diag(H).
    pub act_order: bool,
}

impl Default for Gptq {
    fn default() -> Self {
        Self {
            damp: 0.01,
            block: 128,
            act_order: false,
        }
    }
}

/// What GPTQ needs of one Hessian, shared by every linear that reads the same inputs.
pub struct Prepared {
    /// Visiting order of the columns.
    pub perm: Vec<usize>,
    /// Columns (in visiting order) whose inputs were never active.
    pub dead: Vec<bool>,
    /// Cholesky factorization of the dampened H⁻¹ (in visiting order); its lower factor `L`
    /// is Uᵀ, read in place rather than copied.
    pub l: faer::linalg::solvers::Llt<f32>,
}

/// Factors `h` = Σ x xᵀ `[cols, cols]` (consumed, so its memory is free for the factors):
/// columns in visiting order, dead inputs (never active) given H_ii = 1, dampening added,
/// then the upper Cholesky factor of H⁻¹ (more dampening if H is not positive definite). The
/// Hessian and its factors are f32 as in the reference implementation: at 7B widths (11008
/// inputs) each copy is 485 MB, and at most two are held at a time.
pub fn prepare(h: Vec<f32>, cols: usize, name: &str, opts: &Gptq) -> Result<Prepared, QuantError> {
    let perm: Vec<usize> = if opts.act_order {
        let mut p: Vec<usize> = (0..cols).collect();
        p.sort_by(|&a, &b| {
            h[b * cols + b]
                .partial_cmp(&h[a * cols + a])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        p
    } else {
        (0..cols).collect()
    };
    let dead: Vec<bool> = (0..cols)
        .map(|i| h[perm[i] * cols + perm[i]] == 0.0)
        .collect();
    let diag = |i: usize| {
        if dead[i] {
            1.0
        } else {
            2.0 * h[perm[i] * cols + perm[i]] as f64
        }
    };
    let mean_diag = (0..cols).map(diag).sum::<f64>() / cols as f64;
    let mut damp = opts.damp;
    let mut hd = Mat::<f32>::from_fn(cols, cols, |i, j| {
        if i == j {
            (diag(i) + damp * mean_diag) as f32
        } else if dead[i] || dead[j] {
            0.0
        } else {
            2.0 * h[perm[i] * cols + perm[j]]
        }
    });
    drop(h);
    let llt = loop {
        if let Ok(l) = hd.llt(Side::Lower) {
            break l;
        }
        // Not positive definite: ten times the dampening.
        let extra = (9.0 * damp * mean_diag) as f32;
        damp *= 10.0;
        if damp > 10.0 {
            return Err(QuantError::Numerical(format!(
                "`{name}`: the Hessian is not positive definite even with dampening"
            )));
        }
        for i in 0..cols {
            hd[(i, i)] += extra;
        }
    };
    drop(hd);
    let inv = {
        use faer::linalg::solvers::DenseSolveCore;
        llt.inverse()
    };
    drop(llt);
    let l = inv.llt(Side::Lower).map_err(|_| {
        QuantError::Numerical(format!(
            "`{name}`: the inverse Hessian could not be factored"
        ))
    })?;
    drop(inv);
    Ok(Prepared { perm, dead, l })
}

/// Quantizes `w` `[rows, cols]` given `h` = Σ x xᵀ `[cols, cols]`; returns the integer form.
pub fn gptq_linear(
    scheme: &QuantScheme,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f32],
    opts: &Gptq,
) -> Result<QuantizedLinear, QuantError> {
    let prep = prepare(h.to_vec(), cols, name, opts)?;
    gptq_prepared(scheme, name, w, rows, cols, &prep, opts)
}

/// As [`gptq_linear`], with the Hessian already factored by [`prepare`].
pub fn gptq_prepared(
    scheme: &QuantScheme,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    prep: &Prepared,
    opts: &Gptq,
) -> Result<QuantizedLinear, QuantError> {
    let g = scheme.group_len(name, cols)?;
    let groups = cols.div_ceil(g);
    let (perm, dead) = (&prep.perm, &prep.dead);
    let u = prep.l.L().transpose();
    let mut wm = Mat::<f32>::from_fn(rows, cols, |r, c| {
        if dead[c] { 0.0 } else { w[r * cols + perm[c]] }
    });

    let mut codes = vec![0u8; rows * cols];
    let mut params = vec![
        GroupParams {
            scale: 1.0,
            zero: 0
        };
        rows * groups
    ];
    let mut g_idx = vec![0u32; cols];
    let par = Par::rayon(0);
    for i1 in (0..cols).step_by(opts.block) {
        let i2 = (i1 + opts.block).min(cols);
        let count = i2 - i1;
        let mut err = Mat::<f32>::zeros(rows, count);
        for i in 0..count {
            let c = i1 + i;
            let grp = c / g;
            if c % g == 0 {
                // Group parameters from the error-updated weights, as the reference code does.
                for r in 0..rows {
                    params[r * groups + grp] =
                        scheme.params((c..(c + g).min(cols)).map(|j| wm[(r, j)]));
                }
            }
            g_idx[perm[c]] = grp as u32;
            let d = u[(c, c)];
            for r in 0..rows {
                let p = params[r * groups + grp];
                let x = wm[(r, c)];
                let code = scheme.code(x, p);
                codes[r * cols + perm[c]] = code;
                err[(r, i)] = (x - QuantScheme::value(code, p)) / d;
            }
            for j in i + 1..count {
                let f = u[(c, i1 + j)];
                if f != 0.0 {
                    for r in 0..rows {
                        wm[(r, i1 + j)] -= err[(r, i)] * f;
                    }
                }
            }
        }
        if i2 < cols {
            matmul(
                wm.as_mut().submatrix_mut(0, i2, rows, cols - i2),
                Accum::Add,
                err.as_ref(),
                u.submatrix(i1, i2, count, cols - i2),
                -1.0,
                par,
            );
        }
    }
    Ok(QuantizedLinear {
        rows,
        cols,
        codes,
        params,
        groups,
        g_idx,
    })
}

impl QuantMethod for Gptq {
    fn name(&self) -> &'static str {
        "gptq"
    }

    fn needs_calibration(&self) -> bool {
        true
    }

    fn quantize_block(&self, job: &mut BlockJob<'_>) -> Result<BlockResult, QuantError> {
        let mut linears = BTreeMap::new();
        let mut stats = BTreeMap::new();
        let mut reference = BTreeMap::new();
        let stages: [(Tap, &[&str]); 4] = [
            (
                Tap::QkvInput,
                &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ),
            (Tap::OInput, &["self_attn.o_proj"]),
            (Tap::GateUpInput, &["mlp.gate_proj", "mlp.up_proj"]),
            (Tap::DownInput, &["mlp.down_proj"]),
        ];
        let mut staged = StagedRun::new(job.inputs.clone());
        for (tap, names) in stages {
            // The burn copy of the block lives only while the stage's inputs are computed, so
            // at most one copy of the weights sits beside the Hessian's factors.
            let st = {
                let block = job.weights.build(job.cfg, job.device);
                staged.advance(&block, job.rope, tap, true, job.sample_rows)
            };
            let mut st = st;
            let h = st.xtx.take().expect("xtx captured");
            // One factorization serves every linear of the stage (same inputs, same H).
            let prep = prepare(h, st.width, &format!("{}.weight", names[0]), self)?;
            for name in names {
                let t = job.weights.get(&format!("{name}.weight"));
                let (rows, cols) = (t.shape[0], t.shape[1]);
                reference.insert(name.to_string(), t.data.clone());
                let q = gptq_prepared(
                    &job.scheme,
                    &format!("{name}.weight"),
                    &t.data,
                    rows,
                    cols,
                    &prep,
                    self,
                )?;
                job.weights.get_mut(&format!("{name}.weight")).data = q.dequantize();
                linears.insert(name.to_string(), q);
                stats.insert(name.to_string(), st.without_xtx());
            }
        }
        let block = job.weights.build(job.cfg, job.device);
        let outputs = staged.finish(&block, job.rope);
        Ok(BlockResult {
            linears,
            reference,
            stats,
            outputs: Outputs::Quantized(outputs),
        })
    }
}

/// Runs a block stage by stage over all windows, so each stage's inputs come from the
/// layers already quantized, computing every intermediate once.
pub struct StagedRun {
    x: Vec<Tensor<3>>,
    h: Vec<Tensor<3>>,
    n: Vec<Tensor<3>>,
}

impl StagedRun {
    /// Starts from the block inputs.
    pub fn new(x: Vec<Tensor<3>>) -> Self {
        Self {
            x,
            h: Vec::new(),
            n: Vec::new(),
        }
    }

    /// Computes the inputs of `tap` with `block` (whose earlier layers are final) and their
    /// statistics.
    pub fn advance(
        &mut self,
        block: &model::transformer::DecoderLayer,
        rope: &model::transformer::Rope,
        tap: Tap,
        xtx: bool,
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
            Tap::OInput => self
                .n
                .iter()
                .map(|n| block.self_attn.context(n.clone(), Positions::Causal(rope)))
                .collect(),
            Tap::GateUpInput => {
                self.h = self
                    .x
                    .iter()
                    .zip(&self.n)
                    .map(|(x, n)| {
                        x.clone()
                            + block.self_attn.o_proj.forward(
                                block.self_attn.context(n.clone(), Positions::Causal(rope)),
                            )
                    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::quantize_rtn;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    /// On correlated inputs GPTQ's output error must beat round-to-nearest's.
    #[test]
    fn gptq_beats_rtn_on_output_error() {
        let (rows, cols, n) = (16, 64, 512);
        let mut s = 7u64;
        let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s) as f32).collect();
        // Inputs with a shared component so columns are correlated, and uneven scales.
        let mut x = vec![0f64; n * cols];
        for t in 0..n {
            let common = lcg(&mut s);
            for c in 0..cols {
                x[t * cols + c] = (0.7 * common + 0.3 * lcg(&mut s)) * (1.0 + (c % 7) as f64);
            }
        }
        let mut h = vec![0f64; cols * cols];
        for t in 0..n {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += x[t * cols + i] * x[t * cols + j];
                }
            }
        }
        let out_err = |q: &[f32]| -> f64 {
            let mut e = 0.0;
            for t in 0..n {
                for r in 0..rows {
                    let d: f64 = (0..cols)
                        .map(|c| x[t * cols + c] * (w[r * cols + c] - q[r * cols + c]) as f64)
                        .sum();
                    e += d * d;
                }
            }
            e
        };
        for (bits, group, act) in [(4u8, Some(16), false), (3, None, true), (4, Some(16), true)] {
            let scheme = QuantScheme::new(bits, group, false).unwrap();
            let rtn = quantize_rtn(&scheme, "w", &w, rows, cols)
                .unwrap()
                .dequantize();
            let opts = Gptq {
                act_order: act,
                ..Gptq::default()
            };
            let h32: Vec<f32> = h.iter().map(|&v| v as f32).collect();
            let gq = gptq_linear(&scheme, "w", &w, rows, cols, &h32, &opts).unwrap();
            let (er, eg) = (out_err(&rtn), out_err(&gq.dequantize()));
            assert!(
                eg < 0.8 * er,
                "bits {bits} group {group:?} act {act}: gptq {eg} vs rtn {er}"
            );
            // Every column's group index is within range and codes are within bits.
            assert!(gq.g_idx.iter().all(|&g| (g as usize) < gq.groups));
            assert!(gq.codes.iter().all(|&c| (c as i32) <= scheme.qmax()));
        }
    }
}
