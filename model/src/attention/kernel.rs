//! One head's causal attention in f32, `BLOCK` query rows at a time, each block against
//! the keys up to its own last row (the rest of its score rows is masked anyway).

use super::BLOCK;

/// A matrix inside a slice: element `(r, c)` at `r * rs + c * cs` (a transpose swaps them).
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

fn rows(data: &[f32], rs: usize) -> View<'_> {
    View { data, rs, cs: 1 }
}

fn transposed(data: &[f32], rs: usize) -> View<'_> {
    View {
        data,
        rs: 1,
        cs: rs,
    }
}

/// `dst [m, n]` (row stride `dst_rs`) `= lhs [m, k] · rhs [k, n]`, or `+=` with `add`.
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    add: bool,
    lhs: View,
    rhs: View,
) {
    assert!(m > 0 && n > 0 && k > 0, "empty attention product");
    let last = |r: usize, c: usize, rs: usize, cs: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(last(m, n, dst_rs, 1) < dst.len());
    assert!(last(m, k, lhs.rs, lhs.cs) < lhs.data.len());
    assert!(last(k, n, rhs.rs, rhs.cs) < rhs.data.len());
    // SAFETY: the asserts above keep every element gemm touches inside the three slices,
    // and `dst` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            add,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            if add { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Query rows `r0..r1` of a head: their scores against keys `0..r1` into `p` (row stride
/// `r1`), scaled.
fn scores(q: &[f32], k: &[f32], r0: usize, r1: usize, d: usize, p: &mut [f32]) {
    matmul(
        r1 - r0,
        r1,
        d,
        p,
        r1,
        false,
        rows(&q[r0 * d..], d),
        transposed(k, d),
    );
}

/// Causal attention of one head (`q`, `k`, `v`, `o`: `[s, d]`; `lse`: `[s]`).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
    s: usize,
    d: usize,
    scale: f32,
) {
    let mut p = vec![0f32; BLOCK.min(s) * s];
    for r0 in (0..s).step_by(BLOCK) {
        let r1 = (r0 + BLOCK).min(s);
        scores(q, k, r0, r1, d, &mut p);
        for (i, row) in p[..(r1 - r0) * r1].chunks_mut(r1).enumerate() {
            let (live, masked) = row.split_at_mut(r0 + i + 1);
            let mut max = f32::NEG_INFINITY;
            for x in live.iter_mut() {
                *x *= scale;
                max = max.max(*x);
            }
            let mut sum = 0f32;
            for x in live.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            live.iter_mut().for_each(|x| *x *= inv);
            masked.fill(0.0);
            lse[r0 + i] = max + sum.ln();
        }
        matmul(
            r1 - r0,
            d,
            r1,
            &mut o[r0 * d..],
            d,
            false,
            rows(&p, r1),
            rows(v, d),
        );
    }
}

/// One head's forward inputs and outputs, as the backward pass reads them.
pub(super) struct Head<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub o: &'a [f32],
    pub lse: &'a [f32],
    pub s: usize,
    pub d: usize,
    pub scale: f32,
}

/// Gradients of one head's `q`, `k`, `v` from the gradient `g` of its output; `dk` and `dv`
/// must start at zero (blocks add into them).
pub(super) fn backward(h: &Head, g: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
    let (s, d, scale) = (h.s, h.d, h.scale);
    let mut p = vec![0f32; BLOCK.min(s) * s];
    let mut ds = vec![0f32; BLOCK.min(s) * s];
    for r0 in (0..s).step_by(BLOCK) {
        let r1 = (r0 + BLOCK).min(s);
        let n = r1 - r0;
        scores(h.q, h.k, r0, r1, d, &mut p);
        for (i, row) in p[..n * r1].chunks_mut(r1).enumerate() {
            let (live, masked) = row.split_at_mut(r0 + i + 1);
            let l = h.lse[r0 + i];
            live.iter_mut().for_each(|x| *x = (*x * scale - l).exp());
            masked.fill(0.0);
        }
        // dV[..r1] += Pᵀ dO; dP = dO Vᵀ.
        let g_blk = &g[r0 * d..r1 * d];
        matmul(r1, d, n, dv, d, true, transposed(&p, r1), rows(g_blk, d));
        matmul(
            n,
            r1,
            d,
            &mut ds,
            r1,
            false,
            rows(g_blk, d),
            transposed(h.v, d),
        );
        // dS = P ∘ (dP − rowsum(dO ∘ O)), with the softmax scale folded in.
        for i in 0..n {
            let r = (r0 + i) * d..(r0 + i + 1) * d;
            let dot: f32 = g[r.clone()].iter().zip(&h.o[r]).map(|(a, b)| a * b).sum();
            let prow = &p[i * r1..(i + 1) * r1];
            for (x, pj) in ds[i * r1..(i + 1) * r1].iter_mut().zip(prow) {
                *x = pj * (*x - dot) * scale;
            }
        }
        // dQ = dS K; dK[..r1] += dSᵀ Q.
        matmul(
            n,
            d,
            r1,
            &mut dq[r0 * d..],
            d,
            false,
            rows(&ds, r1),
            rows(h.k, d),
        );
        let q_blk = &h.q[r0 * d..r1 * d];
        matmul(r1, d, n, dk, d, true, transposed(&ds, r1), rows(q_blk, d));
    }
}
