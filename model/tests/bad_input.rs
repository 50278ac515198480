//! Bad input: a corpus of corrupted safetensors folders and GGUF files, generated here, each
//! of which must give one error line naming the file and the problem, never a panic, and
//! never a heap allocation larger than the file while it is opened.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use model::{Checkpoint, ModelError};
use serde_json::json;

// ---------------------------------------------------------------------------------------
// A global allocator that records the largest single allocation made by the thread that
// asked for it (thread-local, so tests running in parallel threads do not interfere).

struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the thread-locals may already be gone while a thread is torn down.
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(p, l, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`, returning its result and the largest single allocation this thread made in it.
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|m| m.set(0));
    TRACK.with(|t| t.set(true));
    let r = f();
    TRACK.with(|t| t.set(false));
    (r, LARGEST.with(|m| m.get()))
}

/// Allocations up to this size are allowed whatever the file size: opening a GGUF file
/// reads the header through gguf-rs via a `BufReader` whose fixed 8 KiB buffer (std's
/// `DEFAULT_BUF_SIZE`) is the largest file-independent allocation. Measured over every case
/// below, everything else stays under 1.2 KiB for these files of at most 4 KiB (path and
/// error strings, config.json text, the safetensors header table), so 8 KiB is the smallest
/// bound that holds. Anything sized by a claimed length (a 2^40-byte string, a 100 GB
/// tensor, u64::MAX metadata entries) is far above it.
const SLACK: usize = 8 << 10;

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
    /// Checks an error is one line, names `file` and contains every `needle`.
    fn check_message(&mut self, case: &str, e: &ModelError, file: &Path, needles: &[&str]) {
        let msg = e.to_string();
        if msg.contains('\n') {
            self.fails
                .push(format!("{case}: error is not one line: {msg:?}"));
        }
        if !msg.contains(&file.display().to_string()) {
            self.fails.push(format!(
                "{case}: error does not name {}: {msg}",
                file.display()
            ));
        }
        for n in needles {
            if !msg.contains(n) {
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

    /// `Checkpoint::open(path)` must fail without panicking, with a one-line error naming
    /// `file` and the problem, and allocate no more than max(size of `file`, SLACK) at once.
    fn open_fails(&mut self, case: &str, path: &Path, file: &Path, needles: &[&str]) {
        self.run += 1;
        let (r, largest) =
            largest_alloc(|| catch_unwind(AssertUnwindSafe(|| Checkpoint::open(path).map(|_| ()))));
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
    c.open_fails("st unknown dtype", &d, &st, &["unknown variant `X9`"]);

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

    // A 0-dimensional attn_q: the q/k un-permutation read `shape[0]` and panicked.
    let mut g = Gguf::tiny();
    g.get(q).ne = vec![];
    let p = write(dir, "q_0d.gguf", &g.bytes());
    c.later_fails(
        "gguf 0-dimensional attn_q",
        &p,
        &p,
        &["has shape [], expected [8, 8]"],
        load_block0,
    );
    c.finish();
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
