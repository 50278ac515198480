//! Which GGUF type each tensor gets: `PATTERN=TYPE` rules, llama.cpp's presets (`q4_k_m`,
//! `q3_k_m`, ...) with their per-layer choices and fallbacks for rows the block size does not
//! divide, and the HF-to-GGUF tensor names the rules match.

use model::gguf::GgmlType;

use crate::blocks::parse_type;
use crate::gguf_export::{ExportError, Result};

/// One `PATTERN=TYPE` rule of a [`TypePlan`].
#[derive(Debug, Clone, PartialEq)]
pub struct TypeRule {
    /// Matched against GGUF tensor names, see [`pattern_matches`].
    pub pattern: String,
    /// The type for matching tensors.
    pub ty: GgmlType,
}

/// Which GGML type each tensor gets: the first matching rule, else the default. 1-D tensors
/// are always F32. A type whose block does not divide the row length falls back (see
/// [`fallback_type`]).
///
/// # Presets
///
/// `n` is the number of blocks; `more(i)` is llama.cpp's `use_more_bits`:
/// `i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2`. "output" means `output.weight`, or
/// `token_embd.weight` when the embeddings are tied (no `output.weight`), as llama.cpp does.
///
/// | preset | default | output | `blk.i.attn_v.weight`, `blk.i.ffn_down.weight` | `general.file_type` |
/// |---|---|---|---|---|
/// | `f32`, `f16`, `bf16` | that type | same | same | 0, 1, 32 |
/// | `q8_0` | Q8_0 | Q8_0 | Q8_0 | 7 |
/// | `q4_0`, `q4_1`, `q5_0`, `q5_1` | that type | Q6_K | default | 2, 3, 8, 9 |
/// | `iq4_nl` | IQ4_NL | Q6_K | `attn_v` Q5_K when `gqa` >= 4, else default | 25 |
/// | `q3_k`, `q4_k`, `q5_k` | Q3_K, Q4_K, Q5_K | Q6_K | default | 11, 14, 16 (llama.cpp's `_S` ids) |
/// | `q6_k` | Q6_K | Q6_K | Q6_K | 18 |
/// | `q3_k_m` | Q3_K | Q6_K | `attn_v` Q5_K for i < 2, else Q4_K; `ffn_down` Q5_K for i < n/16, else Q4_K; `attn_output` Q4_K | 12 |
/// | `q4_k_m` | Q4_K | Q6_K | Q6_K where `more(i)`, else Q4_K | 15 |
/// | `q5_k_m` | Q5_K | Q6_K | Q6_K where `more(i)`, else Q5_K | 17 |
///
/// These follow llama.cpp's `llama_tensor_get_type` for those file types (its `q4_k`/`q5_k`
/// `_S` mixes also bump a few early layers to Q5_K; ours do not). With fallbacks, a model
/// whose hidden size is not a multiple of 256 (SmolLM2: 576) gets Q8_0 for the output in
/// every 3/4/5-bit preset, and Q5_0 (`q4_k*`) / Q5_1 (`q5_k*`) / IQ4_NL (`q3_k*`) for all
/// tensors whose rows are hidden-sized — exactly what llama-quantize writes for it.
#[derive(Debug, Clone, PartialEq)]
pub struct TypePlan {
    /// Preset name (or `custom`).
    pub name: String,
    /// Type of tensors no rule matches.
    pub default: GgmlType,
    /// Ordered rules; the first match wins.
    pub rules: Vec<TypeRule>,
    /// `general.file_type` (llama.cpp `llama_ftype`).
    pub file_type: u32,
}

/// The preset names [`TypePlan::preset`] accepts.
pub const PRESETS: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q3_k", "q4_k", "q5_k", "q6_k",
    "q3_k_m", "q4_k_m", "q5_k_m", "iq4_nl",
];

/// llama.cpp's `use_more_bits(i, n)`.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// Whether a rule pattern matches a GGUF tensor name. A pattern with `*` (any run of
/// characters) or `?` (one character) is a glob over the whole name; otherwise it matches when
/// it occurs in the name as whole dot-separated components: `ffn_down` matches
/// `blk.3.ffn_down.weight`, `blk.1` matches block 1 but not block 10, and `output.weight`
/// matches `output.weight` but not `blk.0.attn_output.weight`.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    if pattern.contains(['*', '?']) {
        return glob(pattern.as_bytes(), name.as_bytes());
    }
    if pattern.is_empty() {
        return false;
    }
    let (nb, pl) = (name.as_bytes(), pattern.len());
    name.match_indices(pattern).any(|(start, _)| {
        let end = start + pl;
        (start == 0 || nb[start - 1] == b'.') && (end == nb.len() || nb[end] == b'.')
    })
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative matcher with single-star backtracking.
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The type llama.cpp falls back to when `ty`'s block does not divide `row_len`: Q3_K ->
/// IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and any 32-wide type -> F16; repeated
/// until it fits.
pub fn fallback_type(ty: GgmlType, row_len: usize) -> GgmlType {
    let mut t = ty;
    loop {
        let (blk, _) = t.block_layout().unwrap_or((1, 0));
        if row_len.is_multiple_of(blk) {
            return t;
        }
        t = match t {
            GgmlType::Q3_K => GgmlType::IQ4_NL,
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::Q6_K => GgmlType::Q8_0,
            _ => GgmlType::F16,
        };
    }
}

impl TypePlan {
    /// Every tensor in `ty` (1-D tensors still F32).
    pub fn uniform(ty: GgmlType) -> Self {
        Self {
            name: ty.name().to_lowercase(),
            default: ty,
            rules: Vec::new(),
            file_type: file_type_of(ty),
        }
    }

    /// [`Self::preset`] for the model `cfg` describes; `tied` when it has no separate
    /// `output.weight`.
    pub fn for_model(name: &str, cfg: &model::Config, tied: bool) -> Result<Self> {
        let gqa = cfg.num_attention_heads / cfg.num_kv_heads().max(1);
        Self::preset(name, cfg.num_hidden_layers, tied, gqa)
    }

    /// A named preset (see the table above) for a model with `n_layers` blocks; `tied` when
    /// there is no separate `output.weight`; `gqa` is attention heads per key/value head.
    pub fn preset(name: &str, n_layers: usize, tied: bool, gqa: usize) -> Result<Self> {
        let lname = name.to_ascii_lowercase();
        let unknown = || {
            ExportError::Input(format!(
                "unknown type `{name}` (valid: {})",
                PRESETS.join(", ")
            ))
        };
        if !PRESETS.contains(&lname.as_str()) {
            return Err(unknown());
        }
        let (base, mixed) = match lname.strip_suffix("_m") {
            Some(b) => (b, true),
            None => (lname.as_str(), false),
        };
        let ty = parse_type(base).ok_or_else(unknown)?;
        let mut plan = Self::uniform(ty);
        plan.name = lname.clone();
        let output = if tied {
            "token_embd.weight"
        } else {
            "output.weight"
        };
        let low_bit = matches!(
            ty,
            GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q3_K
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::IQ4_NL
        );
        if low_bit {
            plan.rules.push(TypeRule {
                pattern: output.into(),
                ty: GgmlType::Q6_K,
            });
        }
        if ty == GgmlType::IQ4_NL && gqa >= 4 {
            plan.rules.push(TypeRule {
                pattern: "attn_v.weight".into(),
                ty: GgmlType::Q5_K,
            });
        }
        if mixed && ty == GgmlType::Q3_K {
            // llama.cpp's Q3_K_M: attn_v Q5_K in the first two blocks, ffn_down in the first
            // n/16, both Q4_K elsewhere; attn_output Q4_K.
            for i in 0..n_layers {
                let rule = |t: &str, ty| TypeRule {
                    pattern: format!("blk.{i}.{t}.weight"),
                    ty,
                };
                let wide = |more: bool| if more { GgmlType::Q5_K } else { GgmlType::Q4_K };
                plan.rules.push(rule("attn_v", wide(i < 2)));
                plan.rules.push(rule("ffn_down", wide(i < n_layers / 16)));
                plan.rules.push(rule("attn_output", GgmlType::Q4_K));
            }
            plan.file_type = 12;
        } else if mixed {
            for i in (0..n_layers).filter(|&i| use_more_bits(i, n_layers)) {
                for t in ["attn_v", "ffn_down"] {
                    plan.rules.push(TypeRule {
                        pattern: format!("blk.{i}.{t}.weight"),
                        ty: GgmlType::Q6_K,
                    });
                }
            }
            plan.file_type = if ty == GgmlType::Q4_K { 15 } else { 17 };
        }
        Ok(plan)
    }

    /// Adds a `PATTERN=TYPE` rule ahead of the existing ones (so user rules override a
    /// preset's).
    pub fn with_rule(mut self, spec: &str) -> Result<Self> {
        let (pat, ty) = spec
            .split_once('=')
            .ok_or_else(|| ExportError::Input(format!("rule `{spec}` is not PATTERN=TYPE")))?;
        let ty = parse_type(ty.trim()).ok_or_else(|| {
            ExportError::Input(format!(
                "rule `{spec}`: unknown type `{ty}` (valid: {})",
                type_names().join(", ")
            ))
        })?;
        let pattern = pat.trim().to_string();
        if pattern.is_empty() {
            return Err(ExportError::Input(format!(
                "rule `{spec}` has an empty pattern"
            )));
        }
        self.rules.insert(0, TypeRule { pattern, ty });
        self.name = format!("{}+rules", self.name.trim_end_matches("+rules"));
        Ok(self)
    }

    /// The planned type of a tensor before any fallback (`shape` row-major).
    pub fn planned_type(&self, gguf_name: &str, shape: &[usize]) -> GgmlType {
        if shape.len() < 2 {
            return GgmlType::F32;
        }
        self.rules
            .iter()
            .find(|r| pattern_matches(&r.pattern, gguf_name))
            .map(|r| r.ty)
            .unwrap_or(self.default)
    }

    /// The type actually written: the planned type, or its fallback when its block does not
    /// divide the row length.
    pub fn type_for(&self, gguf_name: &str, shape: &[usize]) -> GgmlType {
        fallback_type(
            self.planned_type(gguf_name, shape),
            *shape.last().unwrap_or(&1),
        )
    }
}

/// Lower-case names of the block types (`q4_k`, ...).
pub fn type_names() -> Vec<String> {
    crate::blocks::QUANTIZABLE
        .iter()
        .map(|t| t.name().to_lowercase())
        .collect()
}

/// llama.cpp's `llama_ftype` for a file mostly of `ty`.
pub fn file_type_of(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q3_K => 11,
        GgmlType::Q4_K => 14,
        GgmlType::Q5_K => 16,
        GgmlType::Q6_K => 18,
        GgmlType::BF16 => 32,
        GgmlType::IQ4_NL => 25,
        GgmlType::Other(..) => 0,
    }
}

/// The GGUF name of an HF tensor name (inverse of [`model::gguf::gguf_to_hf_name`]).
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let g = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{idx}.{g}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::gguf::gguf_to_hf_name;

    #[test]
    fn patterns() {
        assert!(pattern_matches("ffn_down", "blk.3.ffn_down.weight"));
        assert!(pattern_matches("blk.1", "blk.1.attn_q.weight"));
        assert!(!pattern_matches("blk.1", "blk.10.attn_q.weight"));
        assert!(pattern_matches("output.weight", "output.weight"));
        assert!(!pattern_matches(
            "output.weight",
            "blk.0.attn_output.weight"
        ));
        assert!(pattern_matches(
            "blk.*.attn_?.weight",
            "blk.12.attn_v.weight"
        ));
        assert!(!pattern_matches(
            "blk.*.attn_?.weight",
            "blk.12.attn_output.weight"
        ));
        assert!(pattern_matches("*", "token_embd.weight"));
        assert!(!pattern_matches("", "x"));
    }

    #[test]
    fn more_bits_matches_llama_cpp() {
        // 32 layers: 0..4, 28..32, and every third from 4 (6, 9, ...).
        let got: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            got,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn presets_and_fallbacks() {
        let p = TypePlan::preset("q4_k_m", 30, true, 1).unwrap();
        assert_eq!(p.file_type, 15);
        assert_eq!(
            p.type_for("token_embd.weight", &[49152, 576]),
            GgmlType::Q8_0
        );
        assert_eq!(
            p.planned_type("token_embd.weight", &[49152, 576]),
            GgmlType::Q6_K
        );
        assert_eq!(
            p.type_for("blk.0.ffn_down.weight", &[576, 1536]),
            GgmlType::Q6_K
        );
        assert_eq!(
            p.type_for("blk.4.ffn_down.weight", &[576, 1536]),
            GgmlType::Q4_K
        );
        assert_eq!(
            p.type_for("blk.4.attn_q.weight", &[576, 576]),
            GgmlType::Q5_0
        );
        assert_eq!(
            p.type_for("blk.0.attn_v.weight", &[192, 576]),
            GgmlType::Q8_0
        );
        assert_eq!(p.type_for("blk.0.attn_norm.weight", &[576]), GgmlType::F32);
        let q = TypePlan::preset("Q4_0", 30, false, 1).unwrap();
        assert_eq!(q.type_for("output.weight", &[32000, 4096]), GgmlType::Q6_K);
        assert_eq!(
            q.type_for("token_embd.weight", &[32000, 4096]),
            GgmlType::Q4_0
        );
        assert_eq!(
            q.type_for("blk.0.attn_output.weight", &[4096, 4096]),
            GgmlType::Q4_0
        );
        let r = q.with_rule("ffn_down=q8_0").unwrap();
        assert_eq!(
            r.type_for("blk.2.ffn_down.weight", &[4096, 11008]),
            GgmlType::Q8_0
        );
        assert!(TypePlan::preset("q2_k", 30, false, 1).is_err());
        // q3_k_m on SmolLM2's shapes: Q3_K rows of 576 fall back to IQ4_NL, Q4_K to Q5_0,
        // Q5_K to Q5_1, the output Q6_K to Q8_0; the 1536-wide ffn_down keeps its K types.
        let m = TypePlan::preset("q3_k_m", 30, true, 3).unwrap();
        assert_eq!(m.file_type, 12);
        for (name, shape, ty) in [
            ("blk.3.attn_q.weight", [576, 576], GgmlType::IQ4_NL),
            ("blk.3.ffn_up.weight", [1536, 576], GgmlType::IQ4_NL),
            ("blk.1.attn_v.weight", [192, 576], GgmlType::Q5_1),
            ("blk.2.attn_v.weight", [192, 576], GgmlType::Q5_0),
            ("blk.7.attn_output.weight", [576, 576], GgmlType::Q5_0),
            ("blk.0.ffn_down.weight", [576, 1536], GgmlType::Q5_K),
            ("blk.1.ffn_down.weight", [576, 1536], GgmlType::Q4_K),
            ("token_embd.weight", [49152, 576], GgmlType::Q8_0),
        ] {
            assert_eq!(m.type_for(name, &shape), ty, "{name}");
        }
        // On 4096-wide rows the planned types stand.
        assert_eq!(
            m.type_for("blk.3.attn_q.weight", &[4096, 4096]),
            GgmlType::Q3_K
        );
        assert_eq!(
            m.type_for("blk.5.attn_v.weight", &[1024, 4096]),
            GgmlType::Q4_K
        );
        // iq4_nl: llama.cpp's mix (output Q6_K; attn_v Q5_K only with 4+ heads per kv head).
        let n = TypePlan::preset("iq4_nl", 30, true, 3).unwrap();
        assert_eq!(n.file_type, 25);
        assert_eq!(
            n.type_for("blk.1.attn_v.weight", &[192, 576]),
            GgmlType::IQ4_NL
        );
        assert_eq!(
            n.type_for("token_embd.weight", &[49152, 576]),
            GgmlType::Q8_0
        );
        let g = TypePlan::preset("iq4_nl", 32, false, 4).unwrap();
        assert_eq!(
            g.type_for("blk.1.attn_v.weight", &[1024, 4096]),
            GgmlType::Q5_K
        );
        assert_eq!(
            g.type_for("blk.1.attn_k.weight", &[1024, 4096]),
            GgmlType::IQ4_NL
        );
        assert_eq!(g.type_for("output.weight", &[32000, 4096]), GgmlType::Q6_K);
        assert!(TypePlan::uniform(GgmlType::F16).with_rule("x=q9").is_err());
        assert_eq!(fallback_type(GgmlType::Q4_0, 48), GgmlType::F16);
        assert_eq!(fallback_type(GgmlType::Q5_K, 576), GgmlType::Q5_1);
    }

    #[test]
    fn names_invert_the_reader() {
        for l in [0, 17] {
            for part in [
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.q_proj.bias",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ] {
                let hf = format!("model.layers.{l}.{part}");
                assert_eq!(gguf_to_hf_name(&hf_to_gguf_name(&hf).unwrap()).unwrap(), hf);
            }
        }
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            assert_eq!(gguf_to_hf_name(&hf_to_gguf_name(hf).unwrap()).unwrap(), hf);
        }
        assert!(hf_to_gguf_name("model.rotary.inv_freq").is_none());
    }
}
