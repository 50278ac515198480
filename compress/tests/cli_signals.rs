//! Interrupted runs: `compress convert` and `compress quant` started as child processes and
//! killed at several points. SIGTERM (and SIGINT) leave nothing behind: no temporary folder
//! and no partial output. After SIGKILL a rerun removes the stale temporary, says so, and
//! writes an output byte-identical to an uninterrupted run's.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use model::testkit::{tiny_config, write_hf};

fn hidden_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// Every file of an output folder with a hash of its bytes; reports and the manifest are left
/// out (they hold wall times and paths).
fn files(dir: &Path) -> Vec<(String, u64)> {
    use std::hash::{Hash, Hasher};
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.to_string_lossy();
            !name.ends_with("_report.json") && !name.ends_with("manifest.json")
        })
        .map(|p| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(&p).unwrap().hash(&mut h);
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                h.finish(),
            )
        })
        .collect();
    v.sort();
    v
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_compress"))
        .args(args)
        .output()
        .unwrap()
}

fn kill_after(args: &[&str], ms: u64, signal: i32) -> Option<i32> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_compress"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    status.code().or(status.signal().map(|s| 128 + s))
}

/// A synthetic teacher in `root/teacher`, large enough (~60 MB of f32) that a kill lands
/// while an output is being written.
fn killable_teacher(root: &Path) -> std::path::PathBuf {
    let teacher = root.join("teacher");
    let mut cfg = tiny_config();
    cfg["hidden_size"] = 512.into();
    cfg["intermediate_size"] = 1024.into();
    cfg["num_hidden_layers"] = 8.into();
    cfg["num_attention_heads"] = 8.into();
    cfg["num_key_value_heads"] = 4.into();
    write_hf(&teacher, &cfg, 5, |_, _| {});
    teacher
}

#[test]
fn killed_runs_leave_nothing_and_reruns_match() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let teacher = killable_teacher(root);
    let t = teacher.to_str().unwrap();
    let jobs: [(&str, Vec<String>); 2] = [
        (
            "convert",
            vec![
                "convert".into(),
                t.into(),
                "OUT".into(),
                "--dtype".into(),
                "f32".into(),
            ],
        ),
        (
            "quant",
            [
                "quant", t, "--method", "rtn", "--bits", "4", "--group", "64", "--out", "OUT",
            ]
            .map(String::from)
            .to_vec(),
        ),
    ];
    for (name, args) in jobs {
        let reference = root.join(format!("{name}-ref"));
        let with = |out: &Path| -> Vec<String> {
            args.iter()
                .map(|a| {
                    if a == "OUT" {
                        out.to_str().unwrap().to_string()
                    } else {
                        a.clone()
                    }
                })
                .collect()
        };
        let a = with(&reference);
        let r = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            r.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let want = files(&reference);

        for (i, ms) in [30u64, 120, 400].into_iter().enumerate() {
            for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
                let sub = root.join(format!("{name}-term-{i}-{sig}"));
                std::fs::create_dir_all(&sub).unwrap();
                let out = sub.join("out");
                let a = with(&out);
                let rc = kill_after(&a.iter().map(String::as_str).collect::<Vec<_>>(), ms, sig);
                assert!(
                    hidden_entries(&sub).is_empty(),
                    "{name} signal {sig} at {ms} ms left a temporary"
                );
                if rc == Some(0) {
                    assert_eq!(files(&out), want, "{name}: finished before the signal");
                } else {
                    assert_eq!(rc, Some(code), "{name}: exit code after signal {sig}");
                    assert!(!out.exists(), "{name}: partial output after signal {sig}");
                }
            }
            let sub = root.join(format!("{name}-kill-{i}"));
            std::fs::create_dir_all(&sub).unwrap();
            let out = sub.join("out");
            let a = with(&out);
            let argv: Vec<&str> = a.iter().map(String::as_str).collect();
            let rc = kill_after(&argv, ms, libc::SIGKILL);
            let stale = !hidden_entries(&sub).is_empty();
            if rc == Some(0) {
                continue;
            }
            let mut again = argv.clone();
            again.push("--force");
            let r = run(&again);
            assert!(
                r.status.success(),
                "{name}: rerun failed: {}",
                String::from_utf8_lossy(&r.stderr)
            );
            if stale {
                assert!(
                    String::from_utf8_lossy(&r.stderr).contains("left by an interrupted run"),
                    "{name}: the rerun did not say it removed the stale temporary"
                );
            }
            assert!(
                hidden_entries(&sub).is_empty(),
                "{name}: stale temporary after the rerun"
            );
            assert_eq!(files(&out), want, "{name}: rerun after SIGKILL differs");
        }
    }
}

/// `compress run` killed with SIGKILL at several points (in the first stage, between stages,
/// inside the quantization stage) and run again resumes and ends with the files of an
/// uninterrupted run, stage by stage.
#[test]
fn a_killed_recipe_run_resumes_to_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let teacher = killable_teacher(root);
    let recipe = root.join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "teacher = {teacher:?}\n[[stage]]\nkind = \"prune\"\nmethod = \"magnitude\"\nsparsity = 0.5\n[[stage]]\nkind = \"quant\"\nmethod = \"rtn\"\nbits = 4\ngroup = 64\nformat = \"dense\"\n"
        ),
    )
    .unwrap();
    let r = recipe.to_str().unwrap();
    let reference = root.join("ref");
    let o = run(&["run", r, "--out", reference.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = (
        files(&reference.join("stages/01-prune")),
        files(&reference.join("model")),
    );
    let mut interrupted = 0;
    for (i, ms) in [50u64, 250, 600, 1200].into_iter().enumerate() {
        let out = root.join(format!("kill-{i}"));
        let o_s = out.to_str().unwrap();
        if kill_after(&["run", r, "--out", o_s], ms, libc::SIGKILL) == Some(0) {
            continue;
        }
        interrupted += 1;
        let again = run(&["run", r, "--out", o_s]);
        assert!(
            again.status.success(),
            "kill at {ms} ms, rerun: {}",
            String::from_utf8_lossy(&again.stderr)
        );
        let got = (
            files(&out.join("stages/01-prune")),
            files(&out.join("model")),
        );
        assert_eq!(got, want, "kill at {ms} ms");
        assert!(
            hidden_entries(&out).is_empty(),
            "kill at {ms} ms: a temporary is left"
        );
    }
    assert!(interrupted > 0, "every run finished before its kill");
}
