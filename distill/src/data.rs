//! Training windows from a token stream, and the order a seeded run visits them in.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// Windows of `seq_len + 1` tokens with stride `seq_len`: the model reads the first
/// `seq_len` and predicts the last `seq_len`, so every token after the first is a target
/// exactly once. A remainder shorter than a window is dropped.
pub fn windows(tokens: &[u32], seq_len: usize) -> Vec<Vec<u32>> {
    assert!(seq_len > 0, "windows: seq_len must be positive");
    if tokens.len() < seq_len + 1 {
        return Vec::new();
    }
    (0..(tokens.len() - 1) / seq_len)
        .map(|i| tokens[i * seq_len..(i + 1) * seq_len + 1].to_vec())
        .collect()
}

/// The window indices of a seeded run: a fresh permutation each epoch, so the `k`-th window
/// a run sees depends only on the seed and `k` (which is what lets a resumed run continue
/// with exactly the windows the uninterrupted one would have used).
#[derive(Debug, Clone)]
pub struct Order {
    n: usize,
    seed: u64,
}

impl Order {
    /// An order over `n` windows (n > 0).
    pub fn new(n: usize, seed: u64) -> Self {
        assert!(n > 0, "Order: no windows");
        Self { n, seed }
    }

    /// The windows `k..k + count` of the run, as indices.
    pub fn take(&self, k: u64, count: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(count);
        let mut epoch = u64::MAX;
        let mut perm = Vec::new();
        for j in k..k + count as u64 {
            let e = j / self.n as u64;
            if e != epoch {
                epoch = e;
                perm = self.permutation(e);
            }
            out.push(perm[(j % self.n as u64) as usize]);
        }
        out
    }

    fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut p: Vec<usize> = (0..self.n).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        p.shuffle(&mut rng);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_overlap_by_one_token() {
        let t: Vec<u32> = (0..10).collect();
        let w = windows(&t, 3);
        assert_eq!(
            w,
            vec![vec![0, 1, 2, 3], vec![3, 4, 5, 6], vec![6, 7, 8, 9]]
        );
        assert!(windows(&t[..3], 3).is_empty());
    }

    #[test]
    fn every_epoch_visits_each_window_once_and_depends_on_the_seed() {
        let o = Order::new(7, 3);
        let all = o.take(0, 21);
        for e in 0..3 {
            let mut ep = all[e * 7..(e + 1) * 7].to_vec();
            ep.sort();
            assert_eq!(ep, (0..7).collect::<Vec<_>>());
        }
        assert_ne!(all[..7], all[7..14], "epochs reuse one permutation");
        assert_eq!(
            o.take(5, 9),
            all[5..14].to_vec(),
            "a later start sees the same windows"
        );
        assert_ne!(Order::new(7, 4).take(0, 7), all[..7].to_vec());
    }
}
