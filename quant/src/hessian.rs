//! The Hessian machinery shared by GPTQ and SparseGPT (both optimal-brain-surgeon updates
//! on H = 2 Σ x xᵀ of a linear layer's calibration inputs): column order, dead inputs,
//! dampening and the upper Cholesky factor of H⁻¹ that both algorithms walk column by column.

use faer::{Mat, Side};

use crate::QuantError;

/// What GPTQ and SparseGPT need of one Hessian, shared by every linear that reads the same inputs.
pub struct Prepared {
    /// Visiting order of the columns.
    pub perm: Vec<usize>,
    /// Columns (in visiting order) whose inputs were never active.
    pub dead: Vec<bool>,
    /// Cholesky factorization of the dampened H⁻¹ (in visiting order); its lower factor `L`
    /// is Uᵀ, read in place rather than copied.
    pub l: faer::linalg::solvers::Llt<f32>,
    /// diag(H) = Σ x² of each original column (undampened): the activation energy that
    /// importance-weighted rounding weighs each column's error by.
    pub diag: Vec<f32>,
}

/// Factors `h` = Σ x xᵀ `[cols, cols]` (consumed, so its memory is free for the factors):
/// columns in visiting order, dead inputs (never active) given H_ii = 1, dampening added,
/// then the upper Cholesky factor of H⁻¹ (more dampening if H is not positive definite). The
/// Hessian and its factors are f32 as in the reference implementation: at 7B widths (11008
/// inputs) each copy is 485 MB, and at most two are held at a time.
pub fn prepare(
    h: Vec<f32>,
    cols: usize,
    name: &str,
    damp: f64,
    act_order: bool,
) -> Result<Prepared, QuantError> {
    if !(damp.is_finite() && damp > 0.0) {
        return Err(QuantError::Input(format!(
            "`{name}`: dampening {damp} must be a positive fraction"
        )));
    }
    let perm: Vec<usize> = if act_order {
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
    let hdiag: Vec<f32> = (0..cols).map(|j| h[j * cols + j]).collect();
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
    let mut damp = damp;
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
    Ok(Prepared {
        perm,
        dead,
        l,
        diag: hdiag,
    })
}

/// The optimal-brain-surgeon update GPTQ and SparseGPT share: column `i1 + i` of the block
/// `i1..i1 + count` has been fixed with scaled errors `err[:, i]` (its change divided by
/// `U[c, c]`); push them onto the block's later columns through row `c` of `U`.
pub fn update_within_block(
    wm: &mut faer::Mat<f32>,
    err: &faer::Mat<f32>,
    u: faer::MatRef<'_, f32>,
    i1: usize,
    i: usize,
    count: usize,
) {
    let c = i1 + i;
    for j in i + 1..count {
        let f = u[(c, i1 + j)];
        if f != 0.0 {
            for r in 0..wm.nrows() {
                wm[(r, i1 + j)] -= err[(r, i)] * f;
            }
        }
    }
}

/// After a block `i1..i2` is fixed, its scaled errors update every column after it at once
/// (the lazy batch update): `W[:, i2..] -= Err · U[i1..i2, i2..]`.
pub fn update_after_block(
    wm: &mut faer::Mat<f32>,
    err: &faer::Mat<f32>,
    u: faer::MatRef<'_, f32>,
    i1: usize,
    i2: usize,
) {
    let (rows, cols) = (wm.nrows(), wm.ncols());
    if i2 < cols {
        faer::linalg::matmul::matmul(
            wm.as_mut().submatrix_mut(0, i2, rows, cols - i2),
            faer::Accum::Add,
            err.as_ref(),
            u.submatrix(i1, i2, i2 - i1, cols - i2),
            -1.0,
            faer::Par::rayon(0),
        );
    }
}
