//! The offline teacher cache (`compress distill --cache-teacher`): the teacher's top-k
//! log-probabilities at every predicted position of every training window, computed once on
//! the layer-by-layer engine (one teacher block in memory), so a large teacher never sits in
//! memory beside the student.
//!
//! File format (`compress-distill-teacher-v1`): one JSON header line ([`CacheHeader`]), then
//! for each window in data order, for each of its `seq_len` predicted positions, `k` records
//! of (u32 token id, f32 log-probability at `temperature`), little-endian, most probable first.

use std::io::{Read, Write};
use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use model::Checkpoint;
use model::engine::LayerEngine;
use serde::{Deserialize, Serialize};

use crate::loss::Teacher;
use crate::{DistillError, Result};

/// The format tag of the header.
pub const CACHE_FORMAT: &str = "compress-distill-teacher-v1";

/// The header line is small JSON; a longer first line is not a header.
const MAX_HEADER_BYTES: u64 = 64 * 1024;

/// Windows run through the engine together while building (their states stay in memory).
const GROUP: usize = 64;

/// The run a cache belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheHeader {
    /// Always [`CACHE_FORMAT`].
    pub format: String,
    /// The teacher (informative).
    pub teacher: String,
    /// Predicted positions per window.
    pub seq_len: usize,
    /// Windows, in data order.
    pub windows: usize,
    /// Tokens kept per position.
    pub k: usize,
    /// The teacher's vocabulary.
    pub vocab: usize,
    /// The softmax temperature of the stored log-probabilities.
    pub temperature: f64,
    /// FNV-1a of every window's token ids: the same data, tokenizer and window length.
    pub tokens_fnv1a: String,
}

/// FNV-1a over the windows' token ids (the cache is only valid for exactly these windows).
pub fn windows_hash(windows: &[Vec<u32>]) -> String {
    model::hash::windows_fnv1a(windows)
}

/// A loaded cache: its header and records.
#[derive(Debug)]
pub struct TeacherCache {
    /// What run the records belong to.
    pub header: CacheHeader,
    ids: Vec<u32>,
    logp: Vec<f32>,
}

fn bad(path: &Path, m: impl std::fmt::Display) -> DistillError {
    DistillError::Invalid(format!("{}: {m}", path.display()))
}

/// The top `k` (id, log-prob) of one logit row at temperature `t`, most probable first.
fn top_k(row: &[f32], k: usize, t: f64) -> Vec<(u32, f32)> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = max / t
        + row
            .iter()
            .map(|&x| ((x as f64 - max) / t).exp())
            .sum::<f64>()
            .ln();
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let by_desc = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, by_desc);
    idx.truncate(k);
    idx.sort_by(by_desc);
    idx.into_iter()
        .map(|i| (i, (row[i as usize] as f64 / t - lse) as f32))
        .collect()
}

impl TeacherCache {
    /// Runs the teacher over `windows` (each `seq_len + 1` tokens; the first `seq_len` are
    /// read) and writes the cache to `path`; `progress(done, total)` counts windows.
    pub fn write(
        ckpt: &Checkpoint,
        windows: &[Vec<u32>],
        k: usize,
        temperature: f64,
        path: &Path,
        device: Device,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<()> {
        let cfg = ckpt.config();
        let seq_len = windows.first().map_or(0, |w| w.len() - 1);
        let header = CacheHeader {
            format: CACHE_FORMAT.into(),
            teacher: ckpt.path().display().to_string(),
            seq_len,
            windows: windows.len(),
            k,
            vocab: cfg.vocab_size,
            temperature,
            tokens_fnv1a: windows_hash(windows),
        };
        let io = |e: std::io::Error| bad(path, e);
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        let json = serde_json::to_string(&header).expect("header serializes");
        writeln!(f, "{json}").map_err(io)?;
        let engine = LayerEngine::new(ckpt, device, seq_len);
        let head = engine.load_head()?;
        for (g, group) in windows.chunks(GROUP).enumerate() {
            let inputs: Vec<Vec<u32>> = group.iter().map(|w| w[..seq_len].to_vec()).collect();
            let mut states = engine.embed(&inputs)?;
            engine.run_blocks(&mut states, |_, _, _| Ok(()), || {})?;
            for s in &states {
                let logits = head.logits(s, 0);
                for row in logits.chunks_exact(cfg.vocab_size) {
                    for (id, lp) in top_k(row, k, temperature) {
                        f.write_all(&id.to_le_bytes()).map_err(io)?;
                        f.write_all(&lp.to_le_bytes()).map_err(io)?;
                    }
                }
            }
            progress((g * GROUP + group.len()).min(windows.len()), windows.len());
        }
        f.flush().map_err(io)
    }

    /// Reads and checks a cache: the header, then the size it implies, then every record
    /// (ids in the vocabulary and distinct per position, log-probabilities finite, <= 0 and
    /// in descending order).
    pub fn load(path: &Path) -> Result<Self> {
        let io = |e: std::io::Error| bad(path, e);
        let f = std::fs::File::open(path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        let mut head = Vec::new();
        (&f).take(MAX_HEADER_BYTES)
            .read_to_end(&mut head)
            .map_err(io)?;
        let nl = head
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad(path, "no header line (not a teacher cache)"))?;
        let header: CacheHeader = serde_json::from_slice(&head[..nl])
            .map_err(|e| bad(path, format!("the header is not a cache header ({e})")))?;
        if header.format != CACHE_FORMAT {
            return Err(bad(
                path,
                format!("format {:?}, expected {CACHE_FORMAT:?}", header.format),
            ));
        }
        if header.k == 0 || header.k > header.vocab || header.seq_len == 0 {
            return Err(bad(path, "header k, vocab or seq_len out of range"));
        }
        let records = (header.windows as u128) * (header.seq_len as u128) * (header.k as u128);
        let body = len - nl as u64 - 1;
        if records * 8 != body as u128 {
            return Err(bad(
                path,
                format!(
                    "{body} bytes of records, the header implies {}",
                    records * 8
                ),
            ));
        }
        // The size matched the header, so these allocations are bounded by the file.
        let mut bytes = head[nl + 1..].to_vec();
        (&f).read_to_end(&mut bytes).map_err(io)?;
        let n = records as usize;
        let (mut ids, mut logp) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for r in bytes.chunks_exact(8) {
            ids.push(u32::from_le_bytes([r[0], r[1], r[2], r[3]]));
            logp.push(f32::from_le_bytes([r[4], r[5], r[6], r[7]]));
        }
        let cache = Self { header, ids, logp };
        cache.check_records(path)?;
        Ok(cache)
    }

    fn check_records(&self, path: &Path) -> Result<()> {
        let (k, vocab) = (self.header.k, self.header.vocab);
        let mut seen = std::collections::HashSet::with_capacity(k);
        for (p, (ids, lps)) in self.ids.chunks(k).zip(self.logp.chunks(k)).enumerate() {
            seen.clear();
            for j in 0..k {
                let (id, lp) = (ids[j], lps[j]);
                if id as usize >= vocab || !seen.insert(id) {
                    return Err(bad(
                        path,
                        format!("position {p}: token id {id} out of range or repeated"),
                    ));
                }
                if !lp.is_finite() || lp > 1e-5 || (j > 0 && lp > lps[j - 1]) {
                    return Err(bad(
                        path,
                        format!("position {p}: log-probability {lp} invalid or out of order"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that the cache belongs to this run's windows, vocabulary and temperature.
    pub fn check_run(
        &self,
        path: &Path,
        windows: &[Vec<u32>],
        vocab: usize,
        temperature: f64,
    ) -> Result<()> {
        let h = &self.header;
        let seq_len = windows.first().map_or(0, |w| w.len() - 1);
        let what = if h.vocab != vocab {
            format!("a vocabulary of {}, the student has {vocab}", h.vocab)
        } else if h.seq_len != seq_len || h.windows != windows.len() {
            format!(
                "{} windows of {} tokens, this run has {} of {seq_len}",
                h.windows,
                h.seq_len,
                windows.len()
            )
        } else if h.tokens_fnv1a != windows_hash(windows) {
            "other tokens (other data or tokenizer)".to_string()
        } else if h.temperature != temperature {
            format!("temperature {}, this run uses {temperature}", h.temperature)
        } else {
            return Ok(());
        };
        Err(bad(path, format!("the cache was written for {what}")))
    }

    /// The cached teacher of windows `index` (all their positions, window-major).
    pub fn teacher(&self, index: &[usize], device: &Device) -> Teacher {
        let (k, per) = (self.header.k, self.header.seq_len * self.header.k);
        let mut ids = Vec::with_capacity(index.len() * per);
        let mut logp = Vec::with_capacity(index.len() * per);
        for &w in index {
            let r = w * per..(w + 1) * per;
            ids.extend(self.ids[r.clone()].iter().map(|&i| i as i64));
            logp.extend_from_slice(&self.logp[r]);
        }
        let n = index.len() * self.header.seq_len;
        Teacher::TopK {
            ids: Tensor::<2, Int>::from_data(TensorData::new(ids, [n, k]), device),
            logp: Tensor::<2>::from_data(TensorData::new(logp, [n, k]), device),
        }
    }
}
