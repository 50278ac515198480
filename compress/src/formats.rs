//! `--format` of `quant`, `qat` and `prune`: a comma-separated list of output formats that clap parses
//! into [`Format`]s, so a recipe and a command line are checked by the same parser and a
//! misspelt format is refused before anything is read.

use anyhow::bail;

/// `gguf:auto`: per-tensor types chosen under a size budget (`quant` only).
pub const AUTO: &str = "auto";

/// One output format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// A dense HF folder (bf16 for `quant`, the dtype of `--dtype` for `qat`).
    Dense,
    /// compressed-tensors `pack-quantized` (int32-packed codes; bits 2, 4 or 8).
    Packed,
    /// compressed-tensors `sparse-bitmask` (`prune`).
    Sparse,
    /// The bitsandbytes layout (`quant --scheme`).
    Bnb,
    /// A GGUF file of this type preset (lower case, one of `convert --type`'s), or [`AUTO`].
    Gguf(String),
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "dense" => Ok(Format::Dense),
            "packed" => Ok(Format::Packed),
            "sparse" => Ok(Format::Sparse),
            "bnb" => Ok(Format::Bnb),
            _ => match s.strip_prefix("gguf:") {
                Some(ty)
                    if quant::gguf_export::PRESETS.contains(&ty.trim()) || ty.trim() == AUTO =>
                {
                    Ok(Format::Gguf(ty.trim().to_string()))
                }
                Some(ty) => Err(format!(
                    "unknown GGUF type `{ty}` (valid: {}, {AUTO})",
                    quant::gguf_export::PRESETS.join(", ")
                )),
                None => Err(format!(
                    "`{s}` is not a format (dense, packed, sparse, bnb, gguf:TYPE)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Format::Dense => f.write_str("dense"),
            Format::Packed => f.write_str("packed"),
            Format::Sparse => f.write_str("sparse"),
            Format::Bnb => f.write_str("bnb"),
            Format::Gguf(t) => write!(f, "gguf:{t}"),
        }
    }
}

/// Written as `--format` spells it (reports list the formats written).
impl serde::Serialize for Format {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The formats as `--format` spells them (`dense,packed`).
pub fn joined(formats: &[Format]) -> String {
    formats
        .iter()
        .map(Format::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Checks a command's `--format` list: not empty, no format twice, at most one GGUF, and each
/// format one `supported` accepts; `what` names the command's options in the error
/// (`--scheme`, `qat`) and `list` the formats it takes.
pub fn check(
    formats: &[Format],
    supported: impl Fn(&Format) -> bool,
    what: &str,
    list: &str,
) -> anyhow::Result<()> {
    if formats.is_empty() {
        bail!("--format names no format (supported: {list})");
    }
    if let Some(f) = formats.iter().find(|f| !supported(f)) {
        bail!("--format {f} does not apply to {what} (supported: {list})");
    }
    for (i, f) in formats.iter().enumerate() {
        if formats[..i].contains(f) {
            bail!("--format names {f} twice");
        }
    }
    let ggufs = formats
        .iter()
        .filter(|f| matches!(f, Format::Gguf(_)))
        .count();
    if ggufs > 1 {
        bail!("--format names more than one gguf:TYPE");
    }
    Ok(())
}

/// The GGUF type of a list [`check`] accepted, if it names one.
pub fn gguf(formats: &[Format]) -> Option<&str> {
    formats.iter().find_map(|f| match f {
        Format::Gguf(t) => Some(t.as_str()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_print_back_and_are_checked() {
        let f: Vec<Format> = ["dense", " Packed", "gguf:Q4_K_M"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(joined(&f), "dense,packed,gguf:q4_k_m");
        assert!("gguf:q9_9".parse::<Format>().unwrap_err().contains("q9_9"));
        assert!("spares".parse::<Format>().unwrap_err().contains("spares"));
        let any = |_: &Format| true;
        assert!(check(&f[..2], any, "quant", "").is_ok());
        assert!(check(&f, any, "quant", "").is_ok());
        let two = [f[2].clone(), Format::Gguf("q8_0".into())];
        assert!(check(&two, any, "quant", "").is_err(), "two GGUF types");
        assert!(check(&[], any, "quant", "").is_err());
        assert!(check(&[Format::Dense, Format::Dense], any, "quant", "").is_err());
        let no_bnb = |f: &Format| *f != Format::Bnb;
        let e = check(&[Format::Bnb], no_bnb, "qat", "dense").unwrap_err();
        assert!(e.to_string().contains("bnb does not apply to qat"));
        assert_eq!(gguf(&f[2..]), Some("q4_k_m"));
        assert_eq!(gguf(&f[..2]), None);
    }
}
