//! Bad input: a corpus of corrupted safetensors folders and GGUF files, generated here, each
//! of which must give one error line of at most 300 characters naming the file and the
//! problem, within a few seconds, never a panic, and never a heap allocation larger than the
//! file (plus a stated margin) while it is opened.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use model::{Checkpoint, ModelError};
use serde_json::json;

// ---------------------------------------------------------------------------------------
// A global allocator that records the largest single allocation made by the thread that
// asked for it (thread-local, so tests running in parallel threads do not interfere).

struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// Live heap bytes this thread allocated (minus what it freed) since tracking began, and
    /// their peak.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// Records an allocation of `size` bytes, or a free of `-size`.
fn note(size: usize, delta: isize) {
    // `try_with`: the thread-locals may already be gone while a thread is torn down.
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
            let _ = LIVE.try_with(|l| {
                l.set(l.get() + delta);
                let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
            });
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size(), l.size() as isize);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size(), l.size() as isize);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note(0, -(l.size() as isize));
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        note(new_size, new_size as isize - l.size() as isize);
        unsafe { System.realloc(p, l, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`, returning its result, the largest single allocation this thread made in it and
/// the peak of the heap bytes it held at once (allocated minus freed, by this thread).
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    LARGEST.with(|m| m.set(0));
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    TRACK.with(|t| t.set(true));
    let r = f();
    TRACK.with(|t| t.set(false));
    let peak = PEAK.with(|p| p.get()).max(0) as usize;
    (r, LARGEST.with(|m| m.get()), peak)
}

/// Runs `f`, returning its result and the largest single allocation this thread made in it.
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let (r, largest, _) = measure(f);
    (r, largest)
}

/// Allocations up to this size are allowed whatever the file size: opening a GGUF file
/// reads the header through gguf-rs via a `BufReader` whose fixed 8 KiB buffer (std's
/// `DEFAULT_BUF_SIZE`) is the largest file-independent allocation. Measured over every case
/// below, everything else stays under 1.2 KiB for these files of at most 4 KiB (path and
/// error strings, config.json text, the safetensors header table), so 8 KiB is the smallest
/// bound that holds. Anything sized by a claimed length (a 2^40-byte string, a 100 GB
/// tensor, u64::MAX metadata entries) is far above it.
const SLACK: usize = 8 << 10;

/// The margin of the header parsers' memory budget (`model::io::PARSE_MARGIN`, 1 MiB): a
/// header may take the file's size plus this in memory. Cases that test that budget (files
/// of many tiny entries, large metadata arrays) bound the largest allocation by the file
/// size plus this, and the peak of live heap bytes by twice the file size plus twice this
/// (the parsed table and the checkpoint's index of it).
const MARGIN: usize = model::io::PARSE_MARGIN as usize;

/// Every case must finish within this (release build; the slowest, an 80 MB header of 1.4
/// million tensors, is refused in well under a second).
const TIME_LIMIT: Duration = Duration::from_secs(5);

/// The longest error line accepted.
const MAX_LINE: usize = 300;

// ---------------------------------------------------------------------------------------
// Checks.

fn file_len(p: &Path) -> usize {
    std::fs::metadata(p)
        .map(|m| if m.is_file() { m.len() as usize } else { 0 })
        .unwrap_or(0)
}

/// Collects the failures of every case, so one run reports them all.
#[derive(Default)]
struct Cases {
    fails: Vec<String>,
    run: usize,
}

impl Cases {
    /// Checks an error is one line of at most [`MAX_LINE`] characters, names `file` and
    /// contains every `needle`.
    fn check_message(&mut self, case: &str, e: &ModelError, file: &Path, needles: &[&str]) {
        let full = e.to_string();
        // What the failures below quote: the message, cut (a broken cut must not print 50 MB).
        let chars = full.chars().count();
        let msg = if chars > 2 * MAX_LINE {
            full.chars().take(2 * MAX_LINE).collect::<String>() + "…"
        } else {
            full.clone()
        };
        if full.contains('\n') {
            self.fails
                .push(format!("{case}: error is not one line: {msg:?}"));
        }
        if chars > MAX_LINE {
            self.fails.push(format!(
                "{case}: error of {chars} characters (more than {MAX_LINE}): {msg}"
            ));
        }
        if !full.contains(&file.display().to_string()) {
            self.fails.push(format!(
                "{case}: error does not name {}: {msg}",
                file.display()
            ));
        }
        for n in needles {
            if !full.contains(n) {
                self.fails.push(format!("{case}: error lacks `{n}`: {msg}"));
            }
        }
    }

    fn check_alloc(&mut self, case: &str, largest: usize, file: &Path) {
        let bound = file_len(file).max(SLACK);
        if largest > bound {
            self.fails.push(format!(
                "{case}: largest allocation {largest} bytes > {bound} (file {} bytes)",
                file_len(file)
            ));
        }
    }

    fn check_time(&mut self, case: &str, took: Duration) {
        if took > TIME_LIMIT {
            self.fails
                .push(format!("{case}: took {took:?} (more than {TIME_LIMIT:?})"));
        }
    }

    /// `Checkpoint::open(path)` must fail without panicking, with a one-line error naming
    /// `file` and the problem, within [`TIME_LIMIT`], and allocate no more than
    /// max(size of `file`, SLACK) at once.
    fn open_fails(&mut self, case: &str, path: &Path, file: &Path, needles: &[&str]) {
        self.run += 1;
        let t = Instant::now();
        let (r, largest) =
            largest_alloc(|| catch_unwind(AssertUnwindSafe(|| Checkpoint::open(path).map(|_| ()))));
        self.check_time(case, t.elapsed());
        match r {
            Err(_) => self
                .fails
                .push(format!("{case}: Checkpoint::open panicked")),
            Ok(Ok(())) => self
                .fails
                .push(format!("{case}: Checkpoint::open succeeded")),
            Ok(Err(e)) => self.check_message(case, &e, file, needles),
        }
        self.check_alloc(case, largest, file);
    }

    /// The checkpoint opens (within the allocation bound), then `f` on it must fail cleanly.
    fn later_fails(
        &mut self,
        case: &str,
        path: &Path,
        file: &Path,
        needles: &[&str],
        f: impl FnOnce(&Checkpoint) -> Result<(), ModelError>,
    ) {
        self.run += 1;
        let (ckpt, largest) = largest_alloc(|| Checkpoint::open(path));
        self.check_alloc(case, largest, file);
        let ckpt = match ckpt {
            Ok(c) => c,
            Err(e) => return self.fails.push(format!("{case}: open failed: {e}")),
        };
        match catch_unwind(AssertUnwindSafe(|| f(&ckpt))) {
            Err(_) => self.fails.push(format!("{case}: panicked after open")),
            Ok(Ok(())) => self.fails.push(format!("{case}: succeeded")),
            Ok(Err(e)) => self.check_message(case, &e, file, needles),
        }
    }

    /// `f` must fail as [`Self::open_fails`] describes, with the memory bounds of a budgeted
    /// parse: largest allocation at most size of `file` + MARGIN, peak live heap at most
    /// 2 x (size of `file` + MARGIN).
    fn fails<T>(
        &mut self,
        case: &str,
        file: &Path,
        needles: &[&str],
        f: impl FnOnce() -> Result<T, ModelError>,
    ) {
        self.run += 1;
        let t = Instant::now();
        let (r, largest, peak) = measure(|| catch_unwind(AssertUnwindSafe(f)));
        self.check_time(case, t.elapsed());
        match r {
            Err(_) => self.fails.push(format!("{case}: panicked")),
            Ok(Ok(_)) => self.fails.push(format!("{case}: succeeded")),
            Ok(Err(e)) => self.check_message(case, &e, file, needles),
        }
        self.check_budget(case, largest, peak, file);
    }

    fn check_budget(&mut self, case: &str, largest: usize, peak: usize, file: &Path) {
        let len = file_len(file);
        if largest > len + MARGIN || peak > 2 * (len + MARGIN) {
            self.fails.push(format!(
                "{case}: largest allocation {largest} bytes, peak {peak} bytes (file {len} bytes, margin {MARGIN})"
            ));
        }
        if std::env::var_os("BAD_INPUT_SIZES").is_some() {
            eprintln!("{case}: file {len}, largest {largest}, peak {peak}");
        }
    }

    /// `f` must succeed, within [`TIME_LIMIT`] and the memory bounds of [`Self::fails`].
    fn succeeds<T>(
        &mut self,
        case: &str,
        file: &Path,
        f: impl FnOnce() -> Result<T, ModelError>,
    ) -> Option<T> {
        self.run += 1;
        let t = Instant::now();
        let (r, largest, peak) = measure(|| catch_unwind(AssertUnwindSafe(f)));
        self.check_time(case, t.elapsed());
        self.check_budget(case, largest, peak, file);
        match r {
            Err(_) => self.fails.push(format!("{case}: panicked")),
            Ok(Err(e)) => self.fails.push(format!("{case}: failed: {e}")),
            Ok(Ok(v)) => return Some(v),
        }
        None
    }

    fn finish(self) {
        assert!(
            self.fails.is_empty(),
            "{} of {} cases failed:\n{}",
            self.fails.len(),
            self.run,
            self.fails.join("\n")
        );
        eprintln!("{} cases passed", self.run);
    }
}

fn load_block0(c: &Checkpoint) -> Result<(), ModelError> {
    let engine = model::engine::LayerEngine::new(c, model::default_device(), 8);
    engine.load_block(0).map(|_| ())
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + seed * 13) % 17) as f32 * 0.01 - 0.08)
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

// Tiny Llama: vocab 16, hidden 8, 2 heads of 4, 1 kv head, MLP 16, one block, tied head.
const V: usize = 16;
const H: usize = 8;
const KV: usize = 4;
const I: usize = 16;

/// HF names and shapes of the tiny model, in file order.
fn tiny_tensors() -> Vec<(String, Vec<usize>)> {
    let p = "model.layers.0";
    vec![
        ("model.embed_tokens.weight".into(), vec![V, H]),
        (format!("{p}.input_layernorm.weight"), vec![H]),
        (format!("{p}.self_attn.q_proj.weight"), vec![H, H]),
        (format!("{p}.self_attn.k_proj.weight"), vec![KV, H]),
        (format!("{p}.self_attn.v_proj.weight"), vec![KV, H]),
        (format!("{p}.self_attn.o_proj.weight"), vec![H, H]),
        (format!("{p}.post_attention_layernorm.weight"), vec![H]),
        (format!("{p}.mlp.gate_proj.weight"), vec![I, H]),
        (format!("{p}.mlp.up_proj.weight"), vec![I, H]),
        (format!("{p}.mlp.down_proj.weight"), vec![H, I]),
        ("model.norm.weight".into(), vec![H]),
    ]
}

// ---------------------------------------------------------------------------------------
// safetensors: an HF folder with config.json and model.safetensors.

fn tiny_config() -> serde_json::Value {
    json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": H,
        "intermediate_size": I, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "max_position_embeddings": 64})
}

struct StTensor {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    offsets: (u64, u64),
    data: Vec<u8>,
}

/// A safetensors file as editable parts; `bytes` writes the header from them and then every
/// tensor's `data` in order, whatever the (possibly corrupted) offsets say.
struct St {
    tensors: Vec<StTensor>,
    header_len: Option<u64>,
}

impl St {
    fn tiny() -> Self {
        let mut off = 0;
        let tensors = tiny_tensors()
            .into_iter()
            .enumerate()
            .map(|(k, (name, shape))| {
                let data = f32_bytes(&values(shape.iter().product(), k));
                let t = StTensor {
                    name,
                    dtype: "F32".into(),
                    shape: shape.iter().map(|&d| d as u64).collect(),
                    offsets: (off, off + data.len() as u64),
                    data,
                };
                off = t.offsets.1;
                t
            })
            .collect();
        Self {
            tensors,
            header_len: None,
        }
    }
    /// Recomputes contiguous offsets from the data (after removing a tensor).
    fn relayout(&mut self) {
        let mut off = 0;
        for t in &mut self.tensors {
            t.offsets = (off, off + t.data.len() as u64);
            off = t.offsets.1;
        }
    }
    fn get(&mut self, name: &str) -> &mut StTensor {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .expect("tensor of the tiny model")
    }
    fn bytes(&self) -> Vec<u8> {
        let mut h = serde_json::Map::new();
        for t in &self.tensors {
            h.insert(t.name.clone(), json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [t.offsets.0, t.offsets.1]}));
        }
        let mut text = serde_json::to_string(&h).unwrap();
        while !text.len().is_multiple_of(8) {
            text.push(' ');
        }
        let mut out = self
            .header_len
            .unwrap_or(text.len() as u64)
            .to_le_bytes()
            .to_vec();
        out.extend_from_slice(text.as_bytes());
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
        }
        out
    }
}

/// Writes an HF folder `dir/name` and returns (folder, its model.safetensors, its config.json).
fn hf_folder(
    dir: &Path,
    name: &str,
    config: &serde_json::Value,
    weights: Option<&[u8]>,
) -> (PathBuf, PathBuf, PathBuf) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let (st, cfg) = (d.join("model.safetensors"), d.join("config.json"));
    std::fs::write(&cfg, serde_json::to_string_pretty(config).unwrap()).unwrap();
    if let Some(w) = weights {
        std::fs::write(&st, w).unwrap();
    }
    (d, st, cfg)
}

// ---------------------------------------------------------------------------------------
// GGUF (llama.cpp `docs/gguf.md`, version 3, little-endian).

enum Kv {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    /// Any value: its GGUF type id and the bytes written after it, as given.
    Raw(u32, Vec<u8>),
}

struct GTensor {
    name: String,
    /// GGUF `ne`: innermost dimension first.
    ne: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    /// Written instead of the computed offset when set.
    offset: Option<u64>,
}

/// A GGUF file as editable parts; `bytes` lays the data out aligned to 32 and writes the
/// tensor infos from the parts (so a corrupted `ne`/`ty`/`offset` does not move the data).
struct Gguf {
    kvs: Vec<(String, Kv)>,
    tensors: Vec<GTensor>,
    n_kv: Option<u64>,
}

const ALIGN: usize = 32;

fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let mut s = hf.replace("model.layers.", "blk.");
    for (a, b) in map {
        s = s.replace(a, b);
    }
    s
}

impl Gguf {
    fn tiny() -> Self {
        let u = |k: &str, v: u32| (format!("llama.{k}"), Kv::U32(v));
        let kvs = vec![
            ("general.architecture".into(), Kv::Str("llama".into())),
            u("context_length", 64),
            u("embedding_length", H as u32),
            u("block_count", 1),
            u("feed_forward_length", I as u32),
            u("attention.head_count", 2),
            u("attention.head_count_kv", 1),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Kv::F32(1e-5),
            ),
        ];
        // Weights are random-ish, so llama.cpp's q/k row permutation does not matter here.
        let tensors = tiny_tensors()
            .into_iter()
            .enumerate()
            .map(|(k, (name, shape))| GTensor {
                name: gguf_name(&name),
                ne: shape.iter().rev().map(|&d| d as u64).collect(),
                ty: 0,
                data: f32_bytes(&values(shape.iter().product(), k)),
                offset: None,
            })
            .collect();
        Self {
            kvs,
            tensors,
            n_kv: None,
        }
    }
    fn get(&mut self, name: &str) -> &mut GTensor {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .expect("tensor of the tiny model")
    }
    fn set_kv(&mut self, key: &str, v: Kv) {
        self.kvs
            .iter_mut()
            .find(|(k, _)| k == key)
            .expect("key of the tiny model")
            .1 = v;
    }
    fn bytes(&self) -> Vec<u8> {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.n_kv.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            string(&mut out, k);
            match v {
                Kv::U32(x) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Kv::F32(x) => {
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Kv::Str(s) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    string(&mut out, s);
                }
                Kv::Strs(v) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&8u32.to_le_bytes());
                    out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                    for x in v {
                        string(&mut out, x);
                    }
                }
                Kv::Raw(ty, bytes) => {
                    out.extend_from_slice(&ty.to_le_bytes());
                    out.extend_from_slice(bytes);
                }
            }
        }
        let mut data = Vec::new();
        for t in &self.tensors {
            let off = data.len();
            data.extend_from_slice(&t.data);
            data.resize(data.len().next_multiple_of(ALIGN), 0);
            string(&mut out, &t.name);
            out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.to_le_bytes());
            out.extend_from_slice(&t.offset.unwrap_or(off as u64).to_le_bytes());
        }
        out.resize(out.len().next_multiple_of(ALIGN), 0);
        out.extend_from_slice(&data);
        out
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

// ---------------------------------------------------------------------------------------

#[test]
fn valid_tiny_files_open_and_read() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _, _) = hf_folder(dir.path(), "ok", &tiny_config(), Some(&St::tiny().bytes()));
    let g = write(dir.path(), "ok.gguf", &Gguf::tiny().bytes());
    for p in [d, g] {
        let c = Checkpoint::open(&p).unwrap_or_else(|e| panic!("{e}"));
        for (name, shape) in c.expected_tensors() {
            c.read(&name, &shape).unwrap_or_else(|e| panic!("{e}"));
        }
        load_block0(&c).unwrap();
    }
}

#[test]
fn corrupt_safetensors_folders_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = Cases::default();
    let cfg = tiny_config();
    let good = St::tiny().bytes();
    let emb = "model.embed_tokens.weight";
    let q = "model.layers.0.self_attn.q_proj.weight";
    let down = "model.layers.0.mlp.down_proj.weight";

    let (d, st, _) = hf_folder(dir, "empty_file", &cfg, Some(&[]));
    c.open_fails("st empty file", &d, &st, &["header too small"]);

    let (d, st, _) = hf_folder(dir, "truncated_header", &cfg, Some(&good[..5]));
    c.open_fails(
        "st truncated header (5 bytes)",
        &d,
        &st,
        &["header too small"],
    );

    let (d, st, _) = hf_folder(dir, "truncated_json", &cfg, Some(&good[..40]));
    c.open_fails(
        "st truncated inside the JSON header",
        &d,
        &st,
        &["header length", "runs past the end"],
    );

    let mut s = St::tiny();
    s.header_len = Some(1 << 40);
    let (d, st, _) = hf_folder(dir, "header_len_past_eof", &cfg, Some(&s.bytes()));
    c.open_fails(
        "st header length past EOF",
        &d,
        &st,
        &["header length 1099511627776 runs past the end"],
    );

    let mut s = St::tiny();
    s.header_len = Some(u64::MAX);
    let (d, st, _) = hf_folder(dir, "header_len_max", &cfg, Some(&s.bytes()));
    c.open_fails("st header length u64::MAX", &d, &st, &["runs past the end"]);

    let mut s = St::tiny();
    let o = s.get(emb).offsets;
    s.get(q).offsets = (o.0 + 4, o.0 + 4 + 256);
    let (d, st, _) = hf_folder(dir, "overlap", &cfg, Some(&s.bytes()));
    c.open_fails(
        "st offsets overlapping",
        &d,
        &st,
        &["invalid offset for tensor", "model.layers.0"],
    );

    let mut s = St::tiny();
    let t = s.get("model.norm.weight");
    t.shape = vec![1000];
    t.offsets.1 = t.offsets.0 + 4000;
    let (d, st, _) = hf_folder(dir, "past_end", &cfg, Some(&s.bytes()));
    c.open_fails(
        "st offsets past the end",
        &d,
        &st,
        &["past the end of the file"],
    );

    let (d, st, _) = hf_folder(dir, "truncated_data", &cfg, Some(&good[..good.len() - 4]));
    c.open_fails("st data truncated", &d, &st, &["past the end of the file"]);

    let mut long = good.clone();
    long.extend_from_slice(&[0; 12]);
    let (d, st, _) = hf_folder(dir, "trailing", &cfg, Some(&long));
    c.open_fails(
        "st trailing bytes",
        &d,
        &st,
        &["12 bytes after the last tensor's data"],
    );

    let mut s = St::tiny();
    s.get("model.norm.weight").shape = vec![9];
    let (d, st, _) = hf_folder(dir, "shape_bytes", &cfg, Some(&s.bytes()));
    c.open_fails(
        "st shape/byte-count mismatch",
        &d,
        &st,
        &["invalid shape, data type, or offset"],
    );

    let mut s = St::tiny();
    s.get(q).dtype = "X9".into();
    let (d, st, _) = hf_folder(dir, "unknown_dtype", &cfg, Some(&s.bytes()));
    c.open_fails("st unknown dtype", &d, &st, &["unknown dtype `X9`", q]);

    let mut s = St::tiny();
    s.get(q).shape = vec![1 << 32, 1 << 32, 1 << 32];
    let (d, st, _) = hf_folder(dir, "overflow", &cfg, Some(&s.bytes()));
    c.open_fails("st dimensions overflow", &d, &st, &["overflow"]);

    let mut s = St::tiny();
    let t = s.get("model.norm.weight");
    t.shape = vec![100_000, 250_000];
    t.offsets.1 = t.offsets.0 + 100_000_000_000;
    let (d, st, _) = hf_folder(dir, "huge", &cfg, Some(&s.bytes()));
    c.open_fails(
        "st 100 GB tensor",
        &d,
        &st,
        &["past the end of the file", "up to byte 1000000"],
    );

    let mut cj = cfg.clone();
    cj.as_object_mut().unwrap().remove("hidden_size");
    let (d, _, cf) = hf_folder(dir, "no_hidden", &cj, Some(&good));
    c.open_fails(
        "st config without hidden_size",
        &d,
        &cf,
        &["missing field `hidden_size`"],
    );

    let mut cj = cfg.clone();
    cj["model_type"] = json!("gpt_neox");
    let (d, _, cf) = hf_folder(dir, "gpt_neox", &cj, Some(&good));
    c.open_fails(
        "st unknown model_type",
        &d,
        &cf,
        &["unknown model_type `gpt_neox`"],
    );

    let (d, _, cf) = hf_folder(dir, "bad_json", &cfg, Some(&good));
    std::fs::write(&cf, "{\"model_type\": \"llama\",\n").unwrap();
    c.open_fails("st config not JSON", &d, &cf, &["invalid JSON"]);

    let (d, _, _) = hf_folder(dir, "no_weights", &cfg, None);
    c.open_fails(
        "st directory without weights",
        &d,
        &d,
        &["no model.safetensors"],
    );

    let d = dir.join("empty_dir");
    std::fs::create_dir(&d).unwrap();
    c.open_fails(
        "st empty directory",
        &d,
        &d.join("config.json"),
        &["No such file"],
    );

    let mut s = St::tiny();
    s.tensors.retain(|t| t.name != down);
    s.relayout();
    let (d, _, _) = hf_folder(dir, "missing_tensor", &cfg, Some(&s.bytes()));
    c.later_fails(
        "st missing tensor",
        &d,
        &d,
        &["missing tensor", down],
        load_block0,
    );

    let mut s = St::tiny();
    s.get(down).data[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let (d, _, _) = hf_folder(dir, "nan", &cfg, Some(&s.bytes()));
    c.later_fails(
        "st NaN in a weight",
        &d,
        &d,
        &["non-finite", down],
        load_block0,
    );

    let mut s = St::tiny();
    s.get(q).shape = vec![4, 16];
    let (d, _, _) = hf_folder(dir, "wrong_shape", &cfg, Some(&s.bytes()));
    c.later_fails(
        "st shape differs from config",
        &d,
        &d,
        &["has shape [4, 16], expected [8, 8]", q],
        load_block0,
    );

    let mut s = St::tiny();
    let t = s.get(q);
    t.dtype = "I32".into();
    let (d, st, _) = hf_folder(dir, "i32", &cfg, Some(&s.bytes()));
    c.later_fails(
        "st unsupported dtype",
        &d,
        &st,
        &["unsupported type I32", q],
        load_block0,
    );
    c.finish();
}

#[test]
fn corrupt_gguf_files_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = Cases::default();
    let good = Gguf::tiny().bytes();
    let down = "blk.0.ffn_down.weight";
    let down_hf = "model.layers.0.mlp.down_proj.weight";
    let q = "blk.0.attn_q.weight";

    let p = write(dir, "empty.gguf", &[]);
    c.open_fails("gguf empty file", &p, &p, &["not a GGUF file"]);

    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGML");
    let p = write(dir, "magic.gguf", &bad);
    c.open_fails("gguf bad magic", &p, &p, &["not a GGUF file"]);

    let mut bad = good.clone();
    bad[4..8].copy_from_slice(&7u32.to_le_bytes());
    let p = write(dir, "version.gguf", &bad);
    c.open_fails("gguf bad version", &p, &p, &["unsupported GGUF version 7"]);

    let p = write(dir, "trunc_counts.gguf", &good[..20]);
    c.open_fails(
        "gguf truncated in the counts",
        &p,
        &p,
        &["truncated or corrupt GGUF header", "metadata count"],
    );

    let p = write(dir, "trunc_kv.gguf", &good[..60]);
    c.open_fails(
        "gguf truncated in the metadata",
        &p,
        &p,
        &["truncated or corrupt GGUF header"],
    );

    let p = write(dir, "trunc_infos.gguf", &good[..400]);
    c.open_fails(
        "gguf truncated in the tensor infos",
        &p,
        &p,
        &["truncated or corrupt GGUF header"],
    );

    // The first metadata key's length is the u64 at byte 24.
    let mut bad = good.clone();
    bad[24..32].copy_from_slice(&(good.len() as u64).to_le_bytes());
    let p = write(dir, "key_past_eof.gguf", &bad);
    c.open_fails(
        "gguf key length past EOF",
        &p,
        &p,
        &["metadata key 0 needs", "remain"],
    );

    let mut bad = good.clone();
    bad[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let p = write(dir, "string_2_40.gguf", &bad);
    c.open_fails(
        "gguf string length 2^40",
        &p,
        &p,
        &["needs 1099511627776 bytes"],
    );

    let mut g = Gguf::tiny();
    g.n_kv = Some(u64::MAX);
    let p = write(dir, "n_kv_max.gguf", &g.bytes());
    c.open_fails(
        "gguf n_kv = u64::MAX",
        &p,
        &p,
        &["truncated or corrupt GGUF header"],
    );

    let mut g = Gguf::tiny();
    let o = g.tensors[0].data.len().next_multiple_of(ALIGN) as u64;
    g.get(q).offset = Some(o);
    let p = write(dir, "overlap.gguf", &g.bytes());
    c.open_fails("gguf offsets overlapping", &p, &p, &["overlap", q]);

    let mut g = Gguf::tiny();
    g.get(q).offset = Some(1 << 20);
    let p = write(dir, "past_end.gguf", &g.bytes());
    c.open_fails(
        "gguf offset past the end",
        &p,
        &p,
        &[
            "claims 256 bytes at data offset 1048576",
            "the file has only",
        ],
    );

    let mut g = Gguf::tiny();
    g.get("output_norm.weight").ne = vec![8000];
    let p = write(dir, "shape_bytes.gguf", &g.bytes());
    c.open_fails(
        "gguf shape claims more bytes than stored",
        &p,
        &p,
        &["claims 32000 bytes", "output_norm.weight"],
    );

    let mut g = Gguf::tiny();
    g.get(q).ty = 8; // Q8_0 with rows of 8 values: not whole blocks of 32
    let p = write(dir, "row_blocks.gguf", &g.bytes());
    c.open_fails(
        "gguf row not a whole number of blocks",
        &p,
        &p,
        &["not a multiple of the Q8_0 block size 32"],
    );

    let mut g = Gguf::tiny();
    g.get(q).ty = 99;
    let p = write(dir, "type99.gguf", &g.bytes());
    c.open_fails("gguf unknown type id 99", &p, &p, &["unknown type id 99"]);

    let mut g = Gguf::tiny();
    g.get(q).ty = 40; // GGML_TYPE_COUNT: gguf-rs reached `unreachable!` on it (found reading gguf-rs)
    let p = write(dir, "type40.gguf", &g.bytes());
    c.open_fails(
        "gguf type id 40 (GGML_TYPE_COUNT)",
        &p,
        &p,
        &["unknown type id 40"],
    );

    let mut g = Gguf::tiny();
    g.get(q).ty = 10; // Q2_K: a real type this crate cannot dequantize
    g.get(q).ne = vec![256, 1];
    let p = write(dir, "q2k.gguf", &g.bytes());
    c.open_fails(
        "gguf unsupported type Q2_K",
        &p,
        &p,
        &["unsupported type Q2_K", q],
    );

    let mut g = Gguf::tiny();
    g.get(q).ne = vec![1 << 32, 1 << 32, 1 << 32];
    let p = write(dir, "overflow.gguf", &g.bytes());
    c.open_fails(
        "gguf dimensions overflow",
        &p,
        &p,
        &["product of its dimensions overflows"],
    );

    let mut g = Gguf::tiny();
    g.get(q).ne = vec![1, 2, 3, 4, 5];
    let p = write(dir, "dims5.gguf", &g.bytes());
    c.open_fails("gguf five dimensions", &p, &p, &["5 dimensions"]);

    let mut g = Gguf::tiny();
    g.get(q).ne = vec![250_000, 100_000];
    let p = write(dir, "huge.gguf", &g.bytes());
    c.open_fails(
        "gguf 100 GB tensor",
        &p,
        &p,
        &["claims 100000000000 bytes", q],
    );

    let mut g = Gguf::tiny();
    g.kvs.retain(|(k, _)| k != "llama.embedding_length");
    let p = write(dir, "no_embedding_length.gguf", &g.bytes());
    c.open_fails(
        "gguf without llama.embedding_length",
        &p,
        &p,
        &["missing metadata key `llama.embedding_length`"],
    );

    let mut g = Gguf::tiny();
    g.kvs.retain(|(k, _)| k != "general.architecture");
    let p = write(dir, "no_arch.gguf", &g.bytes());
    c.open_fails(
        "gguf without general.architecture",
        &p,
        &p,
        &["missing metadata key `general.architecture`"],
    );

    let mut g = Gguf::tiny();
    g.set_kv("general.architecture", Kv::Str("gpt2".into()));
    let p = write(dir, "gpt2.gguf", &g.bytes());
    c.open_fails(
        "gguf unknown architecture",
        &p,
        &p,
        &["unknown general.architecture `gpt2`"],
    );

    let mut g = Gguf::tiny();
    g.set_kv("llama.attention.head_count_kv", Kv::U32(3));
    let p = write(dir, "heads.gguf", &g.bytes());
    c.open_fails(
        "gguf inconsistent config",
        &p,
        &p,
        &["not a multiple of num_key_value_heads"],
    );

    // A 0-dimensional token_embd: the vocabulary size fell back to `shape[0]` and panicked.
    let mut g = Gguf::tiny();
    g.get("token_embd.weight").ne = vec![];
    let p = write(dir, "embd_0d.gguf", &g.bytes());
    c.open_fails(
        "gguf 0-dimensional token_embd",
        &p,
        &p,
        &["vocabulary size"],
    );

    let mut g = Gguf::tiny();
    g.tensors.retain(|t| t.name != down);
    let p = write(dir, "missing_tensor.gguf", &g.bytes());
    c.later_fails(
        "gguf missing tensor",
        &p,
        &p,
        &["missing tensor", down_hf],
        load_block0,
    );

    let mut g = Gguf::tiny();
    g.get(down).data[8..12].copy_from_slice(&f32::INFINITY.to_le_bytes());
    g.get(down).data[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let p = write(dir, "nan.gguf", &g.bytes());
    c.later_fails(
        "gguf NaN in a weight",
        &p,
        &p,
        &["2 non-finite", down_hf],
        load_block0,
    );

    let mut g = Gguf::tiny();
    g.get(q).ne = vec![16, 4];
    let p = write(dir, "wrong_shape.gguf", &g.bytes());
    c.later_fails(
        "gguf shape differs from config",
        &p,
        &p,
        &["has shape [4, 16], expected [8, 8]"],
        load_block0,
    );

    // A 0-dimensional attn_q: the q/k un-permutation read `shape[0]` and panicked. Its one
    // value cannot hold 2 heads of 4 for a width of 8, which opening now checks.
    let mut g = Gguf::tiny();
    g.get(q).ne = vec![];
    let p = write(dir, "q_0d.gguf", &g.bytes());
    c.open_fails(
        "gguf 0-dimensional attn_q",
        &p,
        &p,
        &["`llama.attention.head_count` implies 64 values", "holds 1"],
    );
    // A 1-dimensional attn_q of the right size opens and is refused when read.
    let mut g = Gguf::tiny();
    g.get(q).ne = vec![64];
    let p = write(dir, "q_1d.gguf", &g.bytes());
    c.later_fails(
        "gguf 1-dimensional attn_q",
        &p,
        &p,
        &["has shape [64], expected [8, 8]"],
        load_block0,
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------
// Hardening: allocations bounded by the file, counts bounded by the tensors, side files read
// with a limit, short error lines, invalid metadata named.

fn u32b(x: u32) -> Vec<u8> {
    x.to_le_bytes().to_vec()
}
fn u64b(x: u64) -> Vec<u8> {
    x.to_le_bytes().to_vec()
}
fn gstr(s: &[u8]) -> Vec<u8> {
    [u64b(s.len() as u64), s.to_vec()].concat()
}
/// A GGUF array value: item type, the count as written (true or not), the item bytes.
fn arr(item: u32, count: u64, items: &[u8]) -> Kv {
    Kv::Raw(9, [u32b(item), u64b(count), items.to_vec()].concat())
}
fn f32v(x: f32) -> Kv {
    Kv::F32(x)
}

/// A GGUF file of `n` tensor infos of no data (one dimension of 0, F32) and no metadata.
fn gguf_empty_infos(n: usize) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(u32b(3));
    out.extend(u64b(n as u64));
    out.extend(u64b(0));
    for i in 0..n {
        out.extend(gstr(format!("t{i}").as_bytes()));
        out.extend(u32b(1));
        out.extend(u64b(0));
        out.extend(u32b(0));
        out.extend(u64b(0));
    }
    out.resize(out.len().next_multiple_of(ALIGN), 0);
    out
}

/// A safetensors file from header text (padded with spaces) and data.
fn st_raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut text = header.to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = u64b(text.len() as u64);
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn gguf_metadata_and_tables_stay_within_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = Cases::default();
    let q = "blk.0.attn_q.weight";

    // Large arrays are legal and stay in the file's map: opening copies none of them, so it
    // takes no more than opening the tiny model (SLACK), where gguf-rs took one 32-byte JSON
    // value per item (5.1 GB for a 42 MB array).
    for (case, item, size, mb) in [
        ("u8", 0u32, 1usize, 42),
        ("i32", 5, 4, 4),
        ("f64", 12, 8, 4),
    ] {
        let mut g = Gguf::tiny();
        let n = (mb << 20) / size;
        g.kvs
            .push(("test.big".into(), arr(item, n as u64, &vec![1u8; n * size])));
        let p = write(dir, &format!("big_{case}.gguf"), &g.bytes());
        let case = format!("gguf {mb} MB {case} array opens without copying");
        c.run += 1;
        let t = Instant::now();
        let (r, largest, peak) = measure(|| Checkpoint::open(&p));
        c.check_time(&case, t.elapsed());
        match r {
            Ok(ck) if ck.gguf().unwrap().array("test.big").unwrap().len() == n => {}
            Ok(_) => c.fails.push(format!("{case}: wrong array length")),
            Err(e) => c.fails.push(format!("{case}: {e}")),
        }
        if largest > SLACK || peak > 8 * SLACK {
            c.fails.push(format!(
                "{case}: largest allocation {largest}, peak {peak} (bounds {SLACK}, {})",
                8 * SLACK
            ));
        }
    }

    // A million empty strings: 8 MB in the file, 24 MB once read as strings: over the budget.
    let n = 1usize << 20;
    let mut g = Gguf::tiny();
    g.kvs.push((
        "tokenizer.ggml.tokens".into(),
        arr(8, n as u64, &vec![0u8; n * 8]),
    ));
    let p = write(dir, "empty_strings.gguf", &g.bytes());
    c.fails(
        "gguf a million empty strings",
        &p,
        &["`tokenizer.ggml.tokens`", "bytes of memory"],
        || Checkpoint::open(&p),
    );

    // Counts the remaining bytes cannot hold are refused before any loop runs.
    for (case, item, count) in [
        ("string array of 2^40 items", 8u32, 1u64 << 40),
        ("string array of u64::MAX items", 8, u64::MAX),
        ("u8 array of u64::MAX items", 0, u64::MAX),
        ("u32 array of 2^62 items", 4, 1 << 62),
    ] {
        let mut g = Gguf::tiny();
        g.kvs
            .push(("test.lying".into(), arr(item, count, b"abcdefgh")));
        let p = write(dir, "lying.gguf", &g.bytes());
        c.fails(
            &format!("gguf {case}"),
            &p,
            &["`test.lying`", "array length"],
            || Checkpoint::open(&p),
        );
    }
    let mut g = Gguf::tiny();
    g.kvs.push((
        "test.nested".into(),
        arr(9, 1, &[u32b(0), u64b(1), vec![7]].concat()),
    ));
    let p = write(dir, "nested.gguf", &g.bytes());
    c.fails(
        "gguf array of arrays",
        &p,
        &["`test.nested`", "arrays of array"],
        || Checkpoint::open(&p),
    );
    let mut g = Gguf::tiny();
    g.kvs.push(("test.type13".into(), Kv::Raw(13, u64b(0))));
    let p = write(dir, "type13.gguf", &g.bytes());
    c.fails(
        "gguf value type 13",
        &p,
        &["`test.type13`", "unknown value type 13"],
        || Checkpoint::open(&p),
    );

    // 300k tiny keys: 6 MB in the file, ~30 MB as a map: over the budget.
    let mut g = Gguf::tiny();
    for i in 0..300_000 {
        g.kvs.push((format!("k{i}"), Kv::Raw(0, vec![1])));
    }
    let p = write(dir, "many_keys.gguf", &g.bytes());
    c.fails(
        "gguf 300k one-byte keys",
        &p,
        &["metadata key `k", "bytes of memory"],
        || Checkpoint::open(&p),
    );

    // 1.4 million tensor infos of no data: 55 MB, refused at the count.
    let p = write(dir, "empty_infos.gguf", &gguf_empty_infos(1_400_000));
    c.fails(
        "gguf 1.4M empty tensor infos",
        &p,
        &["1400000 tensor infos", "bytes of memory"],
        || Checkpoint::open(&p),
    );
    let mut bad = gguf_empty_infos(1);
    bad[8..16].copy_from_slice(&u64b(u64::MAX));
    let p = write(dir, "n_tensors_max.gguf", &bad);
    c.fails(
        "gguf tensor count u64::MAX",
        &p,
        &["tensor count 18446744073709551615"],
        || Checkpoint::open(&p),
    );

    // Tensors of no data but huge dimensions: refused when opened, not minutes later in the
    // q/k un-permutation that loops over rows.
    for (case, ne) in [
        ("[0, 2^32]", vec![0u64, 1 << 32]),
        ("[2^32, 0]", vec![1 << 32, 0]),
        ("[2^60, 0]", vec![1 << 60, 0]),
        ("[0, 2^60]", vec![0, 1 << 60]),
    ] {
        let mut g = Gguf::tiny();
        let t = g.get(q);
        t.ne = ne;
        t.data.clear();
        let p = write(dir, "zero_rows.gguf", &g.bytes());
        c.fails(
            &format!("gguf attn_q of no data, ne {case}"),
            &p,
            &[q, "dimension", "values a"],
            || Checkpoint::open(&p).and_then(|ck| load_block0(&ck)),
        );
    }
    c.finish();
}

#[test]
fn safetensors_tables_stay_within_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = Cases::default();
    let cfg = tiny_config();

    // 1.4 million zero-size tensors (an 80 MB header): refused once the table outgrows the
    // file, long before it holds them all.
    let mut h = String::from("{");
    for i in 0..1_400_000 {
        if i > 0 {
            h.push(',');
        }
        h.push_str(&format!(
            "\"t{i}\":{{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}"
        ));
    }
    h.push('}');
    let (d, st, _) = hf_folder(dir, "many_empty", &cfg, Some(&st_raw(&h, &[])));
    drop(h);
    c.fails(
        "st 1.4M zero-size tensors",
        &st,
        &["more tensors than its file can back"],
        || Checkpoint::open(&d),
    );

    // A zero-size tensor with a huge dimension is refused when opened.
    for (case, shape) in [
        ("[0, 2^60]", "[0, 1152921504606846976]"),
        ("[2^32, 0]", "[4294967296, 0]"),
    ] {
        let mut s = St::tiny();
        s.tensors.push(StTensor {
            name: "extra".into(),
            dtype: "F32".into(),
            shape: serde_json::from_str(shape).unwrap(),
            offsets: (0, 0),
            data: vec![],
        });
        let end = s.tensors[s.tensors.len() - 2].offsets.1;
        s.tensors.last_mut().unwrap().offsets = (end, end);
        let (d, st, _) = hf_folder(dir, "zero_dims", &cfg, Some(&s.bytes()));
        c.fails(
            &format!("st zero-size tensor of shape {case}"),
            &st,
            &["`extra`", "dimension", "values a"],
            || Checkpoint::open(&d),
        );
    }

    // Duplicate names in the JSON header (serde would keep the last).
    let good = St::tiny().bytes();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[8..8 + n]).unwrap().trim_end();
    let dup = header.strip_suffix('}').unwrap().to_string()
        + r#","model.norm.weight":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#;
    let (d, st, _) = hf_folder(dir, "dup_st", &cfg, Some(&st_raw(&dup, &good[8 + n..])));
    c.fails(
        "st duplicate tensor name",
        &st,
        &["`model.norm.weight` appears twice"],
        || Checkpoint::open(&d),
    );

    // A shape of more than 64 dimensions is refused while it is read.
    let mut s = St::tiny();
    s.get("model.norm.weight").shape = [vec![1u64; 100_000], vec![8]].concat();
    let (d, st, _) = hf_folder(dir, "many_dims", &cfg, Some(&s.bytes()));
    c.fails(
        "st shape of 100001 dimensions",
        &st,
        &["more than 64 dimensions"],
        || Checkpoint::open(&d),
    );

    // An index of a million entries is read as a stream, in n log n (the shard list was
    // deduplicated in n squared), with memory for its distinct shard names only.
    let (d, _, _) = hf_folder(dir, "big_index", &cfg, None);
    let mut map: serde_json::Map<String, serde_json::Value> = (0..1_000_000)
        .map(|i| (format!("t{i}"), json!(format!("s{}.safetensors", i % 1000))))
        .collect();
    map.insert("z".into(), json!("../evil.safetensors"));
    let index = d.join("model.safetensors.index.json");
    std::fs::write(&index, json!({"weight_map": map}).to_string()).unwrap();
    drop(map);
    c.fails(
        "st index of a million entries",
        &index,
        &["shard name `../evil.safetensors` must be a plain file name"],
        || Checkpoint::open(&d),
    );
    let (d, _, _) = hf_folder(dir, "many_shards", &cfg, None);
    let map: serde_json::Map<String, serde_json::Value> = (0..1_000_000)
        .map(|i| (format!("t{i}"), json!(format!("s{i}"))))
        .collect();
    let index = d.join("model.safetensors.index.json");
    std::fs::write(&index, json!({"weight_map": map}).to_string()).unwrap();
    drop(map);
    c.fails(
        "st index of a million shard files",
        &index,
        &["names more shard files than its size allows"],
        || Checkpoint::open(&d),
    );
    c.finish();
}

#[test]
fn counts_must_fit_the_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = Cases::default();

    // block_count 2^24 passed validation and `convert` then built 150 million names.
    for (case, key, v, needles) in [
        (
            "block_count 2^24",
            "llama.block_count",
            1u32 << 24,
            &["`llama.block_count` = 16777216", "hold 1 layer"][..],
        ),
        (
            "block_count 2",
            "llama.block_count",
            2,
            &["`llama.block_count` = 2", "hold 1 layer"][..],
        ),
        (
            "feed_forward_length 2^20",
            "llama.feed_forward_length",
            1 << 20,
            &["`llama.feed_forward_length` implies", "ffn_gate"][..],
        ),
        (
            "head_count_kv 2",
            "llama.attention.head_count_kv",
            2,
            &[
                "`llama.attention.head_count_kv` implies 64 values",
                "holds 32",
            ][..],
        ),
    ] {
        let mut g = Gguf::tiny();
        g.set_kv(key, Kv::U32(v));
        let p = write(dir, "counts.gguf", &g.bytes());
        let needles: Vec<&str> = needles
            .iter()
            .map(|n| n.replace("ffn_gate", "model.layers.0.mlp.gate_proj.weight"))
            .map(|n| &*Box::leak(n.into_boxed_str()))
            .collect();
        c.open_fails(&format!("gguf {case}"), &p, &p, &needles);
    }
    let mut g = Gguf::tiny();
    g.kvs.push(("llama.vocab_size".into(), Kv::U32(1 << 24)));
    let p = write(dir, "vocab.gguf", &g.bytes());
    c.open_fails(
        "gguf vocab_size 2^24",
        &p,
        &p,
        &["`llama.vocab_size` implies", "model.embed_tokens.weight"],
    );
    // 1024 heads of 4: 32768 rows of attn_q, which holds 64 values.
    let mut g = Gguf::tiny();
    g.set_kv("llama.attention.head_count", Kv::U32(1024));
    g.kvs
        .push(("llama.attention.key_length".into(), Kv::U32(4)));
    let p = write(dir, "heads.gguf", &g.bytes());
    c.open_fails(
        "gguf head_count 1024",
        &p,
        &p,
        &["`llama.attention.head_count` implies 32768 values"],
    );

    for (case, key, v, needles) in [
        (
            "num_hidden_layers 2^24",
            "num_hidden_layers",
            1usize << 24,
            &["`num_hidden_layers` = 16777216", "hold 1 layer"][..],
        ),
        (
            "vocab_size 2^24",
            "vocab_size",
            1 << 24,
            &["`vocab_size` implies", "model.embed_tokens.weight"][..],
        ),
        (
            "num_key_value_heads 2",
            "num_key_value_heads",
            2,
            &["`num_key_value_heads` implies 64 values"][..],
        ),
        (
            "intermediate_size 2^20",
            "intermediate_size",
            1 << 20,
            &["`intermediate_size` implies"][..],
        ),
    ] {
        let mut cfg = tiny_config();
        cfg[key] = json!(v);
        let (d, _, cf) = hf_folder(dir, "counts", &cfg, Some(&St::tiny().bytes()));
        c.open_fails(&format!("st {case}"), &d, &cf, needles);
    }
    c.finish();
}

#[test]
fn side_files_are_read_with_a_limit() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = Cases::default();
    let cfg = tiny_config();
    let good = St::tiny().bytes();
    let not_regular = "not a regular file";

    // config.json: a link to /dev/zero reached the memory cap.
    let (d, _, cf) = hf_folder(dir, "cfg_zero", &cfg, Some(&good));
    std::fs::remove_file(&cf).unwrap();
    symlink("/dev/zero", &cf).unwrap();
    c.fails("config.json -> /dev/zero", &cf, &[not_regular], || {
        Checkpoint::open(&d)
    });

    let (d, _, cf) = hf_folder(dir, "cfg_dir", &cfg, Some(&good));
    std::fs::remove_file(&cf).unwrap();
    std::fs::create_dir(&cf).unwrap();
    c.fails("config.json is a directory", &cf, &[not_regular], || {
        Checkpoint::open(&d)
    });

    // A FIFO would block the open forever; it is refused before.
    let (d, _, cf) = hf_folder(dir, "cfg_fifo", &cfg, Some(&good));
    std::fs::remove_file(&cf).unwrap();
    if std::process::Command::new("mkfifo")
        .arg(&cf)
        .status()
        .is_ok_and(|s| s.success())
    {
        c.fails("config.json is a FIFO", &cf, &[not_regular], || {
            Checkpoint::open(&d)
        });
    }

    let (d, _, cf) = hf_folder(dir, "cfg_big", &cfg, Some(&good));
    let mut text = serde_json::to_string(&cfg).unwrap();
    text.insert_str(1, &" ".repeat(2 << 20));
    std::fs::write(&cf, text).unwrap();
    c.fails(
        "config.json of 2 MiB",
        &cf,
        &["more than the 1048576-byte limit"],
        || Checkpoint::open(&d),
    );

    // The weights and the index.
    let (d, st, _) = hf_folder(dir, "st_zero", &cfg, None);
    symlink("/dev/zero", &st).unwrap();
    c.fails(
        "model.safetensors -> /dev/zero",
        &st,
        &[not_regular],
        || Checkpoint::open(&d),
    );
    let (d, _, _) = hf_folder(dir, "index_zero", &cfg, None);
    let index = d.join("model.safetensors.index.json");
    symlink("/dev/zero", &index).unwrap();
    c.fails("index.json -> /dev/zero", &index, &[not_regular], || {
        Checkpoint::open(&d)
    });
    let p = dir.join("zero.gguf");
    symlink("/dev/zero", &p).unwrap();
    c.fails("model.gguf -> /dev/zero", &p, &[not_regular], || {
        Checkpoint::open(&p)
    });

    // Tokenizer files.
    let (d, _, _) = hf_folder(dir, "tok_zero", &cfg, Some(&good));
    let tj = d.join("tokenizer.json");
    symlink("/dev/zero", &tj).unwrap();
    let ck = Checkpoint::open(&d).unwrap();
    c.fails("tokenizer.json -> /dev/zero", &tj, &[not_regular], || {
        model::load_tokenizer(&ck)
    });
    let (d, _, _) = hf_folder(dir, "tok_big", &cfg, Some(&good));
    let tj = d.join("tokenizer.json");
    std::fs::File::create(&tj)
        .unwrap()
        .set_len(65 << 20)
        .unwrap(); // sparse
    c.fails(
        "tokenizer.json of 65 MiB",
        &tj,
        &["more than the 67108864-byte limit"],
        || model::tokenizer::Tokenizer::from_file(&tj),
    );
    let tc = d.join("tokenizer_config.json");
    std::fs::File::create(&tc)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    c.fails(
        "tokenizer_config.json of 17 MiB",
        &tc,
        &["more than the 16777216-byte limit"],
        || model::io::read_side_file(&tc),
    );
    let gc = d.join("generation_config.json");
    symlink("/dev/zero", &gc).unwrap();
    c.fails(
        "generation_config.json -> /dev/zero",
        &gc,
        &[not_regular],
        || model::io::copy_side_file(&gc, &dir.join("copy.json")),
    );
    c.finish();
}

#[test]
fn error_lines_stay_short() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = Cases::default();
    let cfg = tiny_config();
    let q = "model.layers.0.self_attn.q_proj.weight";

    // A 50 MB tensor name with bad offsets (a 99 MB header gave a 50 MB "line").
    let long = "n".repeat(50 << 20);
    let mut s = St::tiny();
    s.get(q).name = long.clone();
    s.tensors
        .iter_mut()
        .find(|t| t.name == long)
        .unwrap()
        .offsets
        .0 += 4;
    let (d, st, _) = hf_folder(dir, "long_name", &cfg, Some(&s.bytes()));
    c.open_fails(
        "st 50 MB tensor name",
        &d,
        &st,
        &["invalid offset for tensor `nnnn", "bytes)`"],
    );
    drop(long);

    let mut s = St::tiny();
    s.get(q).dtype = "X".repeat(1 << 20);
    let (d, st, _) = hf_folder(dir, "long_dtype", &cfg, Some(&s.bytes()));
    c.open_fails("st 1 MB dtype", &d, &st, &["unknown dtype `XXXX", q]);

    // A value of the wrong type: serde's message quotes it.
    let header =
        json!({"x": {"dtype": "F32", "shape": "y".repeat(1 << 20), "data_offsets": [0, 0]}});
    let (d, st, _) = hf_folder(
        dir,
        "long_value",
        &cfg,
        Some(&st_raw(&header.to_string(), &[])),
    );
    c.open_fails(
        "st 1 MB value of the wrong type",
        &d,
        &st,
        &["invalid safetensors header: a string where a shape belongs"],
    );

    let mut s = St::tiny();
    s.get(q).name = "a\nb\r\x1b[2Jc".into();
    let t = s
        .tensors
        .iter_mut()
        .find(|t| t.name.starts_with("a\n"))
        .unwrap();
    t.offsets.0 += 4;
    let (d, st, _) = hf_folder(dir, "newline", &cfg, Some(&s.bytes()));
    c.open_fails(
        "st tensor name with control characters",
        &d,
        &st,
        &["`a\\nb\\r\\u{1b}[2Jc`"],
    );

    // A shape of 62 dimensions in a mismatch message: shown cut.
    let mut s = St::tiny();
    s.get(q).shape = [vec![1u64; 60], vec![8, 8]].concat();
    let (d, _, _) = hf_folder(dir, "long_shape", &cfg, Some(&s.bytes()));
    c.later_fails(
        "st 62-dimensional shape in a message",
        &d,
        &d,
        &["(62 dimensions), expected [8, 8]"],
        load_block0,
    );

    let mut cj = cfg.clone();
    cj["model_type"] = json!("m".repeat(500_000));
    let (d, _, cf) = hf_folder(dir, "long_model_type", &cj, Some(&St::tiny().bytes()));
    // config.json is at most 1 MiB, so what its messages allocate is bounded by the margin.
    c.fails(
        "config.json 500 KB model_type",
        &cf,
        &["unknown model_type `mmmm"],
        || Checkpoint::open(&d),
    );

    // GGUF: a 1 MB tensor name of unknown type, a 1 MB duplicated key, control characters.
    let mut g = Gguf::tiny();
    let t = g.get("blk.0.attn_q.weight");
    t.name = "q".repeat(1 << 20);
    t.ty = 99;
    let p = write(dir, "long_name.gguf", &g.bytes());
    c.open_fails(
        "gguf 1 MB tensor name",
        &p,
        &p,
        &["tensor `qqqq", "unknown type id 99"],
    );
    let mut g = Gguf::tiny();
    let k = "k".repeat(1 << 20);
    g.kvs.push((k.clone(), Kv::U32(1)));
    g.kvs.push((k, Kv::U32(2)));
    let p = write(dir, "long_key.gguf", &g.bytes());
    c.open_fails(
        "gguf 1 MB duplicated key",
        &p,
        &p,
        &["metadata key `kkkk", "appears twice"],
    );
    let mut g = Gguf::tiny();
    g.set_kv("general.architecture", Kv::Str("x\ny".into()));
    let p = write(dir, "arch_newline.gguf", &g.bytes());
    c.open_fails("gguf architecture with a newline", &p, &p, &["`x\\ny`"]);
    c.finish();
}

#[test]
fn invalid_gguf_metadata_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = Cases::default();
    let base = "llama.rope.freq_base";
    let eps = "llama.attention.layer_norm_rms_epsilon";
    let align = "general.alignment";

    // (case, key, value, needles); `push` adds the key, else it replaces the tiny model's.
    let f64v = |x: f64| Kv::Raw(12, x.to_le_bytes().to_vec());
    let cases: Vec<(&str, &str, Kv, Vec<&str>)> = vec![
        (
            "rope base NaN",
            base,
            f32v(f32::NAN),
            vec!["`llama.rope.freq_base` = NaN is invalid"],
        ),
        (
            "rope base +Inf",
            base,
            f32v(f32::INFINITY),
            vec!["`llama.rope.freq_base` = inf is invalid"],
        ),
        (
            "rope base -Inf (f64)",
            base,
            f64v(f64::NEG_INFINITY),
            vec!["`llama.rope.freq_base` = -inf is invalid"],
        ),
        (
            "rope base -10000",
            base,
            f32v(-10_000.0),
            vec!["`llama.rope.freq_base` = -10000 is invalid"],
        ),
        (
            "rope base 0",
            base,
            f32v(0.0),
            vec!["`llama.rope.freq_base` = 0 is invalid"],
        ),
        (
            "rope base a string",
            base,
            Kv::Str("1e4".into()),
            vec!["`llama.rope.freq_base` has type string"],
        ),
        (
            "alignment 0",
            align,
            Kv::U32(0),
            vec!["`general.alignment` is 0", "power of two"],
        ),
        (
            "alignment 3",
            align,
            Kv::U32(3),
            vec!["`general.alignment` is 3", "power of two"],
        ),
        (
            "alignment 7",
            align,
            Kv::U32(7),
            vec!["`general.alignment` is 7", "power of two"],
        ),
        (
            "alignment 48",
            align,
            Kv::U32(48),
            vec!["`general.alignment` is 48", "power of two"],
        ),
        (
            "alignment -32 (i32)",
            align,
            Kv::Raw(5, (-32i32).to_le_bytes().to_vec()),
            vec!["`general.alignment` is -32"],
        ),
        (
            "alignment 32.0 (f32)",
            align,
            f32v(32.0),
            vec!["`general.alignment` has type f32"],
        ),
        (
            "alignment a string",
            align,
            Kv::Str("32".into()),
            vec!["`general.alignment` has type string"],
        ),
        (
            "alignment an array",
            align,
            arr(4, 1, &u32b(32)),
            vec!["`general.alignment` has type array"],
        ),
        (
            "epsilon NaN",
            eps,
            f32v(f32::NAN),
            vec!["`llama.attention.layer_norm_rms_epsilon` = NaN is invalid"],
        ),
        (
            "epsilon +Inf",
            eps,
            f32v(f32::INFINITY),
            vec!["= inf is invalid"],
        ),
        ("epsilon -1e-5", eps, f32v(-1e-5), vec!["is invalid"]),
        ("epsilon 0", eps, f32v(0.0), vec!["= 0 is invalid"]),
        (
            "epsilon a bool",
            eps,
            Kv::Raw(7, vec![1]),
            vec!["`llama.attention.layer_norm_rms_epsilon` has type bool"],
        ),
        (
            "block_count a string",
            "llama.block_count",
            Kv::Str("1".into()),
            vec!["`llama.block_count` has type string"],
        ),
        (
            "block_count -1 (i32)",
            "llama.block_count",
            Kv::Raw(5, (-1i32).to_le_bytes().to_vec()),
            vec!["`llama.block_count` is -1"],
        ),
        (
            "block_count 0",
            "llama.block_count",
            Kv::U32(0),
            vec!["`llama.block_count` = 0 is out of range"],
        ),
        (
            "head_count_kv a float",
            "llama.attention.head_count_kv",
            f32v(1.0),
            vec!["`llama.attention.head_count_kv` has type f32"],
        ),
        (
            "bos id 2^40",
            "tokenizer.ggml.bos_token_id",
            Kv::Raw(10, u64b(1 << 40)),
            vec!["`tokenizer.ggml.bos_token_id` = 1099511627776"],
        ),
        (
            "architecture a u32",
            "general.architecture",
            Kv::U32(1),
            vec!["`general.architecture` has type u32"],
        ),
    ];
    for (case, key, v, needles) in cases {
        let mut g = Gguf::tiny();
        match g.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = v,
            None => g.kvs.push((key.into(), v)),
        }
        let p = write(dir, "meta.gguf", &g.bytes());
        c.open_fails(&format!("gguf {case}"), &p, &p, &needles);
    }

    // A duplicate key no longer lets the last value win, nor a duplicate tensor name.
    let mut g = Gguf::tiny();
    g.kvs.push(("llama.block_count".into(), Kv::U32(1)));
    let p = write(dir, "dup_key.gguf", &g.bytes());
    c.open_fails(
        "gguf duplicate key, same value",
        &p,
        &p,
        &["metadata key `llama.block_count` appears twice"],
    );
    let mut g = Gguf::tiny();
    g.kvs.push(("general.architecture".into(), Kv::U32(7)));
    let p = write(dir, "dup_key2.gguf", &g.bytes());
    c.open_fails(
        "gguf duplicate key, other type",
        &p,
        &p,
        &["metadata key `general.architecture` appears twice"],
    );
    let mut g = Gguf::tiny();
    let norm = g.get("output_norm.weight");
    let copy = GTensor {
        name: norm.name.clone(),
        ne: norm.ne.clone(),
        ty: norm.ty,
        data: norm.data.clone(),
        offset: None,
    };
    g.tensors.push(copy);
    let p = write(dir, "dup_tensor.gguf", &g.bytes());
    c.open_fails(
        "gguf duplicate tensor name",
        &p,
        &p,
        &["tensor `output_norm.weight` appears twice"],
    );

    // Valid values of the keys above still open.
    for (case, key, v) in [
        ("alignment 32 (u64)", align, Kv::Raw(10, u64b(32))),
        ("rope base 5e5", base, f32v(5e5)),
        ("epsilon 1e-6 (f64)", eps, f64v(1e-6)),
    ] {
        let mut g = Gguf::tiny();
        match g.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = v,
            None => g.kvs.push((key.into(), v)),
        }
        let p = write(dir, "ok.gguf", &g.bytes());
        c.succeeds(&format!("gguf {case} opens"), &p, || Checkpoint::open(&p));
    }
    c.finish();
}

/// A word-level `tokenizer.json` of `n` tokens (`<unk>`, then `w1`...), plus `extra` as an
/// added token of id `extra_id`.
fn word_tokenizer(n: usize, extra: Option<u32>) -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), json!(0));
    for i in 1..n {
        vocab.insert(format!("w{i}"), json!(i));
    }
    let added: Vec<serde_json::Value> = extra
        .map(|id| json!({"id": id, "content": "<extra>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .into_iter()
        .collect();
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}})
}

#[test]
fn tokenizer_must_fit_the_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = Cases::default();
    let good = St::tiny().bytes();
    // Both checks: with the tokenizer built (`convert` to HF, `quant`) and without
    // (`convert` to GGUF copies the tokenizer as it is).
    let check = |d: &Path| {
        let ck = Checkpoint::open(d)?;
        let fits = model::tokenizer::check_fits(&ck);
        let built = model::tokenizer::load_checked(&ck).map(|_| ());
        match (fits, built) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(a), Err(b)) if a.to_string() == b.to_string() => Err(a),
            (a, b) => Err(ModelError::format(
                d,
                format!("the checks disagree: {a:?} vs {b:?}"),
            )),
        }
    };

    for (case, n, extra, needles) in [
        (
            "20 tokens for 16 rows",
            20usize,
            None,
            &["token `w19` has id 19", "`vocab_size` is 16"][..],
        ),
        (
            "16 words and an added token",
            16,
            Some(16u32),
            &["`<extra>` has id 16", "`vocab_size` is 16"][..],
        ),
    ] {
        let (d, _, _) = hf_folder(dir, "tok", &tiny_config(), Some(&good));
        let tj = d.join("tokenizer.json");
        std::fs::write(&tj, word_tokenizer(n, extra).to_string()).unwrap();
        c.fails(&format!("st tokenizer of {case}"), &tj, needles, || {
            check(&d)
        });
    }
    let (d, _, _) = hf_folder(dir, "tok", &tiny_config(), Some(&good));
    std::fs::write(
        d.join("tokenizer.json"),
        word_tokenizer(15, Some(15)).to_string(),
    )
    .unwrap();
    c.succeeds(
        "st tokenizer of 15 words and an added token",
        &d.join("model.safetensors"),
        || check(&d),
    );

    let mut cfg = tiny_config();
    cfg["eos_token_id"] = json!([2, 40]);
    let (d, _, cf) = hf_folder(dir, "tok_eos", &cfg, Some(&good));
    std::fs::write(
        d.join("tokenizer.json"),
        word_tokenizer(16, None).to_string(),
    )
    .unwrap();
    c.fails("st eos id 40 of 16", &cf, &["`eos_token_id` = 40"], || {
        check(&d)
    });

    // GGUF: 20 tokens while `llama.vocab_size` (and token_embd) say 16.
    let gguf_tok = |n: usize, vocab: Option<u32>| {
        let mut g = Gguf::tiny();
        g.kvs
            .push(("tokenizer.ggml.model".into(), Kv::Str("gpt2".into())));
        g.kvs.push((
            "tokenizer.ggml.tokens".into(),
            Kv::Strs((0..n).map(|i| format!("t{i}")).collect()),
        ));
        g.kvs
            .push(("tokenizer.ggml.merges".into(), Kv::Strs(vec![])));
        if let Some(v) = vocab {
            g.kvs.push(("llama.vocab_size".into(), Kv::U32(v)));
        }
        g.bytes()
    };
    let p = write(dir, "tok20.gguf", &gguf_tok(20, Some(16)));
    c.fails(
        "gguf 20 tokens for vocab_size 16",
        &p,
        &["token `t19` has id 19", "`llama.vocab_size` is 16"],
        || check(&p),
    );
    let p = write(dir, "tok16.gguf", &gguf_tok(16, None));
    c.succeeds("gguf 16 tokens", &p, || check(&p));
    let mut g = Gguf::tiny();
    g.kvs
        .push(("tokenizer.ggml.bos_token_id".into(), Kv::U32(16)));
    g.kvs
        .push(("tokenizer.ggml.model".into(), Kv::Str("gpt2".into())));
    g.kvs.push((
        "tokenizer.ggml.tokens".into(),
        Kv::Strs((0..16).map(|i| format!("t{i}")).collect()),
    ));
    g.kvs
        .push(("tokenizer.ggml.merges".into(), Kv::Strs(vec![])));
    let p = write(dir, "bos16.gguf", &g.bytes());
    c.fails(
        "gguf bos id 16 of 16",
        &p,
        &["`tokenizer.ggml.bos_token_id` = 16"],
        || check(&p),
    );
    c.finish();
}

/// The `config_json` fuzz target: a config whose dimensions each pass `validate` (at most
/// 2^24) but whose product does not fit u64 panicked in `Config::num_params` with overflow
/// checks on (and wrapped without); it now saturates at `u64::MAX`.
#[test]
fn num_params_of_huge_valid_config_saturates() {
    let big = 1u64 << 24;
    let text = json!({"model_type": "llama", "vocab_size": big, "hidden_size": big,
        "intermediate_size": big, "num_hidden_layers": big, "num_attention_heads": 1 << 14})
    .to_string();
    let c = model::Config::from_json_str(&text, Path::new("config.json")).unwrap();
    assert_eq!(c.head_dim(), 1024);
    assert_eq!(c.num_params(), u64::MAX);
    // Counts that fit are unchanged: 2^20 layers of 2^20-wide blocks (h = i = v = 2^20,
    // q = kv = 2^20): block 4h^2 + 3h^2 + 2h, plus 2vh + h for the untied embeddings.
    let h = 1u64 << 20;
    let text = json!({"model_type": "llama", "vocab_size": h, "hidden_size": h,
        "intermediate_size": h, "num_hidden_layers": h, "num_attention_heads": 1 << 10})
    .to_string();
    let c = model::Config::from_json_str(&text, Path::new("config.json")).unwrap();
    assert_eq!(c.num_params(), h * (7 * h * h + 2 * h) + 2 * h * h + h);
}

/// The `tokenizer_gguf` fuzz target: NaN entries in a SentencePiece vocabulary's
/// `tokenizer.ggml.scores` made the merge ranking's comparison no total order, and the sort
/// panicked ("user-provided comparison function does not correctly implement a total
/// order"). NaN now ranks last; the tokenizer builds.
#[test]
fn nan_token_scores_build_a_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let letters: Vec<String> = ('a'..='p').map(String::from).collect();
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    tokens.extend(letters.iter().cloned());
    for a in &letters {
        for b in &letters {
            tokens.push(format!("{a}{b}"));
        }
    }
    // Scores in a scrambled order (so the sort has work to do), every tenth NaN.
    let n = tokens.len();
    let scores: Vec<u8> = (0..n)
        .flat_map(|i| {
            let s = if i % 10 == 0 {
                f32::NAN
            } else {
                -(((i * 37) % n) as f32)
            };
            s.to_le_bytes()
        })
        .collect();
    let mut g = Gguf::tiny();
    g.kvs
        .push(("tokenizer.ggml.model".into(), Kv::Str("llama".into())));
    g.kvs
        .push(("tokenizer.ggml.tokens".into(), Kv::Strs(tokens)));
    g.kvs
        .push(("tokenizer.ggml.scores".into(), arr(6, n as u64, &scores)));
    let p = write(tmp.path(), "nan_scores.gguf", &g.bytes());
    let file = model::gguf::GgufFile::open(&p).unwrap();
    let tok = catch_unwind(AssertUnwindSafe(|| model::Tokenizer::from_gguf(&file)))
        .expect("no panic")
        .unwrap();
    let ids = tok.encode("abcd").unwrap();
    // (The text's "\u{2581}" prefix is not in this vocabulary: it decodes as `<unk>`.)
    assert!(tok.decode(&ids).unwrap().contains("abcd"), "{ids:?}");
}

/// Writes the seed corpus of the cargo-fuzz targets (see fuzz/README.md):
/// `FUZZ_SEEDS=$PWD/fuzz/corpus cargo test -p model --test bad_input -- --ignored write_fuzz_seeds`
#[test]
#[ignore = "writes the cargo-fuzz seed corpus when FUZZ_SEEDS is set"]
fn write_fuzz_seeds() {
    let Ok(root) = std::env::var("FUZZ_SEEDS") else {
        return;
    };
    let (g, st) = (
        Path::new(&root).join("gguf_open"),
        Path::new(&root).join("safetensors_open"),
    );
    std::fs::create_dir_all(&g).unwrap();
    std::fs::create_dir_all(&st).unwrap();
    write(&g, "tiny", &Gguf::tiny().bytes());
    // One small tensor of every type the reader dequantizes, and a string array.
    let mut q = Gguf::tiny();
    for (ty, n, bytes) in [
        (1u32, 1u64, 2usize),
        (30, 1, 2),
        (2, 32, 18),
        (3, 32, 20),
        (6, 32, 22),
        (7, 32, 24),
        (8, 32, 34),
        (12, 256, 144),
        (13, 256, 176),
        (14, 256, 210),
    ] {
        let data = (0..bytes).map(|i| (i * 37 + ty as usize) as u8).collect();
        q.tensors.push(GTensor {
            name: format!("extra.{ty}"),
            ne: vec![n],
            ty,
            data,
            offset: None,
        });
    }
    q.kvs.push((
        "tokenizer.ggml.tokens".into(),
        Kv::Strs(vec!["a".into(), "b".into(), "<s>".into()]),
    ));
    write(&g, "all_types", &q.bytes());
    write(&st, "tiny", &St::tiny().bytes());
    for dt in ["F16", "BF16"] {
        let mut s = St::tiny();
        let t = s.get("model.norm.weight");
        t.dtype = dt.into();
        t.data.truncate(t.data.len() / 2);
        s.relayout();
        write(&st, &format!("norm_{dt}"), &s.bytes());
    }
}
