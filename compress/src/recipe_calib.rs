//! A recipe's `[calibration]`: where the `--calib` of every stage that calibrates comes from
//! (a file, or sequences the teacher generates: data-free calibration), and which stages take it.

use std::path::{Path, PathBuf};

use anyhow::bail;
use serde::Deserialize;
use toml::Spanned;

use crate::recipe::{Recipe, expand};

/// Where a recipe's calibration sequences come from.
#[derive(Debug, Clone, PartialEq)]
pub enum CalibSource {
    /// A text or token file (`--calib FILE`; windows drawn with each stage's own seed).
    File(PathBuf),
    /// Data-free: `compress generate TEACHER --calib N` into OUT/calibration/teacher.json.
    Teacher {
        /// Sampling temperature (generate's default when `None`).
        temperature: Option<f64>,
        /// Nucleus mass (generate's default when `None`).
        top_p: Option<f64>,
        /// Seed of the sampling.
        seed: u64,
    },
}

/// A recipe's `[calibration]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Where the sequences come from.
    pub source: CalibSource,
    /// Sequences (`--calib-samples`).
    pub samples: usize,
    /// Tokens per sequence (`--calib-len`).
    pub len: usize,
}

/// Where `compress run` writes teacher-generated calibration in OUT.
pub fn generated_calib(out: &Path) -> PathBuf {
    out.join("calibration").join("teacher.json")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CalibTable {
    source: Spanned<String>,
    file: Option<Spanned<String>>,
    samples: Option<usize>,
    len: Option<usize>,
    seed: Option<Spanned<u64>>,
    temperature: Option<Spanned<f64>>,
    top_p: Option<Spanned<f64>>,
}

/// The `[calibration]` table, checked; `at` names a span's file and line.
pub(crate) fn calibration_table(
    t: &CalibTable,
    at: &dyn Fn(std::ops::Range<usize>) -> String,
) -> anyhow::Result<Calibration> {
    let here = |span| format!("{}: [calibration]", at(span));
    let source = match t.source.get_ref().as_str() {
        "file" => {
            let Some(f) = &t.file else {
                bail!(
                    "{}: source = \"file\" needs file = PATH",
                    here(t.source.span())
                );
            };
            for (given, key) in [
                (t.seed.as_ref().map(Spanned::span), "seed"),
                (t.temperature.as_ref().map(Spanned::span), "temperature"),
                (t.top_p.as_ref().map(Spanned::span), "top_p"),
            ] {
                if let Some(span) = given {
                    bail!(
                        "{}: `{key}` applies to source = \"teacher\" (a file's windows are drawn with each stage's own seed)",
                        here(span)
                    );
                }
            }
            CalibSource::File(PathBuf::from(
                expand(f.get_ref()).map_err(|m| anyhow::anyhow!("{}: {m}", here(f.span())))?,
            ))
        }
        "teacher" => {
            if let Some(f) = &t.file {
                bail!(
                    "{}: `file` does not apply to source = \"teacher\" (the teacher generates the sequences)",
                    here(f.span())
                );
            }
            CalibSource::Teacher {
                temperature: t.temperature.as_ref().map(|v| *v.get_ref()),
                top_p: t.top_p.as_ref().map(|v| *v.get_ref()),
                seed: t.seed.as_ref().map_or(0, |v| *v.get_ref()),
            }
        }
        other => bail!(
            "{}: source `{other}` is not \"teacher\" or \"file\"",
            here(t.source.span())
        ),
    };
    Ok(Calibration {
        source,
        samples: t.samples.unwrap_or(128),
        len: t.len.unwrap_or(512),
    })
}

impl Recipe {
    /// The `--calib` file of the stages that take `[calibration]`, for a run into `out`.
    pub fn calib_file(&self, out: &Path) -> Option<PathBuf> {
        Some(match &self.calibration.as_ref()?.source {
            CalibSource::File(f) => f.clone(),
            CalibSource::Teacher { .. } => generated_calib(out),
        })
    }

    /// `compress generate` writing the teacher's calibration sequences for a run into `out`
    /// (`None` unless `[calibration]` has source = "teacher").
    pub fn generate_argv(&self, out: &Path) -> Option<Vec<String>> {
        let c = self.calibration.as_ref()?;
        let CalibSource::Teacher {
            temperature,
            top_p,
            seed,
        } = &c.source
        else {
            return None;
        };
        let mut v: Vec<String> = vec![
            "compress".into(),
            "generate".into(),
            self.teacher.display().to_string(),
            "--calib".into(),
            c.samples.to_string(),
            "--calib-len".into(),
            c.len.to_string(),
            "--seed".into(),
            seed.to_string(),
        ];
        // generate's own defaults for --calib, spelled out so that the plan names them.
        v.extend([
            "--temperature".into(),
            temperature.unwrap_or(1.0).to_string(),
            "--top-p".into(),
            top_p.unwrap_or(0.95).to_string(),
        ]);
        v.extend([
            "--out".into(),
            generated_calib(out).display().to_string(),
            "--force".into(),
        ]);
        Some(v)
    }

    /// Marks the stages `[calibration]` is given to: those that calibrate as written and name
    /// no `calib` of their own; such a stage setting `calib_samples` or `calib_len` is refused
    /// (the table sets them).
    pub(crate) fn assign_calibration(&mut self) -> anyhow::Result<()> {
        if self.calibration.is_none() {
            return Ok(());
        }
        let mut any = false;
        for i in 0..self.stages.len() {
            let s = &self.stages[i];
            if s.args.iter().any(|a| a == "--calib") {
                continue;
            }
            let argv = self.stage_argv(i, Path::new("MODEL"), Path::new("OUT"), Path::new("OUT"));
            let calibrates = crate::Cli::try_parse_from_args(&argv).is_ok_and(|c| c.calibrates());
            if !calibrates {
                continue;
            }
            if let Some(k) = s
                .args
                .iter()
                .find(|a| *a == "--calib-samples" || *a == "--calib-len")
            {
                bail!(
                    "{}:{}: stage {} ({}) sets {k}, which [calibration] sets for every stage that calibrates: remove one, or give the stage its own calib",
                    self.path.display(),
                    s.line,
                    i + 1,
                    s.kind.name()
                );
            }
            self.stages[i].takes_calibration = true;
            any = true;
        }
        if !any {
            bail!(
                "{}: [calibration] is given, but no stage calibrates without its own calib",
                self.path.display()
            );
        }
        Ok(())
    }
}
