//! `compress run RECIPE`: a recipe printed by `--print-recipe` makes the same model as the
//! command; stages chain, resume keeps finished stages, a different recipe or bad recipe is
//! refused with one line naming the file, line and key.

mod common;

use std::path::Path;

use common::{fails_str, ok, run};
use model::testkit::{calib_text, tiny_config, write_hf};

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn a_printed_recipe_makes_the_same_model_as_its_command() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 4, |_, _| {});
    let calib = root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let direct = root.join("direct");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (t, c, d) = (s(&teacher), s(&calib), s(&direct));
    let args = [
        "quant",
        &t,
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group",
        "32",
        "--calib",
        &c,
        "--calib-samples",
        "4",
        "--calib-len",
        "32",
        "--seed",
        "3",
        "--format",
        "dense",
        "--out",
        &d,
    ];
    let mut printing = args.to_vec();
    printing.push("--print-recipe");
    let recipe = ok(&printing);
    assert!(!direct.exists(), "--print-recipe ran the command");
    assert!(
        recipe.contains("kind = \"quant\"") && recipe.contains("seed = 3"),
        "{recipe}"
    );
    let file = root.join("r.toml");
    std::fs::write(&file, &recipe).unwrap();
    ok(&args);
    let out = root.join("run");
    let stdout = ok(&["run", &s(&file), "--out", &s(&out)]);
    assert!(stdout.contains("final model"), "{stdout}");
    assert_eq!(weights(&out.join("model")), weights(&direct));
    assert!(out.join("model/manifest.json").exists());
    assert!(out.join("recipe.toml").exists() && out.join("run.json").exists());
}

#[test]
fn stages_chain_resume_and_refuse_another_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 6, |_, _| {});
    let calib = root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let recipe = |bits: u32| {
        format!(
            "teacher = {teacher:?}\n\n[[stage]]\nkind = \"prune\"\nmethod = \"wanda\"\nsparsity = 0.5\ncalib = {calib:?}\ncalib_samples = 4\ncalib_len = 32\n\n[[stage]]\nkind = \"quant\"\nmethod = \"rtn\"\nbits = {bits}\ngroup = 32\nformat = \"dense\"\n\n[eval]\nppl = {calib:?}\nctx = 32\nchunks = 2\nkld = true\n"
        )
    };
    let file = root.join("r.toml");
    std::fs::write(&file, recipe(4)).unwrap();
    let out = root.join("run");
    let (f, o) = (file.to_str().unwrap(), out.to_str().unwrap());
    ok(&["run", f, "--out", o]);
    let pruned = out.join("stages/01-prune");
    assert!(pruned.join("prune_report.json").exists());
    let first = weights(&out.join("model"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let text = report.to_string();
    assert!(
        text.contains("perplexity") && text.contains("kld"),
        "{text}"
    );
    // The quant stage read the pruned model: its manifest names the pruned files.
    let m = std::fs::read_to_string(out.join("model/manifest.json")).unwrap();
    assert!(m.contains("01-prune"), "{m}");

    // Killed during stage 2: its output never got renamed into place. The rerun keeps
    // stage 1 and ends with the same bytes.
    std::fs::remove_dir_all(out.join("model")).unwrap();
    std::fs::write(out.join("done.json"), "[1]").unwrap();
    let pruned_before = weights(&pruned);
    let o2 = run(&["run", f, "--out", o]);
    let err = String::from_utf8_lossy(&o2.stderr);
    assert!(o2.status.success(), "{err}");
    let said = String::from_utf8_lossy(&o2.stdout);
    assert!(said.contains("stage 1/2 (prune): done before"), "{said}");
    assert_eq!(weights(&pruned), pruned_before);
    assert_eq!(weights(&out.join("model")), first);

    // A calibration file that changed since: refused, naming it.
    let kept = std::fs::read(&calib).unwrap();
    std::fs::write(&calib, calib_text(2999)).unwrap();
    fails_str(root, &["run", f, "--out", o], "calib.txt", &["changed"]);
    std::fs::write(&calib, kept).unwrap();

    // Another recipe in the same folder: refused, naming the stage that differs.
    std::fs::write(&file, recipe(8)).unwrap();
    fails_str(
        root,
        &["run", f, "--out", o],
        "run",
        &["different run", "stage 2"],
    );
    ok(&["run", f, "--out", o, "--force"]);
    assert_ne!(weights(&out.join("model")), first);
}

#[test]
fn the_report_scores_the_packed_model_a_quant_stage_ships() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 4, |_, _| {});
    let calib = root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let file = root.join("r.toml");
    std::fs::write(
        &file,
        format!(
            "teacher = {teacher:?}\n\n[[stage]]\nkind = \"quant\"\nmethod = \"rtn\"\nbits = 4\ngroup = 32\nformat = \"dense,packed\"\n\n[eval]\nppl = {calib:?}\nctx = 32\nchunks = 2\n"
        ),
    )
    .unwrap();
    let out = root.join("run");
    let stdout = ok(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let packed = out.join("model/packed");
    assert!(
        stdout.contains(&format!("final model: {}", packed.display())),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let bytes = report["size"]["bytes"].as_u64().unwrap();
    let dense = std::fs::metadata(out.join("model/model.safetensors"))
        .unwrap()
        .len();
    let shipped = std::fs::metadata(packed.join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(bytes, shipped, "{report}");
    assert!(shipped < dense, "packed {shipped} dense {dense}");
}

#[test]
fn bad_recipes_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 6, |_, _| {});
    let out = root.join("out");
    let o = out.to_str().unwrap().to_string();
    let case = |name: &str, body: &str, needles: &[&str]| {
        let file = root.join(name);
        std::fs::write(&file, format!("teacher = {teacher:?}\n{body}")).unwrap();
        let f = file.to_str().unwrap().to_string();
        fails_str(root, &["run", &f, "--out", &o], name, needles);
        assert!(!out.exists(), "{name}: refused, yet OUT was made");
    };
    case(
        "unknown.toml",
        "\n[[stage]]\nkind = \"quant\"\nmethod = \"rtn\"\nbitz = 4\n",
        &[":6:", "unknown key `bitz`", "bits"],
    );
    case(
        "top.toml",
        "seed = 1\n[[stage]]\nkind = \"quant\"\n",
        &[":2:", "seed"],
    );
    case(
        "owned.toml",
        "[[stage]]\nkind = \"prune\"\nout = \"x\"\n",
        &[":4:", "`out` is set by `compress run`"],
    );
    case(
        "kind.toml",
        "[[stage]]\nkind = \"shrink\"\n",
        &[":3:", "shrink", "prune, distill, quant, qat, export"],
    );
    case(
        "order.toml",
        "[[stage]]\nkind = \"quant\"\nmethod = \"rtn\"\nbits = 4\ngroup = 32\nformat = \"packed\"\n[[stage]]\nkind = \"prune\"\nmethod = \"magnitude\"\nsparsity = 0.5\n",
        &[":9:", "stage 2 (prune)", "not a dense model"],
    );
    case(
        "value.toml",
        "[[stage]]\nkind = \"quant\"\nmethod = \"rtn\"\nbits = \"four\"\n",
        &[":3:", "stage 1 (quant)", "four"],
    );
    // An option that does not apply to the method: refused by the stage's own check.
    case(
        "damp.toml",
        "[[stage]]\nkind = \"quant\"\nmethod = \"rtn\"\nbits = 4\ngroup = 32\ndamp = 0.1\nformat = \"dense\"\n",
        &["--damp"],
    );
    // [calibration]: unknown keys, sources and options that do not go together, a stage that
    // sets what the table sets, and a table no stage takes.
    let gptq = "[[stage]]\nkind = \"quant\"\nmethod = \"gptq\"\nbits = 4\ngroup = 32\nformat = \"dense\"\n";
    case(
        "cal-key.toml",
        &format!("{gptq}[calibration]\nsource = \"teacher\"\nsamplez = 4\n"),
        &[":10:", "samplez"],
    );
    case(
        "cal-src.toml",
        &format!("{gptq}[calibration]\nsource = \"web\"\n"),
        &[":9:", "[calibration]", "web"],
    );
    case(
        "cal-file.toml",
        &format!("{gptq}[calibration]\nsource = \"file\"\n"),
        &[":9:", "needs file"],
    );
    case(
        "cal-temp.toml",
        &format!("{gptq}[calibration]\nsource = \"file\"\nfile = \"x.txt\"\ntemperature = 0.5\n"),
        &[":11:", "`temperature` applies to source = \"teacher\""],
    );
    case(
        "cal-both.toml",
        &format!("{gptq}calib_len = 16\n[calibration]\nsource = \"teacher\"\n"),
        &[":3:", "stage 1 (quant)", "--calib-len", "[calibration]"],
    );
    case(
        "cal-none.toml",
        "[[stage]]\nkind = \"quant\"\nmethod = \"rtn\"\nformat = \"dense\"\n[calibration]\nsource = \"teacher\"\n",
        &["no stage calibrates"],
    );
    case(
        "cal-generated.toml",
        &format!("{gptq}[calibration]\nsource = \"teacher\"\nsamples = 0\n"),
        &["--calib", "1..="],
    );
    // A later stage's inapplicable option or missing file is refused before stage 1 runs
    // (OUT is never made), naming that stage's line.
    let prune = "[[stage]]\nkind = \"prune\"\nmethod = \"magnitude\"\nsparsity = 0.5\n";
    case(
        "late-calib.toml",
        &format!("{prune}[[stage]]\nkind = \"quant\"\nmethod = \"gptq\"\nformat = \"dense\"\n"),
        &[":7:", "stage 2 (quant)", "--method gptq needs --calib"],
    );
    case(
        "late-file.toml",
        &format!(
            "{prune}[[stage]]\nkind = \"prune\"\nmethod = \"wanda\"\ncalib = \"nowhere.txt\"\n"
        ),
        &[":7:", "stage 2 (prune)", "--calib nowhere.txt: not found"],
    );
    let data = root.join("data.txt");
    std::fs::write(&data, calib_text(200)).unwrap();
    case(
        "late-lora.toml",
        &format!("{prune}[[stage]]\nkind = \"distill\"\ndata = {data:?}\nlora_alpha = 8.0\n"),
        &[
            ":7:",
            "stage 2 (distill)",
            "--lora-alpha",
            "need --lora-rank",
        ],
    );
    case(
        "late-eval.toml",
        &format!("{prune}[eval]\nppl = \"nowhere.raw\"\n"),
        &["[eval]", "--ppl nowhere.raw: not found"],
    );
    let missing = root.join("missing.toml");
    std::fs::write(
        &missing,
        "teacher = \"nowhere\"\n[[stage]]\nkind = \"quant\"\nmethod = \"rtn\"\n",
    )
    .unwrap();
    fails_str(
        root,
        &["run", missing.to_str().unwrap(), "--out", &o],
        "missing.toml",
        &["nowhere", "not found"],
    );
    // An existing folder that no run made is not replaced without --force.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    std::fs::write(
        root.join("fine.toml"),
        format!("teacher = {teacher:?}\n[[stage]]\nkind = \"quant\"\nmethod = \"rtn\"\nformat = \"dense\"\n"),
    )
    .unwrap();
    fails_str(
        root,
        &["run", root.join("fine.toml").to_str().unwrap(), "--out", &o],
        "out",
        &["not a `compress run` folder", "--force"],
    );
}

/// `[calibration] source = "teacher"`: the teacher's sequences are generated into
/// OUT/calibration (kept on resume), and the GPTQ stage that names no calib of its own makes
/// exactly the model `compress quant --calib THAT_FILE` makes; a stage with its own calib keeps it.
#[test]
fn teacher_generated_calibration_feeds_the_calibrating_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 8, |_, _| {});
    let calib = root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let file = root.join("r.toml");
    std::fs::write(
        &file,
        format!(
            "teacher = {teacher:?}\n\n[[stage]]\nkind = \"prune\"\nmethod = \"wanda\"\nsparsity = 0.25\ncalib = {calib:?}\ncalib_samples = 4\ncalib_len = 32\n\n[[stage]]\nkind = \"quant\"\nmethod = \"gptq\"\nbits = 4\ngroup = 32\nformat = \"dense\"\n\n[calibration]\nsource = \"teacher\"\nsamples = 3\nlen = 24\nseed = 5\n"
        ),
    )
    .unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = root.join("run");
    let stdout = ok(&["run", &s(&file), "--out", &s(&out)]);
    let generated = out.join("calibration/teacher.json");
    let seqs: Vec<Vec<u32>> = serde_json::from_slice(&std::fs::read(&generated).unwrap()).unwrap();
    assert_eq!((seqs.len(), seqs[0].len()), (3, 24));
    assert!(out.join("calibration/teacher.txt").exists());
    // The generation is `compress generate` itself.
    let direct_gen = root.join("generated.json");
    ok(&[
        "generate",
        &s(&teacher),
        "--calib",
        "3",
        "--calib-len",
        "24",
        "--seed",
        "5",
        "--out",
        &s(&direct_gen),
    ]);
    assert_eq!(
        std::fs::read(&generated).unwrap(),
        std::fs::read(&direct_gen).unwrap()
    );
    // Stage 1 kept its own calibration; stage 2 took the generated one.
    let plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    let argv = |i: usize| plan["stages"][i].to_string();
    assert!(
        argv(0).contains("calib.txt") && !argv(0).contains("teacher.json"),
        "{plan}"
    );
    assert!(
        argv(1).contains("teacher.json") && argv(1).contains("\"24\""),
        "{plan}"
    );
    let direct = root.join("direct");
    ok(&[
        "quant",
        &s(&out.join("stages/01-prune")),
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group",
        "32",
        "--calib",
        &s(&generated),
        "--calib-samples",
        "3",
        "--calib-len",
        "24",
        "--format",
        "dense",
        "--out",
        &s(&direct),
    ]);
    assert_eq!(weights(&out.join("model")), weights(&direct));
    // OUT/recipe.toml is the recipe as run, defaults filled in: it plans the same commands.
    let resolved = std::fs::read_to_string(out.join("recipe.toml")).unwrap();
    assert!(
        resolved.contains("temperature = 1.0")
            && resolved.contains("# sample_rows = 2048")
            && resolved.contains("from [calibration]"),
        "{resolved}"
    );
    let dry = |recipe: &Path| {
        let o = ok(&[
            "run",
            &s(recipe),
            "--out",
            &s(&root.join("dry")),
            "--dry-run",
        ]);
        o.replace(&s(&root.join("dry")), "OUT")
    };
    assert_eq!(dry(&out.join("recipe.toml")), dry(&file));
    assert!(out.join("recipe.given.toml").exists());
    // Run again: everything is kept, the calibration too.
    let again = ok(&["run", &s(&file), "--out", &s(&out)]);
    assert!(
        again.contains("calibration: generated before, kept"),
        "{again}"
    );
    assert!(stdout.contains("calibration: generate"), "{stdout}");
}

/// Every recipe in recipes/ parses and resolves (`--dry-run`), with COMPRESS_DATA pointing at
/// the shared data.
#[test]
fn the_shipped_recipes_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let teacher = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model::testkit::require_file(&teacher, "scripts/get-smollm2.sh") {
        return;
    }
    let data = std::env::var("COMPRESS_DATA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("../shared/data"));
    let mut n = 0;
    for e in std::fs::read_dir(root.join("recipes")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_compress"))
            .current_dir(&root)
            .env("COMPRESS_DATA", &data)
            .args([
                "run",
                p.to_str().unwrap(),
                "--out",
                "/nonexistent/run",
                "--dry-run",
            ])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(said.contains("compress eval"), "{}: {said}", p.display());
        n += 1;
    }
    assert!(n >= 4, "{n} recipes");
}
