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

pub use crate::recipe_calib::{CalibSource, Calibration, generated_calib};
pub use crate::recipe_print::print;
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

    pub(crate) fn from_subcommand(s: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(_, k)| k.subcommand() == s)
            .map(|(_, k)| *k)
    }

    /// Options the pipeline sets: refused as recipe keys.
    pub(crate) fn owned(self) -> &'static [&'static str] {
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

type Table = BTreeMap<Spanned<String>, Spanned<Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    teacher: Spanned<String>,
    #[serde(default)]
    stage: Vec<Table>,
    eval: Option<Table>,
    calibration: Option<crate::recipe_calib::CalibTable>,
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
        Some(t) => Some(crate::recipe_calib::calibration_table(t, &|span| at(span))?),
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
    // Every stage parses as its subcommand would and passes its option checks (an option
    // that does not apply, a missing calibration file), before any stage runs.
    let dir = Path::new("OUT");
    let absent_teacher =
        Path::new("OUT/absent").join(recipe.teacher.file_name().unwrap_or_default());
    let check = |argv: Vec<String>, at: String| -> anyhow::Result<()> {
        let cli =
            crate::Cli::try_parse_from_args(&argv).map_err(|m| anyhow::anyhow!("{at}: {m}"))?;
        crate::check(cli).map_err(|e| anyhow::anyhow!("{at}: {e:#}"))
    };
    for (i, s) in recipe.stages.iter().enumerate() {
        let at = || {
            format!(
                "{}:{}: stage {} ({})",
                path.display(),
                s.line,
                i + 1,
                s.kind.name()
            )
        };
        missing_input(&s.args).map_or(Ok(()), |m| Err(anyhow::anyhow!("{}: {m}", at())))?;
        // The first stage reads the teacher: a stand-in of its name (a .gguf one decides some
        // defaults) that does not exist, so a command that missed its `checks_done` fails
        // loudly here instead of doing the work.
        let model = if i == 0 {
            &absent_teacher
        } else {
            Path::new("MODEL")
        };
        check(recipe.stage_argv(i, model, dir, dir), at())?;
    }
    if let Some(mut argv) = recipe.generate_argv(dir) {
        argv[2] = absent_teacher.display().to_string();
        check(argv, format!("{}: [calibration]", path.display()))?;
    }
    if let Some((args, _)) = &recipe.eval
        && let Some(m) = missing_input(args)
    {
        bail!("{}: [eval]: {m}", path.display());
    }
    if let Some(argv) = recipe.eval_argv(Path::new("MODEL"), dir) {
        check(argv, format!("{}: [eval]", path.display()))?;
    }
    Ok(recipe)
}

/// Options whose value is a file the command reads.
const INPUT_FLAGS: [&str; 7] = [
    "--calib",
    "--data",
    "--teacher-cache",
    "--prompts",
    "--ppl",
    "--task-file",
    "--teacher-logits",
];

/// The first input file named in `args` (a recipe table's options) that does not exist, as
/// an error message: a stage's missing file is refused before the stages before it run.
fn missing_input(args: &[String]) -> Option<String> {
    args.windows(2)
        .filter(|w| INPUT_FLAGS.contains(&w[0].as_str()))
        .find(|w| !Path::new(&w[1]).exists())
        .map(|w| format!("{} {}: not found", w[0], w[1]))
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
pub(crate) fn expand(s: &str) -> Result<String, String> {
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
    pub(crate) fn argv_with(
        &self,
        i: usize,
        model: &Path,
        dir: &Path,
        calib: Option<&Path>,
    ) -> Vec<String> {
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
            // `--format` may be given as one list or as several flags (a TOML array).
            let dense = prev
                .args
                .windows(2)
                .filter(|w| w[0] == "--format")
                .any(|w| {
                    w[1].split(',')
                        .any(|x| x.trim().eq_ignore_ascii_case("dense"))
                });
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
