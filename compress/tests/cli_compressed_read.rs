//! compressed-tensors folders as inputs, through the real binary: the `pack-quantized` folder
//! `compress quant` writes and the `sparse-bitmask` folder `compress prune --format sparse`
//! writes are read by `eval`, `convert` and `inspect` like dense ones, giving the perplexity
//! of the dense twin written beside them; crafted folders whose parts disagree, or whose
//! config names a variant the reader does not decompress, exit 2 with one line naming the
//! file and the tensor or format.

mod common;
use common::ok;

use std::path::Path;

use model::Checkpoint;
use model::safetensors_io::{Dtype, PlanDtype, SafetensorsSet, StoreDtype, StreamingWriter};
use model::testkit::{Rng, calib_text, tiny_config, write_hf};
use serde_json::{Value, json};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// `compress eval MODEL --ppl TEXT`'s report (written to `root/NAME.json`).
fn eval(root: &Path, model: &Path, text: &Path, name: &str) -> Value {
    let json = root.join(format!("{name}.json"));
    ok(&[
        "eval",
        s(model),
        "--ppl",
        s(text),
        "--ctx",
        "64",
        "--chunks",
        "3",
        "--json",
        s(&json),
    ]);
    read_json(&json)
}

fn ppl(report: &Value) -> f64 {
    report["perplexity"]["value"].as_f64().unwrap()
}

/// Asserts two perplexities agree to 1e-6 relative.
fn assert_same_ppl(a: f64, b: f64, what: &str) {
    assert!(
        a.is_finite() && (a - b).abs() <= 1e-6 * a,
        "{what}: {a} vs {b}"
    );
}

/// Linear weights on a per-group grid that 4-bit asymmetric groups of 32 hold exactly: in
/// every group of row `r`, values `(k - z) * u` with `k` in 0..=15 (0 and 15 both present), a
/// power of two `u` and a zero `z` in 1..=14 varying with row and group. Round-to-nearest then
/// gives back the weights, which bf16 (the dense output) also holds exactly, so the dense and
/// packed outputs store the same values.
fn grid(name: &str, d: &mut [f32]) {
    if !name.starts_with("model.layers.") || name.contains("norm") {
        return;
    }
    let cols = if name.contains("down_proj") { 256 } else { 64 };
    let mut rng = Rng(99);
    for (r, row) in d.chunks_mut(cols).enumerate() {
        for (j, g) in row.chunks_mut(32).enumerate() {
            let u = 2f32.powi(-6 - ((r + j) % 3) as i32);
            let z = (1 + (r * 3 + j * 5) % 14) as f32;
            for (c, v) in g.iter_mut().enumerate() {
                let k = match c {
                    0 => 0,
                    1 => 15,
                    _ => ((rng.next() + 1.0) * 8.0) as usize % 16,
                };
                *v = (k as f32 - z) * u;
            }
        }
    }
}

/// `x` rounded to bf16 (to nearest even), as the dense output stores it.
fn bf16(x: f32) -> u32 {
    let b = x.to_bits();
    b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000
}

#[test]
fn packed_folders_evaluate_like_their_dense_twins() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let text = root.join("text.txt");
    std::fs::write(&text, calib_text(2000)).unwrap();

    // Weights the scheme holds exactly: the dense (bf16) and packed outputs are the same model.
    let teacher = root.join("grid");
    write_hf(&teacher, &tiny_config(), 7, |n, d| grid(n, d));
    let q = root.join("q");
    ok(&[
        "quant",
        s(&teacher),
        "--group",
        "32",
        "--format",
        "dense,packed",
        "--out",
        s(&q),
    ]);
    let packed = q.join("packed");
    let dense_r = eval(root, &q, &text, "dense");
    let packed_r = eval(root, &packed, &text, "packed");
    assert_eq!(packed_r["format"], "safetensors (pack-quantized)");
    assert_same_ppl(ppl(&dense_r), ppl(&packed_r), "dense vs packed");
    // Scales and zero points count in the size: 4 bits + (16 + 4) / 32, and bf16 elsewhere.
    let bpw = packed_r["size"]["bits_per_weight"].as_f64().unwrap();
    assert!(bpw > 4.0 && bpw < dense_r["size"]["bits_per_weight"].as_f64().unwrap() / 2.0);
    let inspect: Value = serde_json::from_str(&ok(&["inspect", s(&packed), "--json"])).unwrap();
    assert_eq!(inspect["by_dtype"]["int4 (pack-quantized)"]["count"], 21);

    // Lossy, symmetric 8-bit groups in activation order (weight_g_idx): every weight read from
    // the packed folder rounds to the dense output's bf16, and `convert` (f32) of the packed
    // folder evaluates as the packed folder does.
    let teacher = root.join("random");
    write_hf(&teacher, &tiny_config(), 11, |_, _| {});
    let calib = root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let q = root.join("gptq");
    ok(&[
        "quant",
        s(&teacher),
        "--method",
        "gptq",
        "--act-order",
        "--calib",
        s(&calib),
        "--calib-samples",
        "4",
        "--calib-len",
        "32",
        "--sym",
        "--bits",
        "8",
        "--group",
        "32",
        "--format",
        "dense,packed",
        "--out",
        s(&q),
    ]);
    let packed = q.join("packed");
    let qc = &read_json(&packed.join("config.json"))["quantization_config"];
    assert_eq!(
        qc["config_groups"]["group_0"]["weights"]["actorder"], "group",
        "{qc}"
    );
    let (p, d) = (
        Checkpoint::open(&packed).unwrap(),
        Checkpoint::open(&q).unwrap(),
    );
    for (name, shape) in d.expected_tensors() {
        let (pw, dw) = (
            p.read(&name, &shape).unwrap(),
            d.read(&name, &shape).unwrap(),
        );
        assert!(
            pw.iter().zip(&dw).all(|(a, b)| bf16(*a) == b.to_bits()),
            "{name}: the packed weights do not round to the dense ones"
        );
    }
    let f32_copy = root.join("gptq-f32");
    ok(&["convert", s(&packed), s(&f32_copy), "--dtype", "f32"]);
    assert_same_ppl(
        ppl(&eval(root, &packed, &text, "gptq-packed")),
        ppl(&eval(root, &f32_copy, &text, "gptq-f32")),
        "packed vs its f32 conversion",
    );
}

#[test]
fn sparse_folders_evaluate_like_their_dense_twins() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let text = root.join("text.txt");
    std::fs::write(&text, calib_text(2000)).unwrap();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 3, |_, _| {});
    let p = root.join("p");
    ok(&[
        "prune",
        s(&teacher),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--format",
        "dense,sparse",
        "--out",
        s(&p),
    ]);
    let dense_r = eval(root, &p, &text, "dense");
    let sparse_r = eval(root, &p.join("sparse"), &text, "sparse");
    assert_eq!(sparse_r["format"], "safetensors (sparse-bitmask)");
    assert_same_ppl(ppl(&dense_r), ppl(&sparse_r), "dense vs sparse");
}

/// Copies the HF folder `src` to `dst`, letting `cfg` edit `quantization_config` and `patch`
/// edit each tensor's shape and bytes.
fn variant(
    src: &Path,
    dst: &Path,
    cfg: impl FnOnce(&mut Value),
    mut patch: impl FnMut(&str, &mut Vec<usize>, &mut Vec<u8>),
) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if e.path().is_file() && name != "model.safetensors" {
            std::fs::copy(e.path(), dst.join(name)).unwrap();
        }
    }
    let mut c = read_json(&dst.join("config.json"));
    cfg(&mut c["quantization_config"]);
    std::fs::write(dst.join("config.json"), c.to_string()).unwrap();
    let set = SafetensorsSet::open(src).unwrap();
    let mut tensors = Vec::new();
    for (name, e) in set.entries() {
        let dt = match e.dtype {
            Dtype::F32 => PlanDtype::Float(StoreDtype::F32),
            Dtype::BF16 => PlanDtype::Float(StoreDtype::BF16),
            Dtype::U8 => PlanDtype::U8,
            Dtype::I32 => PlanDtype::I32,
            Dtype::I64 => PlanDtype::I64,
            other => panic!("{name}: {other:?}"),
        };
        let (mut shape, mut bytes) = (
            e.shape.clone(),
            set.with_bytes(name, <[u8]>::to_vec).unwrap(),
        );
        patch(name, &mut shape, &mut bytes);
        tensors.push((name.clone(), shape, dt, bytes));
    }
    let plan = tensors
        .iter()
        .map(|(n, s, d, _)| (n.clone(), s.clone(), *d))
        .collect();
    let path = dst.join("model.safetensors");
    let mut w = StreamingWriter::create_with(&path, plan, &Default::default()).unwrap();
    for (n, _, _, b) in &tensors {
        w.write_next_raw(n, b).unwrap();
    }
    w.finish().unwrap();
}

/// A crafted folder: what is wrong, how it is made, the file and the needles of its error.
type Case<'a> = (&'a str, Box<dyn Fn(&Path) + 'a>, &'a str, Vec<String>);

#[test]
fn crafted_compressed_folders_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("work");
    std::fs::create_dir_all(&root).unwrap();
    let text = root.join("text.txt");
    std::fs::write(&text, calib_text(500)).unwrap();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 5, |_, _| {});
    let (q, p) = (root.join("q"), root.join("p"));
    ok(&["quant", s(&teacher), "--group", "32", "--out", s(&q)]);
    ok(&[
        "prune",
        s(&teacher),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--format",
        "sparse",
        "--out",
        s(&p),
    ]);
    let up = "model.layers.0.mlp.up_proj"; // [256, 64]: 8 words a row, 2 groups
    let bad = root.join("bad");
    let cases: Vec<Case> = vec![
        (
            "weight_shape against weight_packed's words",
            Box::new(|d| {
                variant(
                    &q,
                    d,
                    |_| {},
                    |n, _, b| {
                        if n == format!("{up}.weight_shape") {
                            b[8..].copy_from_slice(&96i64.to_le_bytes());
                        }
                    },
                )
            }),
            "model.safetensors",
            vec![format!("{up}.weight_packed"), "expected [256, 12]".into()],
        ),
        (
            "a zero point tensor of the wrong size",
            Box::new(|d| {
                variant(
                    &q,
                    d,
                    |_| {},
                    |n, shape, b| {
                        if n == format!("{up}.weight_zero_point") {
                            shape[0] += 1;
                            b.extend(vec![0; 4 * shape[1]]);
                        }
                    },
                )
            }),
            "model.safetensors",
            vec![format!("{up}.weight_zero_point"), "expected [32, 2]".into()],
        ),
        (
            "num_bits 3",
            Box::new(|d| {
                variant(
                    &q,
                    d,
                    |c| c["config_groups"]["group_0"]["weights"]["num_bits"] = json!(3),
                    |_, _, _| {},
                )
            }),
            "config.json",
            vec!["pack-quantized with num_bits 3".into()],
        ),
        (
            "float-quantized",
            Box::new(|d| {
                variant(
                    &q,
                    d,
                    |c| c["format"] = json!("float-quantized"),
                    |_, _, _| {},
                )
            }),
            "config.json",
            vec!["format `float-quantized` is not supported".into()],
        ),
        (
            "sparse row offsets (found while reading)",
            Box::new(|d| {
                variant(
                    &p,
                    d,
                    |_| {},
                    |n, _, b| {
                        if n == format!("{up}.row_offsets") {
                            b[..8].copy_from_slice(&3i64.to_le_bytes());
                        }
                    },
                )
            }),
            "model.safetensors",
            vec![format!("{up}.row_offsets"), "row 0 starts at 3".into()],
        ),
    ];
    for (what, make, file, needles) in cases {
        let _ = std::fs::remove_dir_all(&bad);
        make(&bad);
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        let err = common::fails(
            &root,
            &[
                Path::new("eval"),
                &bad,
                Path::new("--ppl"),
                &text,
                Path::new("--ctx"),
                Path::new("64"),
            ],
            file,
            &needles,
        );
        assert!(
            !err.contains("panicked") && err.len() <= 300,
            "{what}: {err}"
        );
    }
}
