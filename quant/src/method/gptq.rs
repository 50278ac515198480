//! GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
//! Pre-trained Transformers"): quantize one input column at a time and push each column's
//! rounding error onto the columns not yet quantized, weighted by the inverse Hessian
//! H = 2 X Xᵀ of the layer's calibration inputs. Columns go in blocks of 128 with lazy
//! updates, optionally in activation order (largest diag(H) first), and the linear layers of
//! a block are quantized in true-sequential order: q/k/v, then o, then gate/up, then down,
//! each with inputs produced by the layers already quantized. Two departures from the
//! reference, both measured on SmolLM2 (BENCHMARKS.md): each window's first position (the
//! attention sink) counts [`Gptq::sink_weight`] times in H, and into GGUF
//! ([`crate::gguf_grid`]) a block's scales are searched against diag(H) as imatrix rounding
//! does.

use std::collections::BTreeMap;

use faer::Mat;
use model::transformer::Tap;

use super::{BlockJob, BlockResult, Outputs, QuantMethod};
use crate::QuantError;
use crate::gguf_export::TypePlan;
use crate::gguf_grid::{gptq_blocks, linear_type};
use crate::hessian::{Prepared, prepare, update_after_block, update_within_block};
use crate::scheme::{GroupParams, QuantScheme, QuantizedLinear};
use crate::staged::StagedRun;

/// GPTQ's options.
#[derive(Debug, Clone)]
pub struct Gptq {
    /// Dampening added to diag(H), as a fraction of its mean (0.01 in the paper's code).
    pub damp: f64,
    /// Columns per lazy-update block.
    pub block: usize,
    /// Quantize columns in order of decreasing diag(H).
    pub act_order: bool,
    /// Take every group's scale and zero point from the original weights before the column
    /// sweep (llm-compressor's and AutoGPTQ's `static_groups`), instead of from the
    /// error-updated weights when the sweep enters the group (the GPTQ reference code).
    pub static_groups: bool,
    /// Keep each linear's unrounded error-updated weights in [`QuantizedLinear::latent`]
    /// (QAT from GPTQ starts there; one f32 copy of the weights more).
    pub keep_latent: bool,
    /// How many times the first position of each calibration window (the attention sink,
    /// which nearly every later token attends to) counts in H. GPTQ weighs every token's
    /// output error alike, but an error in the sink's values reaches every later position:
    /// counted once (the reference code, llm-compressor), the error feedback on v/o_proj
    /// made SmolLM2 worse than plain importance rounding. 1 is plain GPTQ.
    pub sink_weight: f32,
    /// Write every decoder linear into the GGUF block type this plan gives it
    /// ([`crate::gguf_grid`]) instead of the pipeline's integer scheme.
    pub gguf: Option<TypePlan>,
}

/// [`Gptq::sink_weight`]'s default, measured on SmolLM2 (BENCHMARKS.md): W4 g64 asym
/// perplexity / KLD 28.06 / 0.236 at 1, 25.61 / 0.159 at 30, 26.41 / 0.182 at 100; GGUF Q4_0
/// 26.43 at 1, 24.46 / KLD 0.098 at 30, 24.29 / 0.102 at 100, 24.70 at 400.
pub const SINK_WEIGHT: f32 = 30.0;

impl Default for Gptq {
    fn default() -> Self {
        Self {
            damp: 0.01,
            block: 128,
            act_order: false,
            static_groups: false,
            keep_latent: false,
            sink_weight: SINK_WEIGHT,
            gguf: None,
        }
    }
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
    let prep = prepare(h.to_vec(), cols, name, opts.damp, opts.act_order)?;
    gptq_prepared(scheme, name, w, rows, cols, &prep, opts)
}

/// What GPTQ's column sweep asks of a grid: [`sweep`] calls `enter` when it reaches a column
/// (so a grid can fix a group's parameters at its boundary) and `round` for each row of it.
pub(crate) trait ColumnRounder {
    /// The sweep reached visiting position `c`; `wm` holds the error-updated weights (columns
    /// in visiting order).
    fn enter(&mut self, c: usize, wm: &Mat<f32>);
    /// The value that row `r` of visiting position `c` takes for its error-updated value `x`.
    fn round(&mut self, r: usize, c: usize, x: f32) -> f32;
}

/// `w` `[rows, cols]` in `prep`'s visiting order, dead columns zeroed, as GPTQ's sweep starts.
pub(crate) fn sweep_start(w: &[f32], rows: usize, cols: usize, prep: &Prepared) -> Mat<f32> {
    Mat::<f32>::from_fn(rows, cols, |r, c| {
        if prep.dead[c] {
            0.0
        } else {
            w[r * cols + prep.perm[c]]
        }
    })
}

/// GPTQ's column sweep over `wm` (from [`sweep_start`]): each column rounded by `grid`, its
/// error pushed onto the columns not yet visited through the Cholesky factor of H⁻¹, in
/// blocks of `block` columns with lazy updates.
pub(crate) fn sweep(
    wm: &mut Mat<f32>,
    prep: &Prepared,
    block: usize,
    grid: &mut dyn ColumnRounder,
) {
    let (rows, cols) = (wm.nrows(), wm.ncols());
    let u = prep.l.L().transpose();
    for i1 in (0..cols).step_by(block) {
        let i2 = (i1 + block).min(cols);
        let count = i2 - i1;
        let mut err = Mat::<f32>::zeros(rows, count);
        for i in 0..count {
            let c = i1 + i;
            grid.enter(c, wm);
            let d = u[(c, c)];
            for r in 0..rows {
                let x = wm[(r, c)];
                err[(r, i)] = (x - grid.round(r, c, x)) / d;
            }
            update_within_block(wm, &err, u, i1, i, count);
        }
        update_after_block(wm, &err, u, i1, i2);
    }
}

/// The integer scheme's grid for [`sweep`]: a group's scale and zero point from the
/// error-updated weights when the sweep enters it (the reference code), or from the original
/// weights up front (`static_groups`).
struct SchemeGrid<'a> {
    scheme: &'a QuantScheme,
    prep: &'a Prepared,
    static_groups: bool,
    g: usize,
    groups: usize,
    cols: usize,
    /// Exact zeros of the input (pruned weights), in visiting order.
    pruned: Option<Vec<bool>>,
    params: Vec<GroupParams>,
    codes: Vec<u8>,
    g_idx: Vec<u32>,
    latent: Option<Vec<f32>>,
    /// Group of the column being rounded.
    grp: usize,
}

impl ColumnRounder for SchemeGrid<'_> {
    fn enter(&mut self, c: usize, wm: &Mat<f32>) {
        let (g, perm) = (self.g, &self.prep.perm);
        self.grp = if self.static_groups {
            perm[c] / g
        } else {
            c / g
        };
        if !self.static_groups && c % g == 0 {
            // Group parameters from the error-updated weights, as the reference code does;
            // pruned positions count as the zeros they will be.
            for r in 0..wm.nrows() {
                let kept = |j: usize| self.pruned.as_ref().is_none_or(|m| !m[r * self.cols + j]);
                let p = self.scheme.params(
                    (c..(c + g).min(self.cols)).map(|j| if kept(j) { wm[(r, j)] } else { 0.0 }),
                );
                self.params[r * self.groups + self.grp] = p;
            }
        }
        self.g_idx[perm[c]] = self.grp as u32;
    }

    fn round(&mut self, r: usize, c: usize, x: f32) -> f32 {
        let p = self.params[r * self.groups + self.grp];
        let at = r * self.cols + self.prep.perm[c];
        let kept = self.pruned.as_ref().is_none_or(|m| !m[r * self.cols + c]);
        let code = if kept {
            self.scheme.code(x, p)
        } else {
            p.zero.clamp(0, self.scheme.qmax()) as u8
        };
        self.codes[at] = code;
        if let Some(l) = self.latent.as_mut() {
            // A pruned weight's latent value is the zero it stays.
            l[at] = if kept { x } else { 0.0 };
        }
        QuantScheme::value(code, p)
    }
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
    let perm = &prep.perm;
    let mut wm = sweep_start(w, rows, cols, prep);
    // Exact zeros of the input (pruned weights) stay exact zeros: they take the zero code and
    // their whole value becomes error pushed onto later columns, as in SparseGPT's joint
    // sparsity + quantization mode. A pruned model keeps its mask through quantization.
    let pruned: Option<Vec<bool>> = w.contains(&0.0).then(|| {
        (0..rows * cols)
            .map(|i| w[(i / cols) * cols + perm[i % cols]] == 0.0)
            .collect()
    });
    let mut grid = SchemeGrid {
        scheme,
        prep,
        static_groups: opts.static_groups,
        g,
        groups,
        cols,
        pruned,
        params: vec![
            GroupParams {
                scale: 1.0,
                zero: 0
            };
            rows * groups
        ],
        codes: vec![0u8; rows * cols],
        g_idx: vec![0u32; cols],
        latent: opts.keep_latent.then(|| vec![0f32; rows * cols]),
        grp: 0,
    };
    if opts.static_groups {
        // Groups of consecutive original columns, whatever order the sweep takes.
        for i in 0..rows * groups {
            let (r, gi) = (i / groups, i % groups);
            grid.params[i] = grid
                .scheme
                .params((gi * g..((gi + 1) * g).min(cols)).map(|j| w[r * cols + j]));
        }
    }
    sweep(&mut wm, prep, opts.block, &mut grid);
    Ok(QuantizedLinear {
        rows,
        cols,
        codes: grid.codes,
        params: grid.params,
        groups,
        g_idx: grid.g_idx,
        latent: grid.latent,
        blocks: None,
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
                staged.advance(
                    &block,
                    job.rope,
                    tap,
                    Some(self.sink_weight),
                    job.sample_rows,
                )
            };
            let mut st = st;
            let h = st.xtx.take().expect("xtx captured");
            // One factorization serves every linear of the stage (same inputs, same H).
            let prep = prepare(
                h,
                st.width,
                &format!("{}.weight", names[0]),
                self.damp,
                self.act_order,
            )?;
            for name in names {
                let t = job.weights.get(&format!("{name}.weight"));
                let (rows, cols) = (t.shape[0], t.shape[1]);
                reference.insert(name.to_string(), t.data.clone());
                let full = format!("model.layers.{}.{name}.weight", job.layer);
                let q = match &self.gguf {
                    Some(plan) => {
                        let ty = linear_type(plan, &full, rows, cols)?;
                        gptq_blocks(ty, &full, &t.data, rows, cols, &prep, self)?
                    }
                    None => gptq_prepared(&job.scheme, &full, &t.data, rows, cols, &prep, self)?,
                };
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
        for (bits, group, act, stat) in [
            (4u8, Some(16), false, false),
            (3, None, true, false),
            (4, Some(16), true, false),
            (4, Some(16), false, true),
            (4, Some(16), true, true),
        ] {
            let scheme = QuantScheme::new(bits, group, false).unwrap();
            let rtn_q = quantize_rtn(&scheme, "w", &w, rows, cols).unwrap();
            let rtn = rtn_q.dequantize();
            let opts = Gptq {
                act_order: act,
                static_groups: stat,
                ..Gptq::default()
            };
            let h32: Vec<f32> = h.iter().map(|&v| v as f32).collect();
            let gq = gptq_linear(&scheme, "w", &w, rows, cols, &h32, &opts).unwrap();
            let (er, eg) = (out_err(&rtn), out_err(&gq.dequantize()));
            assert!(
                eg < 0.8 * er,
                "bits {bits} group {group:?} act {act} static {stat}: gptq {eg} vs rtn {er}"
            );
            if stat {
                // Static groups: RTN's grid on the original weights, in original column order.
                assert_eq!(gq.params, rtn_q.params, "act {act}");
                assert!(
                    gq.g_idx
                        .iter()
                        .enumerate()
                        .all(|(c, &g)| g as usize == c / 16)
                );
            }
            // Every column's group index is within range and codes are within bits.
            assert!(gq.g_idx.iter().all(|&g| (g as usize) < gq.groups));
            assert!(gq.codes.iter().all(|&c| (c as i32) <= scheme.qmax()));
        }
    }

    /// A pruned weight (exact zeros) keeps every zero through GPTQ's error feedback, and GPTQ
    /// still beats round-to-nearest on the output. Broken once by dropping the `pruned`
    /// branch of the code choice: the zeros filled in and the first assertion failed.
    #[test]
    fn gptq_keeps_pruned_zeros() {
        let (rows, cols, n) = (8, 64, 256);
        let mut s = 3u64;
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                if (i * 7) % 4 < 2 {
                    0.0
                } else {
                    lcg(&mut s) as f32
                }
            })
            .collect();
        let mut x = vec![0f64; n * cols];
        for t in 0..n {
            let common = lcg(&mut s);
            for c in 0..cols {
                x[t * cols + c] = 0.7 * common + 0.3 * lcg(&mut s);
            }
        }
        let mut h = vec![0f32; cols * cols];
        for t in 0..n {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += (x[t * cols + i] * x[t * cols + j]) as f32;
                }
            }
        }
        for act in [false, true] {
            let scheme = QuantScheme::new(4, Some(16), false).unwrap();
            let opts = Gptq {
                act_order: act,
                ..Gptq::default()
            };
            let q = gptq_linear(&scheme, "w", &w, rows, cols, &h, &opts)
                .unwrap()
                .dequantize();
            for (i, (a, b)) in w.iter().zip(&q).enumerate() {
                assert!(*a != 0.0 || *b == 0.0, "act {act}: zero {i} became {b}");
            }
            let err = |p: &[f32]| -> f64 {
                (0..n)
                    .map(|t| {
                        (0..rows)
                            .map(|r| {
                                let d: f64 = (0..cols)
                                    .map(|c| {
                                        x[t * cols + c] * (w[r * cols + c] - p[r * cols + c]) as f64
                                    })
                                    .sum();
                                d * d
                            })
                            .sum::<f64>()
                    })
                    .sum()
            };
            let rtn = quantize_rtn(&scheme, "w", &w, rows, cols)
                .unwrap()
                .dequantize();
            assert!(rtn.iter().zip(&w).all(|(a, b)| *b != 0.0 || *a == 0.0));
            assert!(
                err(&q) < err(&rtn),
                "act {act}: gptq {} vs rtn {}",
                err(&q),
                err(&rtn)
            );
        }
    }
}
