//! The compressed-tensors `sparse-bitmask` output: the model crate's decoder (LSB-first packed
//! bits per row, values located through `row_offsets`, which it checks) must give back the
//! dense tensors bit for bit, and the file must be smaller than the dense one.

use std::collections::BTreeMap;
use std::path::Path;

use model::safetensors_io::{Dtype, SafetensorsSet, StoreDtype, StreamingWriter};
use model::testkit::{tiny_config, write_hf};
use prune::sparse::{SPARSE_LINEARS, write_sparse_bitmask};
use serde_json::Value;

fn is_linear(name: &str) -> bool {
    name.starts_with("model.layers.")
        && SPARSE_LINEARS
            .iter()
            .any(|l| name.ends_with(&format!(".{l}.weight")))
}

/// Bytes of every tensor of an HF folder, with dtype and shape.
fn raw_tensors(dir: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let set = SafetensorsSet::open(dir).unwrap();
    set.entries()
        .iter()
        .map(|(n, e)| {
            let b = set.with_bytes(n, |b| b.to_vec()).unwrap();
            (n.clone(), (e.dtype, e.shape.clone(), b))
        })
        .collect()
}

fn i64s(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Decodes a sparse-bitmask folder back to dense tensors (name -> dtype, shape, bytes).
fn decode(dir: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let raw = raw_tensors(dir);
    let mut out = BTreeMap::new();
    for (name, (dt, shape, bytes)) in &raw {
        let Some(module) = name.strip_suffix(".bitmask") else {
            let compressed_part = [".compressed", ".row_offsets", ".shape"]
                .iter()
                .any(|s| name.ends_with(s));
            if !compressed_part {
                out.insert(name.clone(), (*dt, shape.clone(), bytes.clone()));
            }
            continue;
        };
        assert_eq!(*dt, Dtype::U8, "{name}");
        let part = |s: &str| &raw[&format!("{module}.{s}")];
        let (sdt, sshape, sbytes) = part("shape");
        assert_eq!(
            (*sdt, sshape.as_slice()),
            (Dtype::I64, &[2][..]),
            "{module}.shape"
        );
        let dims = i64s(sbytes);
        let (rows, cols) = (dims[0] as usize, dims[1] as usize);
        assert_eq!(shape, &vec![rows, cols.div_ceil(8)], "{name}");
        let (odt, oshape, obytes) = part("row_offsets");
        assert_eq!((*odt, oshape.clone()), (Dtype::I64, vec![rows]));
        let (vdt, vshape, values) = part("compressed");
        assert_eq!(vshape.len(), 1);
        let es = if *vdt == Dtype::F32 { 4 } else { 2 };
        // The model crate's reader: it checks the offsets, the bits past each row's end and
        // the value count against the bitmask.
        let dense = model::compressed::decode_bitmask(bytes, &i64s(obytes), values, es, rows, cols)
            .unwrap_or_else(|e| panic!("{module}: {e}"));
        out.insert(format!("{module}.weight"), (*vdt, vec![rows, cols], dense));
    }
    out
}

/// Copies an f32 HF folder as bf16 (the dtype the pruning writes).
fn to_bf16(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    let set = SafetensorsSet::open(src).unwrap();
    let plan: Vec<_> = set
        .entries()
        .iter()
        .map(|(n, e)| (n.clone(), e.shape.clone(), StoreDtype::BF16))
        .collect();
    let mut w =
        StreamingWriter::create(&dst.join("model.safetensors"), plan, &BTreeMap::new()).unwrap();
    for n in set.entries().keys() {
        w.write_next(n, &set.read_f32(n).unwrap().unwrap().0)
            .unwrap();
    }
    w.finish().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
}

/// -0.0 -> +0.0, which is what the format (like `tensor != 0`) gives back.
fn canonical_zeros(dt: Dtype, b: &[u8]) -> Vec<u8> {
    let mut b = b.to_vec();
    match dt {
        Dtype::F32 => b.chunks_exact_mut(4).for_each(|c| {
            if c == 0x8000_0000u32.to_le_bytes() {
                c.fill(0)
            }
        }),
        _ => b.chunks_exact_mut(2).for_each(|c| {
            if c == 0x8000u16.to_le_bytes() {
                c.fill(0)
            }
        }),
    }
    b
}

/// Checks `sparse` decodes to `dense` exactly; returns (non-zeros, linear weights).
fn assert_round_trip(dense: &Path, sparse: &Path) -> (u64, u64) {
    let want = raw_tensors(dense);
    let got = decode(sparse);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    let (mut nz, mut all) = (0u64, 0u64);
    for (name, (dt, shape, bytes)) in &want {
        let (gdt, gshape, gbytes) = &got[name];
        assert_eq!((dt, shape), (gdt, gshape), "{name}");
        if is_linear(name) {
            assert_eq!(&canonical_zeros(*dt, bytes), gbytes, "{name} differs");
            let es = if *dt == Dtype::F32 { 4 } else { 2 };
            all += (bytes.len() / es) as u64;
            nz += canonical_zeros(*dt, bytes)
                .chunks_exact(es)
                .filter(|e| e.iter().any(|&x| x != 0))
                .count() as u64;
        } else {
            assert_eq!(bytes, gbytes, "{name} differs");
        }
    }
    (nz, all)
}

/// With `SPARSE_CHECK_DIR` set, keeps a dense/sparse pair as `$SPARSE_CHECK_DIR/<case>/{dense,
/// sparse}` for scripts/check_sparse.sh (the check with the compressed-tensors package).
fn keep_for_python(case: &str, dense: &Path, sparse: &Path) {
    let Some(root) = std::env::var_os("SPARSE_CHECK_DIR") else {
        return;
    };
    for (src, sub) in [(dense, "dense"), (sparse, "sparse")] {
        let dst = Path::new(&root).join(case).join(sub);
        std::fs::create_dir_all(&dst).unwrap();
        for f in std::fs::read_dir(src).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dst.join(f.file_name())).unwrap();
        }
    }
}

fn config_of(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn unstructured_bf16_round_trip_is_exact_and_smaller() {
    let tmp = tempfile::tempdir().unwrap();
    let (f32_dir, dense, sparse) = (
        tmp.path().join("f32"),
        tmp.path().join("dense"),
        tmp.path().join("sparse"),
    );
    let mut cfg = tiny_config();
    // down_proj has 100 input columns: rows end inside a mask byte.
    cfg["intermediate_size"] = 100.into();
    let mut neg_zeros = 0;
    write_hf(&f32_dir, &cfg, 7, |name, w| {
        if is_linear(name) {
            // Weights are uniform in ±0.05: dropping |w| < 0.025 prunes about half.
            for v in w.iter_mut() {
                if v.abs() < 0.025 {
                    *v = 0.0;
                }
            }
            if name == "model.layers.1.self_attn.o_proj.weight" {
                w[3] = -0.0;
                w[70] = -0.0;
                neg_zeros += 2;
            }
        }
    });
    to_bf16(&f32_dir, &dense);
    std::fs::write(
        dense.join("generation_config.json"),
        r#"{"bos_token_id": 0}"#,
    )
    .unwrap();

    let rep = write_sparse_bitmask(&dense, &sparse, "unstructured").unwrap();
    let (nz, all) = assert_round_trip(&dense, &sparse);
    keep_for_python("unstructured_bf16", &dense, &sparse);
    assert_eq!(rep.compressed_linears, 3 * 7);
    assert_eq!((rep.linear_nonzeros, rep.linear_params), (nz, all));
    assert!((0.45..0.55).contains(&rep.linear_sparsity), "{rep:?}");
    assert_eq!(rep.negative_zeros, neg_zeros);
    assert_eq!(
        rep.dense_bytes,
        std::fs::metadata(dense.join("model.safetensors"))
            .unwrap()
            .len()
    );
    assert_eq!(
        rep.sparse_bytes,
        std::fs::metadata(sparse.join("model.safetensors"))
            .unwrap()
            .len()
    );
    // Values and bitmask take ~1.125 of the 2 bytes a weight; row offsets (8 bytes a row)
    // weigh more than they would in a real model, and embeddings and lm_head are unchanged.
    let raw = raw_tensors(&sparse);
    let part_bytes = |suffix: &str| -> usize {
        raw.iter()
            .filter(|(n, _)| n.ends_with(suffix))
            .map(|(_, t)| t.2.len())
            .sum()
    };
    let (values, bits) = (part_bytes(".compressed"), part_bytes(".bitmask"));
    assert_eq!(values as u64, 2 * nz);
    assert!((values + bits) as f64 / (2 * all) as f64 <= 0.6, "{rep:?}");
    assert!(
        (rep.sparse_bytes as f64) < 0.8 * rep.dense_bytes as f64,
        "{rep:?}"
    );
    // The whole model's zeros are the linears' (the other tensors have none).
    assert_eq!(rep.model_params - rep.model_nonzeros, all - nz);

    let qc = &config_of(&sparse)["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors");
    let sc = &qc["sparsity_config"];
    assert_eq!(sc["format"], "sparse-bitmask");
    assert_eq!(sc["sparsity_structure"], "unstructured");
    assert_eq!(sc["ignore"], serde_json::json!(["lm_head"]));
    assert!((sc["global_sparsity"].as_f64().unwrap() - rep.global_sparsity).abs() < 1e-6);
    assert!(qc.get("config_groups").is_none());
    // The rest of config.json is the dense one.
    let mut c = config_of(&sparse);
    c.as_object_mut().unwrap().remove("quantization_config");
    assert_eq!(c, config_of(&dense));
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(dense.join(f)).unwrap(),
            std::fs::read(sparse.join(f)).unwrap(),
            "{f}"
        );
    }
}

/// Zeroes the 2 smallest of every 4 consecutive weights of each row.
fn prune_2_4(w: &mut [f32]) {
    for g in w.chunks_mut(4) {
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()));
        for &i in &idx[..2] {
            g[i] = 0.0;
        }
    }
}

#[test]
fn two_four_f32_with_biases_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let (dense, sparse) = (tmp.path().join("dense"), tmp.path().join("sparse"));
    let mut cfg = tiny_config();
    cfg["model_type"] = "qwen2".into();
    cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    cfg["intermediate_size"] = 100.into();
    write_hf(&dense, &cfg, 11, |name, w| {
        if is_linear(name) {
            prune_2_4(w);
        }
    });
    let rep = write_sparse_bitmask(&dense, &sparse, "2:4").unwrap();
    let (nz, all) = assert_round_trip(&dense, &sparse);
    keep_for_python("two_four_f32_qwen2", &dense, &sparse);
    assert_eq!(rep.linear_nonzeros, nz);
    assert_eq!(nz * 2, all);
    assert_eq!(rep.structure, "2:4");
    // f32 values stay f32; the q/k/v biases are copied, not compressed.
    let raw = raw_tensors(&sparse);
    assert_eq!(
        raw["model.layers.0.self_attn.q_proj.compressed"].0,
        Dtype::F32
    );
    assert!(raw.contains_key("model.layers.0.self_attn.q_proj.bias"));
    assert!(!raw.contains_key("model.layers.0.self_attn.q_proj.bias.bitmask"));
    assert!(rep.sparse_bytes < rep.dense_bytes);
    let sc = &config_of(&sparse)["quantization_config"]["sparsity_config"];
    assert_eq!(sc["sparsity_structure"], "2:4");

    // Weights that are not 2:4 are refused under that structure, but fine as unstructured.
    let (dense2, sparse2) = (tmp.path().join("dense2"), tmp.path().join("sparse2"));
    write_hf(&dense2, &cfg, 11, |name, w| {
        if is_linear(name) {
            prune_2_4(w);
            if name.ends_with("mlp.up_proj.weight") {
                w[5] = 0.5;
            }
        }
    });
    let e = write_sparse_bitmask(&dense2, &sparse2, "2:4").unwrap_err();
    assert!(e.to_string().contains("not 2:4 sparse"), "{e}");
    write_sparse_bitmask(&dense2, &sparse2, "unstructured").unwrap();
    assert_round_trip(&dense2, &sparse2);
}

#[test]
fn bad_calls_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = tmp.path().join("dense");
    write_hf(&dense, &tiny_config(), 3, |_, _| {});
    let e = write_sparse_bitmask(&dense, &dense, "unstructured").unwrap_err();
    assert!(
        e.to_string().contains("must not be the dense folder"),
        "{e}"
    );
    let e = write_sparse_bitmask(&dense, &tmp.path().join("o"), "3:2").unwrap_err();
    assert!(e.to_string().contains("N:M"), "{e}");
}
