//! compressed-tensors folders through `Checkpoint`: `pack-quantized` and `sparse-bitmask`
//! folders written here from the formats' descriptions read back as the weights they encode,
//! bit for bit, and the engine gives the same logits as on a dense twin holding those weights.
//! Folders whose parts disagree, or whose config names a variant this reader does not
//! decompress, are refused with one short line naming the file and the tensor or format,
//! never a panic, and with no allocation larger than the file.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use model::compressed::{pack_codes, packed_words};
use model::safetensors_io::{PlanDtype, StoreDtype, StreamingWriter};
use model::testkit::{logits, tiny_config, write_byte_tokenizer, write_hf};
use model::{Checkpoint, ModelError};
use serde_json::{Value, json};

// The largest single allocation of the thread that asks, as in bad_input.rs.
struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
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

/// A stored tensor: name, shape, dtype, little-endian bytes.
type Stored = (String, Vec<usize>, PlanDtype, Vec<u8>);

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn i32s(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn i64s(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Decoder linear weights of the tiny model.
fn is_linear(name: &str, shape: &[usize]) -> bool {
    name.starts_with("model.layers.") && shape.len() == 2
}

/// Writes an HF folder: `cfg` as config.json, the byte tokenizer and `tensors` in order.
fn write_folder(dir: &Path, cfg: &Value, tensors: &[Stored]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    write_byte_tokenizer(dir, 300);
    let plan = tensors
        .iter()
        .map(|(n, s, d, _)| (n.clone(), s.clone(), *d))
        .collect();
    let path = dir.join("model.safetensors");
    let mut w = StreamingWriter::create_with(&path, plan, &BTreeMap::new()).unwrap();
    for (n, _, _, b) in tensors {
        w.write_next_raw(n, b).unwrap();
    }
    w.finish().unwrap();
}

/// The weight arguments of a config group.
#[derive(Clone, Copy)]
struct Args {
    bits: u8,
    group: Option<usize>,
    sym: bool,
    g_idx: bool,
}

impl Args {
    fn json(self) -> Value {
        json!({"num_bits": self.bits, "type": "int", "symmetric": self.sym, "dynamic": false,
            "strategy": if self.group.is_some() { "group" } else { "channel" },
            "group_size": self.group,
            "actorder": if self.g_idx { json!("group") } else { Value::Null }})
    }
}

/// tiny_config with a pack-quantized `quantization_config` of these groups.
fn packed_config(groups: Value) -> Value {
    let mut c = tiny_config();
    c["quantization_config"] = json!({"quant_method": "compressed-tensors",
        "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": groups, "ignore": ["lm_head"], "kv_cache_scheme": null});
    c
}

/// Quantizes `w` (`rows` x `cols`) by min/max rounding and stores it as the pack-quantized
/// parts of `module`; returns them with the weight they stand for, computed here directly
/// as `(code - zero) * scale`.
fn pack(module: &str, w: &[f32], rows: usize, cols: usize, a: Args) -> (Vec<Stored>, Vec<f32>) {
    let (bits, qmax) = (a.bits, (1i32 << a.bits) - 1);
    let gs = a.group.unwrap_or(cols);
    let groups = cols.div_ceil(gs);
    // Activation order: columns visited in the order c * 7 mod cols, groups taken in turn.
    let group_of: Vec<usize> = (0..cols)
        .map(|c| if a.g_idx { (c * 7 % cols) / gs } else { c / gs })
        .collect();
    let (mut codes, mut scale, mut zero) = (
        vec![0u8; rows * cols],
        vec![0f32; rows * groups],
        vec![0i32; rows * groups],
    );
    let mut want = vec![0f32; rows * cols];
    for r in 0..rows {
        for j in 0..groups {
            let vals = (0..cols)
                .filter(|&c| group_of[c] == j)
                .map(|c| w[r * cols + c]);
            let (lo, hi) = vals.fold((0f32, 0f32), |(l, h), v| (l.min(v), h.max(v)));
            let (s, z) = if a.sym {
                (2.0 * lo.abs().max(hi) / qmax as f32, 1 << (bits - 1))
            } else {
                let s = (hi - lo) / qmax as f32;
                (s, ((-lo / s).round() as i32).clamp(0, qmax))
            };
            (scale[r * groups + j], zero[r * groups + j]) = (s, z);
        }
        for c in 0..cols {
            let k = r * groups + group_of[c];
            let q = ((w[r * cols + c] / scale[k]).round() as i32 + zero[k]).clamp(0, qmax);
            codes[r * cols + c] = q as u8;
            want[r * cols + c] = (q - zero[k]) as f32 * scale[k];
        }
    }
    let pw = packed_words(cols, bits);
    let mut packed = vec![0i32; rows * pw];
    for (out, row) in packed.chunks_mut(pw).zip(codes.chunks(cols)) {
        pack_codes(row.iter().copied(), bits, out);
    }
    let p = |s: &str| format!("{module}.{s}");
    let mut out = vec![
        (
            p("weight_packed"),
            vec![rows, pw],
            PlanDtype::I32,
            i32s(&packed),
        ),
        (
            p("weight_scale"),
            vec![rows, groups],
            PlanDtype::Float(StoreDtype::F32),
            f32s(&scale),
        ),
    ];
    if !a.sym {
        let zw = packed_words(rows, bits);
        let mut zp = vec![0i32; zw * groups];
        let mut col = vec![0i32; zw];
        for j in 0..groups {
            pack_codes(
                (0..rows).map(|r| zero[r * groups + j] as u8),
                bits,
                &mut col,
            );
            for (w, &v) in col.iter().enumerate() {
                zp[w * groups + j] = v;
            }
        }
        out.push((
            p("weight_zero_point"),
            vec![zw, groups],
            PlanDtype::I32,
            i32s(&zp),
        ));
    }
    out.push((
        p("weight_shape"),
        vec![2],
        PlanDtype::I64,
        i64s(&[rows as i64, cols as i64]),
    ));
    if a.g_idx {
        let g: Vec<i32> = group_of.iter().map(|&j| j as i32).collect();
        out.push((p("weight_g_idx"), vec![cols], PlanDtype::I32, i32s(&g)));
    }
    (out, want)
}

/// The sparse-bitmask parts of `module` for `w`, values stored as f32.
fn sparsify(module: &str, w: &[f32], rows: usize, cols: usize) -> Vec<Stored> {
    let rb = cols.div_ceil(8);
    let (mut mask, mut offsets, mut values) = (vec![0u8; rows * rb], Vec::new(), Vec::new());
    for r in 0..rows {
        offsets.push(values.len() as i64);
        for c in 0..cols {
            if w[r * cols + c] != 0.0 {
                mask[r * rb + c / 8] |= 1 << (c % 8);
                values.push(w[r * cols + c]);
            }
        }
    }
    let p = |s: &str| format!("{module}.{s}");
    vec![
        (p("bitmask"), vec![rows, rb], PlanDtype::U8, mask),
        (
            p("compressed"),
            vec![values.len()],
            PlanDtype::Float(StoreDtype::F32),
            f32s(&values),
        ),
        (p("row_offsets"), vec![rows], PlanDtype::I64, i64s(&offsets)),
        (
            p("shape"),
            vec![2],
            PlanDtype::I64,
            i64s(&[rows as i64, cols as i64]),
        ),
    ]
}

/// A teacher in `root/teacher` (seed 5, `edit` applied) and its tensors in file order, each
/// decoder linear replaced by `compress`'s parts; returns them with the weights they encode.
fn compressed_tensors(
    root: &Path,
    edit: impl FnMut(&str, &mut Vec<f32>),
    mut compress: impl FnMut(&str, &[f32], usize, usize) -> (Vec<Stored>, Vec<f32>),
) -> (Vec<Stored>, BTreeMap<String, Vec<f32>>) {
    let teacher = write_hf(&root.join("teacher"), &tiny_config(), 5, edit);
    let cfg = model::Config::from_json_str(&tiny_config().to_string(), Path::new("c")).unwrap();
    let (mut stored, mut want) = (Vec::new(), BTreeMap::new());
    for (name, shape) in model::checkpoint::expected_tensors(&cfg) {
        let w = &teacher[&name];
        if is_linear(&name, &shape) {
            let module = name.strip_suffix(".weight").unwrap();
            let (parts, deq) = compress(module, w, shape[0], shape[1]);
            stored.extend(parts);
            want.insert(name, deq);
        } else {
            stored.push((
                name.clone(),
                shape,
                PlanDtype::Float(StoreDtype::F32),
                f32s(w),
            ));
            want.insert(name, w.clone());
        }
    }
    (stored, want)
}

/// Checks `dir` reads back as `want` bit for bit, lists `X.weight` and not the parts, and
/// runs like a dense twin holding `want` (same seed, so the same other tensors).
fn assert_reads_back(root: &Path, dir: &Path, want: &BTreeMap<String, Vec<f32>>, format: &str) {
    let ckpt = Checkpoint::open(dir).unwrap();
    ckpt.check_shapes().unwrap();
    assert_eq!(ckpt.format(), format!("safetensors ({format})"));
    let metas = ckpt.tensors();
    assert_eq!(
        metas.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        want.keys().map(String::as_str).collect::<Vec<_>>()
    );
    for (name, shape) in ckpt.expected_tensors() {
        let got = ckpt.read(&name, &shape).unwrap();
        let same = got.len() == want[&name].len()
            && got
                .iter()
                .zip(&want[&name])
                .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name} differs from the weights it encodes");
        let m = metas.iter().find(|t| t.name == name).unwrap();
        assert_eq!(m.dtype.contains(format), is_linear(&name, &shape), "{m:?}");
    }
    let twin = root.join(format!("twin-{format}"));
    write_hf(&twin, &tiny_config(), 5, |n, d| *d = want[n].clone());
    let windows = vec![vec![0u32, 5, 17, 42, 99, 150, 299, 3, 258, 7]];
    let twin = Checkpoint::open(&twin).unwrap();
    assert_eq!(logits(&ckpt, &windows), logits(&twin, &windows));
}

#[test]
fn packed_folders_read_back_their_dequantized_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // 4-bit asymmetric groups of 32, down_proj per channel 8-bit symmetric through a `re:`
    // target; then 2-bit symmetric groups of 16 in activation order (weight_g_idx).
    let g4 = Args {
        bits: 4,
        group: Some(32),
        sym: false,
        g_idx: false,
    };
    let ch8 = Args {
        bits: 8,
        group: None,
        sym: true,
        g_idx: false,
    };
    let g2 = Args {
        bits: 2,
        group: Some(16),
        sym: true,
        g_idx: true,
    };
    let cases = [
        (
            json!({"group_0": {"targets": ["Linear"], "weights": g4.json()},
            "group_1": {"targets": ["re:.*\\.mlp\\.down_proj$"], "weights": ch8.json()}}),
            [g4, ch8],
        ),
        (
            json!({"group_0": {"targets": ["Linear"], "weights": g2.json()}}),
            [g2, g2],
        ),
    ];
    for (i, (groups, [args, down])) in cases.into_iter().enumerate() {
        let (stored, want) = compressed_tensors(
            root,
            |_, _| {},
            |m, w, r, c| {
                pack(
                    m,
                    w,
                    r,
                    c,
                    if m.ends_with("down_proj") { down } else { args },
                )
            },
        );
        let dir = root.join(format!("packed{i}"));
        write_folder(&dir, &packed_config(groups), &stored);
        assert_reads_back(root, &dir, &want, "pack-quantized");
    }
}

#[test]
fn sparse_folders_read_back_the_dense_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Two thirds of every linear's weights zero, rows of 64 and 256 columns.
    let zero = |name: &str, d: &mut Vec<f32>| {
        if name.starts_with("model.layers.") && !name.contains("norm") {
            d.iter_mut().enumerate().for_each(|(i, v)| {
                if (i * 2_654_435_761) % 3 != 0 {
                    *v = 0.0;
                }
            });
        }
    };
    let (stored, want) =
        compressed_tensors(root, zero, |m, w, r, c| (sparsify(m, w, r, c), w.to_vec()));
    let mut cfg = tiny_config();
    cfg["quantization_config"] = json!({"quant_method": "compressed-tensors", "sparsity_config":
        {"format": "sparse-bitmask", "global_sparsity": 0.5, "sparsity_structure": "unstructured",
         "targets": ["Linear"], "ignore": ["lm_head"]}});
    let dir = root.join("sparse");
    write_folder(&dir, &cfg, &stored);
    assert_reads_back(root, &dir, &want, "sparse-bitmask");
}

/// The first error of opening `dir`, checking its shapes and reading every tensor (there must
/// be one), with the largest allocation made meanwhile.
fn first_error(dir: &Path) -> (ModelError, usize) {
    LARGEST.with(|m| m.set(0));
    TRACK.with(|t| t.set(true));
    let r = (|| {
        let c = Checkpoint::open(dir)?;
        c.check_shapes()?;
        for (name, shape) in c.expected_tensors() {
            c.read(&name, &shape)?;
        }
        Ok(())
    })();
    TRACK.with(|t| t.set(false));
    (
        r.expect_err("a bad folder was read"),
        LARGEST.with(|m| m.get()),
    )
}

/// Replaces tensor `name` of `stored` (it must exist) by `new`, or drops it.
fn replace(
    stored: &[Stored],
    name: &str,
    new: Option<(Vec<usize>, PlanDtype, Vec<u8>)>,
) -> Vec<Stored> {
    assert!(stored.iter().any(|t| t.0 == name), "{name}");
    stored
        .iter()
        .filter_map(|t| match (&new, t.0 == name) {
            (_, false) => Some(t.clone()),
            (Some((s, d, b)), true) => Some((t.0.clone(), s.clone(), *d, b.clone())),
            (None, true) => None,
        })
        .collect()
}

/// A crafted folder: what is wrong, its config, its tensors, the file and what its error says.
type Case<'a> = (&'a str, Value, Vec<Stored>, &'a str, Vec<String>);

#[test]
fn inconsistent_compressed_folders_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let a = Args {
        bits: 4,
        group: Some(32),
        sym: false,
        g_idx: true,
    };
    let (packed, _) = compressed_tensors(root, |_, _| {}, |m, w, r, c| pack(m, w, r, c, a));
    let (sparse, _) =
        compressed_tensors(root, |_, _| {}, |m, w, r, c| (sparsify(m, w, r, c), vec![]));
    let pcfg = packed_config(json!({"group_0": {"targets": ["Linear"], "weights": a.json()}}));
    let mut scfg = tiny_config();
    scfg["quantization_config"] = json!({"quant_method": "compressed-tensors",
        "sparsity_config": {"format": "sparse-bitmask"}});
    let up = "model.layers.1.mlp.up_proj"; // [256, 64]: 8 words a row, 2 groups
    let t = |s: &str| format!("{up}.{s}");
    let i32t = |shape: Vec<usize>, v: Vec<i32>| Some((shape, PlanDtype::I32, i32s(&v)));
    let shape = |v: [i64; 2]| Some((vec![2], PlanDtype::I64, i64s(&v)));
    let with_cfg = |edit: &dyn Fn(&mut Value)| {
        let mut c = pcfg.clone();
        edit(&mut c["quantization_config"]);
        c
    };
    fn weights(c: &mut Value) -> &mut Value {
        &mut c["config_groups"]["group_0"]["weights"]
    }
    let mut bad_g_idx: Vec<i32> = (0..64).map(|c| (c * 7 % 64) / 32).collect();
    bad_g_idx[5] = 2;
    let f32t = |shape: Vec<usize>, n| Some((shape, PlanDtype::Float(StoreDtype::F32), vec![0; n]));
    // (case, sparse, the part replaced (dropped if `None`), the part named, what else is said)
    #[rustfmt::skip]
    let parts = [
        ("cols/words", false, "weight_shape", shape([256, 72]), "weight_packed", "[256, 9]"),
        ("rows/words", false, "weight_shape", shape([255, 64]), "weight_packed", "[255, 8]"),
        ("huge shape", false, "weight_shape", shape([1 << 40, 1 << 40]), "weight_packed", ""),
        ("negative", false, "weight_shape", shape([-256, 64]), "weight_shape", "positive"),
        ("zp rows", false, "weight_zero_point", i32t(vec![33, 2], vec![0; 66]), "weight_zero_point", "[32, 2]"),
        ("scale", false, "weight_scale", f32t(vec![256, 3], 3072), "weight_scale", "[256, 2]"),
        ("dtype", false, "weight_packed", Some((vec![256, 4], PlanDtype::I64, vec![0; 8192])), "weight_packed", "dtype I64"),
        ("no scale", false, "weight_scale", None, "weight_scale", "missing"),
        ("g_idx len", false, "weight_g_idx", i32t(vec![63], vec![0; 63]), "weight_g_idx", "[64]"),
        ("g_idx", false, "weight_g_idx", i32t(vec![64], bad_g_idx), "weight_g_idx", "column 5 is in group 2"),
        ("offsets", true, "row_offsets", Some((vec![256], PlanDtype::I64, i64s(&[7; 256]))), "row_offsets", "row 0 starts at 7"),
        ("values", true, "compressed", f32t(vec![256 * 64 + 1], 65540), "compressed", "at most 256 x 64"),
        ("bitmask", true, "bitmask", Some((vec![256, 9], PlanDtype::U8, vec![0; 2304])), "bitmask", "[256, 8]"),
    ];
    let mut cases: Vec<Case> = parts
        .into_iter()
        .map(|(what, sp, part, new, named, msg)| {
            let (cfg, base) = if sp {
                (&scfg, &sparse)
            } else {
                (&pcfg, &packed)
            };
            let needles = vec![t(named), msg.into()];
            (
                what,
                cfg.clone(),
                replace(base, &t(part), new),
                "model.safetensors",
                needles,
            )
        })
        .collect();
    let mut dense_too = packed.clone();
    dense_too.push((
        t("weight"),
        vec![256, 64],
        PlanDtype::Float(StoreDtype::F32),
        vec![0; 65536],
    ));
    let sym = with_cfg(&|c| weights(c)["symmetric"] = json!(true));
    let st = "model.safetensors";
    cases.push((
        "dense and packed",
        pcfg.clone(),
        dense_too,
        st,
        vec![t("weight`: is stored both")],
    ));
    cases.push((
        "zp when symmetric",
        sym,
        packed.clone(),
        st,
        vec!["zero_point`: is stored".into()],
    ));
    let mut marlin = tiny_config();
    marlin["quantization_config"] = json!({"quant_method": "compressed-tensors",
        "sparsity_config": {"format": "marlin-24"}});
    let act = json!({"num_bits": 8});
    // (case, config, what the message says)
    #[rustfmt::skip]
    let configs = [
        ("3 bits", with_cfg(&|c| weights(c)["num_bits"] = json!(3)), "pack-quantized with num_bits 3"),
        ("float", with_cfg(&|c| c["format"] = json!("float-quantized")), "format `float-quantized`"),
        ("activations", with_cfg(&|c| c["config_groups"]["group_0"]["input_activations"] = act.clone()), "activation quantization"),
        ("marlin-24", marlin, "format `marlin-24`"),
    ];
    for (what, cfg, msg) in configs {
        cases.push((what, cfg, packed.clone(), "config.json", vec![msg.into()]));
    }
    for (i, (what, cfg, stored, file, needles)) in cases.into_iter().enumerate() {
        let dir = root.join(format!("bad{i}"));
        write_folder(&dir, &cfg, &stored);
        let (e, largest) = first_error(&dir);
        let line = e.to_string();
        assert!(!line.contains('\n') && line.len() <= 300, "{what}: {line}");
        assert!(line.contains(file), "{what}: does not name {file}: {line}");
        for n in &needles {
            assert!(line.contains(n.as_str()), "{what}: lacks `{n}`: {line}");
        }
        let len = std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len() as usize;
        assert!(
            largest <= len,
            "{what}: allocated {largest} bytes for a {len}-byte file"
        );
    }
}
