//! Helpers shared by the CLI tests: run the real binary and check the one-line error
//! contract, with a snapshot of the scratch folder before and after.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every file under `root`, with its bytes (folders as empty entries).
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.insert(p.clone(), None);
                stack.push(p);
            } else {
                out.insert(p.clone(), Some(std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// [`fails`] with UTF-8 arguments.
#[allow(dead_code)]
pub fn fails_str(root: &Path, args: &[&str], names: &str, needles: &[&str]) -> String {
    let paths: Vec<&Path> = args.iter().map(Path::new).collect();
    fails(root, &paths, names, needles)
}

/// Runs `compress args` and checks: exit code 2, stderr one line starting `error:` that
/// contains `names` (a file name) and every `needle`, and no change under `root`; returns
/// the stderr.
pub fn fails(root: &Path, args: &[&Path], names: &str, needles: &[&str]) -> String {
    let before = snapshot(root);
    let out = Command::new(env!("CARGO_BIN_EXE_compress"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let cmd = format!(
        "compress {}",
        args.iter()
            .map(|a| a.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{cmd}: exit status {:?}, stderr {err}",
        out.status
    );
    assert!(
        err.starts_with("error: ") && err.ends_with('\n') && err.lines().count() == 1,
        "{cmd}: stderr not one error line: {err:?}"
    );
    assert!(
        err.contains(names),
        "{cmd}: stderr does not name `{names}`: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{cmd}: stderr lacks `{n}`: {err}");
    }
    assert!(
        snapshot(root) == before,
        "{cmd}: files under {} changed",
        root.display()
    );
    err.into_owned()
}

/// Runs `compress args`.
pub fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_compress"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs `compress args`, asserts success and returns stdout.
pub fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "compress {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
