//! Choosing which weights to drop from their scores: per output row for unstructured
//! sparsity (as Wanda compares weights), per group of M consecutive inputs for N:M.

use rayon::prelude::*;

use crate::Pattern;

/// Weights pruned per row of `cols` inputs at unstructured `sparsity` (rounded to nearest).
pub fn pruned_per_row(cols: usize, sparsity: f64) -> usize {
    ((cols as f64 * sparsity).round() as usize).min(cols)
}

/// Sets to zero, in each row of `w` `[rows, cols]`, the weights with the lowest `scores`
/// under `pattern`: the `round(cols · sparsity)` lowest of the row, or the `M − N` lowest of
/// every `M` consecutive inputs. Ties go to the lower column index.
pub fn prune_by_score(w: &mut [f32], scores: &[f32], rows: usize, cols: usize, pattern: Pattern) {
    assert_eq!(w.len(), rows * cols);
    assert_eq!(scores.len(), rows * cols);
    w.par_chunks_mut(cols)
        .zip(scores.par_chunks(cols))
        .for_each(|(wr, sr)| match pattern {
            Pattern::Unstructured { sparsity } => {
                let k = pruned_per_row(cols, sparsity);
                for j in lowest(sr, k) {
                    wr[j] = 0.0;
                }
            }
            Pattern::NofM { n, m } => {
                for (wg, sg) in wr.chunks_mut(m).zip(sr.chunks(m)) {
                    for j in lowest(sg, m - n) {
                        wg[j] = 0.0;
                    }
                }
            }
        });
}

/// Indices of the `k` lowest values (NaN scores count as lowest; ties by index).
pub fn lowest(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k == 0 {
        return Vec::new();
    }
    if k >= idx.len() {
        return idx;
    }
    let key = |i: usize| {
        let s = scores[i];
        if s.is_nan() { f32::NEG_INFINITY } else { s }
    };
    idx.select_nth_unstable_by(k - 1, |&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Fraction of exact zeros.
pub fn sparsity_of(w: &[f32]) -> f64 {
    w.iter().filter(|&&x| x == 0.0).count() as f64 / w.len().max(1) as f64
}

/// Checks an N:M pattern on `w` `[rows, cols]`: at most N non-zeros in each group of M.
pub fn satisfies_nm(w: &[f32], cols: usize, n: usize, m: usize) -> bool {
    w.chunks(cols).all(|r| {
        r.chunks(m)
            .all(|g| g.iter().filter(|&&x| x != 0.0).count() <= n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unstructured_prunes_the_lowest_of_each_row() {
        let mut w = vec![1.0, -4.0, 3.0, 2.0, 5.0, 6.0, -7.0, 8.0];
        let s: Vec<f32> = w.iter().map(|x: &f32| x.abs()).collect();
        prune_by_score(&mut w, &s, 2, 4, Pattern::Unstructured { sparsity: 0.5 });
        assert_eq!(w, vec![0.0, -4.0, 3.0, 0.0, 0.0, 0.0, -7.0, 8.0]);
    }

    #[test]
    fn n_of_m_keeps_n_in_every_group() {
        let mut w: Vec<f32> = (1..=16)
            .map(|x| x as f32 * if x % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let s: Vec<f32> = w.iter().map(|x| x.abs()).collect();
        prune_by_score(&mut w, &s, 2, 8, Pattern::NofM { n: 2, m: 4 });
        assert!(satisfies_nm(&w, 8, 2, 4));
        // The two largest of each group of 4 survive.
        assert_eq!(&w[..4], &[0.0, 0.0, -3.0, 4.0]);
        assert!((sparsity_of(&w) - 0.5).abs() < 1e-12);
    }
}
