//! `compress run RECIPE --out DIR`: runs a recipe's stages in order, each reading the
//! previous one's output, then its evaluation. OUT/model is the final model, OUT/stages/NN-KIND
//! the stages before it, OUT/report.json the evaluation; OUT/recipe.toml is the recipe as
//! given and OUT/run.json the resolved command lines with the teacher's file hashes.
//!
//! Resume: run again with the same recipe and OUT and the finished stages are kept (a stage
//! is finished when its output was renamed into place, which happens only once it is
//! complete); a training stage cut short continues from its newest checkpoint (`--resume`).
//! An OUT made by a different recipe, or whose teacher files changed, is refused with what
//! differs (`--force` starts over).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::recipe::{Kind, Recipe};

/// `compress run` options.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The recipe, a TOML file (docs/recipes.md; `compress quant ... --print-recipe` writes one).
    recipe: crate::Path,
    /// The run folder: OUT/model is the final model, OUT/stages/NN-KIND the stages before it.
    #[arg(long)]
    out: crate::Path,
    /// Start over in an OUT made by a different recipe or from other inputs (it is deleted).
    #[arg(long)]
    force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Check the recipe and print the command line of every stage, without running them.
    #[arg(long)]
    dry_run: bool,
}

/// The file listing the stages done so far, in OUT.
const DONE: &str = "done.json";

/// Runs a recipe.
pub fn run(a: Args) -> anyhow::Result<()> {
    crate::set_threads(a.threads);
    let recipe = crate::recipe::load(&a.recipe)?;
    if !recipe.teacher.exists() {
        bail!(
            "{}: teacher {} not found",
            a.recipe.display(),
            recipe.teacher.display()
        );
    }
    crate::output::check_output(&recipe.teacher, &a.out, true)?;
    let plan = plan(&recipe, &a.out)?;
    if a.dry_run {
        if !plan["calibration"].is_null() {
            println!("compress {}", join(&plan["calibration"]));
        }
        for s in plan["stages"].as_array().into_iter().flatten() {
            println!("compress {}", join(s));
        }
        if !plan["eval"].is_null() {
            println!("compress {}", join(&plan["eval"]));
        }
        return Ok(());
    }
    if a.out.exists() {
        let run_json = a.out.join("run.json");
        let before: Option<Value> = std::fs::read_to_string(&run_json)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        match before {
            Some(b) if b == plan => println!("{}: resuming", a.out.display()),
            _ if a.force => {
                std::fs::remove_dir_all(&a.out).with_context(|| format!("{}", a.out.display()))?
            }
            Some(b) => bail!(
                "{}: made by a different run ({}); use --force to start over, or another --out",
                a.out.display(),
                difference(&b, &plan)
            ),
            None => bail!(
                "{}: already exists and is not a `compress run` folder (use --force to replace it)",
                a.out.display()
            ),
        }
    }
    let created = !a.out.exists();
    if created {
        // OUT appears with its records, so an OUT without run.json is never one of ours.
        let tmp = crate::output::temp_sibling(&a.out);
        std::fs::create_dir_all(tmp.join("stages"))
            .with_context(|| format!("{}", tmp.display()))?;
        let mut guard = crate::output::TempGuard(Some(tmp.clone()));
        write_records(&a, &recipe, &plan, &tmp)?;
        crate::output::commit(&tmp, &a.out)?;
        guard.0 = None;
    }
    let records = if created {
        Ok(())
    } else {
        write_records(&a, &recipe, &plan, &a.out)
    };
    let result = records.and_then(|()| execute(&a, &recipe));
    // A run that fails before any stage finished leaves nothing behind.
    if result.is_err() && created && read_done(&a.out).is_empty() {
        std::fs::remove_dir_all(&a.out).ok();
    }
    result
}

/// Writes the recipe as given (recipe.given.toml), as run with its defaults filled in
/// (recipe.toml) and the resolved plan (run.json) into `dir`.
fn write_records(a: &Args, recipe: &Recipe, plan: &Value, dir: &Path) -> anyhow::Result<()> {
    let text = std::fs::read(&a.recipe).with_context(|| format!("{}", a.recipe.display()))?;
    crate::output::write_atomic(&dir.join("recipe.given.toml"), &text)?;
    crate::output::write_atomic(&dir.join("recipe.toml"), recipe.resolved()?.as_bytes())?;
    crate::output::write_atomic(
        &dir.join("run.json"),
        serde_json::to_string_pretty(plan)?.as_bytes(),
    )
}

/// Runs the stages not done yet, then the evaluation.
fn execute(a: &Args, recipe: &Recipe) -> anyhow::Result<()> {
    if let Some(argv) = recipe.generate_argv(&a.out) {
        let file = crate::recipe::generated_calib(&a.out);
        // The token file is renamed into place complete, so one that exists is finished.
        if file.exists() {
            println!("calibration: generated before, kept");
        } else {
            println!("calibration: {}", argv[1..].join(" "));
            let at = format!("{}: [calibration]", recipe.path.display());
            let cli =
                crate::Cli::try_parse_from_args(&argv).map_err(|m| anyhow::anyhow!("{at}: {m}"))?;
            crate::run(cli).with_context(|| at.clone())?;
        }
    }
    let mut done = read_done(&a.out);
    let mut model = recipe.teacher.clone();
    let n = recipe.stages.len();
    for (i, s) in recipe.stages.iter().enumerate() {
        let dir = stage_dir(&a.out, i, n, s.kind);
        let target = if s.kind == Kind::Export {
            crate::recipe::export_target(s, &dir)
        } else {
            dir.clone()
        };
        let label = format!("stage {}/{n} ({})", i + 1, s.kind.name());
        if done.contains(&(i + 1)) && target.exists() {
            println!("{label}: done before, kept");
            model = target;
            continue;
        }
        let mut argv = recipe.stage_argv(i, &model, &dir, &a.out);
        let ckpts = crate::distill_checkpoints::root_for(&dir);
        if matches!(s.kind, Kind::Distill | Kind::Qat) && ckpts.exists() {
            argv.push("--resume".into());
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        }
        if target != dir {
            std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        }
        println!("{label}: {}", argv[1..].join(" "));
        // Errors name the recipe and the stage's line.
        let at = format!("{}:{}: {label}", recipe.path.display(), s.line);
        let cli =
            crate::Cli::try_parse_from_args(&argv).map_err(|m| anyhow::anyhow!("{at}: {m}"))?;
        crate::run(cli).with_context(|| at.clone())?;
        done.push(i + 1);
        crate::output::write_atomic(&a.out.join(DONE), serde_json::to_vec(&done)?.as_slice())?;
        model = target;
    }
    let final_model = final_model(&model);
    if let Some(argv) = recipe.eval_argv(&final_model, &a.out.join("report.json")) {
        println!("eval: {}", argv[1..].join(" "));
        let at = format!("{}: [eval]", recipe.path.display());
        let cli =
            crate::Cli::try_parse_from_args(&argv).map_err(|m| anyhow::anyhow!("{at}: {m}"))?;
        crate::run(cli).with_context(|| at.clone())?;
    }
    println!("final model: {}", final_model.display());
    if recipe.eval.is_some() {
        println!("report: {}", a.out.join("report.json").display());
    }
    Ok(())
}

/// The model a recipe delivers, which `[eval]` scores: the compressed form when the last
/// stage wrote one beside its dense weights (`packed/`, as `--format dense,packed` writes), so
/// the report's size is the size a user ships; else the folder or file the stage wrote.
fn final_model(model: &Path) -> PathBuf {
    let packed = model.join("packed");
    if packed.join("model.safetensors").exists() {
        packed
    } else if model.join("model.safetensors").exists() || model.is_file() {
        model.to_path_buf()
    } else if model.join("model.gguf").exists() {
        model.join("model.gguf")
    } else {
        model.to_path_buf()
    }
}

/// OUT/model for the last stage, else OUT/stages/NN-KIND.
fn stage_dir(out: &Path, i: usize, n: usize, kind: Kind) -> PathBuf {
    if i + 1 == n {
        out.join("model")
    } else {
        out.join("stages")
            .join(format!("{:02}-{}", i + 1, kind.name()))
    }
}

/// What a run is: every command line it runs and the teacher's files with their hashes.
fn plan(recipe: &Recipe, out: &Path) -> anyhow::Result<Value> {
    let n = recipe.stages.len();
    let mut model = recipe.teacher.clone();
    let mut stages = Vec::new();
    for (i, s) in recipe.stages.iter().enumerate() {
        let dir = stage_dir(out, i, n, s.kind);
        stages.push(json!(recipe.stage_argv(i, &model, &dir, out)[1..]));
        model = if s.kind == Kind::Export {
            crate::recipe::export_target(s, &dir)
        } else {
            dir
        };
    }
    let eval = recipe
        .eval_argv(Path::new("FINAL"), &out.join("report.json"))
        .map(|v| json!(v[1..]));
    // Data files the stages read (calibration, training, evaluation text): any argument that
    // names an existing file outside OUT.
    let mut data = serde_json::Map::new();
    let args = stages.iter().chain(eval.iter()).filter_map(Value::as_array);
    for a in args.flatten().filter_map(Value::as_str) {
        let p = Path::new(a);
        if p.is_file() && !p.starts_with(out) && p != recipe.teacher {
            data.insert(a.to_string(), json!(crate::manifest::sha256_file(p)?.1));
        }
    }
    let mut plan = json!({
        "teacher": recipe.teacher,
        "teacher_files": crate::manifest::hash_input(&recipe.teacher)?,
        "data_files": data,
        "stages": stages,
        "eval": eval,
    });
    // Only with a generated calibration, so that earlier runs keep their plan.
    if let Some(g) = recipe.generate_argv(out) {
        plan["calibration"] = json!(g[1..]);
    }
    Ok(plan)
}

/// A short description of the first difference between two plans.
fn difference(before: &Value, now: &Value) -> String {
    if before["teacher_files"] != now["teacher_files"] {
        return "the teacher's files changed".into();
    }
    if let (Some(b), Some(n)) = (
        before["data_files"].as_object(),
        now["data_files"].as_object(),
    ) && let Some(k) = n.keys().find(|k| b.contains_key(*k) && b[*k] != n[*k])
    {
        return format!("{k} changed");
    }
    let (b, n) = (&before["stages"], &now["stages"]);
    let (bl, nl) = (
        b.as_array().map_or(0, Vec::len),
        n.as_array().map_or(0, Vec::len),
    );
    if bl != nl {
        return format!("{bl} stages before, {nl} now");
    }
    for i in 0..nl {
        if b[i] != n[i] {
            return format!("stage {} differs: was `{}`", i + 1, join(&b[i]));
        }
    }
    if before["eval"] != now["eval"] {
        return "the evaluation differs".into();
    }
    if before.get("calibration") != now.get("calibration") {
        return "the [calibration] differs".into();
    }
    "another teacher".into()
}

fn join(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn read_done(out: &Path) -> Vec<usize> {
    std::fs::read(out.join(DONE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}
