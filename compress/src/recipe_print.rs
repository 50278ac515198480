//! Recipes written out: `--print-recipe` (a stage command line as a recipe) and the recipe as
//! run, with its defaults filled in (`OUT/recipe.toml`).

use std::path::Path;

use anyhow::{Context, bail};
use clap::{ArgAction, CommandFactory};
use toml::Value;

use crate::recipe::{CalibSource, Kind, Recipe};

impl Recipe {
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
