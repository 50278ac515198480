//! Recipe files: a teacher, an ordered list of stages and an evaluation, in TOML.
//!
//! ```toml
//! teacher = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
//!
//! [[stage]]
//! kind = "prune"            # prune | distill | quant | qat | export
//! method = "wanda"
//! sparsity = 0.5
//! calib = "data/wikitext-2/wiki.valid.tokens"
//!
//! [eval]
//! ppl = "data/wikitext-2/wiki.test.raw"
//! kld = true                # KL divergence from the teacher
//!
//! [calibration]             # optional: --calib of every stage that calibrates
//! source = "teacher"        # data-free (sequences the teacher samples), or "file"
//! samples = 128
//! len = 512
//! ```
//!
//! A stage's keys are its subcommand's options, spelled as the option's field (`calib_samples`)
//! or its flag (`calib-samples`). The subcommand's clap definition is the one schema: a stage
//! table is turned into that subcommand's command line and parsed by the same `Args` struct
//! `compress quant ...` parses, so a recipe and a command line can never mean different
//! things, types and enums are checked by the same value parsers, and an option that does not
//! apply is refused by the same rules. `--print-recipe` goes the other way (every option with
//! its value, defaults included). Keys the pipeline sets (the model, `out`, `force`, `threads`)
//! are refused, and unknown keys are named with their line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{ArgAction, CommandFactory};
use serde::Deserialize;
use toml::{Spanned, Value};

/// One stage kind and the subcommand it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `compress prune`.
    Prune,
    /// `compress distill` (the student is the previous stage's output, the teacher the
    /// recipe's).
    Distill,
    /// `compress quant`.
    Quant,
    /// `compress qat` (the student is the previous stage's output, the teacher the recipe's;
    /// as a first stage, the teacher itself, as on the command line).
    Qat,
    /// `compress convert` (an HF folder, or with `type = "q4_k_m"` a GGUF file).
    Export,
}

impl Kind {
    const ALL: [(&'static str, Kind); 5] = [
        ("prune", Kind::Prune),
        ("distill", Kind::Distill),
        ("quant", Kind::Quant),
        ("qat", Kind::Qat),
        ("export", Kind::Export),
    ];

    /// The kind's name in recipes.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .expect("listed")
            .0
    }

    /// The subcommand it runs.
    pub fn subcommand(self) -> &'static str {
        match self {
            Kind::Export => "convert",
            k => k.name(),
        }
    }

    fn from_subcommand(s: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(_, k)| k.subcommand() == s)
            .map(|(_, k)| *k)
    }

    /// Options the pipeline sets: refused as recipe keys.
    fn owned(self) -> &'static [&'static str] {
        match self {
            Kind::Distill => &["student", "teacher", "out", "force", "threads", "resume"],
            Kind::Qat => &["teacher", "student", "out", "force", "threads", "resume"],
            _ => &["model", "out", "force", "threads"],
        }
    }
}

/// A stage as written: its kind and options, with the line of each key.
#[derive(Debug, Clone)]
pub struct Stage {
    /// What runs.
    pub kind: Kind,
    /// 1-based line of the stage's `kind` key.
    pub line: usize,
    /// The options as command-line arguments (without the model and output).
    pub args: Vec<String>,
    /// Whether the recipe's `[calibration]` is given to it (it calibrates and names no
    /// `calib` of its own).
    pub takes_calibration: bool,
}

/// A parsed recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The recipe file.
    pub path: PathBuf,
    /// The model the first stage reads.
    pub teacher: PathBuf,
    /// The stages in order.
    pub stages: Vec<Stage>,
    /// `compress eval` options for the final model, and whether to measure KL from the teacher.
    pub eval: Option<(Vec<String>, bool)>,
    /// `[calibration]`, given to the stages that calibrate and do not name their own `calib`.
    pub calibration: Option<Calibration>,
}

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
struct CalibTable {
    source: Spanned<String>,
    file: Option<Spanned<String>>,
    samples: Option<usize>,
    len: Option<usize>,
    seed: Option<Spanned<u64>>,
    temperature: Option<Spanned<f64>>,
    top_p: Option<Spanned<f64>>,
}

type Table = BTreeMap<Spanned<String>, Spanned<Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    teacher: Spanned<String>,
    #[serde(default)]
    stage: Vec<Table>,
    eval: Option<Table>,
    calibration: Option<CalibTable>,
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// Reads and checks a recipe: every stage's options parse as its subcommand's would. Relative
/// paths in the recipe are taken from the working directory, as on the command line.
pub fn load(path: &Path) -> anyhow::Result<Recipe> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let file: File = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| line_of(&text, s.start));
        let msg = e.message().replace('\n', " ");
        match line {
            Some(l) => anyhow::anyhow!("{}:{l}: {msg}", path.display()),
            None => anyhow::anyhow!("{}: {msg}", path.display()),
        }
    })?;
    if file.stage.is_empty() {
        bail!(
            "{}: no [[stage]] (prune, distill, quant, qat or export)",
            path.display()
        );
    }
    let at =
        |span: std::ops::Range<usize>| format!("{}:{}", path.display(), line_of(&text, span.start));
    let mut stages = Vec::new();
    for (i, t) in file.stage.iter().enumerate() {
        let n = i + 1;
        let Some((k, v)) = t.iter().find(|(k, _)| k.get_ref() == "kind") else {
            let first = t.keys().next().map_or(0, |k| k.span().start);
            bail!(
                "{}: stage {n} has no `kind` (prune, distill, quant, qat or export)",
                at(first..first)
            );
        };
        let kind = match v
            .get_ref()
            .as_str()
            .and_then(|s| Kind::ALL.iter().find(|(name, _)| *name == s))
        {
            Some((_, k)) => *k,
            None => bail!(
                "{}: stage {n}: kind {} is not one of prune, distill, quant, qat, export",
                at(v.span()),
                v.get_ref()
            ),
        };
        let mut args = Vec::new();
        for (key, value) in t.iter().filter(|(k, _)| k.get_ref() != "kind") {
            let where_ = format!("{}: stage {n} ({})", at(key.span()), kind.name());
            args.extend(
                to_args(
                    kind.subcommand(),
                    kind.owned(),
                    key.get_ref(),
                    value.get_ref(),
                )
                .map_err(|m| anyhow::anyhow!("{where_}: {m}"))?,
            );
        }
        stages.push(Stage {
            kind,
            line: line_of(&text, k.span().start),
            args,
            takes_calibration: false,
        });
    }
    let eval = match &file.eval {
        None => None,
        Some(t) => Some(eval_table(t, &|span| at(span))?),
    };
    let teacher = expand(file.teacher.get_ref())
        .map_err(|m| anyhow::anyhow!("{}: teacher: {m}", at(file.teacher.span())))?;
    let calibration = match &file.calibration {
        None => None,
        Some(t) => Some(calibration_table(t, &|span| at(span))?),
    };
    let mut recipe = Recipe {
        path: path.to_path_buf(),
        teacher: PathBuf::from(teacher),
        stages,
        eval,
        calibration,
    };
    recipe.check_order()?;
    recipe.assign_calibration()?;
    // Every stage parses as its subcommand would, before any work.
    let dir = Path::new("OUT");
    for (i, s) in recipe.stages.iter().enumerate() {
        let argv = recipe.stage_argv(i, Path::new("MODEL"), dir, dir);
        crate::Cli::try_parse_from_args(&argv).map_err(|m| {
            anyhow::anyhow!(
                "{}:{}: stage {} ({}): {m}",
                path.display(),
                s.line,
                i + 1,
                s.kind.name()
            )
        })?;
    }
    if let Some(argv) = recipe.generate_argv(dir) {
        crate::Cli::try_parse_from_args(&argv)
            .map_err(|m| anyhow::anyhow!("{}: [calibration]: {m}", path.display()))?;
    }
    if let Some(argv) = recipe.eval_argv(Path::new("MODEL"), dir) {
        crate::Cli::try_parse_from_args(&argv)
            .map_err(|m| anyhow::anyhow!("{}: [eval]: {m}", path.display()))?;
    }
    Ok(recipe)
}

/// The `[calibration]` table, checked; `at` names a span's file and line.
fn calibration_table(
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

/// The `[eval]` table as `compress eval` arguments, and its `kld` switch; `at` names a span's
/// file and line.
fn eval_table(
    t: &Table,
    at: &dyn Fn(std::ops::Range<usize>) -> String,
) -> anyhow::Result<(Vec<String>, bool)> {
    let mut args = Vec::new();
    let mut kld = false;
    for (key, value) in t {
        let where_ = format!("{}: [eval]", at(key.span()));
        if key.get_ref() == "kld" {
            kld = value
                .get_ref()
                .as_bool()
                .ok_or_else(|| anyhow::anyhow!("{where_}: kld is true or false"))?;
            continue;
        }
        let owned = &["model", "json", "force", "threads", "teacher"];
        args.extend(
            to_args("eval", owned, key.get_ref(), value.get_ref())
                .map_err(|m| anyhow::anyhow!("{where_}: {m}"))?,
        );
    }
    Ok((args, kld))
}

/// `s` with every `${NAME}` replaced by that environment variable (e.g. `${COMPRESS_DATA}`, so
/// one recipe serves machines whose data lives in different places).
fn expand(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out += &rest[..i];
        let Some(j) = rest[i..].find('}') else {
            return Err(format!("`{s}`: unclosed ${{"));
        };
        let name = &rest[i + 2..i + j];
        match std::env::var(name) {
            Ok(v) => out += &v,
            Err(_) => {
                return Err(format!(
                    "`{s}` needs the environment variable {name}, which is not set"
                ));
            }
        }
        rest = &rest[i + j + 1..];
    }
    Ok(out + rest)
}

/// The command-line arguments of one recipe key.
fn to_args(sub: &str, owned: &[&str], key: &str, value: &Value) -> Result<Vec<String>, String> {
    let cmd = crate::Cli::command();
    let sc = cmd.find_subcommand(sub).expect("a subcommand");
    let id = key.replace('-', "_");
    let arg = sc
        .get_arguments()
        .find(|a| a.get_id().as_str() == id && a.get_long().is_some());
    if owned.contains(&id.as_str()) {
        return Err(format!(
            "`{key}` is set by `compress run`, not by the recipe"
        ));
    }
    let Some(arg) = arg.filter(|a| !matches!(a.get_id().as_str(), "help" | "print_recipe")) else {
        let mut valid: Vec<&str> = sc
            .get_arguments()
            .filter(|a| a.get_long().is_some())
            .map(|a| a.get_id().as_str())
            .filter(|a| !owned.contains(a) && !matches!(*a, "help" | "print_recipe"))
            .collect();
        valid.sort();
        return Err(format!("unknown key `{key}` (valid: {})", valid.join(", ")));
    };
    let flag = format!("--{}", arg.get_long().expect("long"));
    let scalar = |v: &Value| -> Result<String, String> {
        match v {
            Value::String(s) => expand(s),
            Value::Integer(i) => Ok(i.to_string()),
            Value::Float(f) => Ok(f.to_string()),
            Value::Boolean(b) => Ok(b.to_string()),
            _ => Err(format!("`{key}` takes a string, number or boolean")),
        }
    };
    match (arg.get_action(), value) {
        (ArgAction::SetTrue, Value::Boolean(b)) => Ok(if *b { vec![flag] } else { vec![] }),
        (ArgAction::SetTrue, _) => Err(format!("`{key}` is true or false")),
        (ArgAction::Append, Value::Array(items)) => {
            let mut v = Vec::new();
            for it in items {
                v.push(flag.clone());
                v.push(scalar(it)?);
            }
            Ok(v)
        }
        (_, Value::Array(items)) => {
            let parts: Result<Vec<String>, String> = items.iter().map(scalar).collect();
            Ok(vec![flag, parts?.join(",")])
        }
        (_, v) => Ok(vec![flag, scalar(v)?]),
    }
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

    /// The recipe as run: the teacher, `[calibration]` with its defaults, each stage's options
    /// as written and, commented, the defaults of the others (some apply only to other
    /// methods), and `[eval]` likewise. `${VAR}`s are expanded. Running it makes the same
    /// command lines as the recipe it came from.
    pub fn resolved(&self) -> anyhow::Result<String> {
        let mut out = format!(
            "# {} as run by compress {} (defaults filled in; commented: options left at their default)\nteacher = {}\n",
            self.path.display(),
            env!("CARGO_PKG_VERSION"),
            Value::String(self.teacher.display().to_string())
        );
        if let Some(c) = &self.calibration {
            out += "\n[calibration]\n";
            match &c.source {
                CalibSource::File(f) => {
                    out += &format!(
                        "source = \"file\"\nfile = {}\n",
                        Value::String(f.display().to_string())
                    );
                }
                CalibSource::Teacher {
                    temperature,
                    top_p,
                    seed,
                } => {
                    out += &format!(
                        "source = \"teacher\"\nseed = {seed}\ntemperature = {}\ntop_p = {}\n",
                        Value::Float(temperature.unwrap_or(1.0)),
                        Value::Float(top_p.unwrap_or(0.95))
                    );
                }
            }
            out += &format!("samples = {}\nlen = {}\n", c.samples, c.len);
        }
        let table = |argv: &[String], owned: &[&str]| -> anyhow::Result<String> {
            let m = crate::Cli::command()
                .try_get_matches_from(argv)
                .map_err(|e| anyhow::anyhow!(crate::clap_error_line(&e)))?;
            let (sub, sm) = m.subcommand().context("no subcommand")?;
            let (given, defaults) = option_lines(owned, sub, sm);
            let mut t = String::new();
            for l in given {
                t += &format!("{l}\n");
            }
            for l in defaults {
                t += &format!("# {l}\n");
            }
            Ok(t)
        };
        let (model, dir) = (Path::new("MODEL"), Path::new("OUT"));
        for (i, s) in self.stages.iter().enumerate() {
            out += &format!("\n[[stage]]\nkind = \"{}\"\n", s.kind.name());
            let mut owned = s.kind.owned().to_vec();
            if s.takes_calibration {
                out += "# calib, calib_samples, calib_len: from [calibration]\n";
                owned.extend(["calib", "calib_samples", "calib_len"]);
            }
            out += &table(&self.argv_with(i, model, dir, None), &owned)?;
        }
        if let Some((args, kld)) = &self.eval {
            let mut argv = vec!["compress".to_string(), "eval".into(), "MODEL".into()];
            argv.extend(args.iter().cloned());
            out += &format!("\n[eval]\nkld = {kld}\n");
            out += &table(&argv, &["model", "json", "force", "threads", "teacher"])?;
        }
        Ok(out)
    }

    /// Marks the stages `[calibration]` is given to: those that calibrate as written and name
    /// no `calib` of their own; such a stage setting `calib_samples` or `calib_len` is refused
    /// (the table sets them).
    fn assign_calibration(&mut self) -> anyhow::Result<()> {
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

    /// The command line of stage `i` reading `model` and writing into the folder `dir`, in a
    /// run into `out`.
    pub fn stage_argv(&self, i: usize, model: &Path, dir: &Path, out: &Path) -> Vec<String> {
        let calib = self
            .calib_file(out)
            .filter(|_| self.stages[i].takes_calibration);
        self.argv_with(i, model, dir, calib.as_deref())
    }

    /// Stage `i`'s command line with `calib` (the `[calibration]` file, when it is given to
    /// the stage).
    fn argv_with(&self, i: usize, model: &Path, dir: &Path, calib: Option<&Path>) -> Vec<String> {
        let s = &self.stages[i];
        let p = |p: &Path| p.display().to_string();
        let mut v = vec!["compress".to_string(), s.kind.subcommand().to_string()];
        match s.kind {
            Kind::Distill | Kind::Qat => {
                v.extend([
                    "--teacher".into(),
                    p(&self.teacher),
                    "--student".into(),
                    p(model),
                ]);
            }
            Kind::Export => {
                v.push(p(model));
                v.push(p(&export_target(s, dir)));
            }
            Kind::Prune | Kind::Quant => v.push(p(model)),
        }
        v.extend(s.args.iter().cloned());
        if let (Some(c), Some(f)) = (&self.calibration, calib) {
            v.extend([
                "--calib".into(),
                p(f),
                "--calib-samples".into(),
                c.samples.to_string(),
                "--calib-len".into(),
                c.len.to_string(),
            ]);
        }
        if s.kind != Kind::Export {
            v.extend(["--out".into(), p(dir)]);
        }
        v.push("--force".into());
        v
    }

    /// `compress eval` of `model` writing `json`, when the recipe has an `[eval]`.
    pub fn eval_argv(&self, model: &Path, json: &Path) -> Option<Vec<String>> {
        let (args, kld) = self.eval.as_ref()?;
        let mut v = vec![
            "compress".into(),
            "eval".into(),
            model.display().to_string(),
        ];
        v.extend(args.iter().cloned());
        if *kld {
            v.extend(["--teacher".into(), self.teacher.display().to_string()]);
        }
        v.extend([
            "--json".into(),
            json.display().to_string(),
            "--force".into(),
        ]);
        Some(v)
    }

    /// Stages after a quantizing stage need its dense output.
    fn check_order(&self) -> anyhow::Result<()> {
        for (i, s) in self.stages.iter().enumerate().skip(1) {
            let prev = &self.stages[i - 1];
            let dense = value_of(&prev.args, "--format")
                .is_some_and(|f| f.split(',').any(|x| x == "dense"));
            if matches!(prev.kind, Kind::Quant | Kind::Qat) && !dense {
                bail!(
                    "{}:{}: stage {} ({}) reads the output of stage {} ({}), which is not a dense model: give stage {} format = \"dense\" (or \"dense,packed\"), or make it the last stage",
                    self.path.display(),
                    s.line,
                    i + 1,
                    s.kind.name(),
                    i,
                    prev.kind.name(),
                    i
                );
            }
            if prev.kind == Kind::Export {
                bail!(
                    "{}:{}: stage {} ({}) follows an export stage; export writes the final file and comes last",
                    self.path.display(),
                    s.line,
                    i + 1,
                    s.kind.name()
                );
            }
        }
        Ok(())
    }
}

/// The value after `flag` in `args`.
fn value_of<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Where an export stage writes inside its folder `dir`: `dir/model.gguf` for a GGUF type,
/// else the folder itself.
pub fn export_target(s: &Stage, dir: &Path) -> PathBuf {
    if value_of(&s.args, "--type").is_some() {
        dir.join("model.gguf")
    } else {
        dir.to_path_buf()
    }
}

/// The options of a parsed stage command line as recipe lines: those given on it, and the
/// other options' defaults (a `false` switch left out).
fn option_lines(owned: &[&str], sub: &str, sm: &clap::ArgMatches) -> (Vec<String>, Vec<String>) {
    let cmd = crate::Cli::command();
    let sc = cmd.find_subcommand(sub).expect("a subcommand");
    let mut given = Vec::new();
    let mut defaults = Vec::new();
    for arg in sc.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.get_long().is_none() || owned.contains(&id) || matches!(id, "help" | "print_recipe")
        {
            continue;
        }
        let explicit = sm.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        let value = if matches!(arg.get_action(), ArgAction::SetTrue) {
            Value::Boolean(sm.get_flag(id))
        } else {
            let Some(raw) = sm.get_raw(id) else { continue };
            let vals: Vec<Value> = raw.map(|v| typed(&v.to_string_lossy())).collect();
            if matches!(arg.get_action(), ArgAction::Append) {
                Value::Array(vals)
            } else {
                vals.into_iter().next().expect("a value")
            }
        };
        let line = format!("{id} = {value}");
        if explicit {
            given.push(line);
        } else if value != Value::Boolean(false) {
            defaults.push(line);
        }
    }
    (given, defaults)
}

/// `--print-recipe`: the recipe equivalent of a stage command line (every option with its
/// value, defaults included), as TOML on stdout.
pub fn print(argv: &[String]) -> anyhow::Result<String> {
    let m = crate::Cli::command()
        .try_get_matches_from(argv)
        .map_err(|e| anyhow::anyhow!(crate::clap_error_line(&e)))?;
    let (sub, sm) = m.subcommand().context("no subcommand")?;
    let Some(kind) = Kind::from_subcommand(sub) else {
        bail!("applies to prune, distill, quant, qat and convert, not {sub}");
    };
    let model_key = match kind {
        Kind::Distill | Kind::Qat => "teacher",
        _ => "model",
    };
    let first = |id: &str| {
        sm.get_raw(id)
            .and_then(|mut v| v.next())
            .map(|v| v.to_string_lossy().into_owned())
    };
    let teacher = first(model_key);
    let student = first("student");
    if kind == Kind::Distill && (teacher.is_none() || student != teacher) {
        bail!(
            "a recipe's distill stage trains the previous stage's output (the teacher itself when it comes first) against the recipe's teacher: write the stages that make --student before it"
        );
    }
    if kind == Kind::Qat && student.is_some() && student != teacher {
        bail!(
            "a recipe's qat stage trains the previous stage's output (the teacher itself when it comes first) against the recipe's teacher: write the stages that make --student before it"
        );
    }
    let teacher = teacher.unwrap_or_default();
    let (given, defaults) = option_lines(kind.owned(), sub, sm);
    let mut out = format!(
        "# The recipe of: compress {}\nteacher = {}\n\n[[stage]]\nkind = \"{}\"\n",
        argv[1..].join(" "),
        Value::String(teacher),
        kind.name()
    );
    for l in given {
        out += &format!("{l}\n");
    }
    if !defaults.is_empty() {
        out += "# defaults of this command (some apply only to other methods):\n";
        for l in defaults {
            out += &format!("# {l}\n");
        }
    }
    Ok(out)
}

/// A command-line value as the TOML type it reads as (integers and floats as numbers).
fn typed(s: &str) -> Value {
    if let Ok(i) = s.parse::<i64>() {
        return Value::Integer(i);
    }
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() && !s.is_empty() && s.chars().any(|c| c.is_ascii_digit()) => {
            Value::Float(f)
        }
        _ => Value::String(s.to_string()),
    }
}
