//! The bitsandbytes schemes on a tiny synthetic checkpoint: the block driver with the dense
//! and bitsandbytes sinks, and the bitsandbytes file decoded here independently (nibble
//! order, absmax, double quantization, quant-state JSON) against the dense output.

use model::safetensors_io::{SafetensorsSet, StoreDtype};
use model::{Checkpoint, testkit};
use quant::nf4::bnb::BnbSink;
use quant::nf4::stage::quantize_model;
use quant::nf4::{BnbScheme, BnbType, dynamic_map};
use quant::pipeline::{DenseSink, OutputSink};
use serde_json::Value;

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Decodes one linear of the bitsandbytes file as bitsandbytes' `dequantize_4bit` does.
fn decode(st: &SafetensorsSet, module: &str, ty: &str) -> (Vec<f32>, Value) {
    let bytes = |n: &str| {
        st.with_bytes(&format!("{module}.weight{n}"), |b| b.to_vec())
            .unwrap()
    };
    let js: Value = serde_json::from_slice(&bytes(&format!(".quant_state.bitsandbytes__{ty}")))
        .expect("quant state JSON");
    let block = js["blocksize"].as_u64().unwrap() as usize;
    let map = f32s(&bytes(".quant_map"));
    let absmax: Vec<f32> = if js.get("nested_offset").is_some() {
        let nested = f32s(&bytes(".nested_absmax"));
        let nmap = f32s(&bytes(".nested_quant_map"));
        let off = js["nested_offset"].as_f64().unwrap() as f32;
        bytes(".absmax")
            .iter()
            .enumerate()
            .map(|(i, &c)| nmap[c as usize] * nested[i / 256] + off)
            .collect()
    } else {
        f32s(&bytes(".absmax"))
    };
    let codes: Vec<u8> = bytes("").iter().flat_map(|b| [b >> 4, b & 15]).collect();
    let w = codes
        .iter()
        .enumerate()
        .map(|(i, &c)| map[c as usize] * absmax[i / block])
        .collect();
    (w, js)
}

#[test]
fn bnb_file_decodes_to_the_dense_output() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    testkit::write_hf(&src, &testkit::tiny_config(), 3, |_, _| {});
    let ckpt = Checkpoint::open(&src).unwrap();
    let cfg = ckpt.config().clone();
    for (ty, dq) in [(BnbType::Nf4, true), (BnbType::Fp4, false)] {
        let scheme = BnbScheme::new(ty, Some(32), dq).unwrap();
        let (dense, bnb) = (tmp.path().join("dense"), tmp.path().join("bnb"));
        std::fs::create_dir_all(&dense).unwrap();
        std::fs::create_dir_all(&bnb).unwrap();
        let mut sinks: Vec<Box<dyn OutputSink>> = vec![
            Box::new(
                DenseSink::create(&dense.join("model.safetensors"), &cfg, StoreDtype::F32).unwrap(),
            ),
            Box::new(BnbSink::create(&bnb.join("model.safetensors"), &cfg, scheme).unwrap()),
        ];
        let report = quantize_model(
            &ckpt,
            scheme,
            model::default_device(),
            &mut sinks,
            |_, _| {},
        )
        .unwrap();
        for s in sinks {
            s.finish().unwrap();
        }
        assert_eq!(report.linears.len(), 7 * cfg.num_hidden_layers);
        assert!(
            report
                .linears
                .iter()
                .all(|l| l.weight_rel_error > 0.0 && l.weight_rel_error < 0.2)
        );
        let d = SafetensorsSet::open(&dense).unwrap();
        let b = SafetensorsSet::open(&bnb).unwrap();
        for l in 0..cfg.num_hidden_layers {
            for lin in ["self_attn.q_proj", "mlp.down_proj"] {
                let module = format!("model.layers.{l}.{lin}");
                let (want, shape) = d.read_f32(&format!("{module}.weight")).unwrap().unwrap();
                let (got, js) = decode(&b, &module, ty.name());
                assert_eq!(got, want, "{module}");
                assert_eq!(js["shape"], serde_json::json!(shape));
                assert_eq!(js["dtype"], "bfloat16");
                assert_eq!(
                    b.entries()[&format!("{module}.weight")].shape,
                    [got.len() / 2, 1]
                );
                if dq {
                    let m = f32s(
                        &b.with_bytes(&format!("{module}.weight.nested_quant_map"), |x| x.to_vec())
                            .unwrap(),
                    );
                    assert_eq!(m, dynamic_map());
                }
            }
        }
        // Tensors other than the decoder linears keep their values (bf16 in the bnb file).
        let (emb, _) = b.read_f32("model.embed_tokens.weight").unwrap().unwrap();
        let (emb_d, _) = d.read_f32("model.embed_tokens.weight").unwrap().unwrap();
        assert!(
            emb.iter()
                .zip(&emb_d)
                .all(|(a, b)| (a - b).abs() <= b.abs() / 128.0)
        );
        std::fs::remove_dir_all(&dense).unwrap();
        std::fs::remove_dir_all(&bnb).unwrap();
    }
}

#[test]
fn a_block_that_does_not_divide_a_width_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    testkit::write_hf(tmp.path(), &testkit::tiny_config(), 3, |_, _| {});
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    // hidden 64: q_proj's 64 input columns do not take blocks of 128.
    let scheme = BnbScheme::new(BnbType::Nf4, Some(128), false).unwrap();
    let mut sinks: Vec<Box<dyn OutputSink>> = Vec::new();
    let e = quantize_model(
        &ckpt,
        scheme,
        model::default_device(),
        &mut sinks,
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.weight")
            && e.contains("128")
            && e.contains("64"),
        "{e}"
    );
}
