//! RoPE settings of configs saved by transformers 5 (`rope_parameters`) read the same as
//! the transformers 4 layout (`rope_theta` / `rope_scaling`); ambiguous, unknown or
//! non-finite values fail with a message naming the key. Fixtures: `tests/fixtures/tf5/`
//! (see the README there).
//!
//! Breakage caught: the parser ignoring `rope_parameters` (the old behaviour: SmolLM2 read
//! as theta 10000) failed every test but the write-back one; the theta conflict check
//! disabled failed `conflicting_layouts_name_both_keys`.

use std::path::{Path, PathBuf};

use model::Config;
use model::config::RopeOrigin;
use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tf5")
        .join(name)
}

/// The four models, with the RoPE base their model cards give.
const MODELS: &[(&str, f64)] = &[
    ("llama31_8b", 500_000.0),
    ("qwen25_05b", 1_000_000.0),
    ("smollm2_135m", 100_000.0),
    ("mistral_7b_v01", 10_000.0),
];

fn load(name: &str) -> (Config, RopeOrigin) {
    Config::from_file_with_origin(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn transformers5_configs_read_as_their_transformers4_equivalents() {
    for &(model, theta) in MODELS {
        let (new, new_origin) = load(&format!("{model}.tf5.json"));
        let (old, old_origin) = load(&format!("{model}.tf4.json"));
        // The fixture really is in the new layout, and the old one in the old.
        let raw: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(&format!("{model}.tf5.json"))).unwrap(),
        )
        .unwrap();
        assert!(raw.get("rope_theta").is_none() && raw.get("rope_parameters").is_some());
        assert_eq!(
            new_origin,
            RopeOrigin {
                theta_defaulted: false,
                nested: true,
                flat: false
            },
            "{model}"
        );
        assert_eq!(
            old_origin,
            RopeOrigin {
                theta_defaulted: false,
                nested: false,
                flat: true
            },
            "{model}"
        );
        assert_eq!(new.rope_theta, theta, "{model}: rope_theta");
        assert_eq!(old.rope_theta, theta, "{model}: rope_theta (old layout)");
        assert_eq!(new.rope_scaling, old.rope_scaling, "{model}: rope_scaling");
        assert_eq!(
            new.rope_inv_freq(),
            old.rope_inv_freq(),
            "{model}: inv_freq"
        );
        assert_eq!(new.head_dim(), old.head_dim(), "{model}");
        assert_eq!(new.num_params(), old.num_params(), "{model}");
        // transformers 5's `dtype` is read as `torch_dtype`.
        assert_eq!(new.torch_dtype.as_deref(), Some("bfloat16"), "{model}");
        assert_eq!(new.torch_dtype, old.torch_dtype, "{model}");
    }
    // Both names, disagreeing: refused, naming both.
    let mut v = raw("smollm2_135m.tf5.json");
    v["torch_dtype"] = "float32".into();
    expect_err(&v, &["torch_dtype", "dtype"]);
    let (llama, _) = load("llama31_8b.tf5.json");
    let rs = llama.rope_scaling.expect("llama3 scaling");
    assert_eq!(rs.kind(), "llama3");
    assert_eq!(
        (
            rs.factor,
            rs.low_freq_factor,
            rs.high_freq_factor,
            rs.original_max_position_embeddings
        ),
        (Some(8.0), Some(1.0), Some(4.0), Some(8192))
    );
}

#[test]
fn a_config_written_back_keeps_its_rope() {
    // Outputs are written from `Config`: the old layout, which both transformers read.
    let (c, _) = load("llama31_8b.tf5.json");
    let text = serde_json::to_string(&c).unwrap();
    let (back, origin) = Config::from_json_str_with_origin(&text, Path::new("out.json")).unwrap();
    assert_eq!(back, c);
    assert!(origin.flat && !origin.nested && !origin.theta_defaulted);
}

#[test]
fn both_layouts_agreeing_is_accepted() {
    let mut v = raw("llama31_8b.tf5.json");
    v["rope_theta"] = json!(500000);
    v["rope_scaling"] = v["rope_parameters"].clone();
    let (c, o) = parse(&v).unwrap();
    assert_eq!(c.rope_theta, 500_000.0);
    assert!(o.flat && o.nested);
}

#[test]
fn missing_theta_defaults_only_where_hf_does_and_says_so() {
    for model in ["llama31_8b", "qwen25_05b", "mistral_7b_v01"] {
        let mut v = raw(&format!("{model}.tf4.json"));
        v.as_object_mut().unwrap().remove("rope_theta");
        let (c, o) = parse(&v).unwrap();
        assert_eq!(c.rope_theta, 10_000.0, "{model}");
        assert!(o.theta_defaulted, "{model}");
    }
    // `rope_parameters` without a theta is not defaulted.
    let mut v = raw("smollm2_135m.tf5.json");
    v["rope_parameters"]
        .as_object_mut()
        .unwrap()
        .remove("rope_theta");
    expect_err(&v, &["rope_parameters", "rope_theta"]);
    // Nor is a file carrying the base under another family's name.
    let mut v = raw("smollm2_135m.tf4.json");
    v.as_object_mut().unwrap().remove("rope_theta");
    v["rotary_emb_base"] = json!(100000);
    expect_err(&v, &["rotary_emb_base"]);
}

#[test]
fn unknown_and_unimplemented_rope_types_name_the_key() {
    let mut v = raw("smollm2_135m.tf5.json");
    v["rope_parameters"]["rope_type"] = json!("wobbly");
    expect_err(&v, &["rope_parameters.rope_type", "wobbly", "unknown"]);
    for t in ["linear", "dynamic", "yarn", "longrope"] {
        let mut v = raw("smollm2_135m.tf5.json");
        v["rope_parameters"]["rope_type"] = json!(t);
        v["rope_parameters"]["factor"] = json!(2.0);
        expect_err(&v, &["rope_parameters.rope_type", t, "not implemented"]);
        let mut v = raw("smollm2_135m.tf4.json");
        v["rope_scaling"] = json!({"type": t, "factor": 2.0});
        expect_err(&v, &["rope_scaling.type", t]);
    }
    let mut v = raw("smollm2_135m.tf5.json");
    v["rope_parameters"]["mrope_section"] = json!([16, 8, 8]);
    expect_err(&v, &["rope_parameters.mrope_section"]);
    let mut v = raw("smollm2_135m.tf5.json");
    v["rope_parameters"]["partial_rotary_factor"] = json!(0.5);
    expect_err(&v, &["rope_parameters.partial_rotary_factor"]);
}

#[test]
fn non_finite_theta_names_the_key() {
    // transformers 5 writes NaN as a tagged object ...
    let mut v = raw("smollm2_135m.tf5.json");
    v["rope_parameters"]["rope_theta"] = json!({"__float__": "NaN"});
    expect_err(&v, &["rope_parameters.rope_theta", "NaN"]);
    // ... Python's json.dumps (transformers 4) as a bare token, which is not JSON.
    let text = std::fs::read_to_string(fixture("smollm2_135m.tf5.json"))
        .unwrap()
        .replace("\"rope_theta\": 100000", "\"rope_theta\": NaN");
    assert!(text.contains("NaN"));
    let e = Config::from_json_str(&text, Path::new("config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rope_parameters.rope_theta") && e.contains("NaN"),
        "{e}"
    );
    let text = std::fs::read_to_string(fixture("smollm2_135m.tf4.json"))
        .unwrap()
        .replace("\"rope_theta\": 100000", "\"rope_theta\": Infinity");
    let e = Config::from_json_str(&text, Path::new("config.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`rope_theta`") && e.contains("Infinity"), "{e}");
    let mut v = raw("smollm2_135m.tf4.json");
    v["rope_theta"] = json!(0.5);
    expect_err(&v, &["`rope_theta`"]);
}

#[test]
fn conflicting_layouts_name_both_keys() {
    let mut v = raw("smollm2_135m.tf5.json");
    v["rope_theta"] = json!(10000.0);
    expect_err(
        &v,
        &["`rope_theta`", "`rope_parameters.rope_theta`", "conflicts"],
    );

    let mut v = raw("llama31_8b.tf5.json");
    v["rope_scaling"] = v["rope_parameters"].clone();
    v["rope_scaling"]["factor"] = json!(4.0);
    expect_err(&v, &["rope_scaling.factor", "rope_parameters.factor"]);

    let mut v = raw("llama31_8b.tf5.json");
    v["rope_scaling"] = json!({"rope_type": "default"});
    expect_err(&v, &["rope_scaling.rope_type", "rope_parameters.rope_type"]);

    // transformers 5 takes a top-level original_max_position_embeddings over the dict's.
    let mut v = raw("llama31_8b.tf5.json");
    v["original_max_position_embeddings"] = json!(4096);
    expect_err(
        &v,
        &[
            "`rope_parameters.original_max_position_embeddings`",
            "`original_max_position_embeddings`",
        ],
    );

    let mut v = raw("llama31_8b.tf5.json");
    v["rope_parameters"]["type"] = json!("default");
    expect_err(&v, &["rope_parameters.type", "rope_parameters.rope_type"]);
}

#[test]
fn llama3_fields_are_required_and_checked() {
    let mut v = raw("llama31_8b.tf5.json");
    v["rope_parameters"]
        .as_object_mut()
        .unwrap()
        .remove("low_freq_factor");
    expect_err(&v, &["rope_parameters.low_freq_factor", "missing"]);
    let mut v = raw("llama31_8b.tf5.json");
    v["rope_parameters"]["high_freq_factor"] = json!(0.5);
    expect_err(&v, &["rope_parameters.high_freq_factor"]);
    let mut v = raw("llama31_8b.tf5.json");
    v["rope_parameters"]["factor"] = json!({"__float__": "Infinity"});
    expect_err(&v, &["rope_parameters.factor"]);
}

#[test]
fn rope_differing_per_layer_type_is_refused() {
    let mut v = raw("qwen25_05b.tf5.json");
    let p = v["rope_parameters"].clone();
    v["rope_parameters"] = json!({"full_attention": p.clone(), "sliding_attention": p});
    let (c, _) = parse(&v).unwrap();
    assert_eq!(c.rope_theta, 1_000_000.0);
    v["rope_parameters"]["sliding_attention"]["rope_theta"] = json!(10000.0);
    expect_err(&v, &["rope_parameters.sliding_attention", "per layer type"]);
}

fn raw(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn parse(v: &Value) -> model::Result<(Config, RopeOrigin)> {
    Config::from_json_str_with_origin(&v.to_string(), Path::new("config.json"))
}

/// Parsing fails with one line naming the file and containing every part of `want`.
fn expect_err(v: &Value, want: &[&str]) {
    let e = parse(v).expect_err("must be refused").to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(e.starts_with("config.json: "), "{e}");
    for w in want {
        assert!(e.contains(w), "`{w}` not in: {e}");
    }
}
