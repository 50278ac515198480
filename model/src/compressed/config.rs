//! The `quantization_config` of a compressed-tensors `config.json`: which of the two readable
//! formats a folder is in and, for `pack-quantized`, each config group's weight arguments and
//! the modules it targets. Everything else compressed-tensors can describe (other formats,
//! activation or KV-cache quantization, float or dynamic weights) is refused by name.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

use super::codec::PACKED_BITS;
use crate::error::{MAX_NAME_CHARS, ModelError, Result, clip};

/// The quantization format this reader decompresses.
pub const PACK_QUANTIZED: &str = "pack-quantized";
/// The sparsity format this reader decompresses.
pub const SPARSE_BITMASK: &str = "sparse-bitmask";
/// Most `re:` targets compiled from one config (real configs hold a handful).
const MAX_REGEX_TARGETS: usize = 256;
/// Most bytes a compiled target regex may take.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// How one config group quantizes weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WeightArgs {
    /// Code width.
    pub bits: u8,
    /// Columns per scale; `None` per channel.
    pub group: Option<usize>,
    /// No stored zero point (the zero is `2^(bits-1)`).
    pub sym: bool,
}

/// One `pack-quantized` config group.
#[derive(Debug)]
pub(crate) struct Group {
    name: String,
    /// Module names matched exactly.
    names: BTreeSet<String>,
    /// `re:` targets, anchored at the start as Python's `re.match`.
    regexes: Vec<regex::Regex>,
    /// Targets the `Linear` class.
    linear: bool,
    pub args: WeightArgs,
}

/// How a folder's linears are stored.
#[derive(Debug)]
pub(crate) enum Layout {
    /// Plain weights (no `quantization_config`, or one whose formats store them dense).
    Dense,
    /// `pack-quantized` config groups.
    Packed(Vec<Group>),
    /// `sparse-bitmask`.
    Sparse,
}

impl Layout {
    /// The format's name, `None` when dense.
    pub fn format(&self) -> Option<&'static str> {
        match self {
            Self::Dense => None,
            Self::Packed(_) => Some(PACK_QUANTIZED),
            Self::Sparse => Some(SPARSE_BITMASK),
        }
    }
}

/// The weight arguments of the group that targets `module`: a group naming it (exactly or by
/// `re:`) before one targeting `Linear`, as vLLM resolves them; groups that tie must agree.
pub(crate) fn args_for(groups: &[Group], module: &str) -> std::result::Result<WeightArgs, String> {
    let by_name: Vec<&Group> = groups
        .iter()
        .filter(|g| g.names.contains(module) || g.regexes.iter().any(|r| r.is_match(module)))
        .collect();
    let pick = if by_name.is_empty() {
        groups.iter().filter(|g| g.linear).collect()
    } else {
        by_name
    };
    match pick.as_slice() {
        [] => Err("no config group of quantization_config targets it".into()),
        [first, rest @ ..] => match rest.iter().find(|g| g.args != first.args) {
            Some(other) => Err(format!(
                "config groups `{}` and `{}` both target it with different weights",
                clip(&first.name, MAX_NAME_CHARS),
                clip(&other.name, MAX_NAME_CHARS)
            )),
            None => Ok(first.args),
        },
    }
}

/// A string field, `None` when absent or null.
fn opt_str<'a>(
    m: &'a Map<String, Value>,
    key: &str,
    at: &str,
) -> std::result::Result<Option<&'a str>, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{at}`{key}` is not a string")),
    }
}

/// Whether a field is present and not null.
fn present(m: &Map<String, Value>, key: &str) -> bool {
    m.get(key).is_some_and(|v| !v.is_null())
}

fn unsupported_format(f: &str) -> String {
    format!(
        "format `{}` is not supported (readable: {PACK_QUANTIZED}, {SPARSE_BITMASK})",
        clip(f, MAX_NAME_CHARS)
    )
}

/// The `weights` arguments of group `at`, which must be `pack-quantized` integers.
fn weight_args(w: &Value, at: &str) -> std::result::Result<WeightArgs, String> {
    let w = w
        .as_object()
        .ok_or_else(|| format!("{at}`weights` is not an object"))?;
    let bits = w.get("num_bits").and_then(Value::as_u64);
    let bits = match bits {
        Some(b) if PACKED_BITS.iter().any(|&p| p as u64 == b) => b as u8,
        _ => {
            let shown = w
                .get("num_bits")
                .map_or("none".into(), |v| clip(&v.to_string(), 20).into_owned());
            return Err(format!(
                "{at}{PACK_QUANTIZED} with num_bits {shown} is not supported (2, 4 or 8)"
            ));
        }
    };
    match opt_str(w, "type", at)? {
        None | Some("int") => {}
        Some(t) => {
            return Err(format!(
                "{at}weights of type `{}` are not supported (int only)",
                clip(t, MAX_NAME_CHARS)
            ));
        }
    }
    match w.get("dynamic") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(_) => return Err(format!("{at}dynamic weight quantization is not supported")),
    }
    let group = match opt_str(w, "strategy", at)? {
        Some("channel") => None,
        Some("group") => match w.get("group_size").and_then(Value::as_u64) {
            Some(g) if g > 0 && g <= u32::MAX as u64 => Some(g as usize),
            _ => {
                return Err(format!(
                    "{at}strategy `group` needs a positive `group_size`"
                ));
            }
        },
        s => {
            return Err(format!(
                "{at}weight strategy `{}` is not supported (group or channel)",
                clip(s.unwrap_or("none"), MAX_NAME_CHARS)
            ));
        }
    };
    let sym = match w.get("symmetric") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(format!("{at}`symmetric` is not a boolean")),
    };
    Ok(WeightArgs { bits, group, sym })
}

/// The targets of group `at` into `g`; `regexes` counts the `re:` targets so far.
fn targets(
    v: Option<&Value>,
    g: &mut Group,
    regexes: &mut usize,
    at: &str,
) -> std::result::Result<(), String> {
    let list = v
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{at}`targets` is not a list"))?;
    for t in list {
        let t = t
            .as_str()
            .ok_or_else(|| format!("{at}a target is not a string"))?;
        if let Some(pat) = t.strip_prefix("re:") {
            *regexes += 1;
            if *regexes > MAX_REGEX_TARGETS {
                return Err(format!("more than {MAX_REGEX_TARGETS} `re:` targets"));
            }
            let re = regex::RegexBuilder::new(&format!("^(?:{pat})"))
                .size_limit(REGEX_SIZE_LIMIT)
                .dfa_size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|_| {
                    format!(
                        "{at}target `{}` is not a regex this reader can use",
                        clip(t, MAX_NAME_CHARS)
                    )
                })?;
            g.regexes.push(re);
        } else if t == "Linear" {
            g.linear = true;
        } else {
            // A module name, or a class other than Linear (which no packed module is).
            g.names.insert(t.to_string());
        }
    }
    Ok(())
}

/// The layout `config.json` (text `text`, at `path`) describes.
pub(crate) fn layout(text: &str, path: &Path) -> Result<Layout> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| ModelError::config(path, format!("invalid JSON: {e}")))?;
    parse(&v).map_err(|m| ModelError::config(path, format!("quantization_config: {m}")))
}

fn parse(v: &Value) -> std::result::Result<Layout, String> {
    let qc = match v.get("quantization_config") {
        None | Some(Value::Null) => return Ok(Layout::Dense),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("not an object".into()),
    };
    match opt_str(qc, "quant_method", "")? {
        Some("compressed-tensors") => {}
        other => {
            return Err(format!(
                "quant_method `{}` is not supported (readable: compressed-tensors {PACK_QUANTIZED} and {SPARSE_BITMASK})",
                clip(other.unwrap_or("none"), MAX_NAME_CHARS)
            ));
        }
    }
    let sparse = match qc.get("sparsity_config") {
        None | Some(Value::Null) => false,
        // compressed-tensors 0.19 writes `{}` for a model without sparsity.
        Some(Value::Object(s)) if s.is_empty() => false,
        Some(Value::Object(s)) => match opt_str(s, "format", "sparsity_config: ")? {
            Some(SPARSE_BITMASK) => true,
            Some("dense") => false,
            other => {
                return Err(format!(
                    "sparsity_config: {}",
                    unsupported_format(other.unwrap_or("none"))
                ));
            }
        },
        Some(_) => return Err("`sparsity_config` is not an object".into()),
    };
    if present(qc, "kv_cache_scheme") {
        return Err("KV-cache quantization (kv_cache_scheme) is not supported".into());
    }
    let global = opt_str(qc, "format", "")?;
    if let Some(f) = global
        && ![PACK_QUANTIZED, "dense", "mixed-precision"].contains(&f)
    {
        return Err(unsupported_format(f));
    }
    let groups = match qc.get("config_groups") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err("`config_groups` is not an object".into()),
    };
    let mut packed = Vec::new();
    let mut regexes = 0;
    for (name, g) in &groups {
        let at = format!("config group `{}`: ", clip(name, MAX_NAME_CHARS));
        let g = g.as_object().ok_or_else(|| format!("{at}not an object"))?;
        for key in ["input_activations", "output_activations"] {
            if present(g, key) {
                return Err(format!(
                    "{at}activation quantization ({key}) is not supported"
                ));
            }
        }
        let Some(w) = g.get("weights").filter(|w| !w.is_null()) else {
            continue;
        };
        match opt_str(g, "format", &at)?.or(global).unwrap_or("dense") {
            PACK_QUANTIZED => {}
            "dense" => continue,
            f => return Err(format!("{at}{}", unsupported_format(f))),
        }
        let mut group = Group {
            name: name.clone(),
            names: BTreeSet::new(),
            regexes: Vec::new(),
            linear: false,
            args: weight_args(w, &at)?,
        };
        targets(g.get("targets"), &mut group, &mut regexes, &at)?;
        packed.push(group);
    }
    match (packed.is_empty(), sparse) {
        (true, false) => Ok(Layout::Dense),
        (true, true) => Ok(Layout::Sparse),
        (false, false) => Ok(Layout::Packed(packed)),
        (false, true) => Err(format!(
            "{SPARSE_BITMASK} combined with {PACK_QUANTIZED} is not supported"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_qc(qc: Value) -> std::result::Result<Layout, String> {
        parse(&json!({ "quantization_config": qc }))
    }

    fn group(weights: Value, targets: Value) -> Value {
        json!({
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": targets, "weights": weights,
                "input_activations": null, "output_activations": null}},
        })
    }

    fn w4(extra: Value) -> Value {
        let mut w = json!({"num_bits": 4, "type": "int", "symmetric": false,
            "strategy": "group", "group_size": 32});
        w.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        w
    }

    #[test]
    fn readable_layouts() {
        assert!(matches!(parse(&json!({})).unwrap(), Layout::Dense));
        let sparse = json!({"quant_method": "compressed-tensors",
            "sparsity_config": {"format": "sparse-bitmask", "targets": ["Linear"]}});
        assert!(matches!(parse_qc(sparse).unwrap(), Layout::Sparse));
        let Layout::Packed(g) = parse_qc(group(w4(json!({})), json!(["Linear"]))).unwrap() else {
            panic!("not packed");
        };
        let args = WeightArgs {
            bits: 4,
            group: Some(32),
            sym: false,
        };
        assert_eq!(args_for(&g, "model.layers.0.mlp.up_proj"), Ok(args));
        // An empty sparsity_config (as llm-compressor 0.14 writes it) is no sparsity.
        let mut empty = group(w4(json!({})), json!(["Linear"]));
        empty["sparsity_config"] = json!({});
        assert!(matches!(parse_qc(empty).unwrap(), Layout::Packed(_)));
        // Named and `re:` targets win over `Linear`; a tie must agree.
        let qc = json!({"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {
            "a": {"targets": ["Linear"], "weights": w4(json!({}))},
            "b": {"targets": ["re:.*\\.down_proj$"], "weights": w4(json!({"strategy": "channel"}))},
            "c": {"targets": ["model.layers.1.down_proj"],
                "weights": w4(json!({"num_bits": 8}))}}});
        let Layout::Packed(g) = parse_qc(qc).unwrap() else {
            panic!("not packed")
        };
        assert_eq!(
            args_for(&g, "model.layers.0.up_proj").unwrap().group,
            Some(32)
        );
        assert_eq!(
            args_for(&g, "model.layers.0.down_proj").unwrap().group,
            None
        );
        assert!(
            args_for(&g, "model.layers.1.down_proj")
                .unwrap_err()
                .contains("different weights")
        );
    }

    #[test]
    fn unsupported_variants_are_named() {
        let err = |qc: Value| match parse_qc(qc) {
            Err(e) => e,
            Ok(l) => panic!("accepted: {l:?}"),
        };
        assert!(err(group(w4(json!({"num_bits": 3})), json!(["Linear"]))).contains("num_bits 3"));
        assert!(err(group(w4(json!({"type": "float"})), json!(["Linear"]))).contains("`float`"));
        assert!(
            err(group(w4(json!({"strategy": "tensor"})), json!(["Linear"]))).contains("`tensor`")
        );
        assert!(err(group(w4(json!({"dynamic": true})), json!(["Linear"]))).contains("dynamic"));
        let mut act = group(w4(json!({})), json!(["Linear"]));
        act["config_groups"]["group_0"]["input_activations"] = json!({"num_bits": 8});
        assert!(err(act).contains("activation quantization"));
        let mut fq = group(w4(json!({})), json!(["Linear"]));
        fq["format"] = json!("float-quantized");
        assert!(err(fq).contains("`float-quantized`"));
        let marlin = json!({"quant_method": "compressed-tensors",
            "sparsity_config": {"format": "marlin-24"}});
        assert!(err(marlin).contains("`marlin-24`"));
        assert!(err(json!({"quant_method": "gptq"})).contains("`gptq`"));
        let mut both = group(w4(json!({})), json!(["Linear"]));
        both["sparsity_config"] = json!({"format": "sparse-bitmask"});
        assert!(err(both).contains("combined"));
        assert!(err(group(w4(json!({})), json!(["re:(?=x)"]))).contains("regex"));
    }
}
