//! Size and speed figures shared by every report.

use model::Checkpoint;
use serde::Serialize;

/// How big a checkpoint is.
#[derive(Debug, Clone, Serialize)]
pub struct SizeReport {
    /// Bytes of the weight files on disk.
    pub bytes: u64,
    /// Parameters (values in all tensors).
    pub params: u64,
    /// Bits of tensor data per parameter, scales and zero points included.
    pub bits_per_weight: f64,
}

impl SizeReport {
    /// Measures a checkpoint.
    pub fn of(ckpt: &Checkpoint) -> Self {
        let t = ckpt.tensors();
        let params: u64 = t.iter().map(|m| m.numel()).sum();
        let data: u64 = t.iter().map(|m| m.bytes).sum();
        Self {
            bytes: ckpt.bytes_on_disk(),
            params,
            bits_per_weight: if params > 0 {
                8.0 * data as f64 / params as f64
            } else {
                0.0
            },
        }
    }
}

/// How fast an evaluation ran.
#[derive(Debug, Clone, Serialize)]
pub struct SpeedReport {
    /// Tokens through the model per second.
    pub tokens_per_second: f64,
    /// Seconds in the model.
    pub wall_seconds: f64,
    /// Worker threads.
    pub threads: usize,
}
