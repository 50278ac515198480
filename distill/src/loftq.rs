//! LoftQ initialisation of QLoRA adapters (Li et al., 2023, arXiv:2310.08659; PEFT's
//! `init_lora_weights="loftq"`): instead of starting from `Q(W)` with a zero update, the
//! 4-bit base and the rank-r factors are chosen together so that `Q + L·R` approximates `W`.
//! Alternating `iters` times: `Q = quant(W - L·R)`, then `L·R` = the best rank-r
//! approximation (truncated SVD) of `W - deq(Q)`. With one iteration the base is `Q(W)`
//! itself, the one bitsandbytes makes of the student, and the adapters start at the dominant
//! part of its rounding error instead of at zero.

use faer::diag::Diag;
use faer::linalg::svd::{ComputeSvdVectors, svd, svd_scratch};
use faer::{Mat, Par};
use quant::nf4::{BnbLinear, BnbScheme, quantize};

use crate::qlora::Nf4Weight;
use crate::{DistillError, Result};

/// How QLoRA's adapters start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "init")]
pub enum LoraInit {
    /// As LoRA: `A` Gaussian, `B` zero, so training starts at the 4-bit base.
    #[default]
    Gaussian,
    /// LoftQ with this many alternating steps (at least 1).
    Loftq {
        /// Alternations of quantization and truncated SVD.
        iters: usize,
    },
}

/// A 4-bit base and low-rank factors whose sum approximates a weight.
pub struct LoftqStart {
    /// The quantized base.
    pub base: BnbLinear,
    /// `L = U·sqrt(S)`, `[rows, rank]` row-major.
    pub left: Vec<f32>,
    /// `R = sqrt(S)·Vᵀ`, `[rank, cols]` row-major.
    pub right: Vec<f32>,
}

/// LoftQ for one HF-layout weight `w` (`[rows, cols]`, row-major).
pub fn loftq(
    scheme: &BnbScheme,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
    iters: usize,
) -> Result<LoftqStart> {
    let rank = rank.min(rows).min(cols);
    let invalid = |e: quant::QuantError| DistillError::Invalid(e.to_string());
    let mut left = vec![0f32; rows * rank];
    let mut right = vec![0f32; rank * cols];
    let mut base = quantize(scheme, name, w, rows, cols).map_err(invalid)?;
    for it in 0..iters.max(1) {
        if it > 0 {
            let target: Vec<f32> = (0..rows * cols)
                .map(|i| w[i] - low_rank_at(&left, &right, rank, cols, i))
                .collect();
            base = quantize(scheme, name, &target, rows, cols).map_err(invalid)?;
        }
        let deq = Nf4Weight::from_linear(&base)?.dequantize_hf();
        let residual = Mat::<f32>::from_fn(rows, cols, |r, c| w[r * cols + c] - deq[r * cols + c]);
        let (u, s, v) = thin_svd(&residual, name)?;
        for k in 0..rank {
            let root = s[k].max(0.0).sqrt();
            for r in 0..rows {
                left[r * rank + k] = u[(r, k)] * root;
            }
            for c in 0..cols {
                right[k * cols + c] = v[(c, k)] * root;
            }
        }
    }
    Ok(LoftqStart { base, left, right })
}

/// `(L·R)[i]` for the row-major index `i` of a `[rows, cols]` product.
fn low_rank_at(left: &[f32], right: &[f32], rank: usize, cols: usize, i: usize) -> f32 {
    let (r, c) = (i / cols, i % cols);
    (0..rank)
        .map(|k| left[r * rank + k] * right[k * cols + c])
        .sum()
}

/// The thin SVD, computed sequentially so that the result does not depend on the thread count.
fn thin_svd(a: &Mat<f32>, name: &str) -> Result<(Mat<f32>, Vec<f32>, Mat<f32>)> {
    let (m, n) = a.shape();
    let size = m.min(n);
    let mut u = Mat::<f32>::zeros(m, size);
    let mut v = Mat::<f32>::zeros(n, size);
    let mut s = Diag::<f32>::zeros(size);
    let thin = ComputeSvdVectors::Thin;
    let mut buf = faer::dyn_stack::MemBuffer::new(svd_scratch::<f32>(
        m,
        n,
        thin,
        thin,
        Par::Seq,
        Default::default(),
    ));
    svd(
        a.as_ref(),
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        Par::Seq,
        faer::dyn_stack::MemStack::new(&mut buf),
        Default::default(),
    )
    .map_err(|e| DistillError::Invalid(format!("{name}: LoftQ's SVD did not converge: {e:?}")))?;
    let s = s.column_vector().iter().copied().collect();
    Ok((u, s, v))
}
