//! Writing outputs safely: to a temporary name next to the target, renamed when complete;
//! never into the input model, never over an existing output without `--force`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Refuses outputs that would touch the input model or overwrite without `force`.
pub fn check_output(input: &Path, out: &Path, force: bool) -> anyhow::Result<()> {
    let canon_in = input
        .canonicalize()
        .with_context(|| format!("{}", input.display()))?;
    let out_parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Ok(p) = out_parent.canonicalize() {
        let target = p.join(out.file_name().unwrap_or_default());
        if target == canon_in || (canon_in.is_dir() && target.starts_with(&canon_in)) {
            bail!(
                "{}: output would be written into the input model {}; choose another path",
                out.display(),
                input.display()
            );
        }
        if canon_in.is_file() && canon_in.starts_with(&target) {
            bail!(
                "{}: output folder contains the input model; choose another path",
                out.display()
            );
        }
    }
    if out.exists() && !force {
        bail!(
            "{}: already exists (use --force to replace it)",
            out.display()
        );
    }
    Ok(())
}

/// A temporary sibling path for `out`, registered for removal on SIGINT/SIGTERM; stale
/// temporaries of earlier, killed runs for the same output are removed first.
pub fn temp_sibling(out: &Path) -> PathBuf {
    remove_stale_temps(out);
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    if let Ok(mut t) = TEMPS.lock() {
        t.push(tmp.clone());
    }
    tmp
}

/// Moves a completed temporary file or folder into place, replacing `out` if it exists.
pub fn commit(tmp: &Path, out: &Path) -> anyhow::Result<()> {
    // Under the lock the SIGINT/SIGTERM handler takes: it never deletes `tmp` while (or
    // after) it is renamed into place, which would empty the finished output.
    let mut temps = TEMPS.lock().unwrap_or_else(|e| e.into_inner());
    if out.exists() {
        let old = out.with_file_name(format!(
            ".{}.old-{}",
            out.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            std::process::id()
        ));
        std::fs::rename(out, &old)
            .with_context(|| format!("{}: cannot move aside", out.display()))?;
        std::fs::rename(tmp, out)
            .with_context(|| format!("{}: cannot rename into place", out.display()))?;
        if old.is_dir() {
            std::fs::remove_dir_all(&old).ok();
        } else {
            std::fs::remove_file(&old).ok();
        }
    } else {
        std::fs::rename(tmp, out)
            .with_context(|| format!("{}: cannot rename into place", out.display()))?;
    }
    temps.retain(|p| p != tmp);
    COMMITTED.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// Writes a small file atomically.
pub fn write_atomic(out: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = temp_sibling(out);
    std::fs::write(&tmp, bytes).with_context(|| format!("{}", tmp.display()))?;
    commit(&tmp, out)
}

/// Removes a temporary output when dropped unless it was kept.
pub struct TempGuard(pub Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if p.is_dir() {
                std::fs::remove_dir_all(&p).ok();
            } else {
                std::fs::remove_file(&p).ok();
            }
        }
    }
}

/// Temporary outputs of this process, removed by the SIGINT/SIGTERM handler.
static TEMPS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Set once an output has been moved into place.
static COMMITTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn remove_path(p: &Path) {
    if p.is_dir() {
        std::fs::remove_dir_all(p).ok();
    } else {
        std::fs::remove_file(p).ok();
    }
}

/// Unix tool manners: a closed output pipe ends the process quietly (SIGPIPE's default
/// action, where Rust would panic on the failed print), and SIGINT/SIGTERM remove this
/// process's temporary outputs before exiting with 128 + the signal number.
pub fn install_signal_handlers() {
    // SAFETY: restoring the default disposition of SIGPIPE before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            // Held until exit, so no commit can start after the temporaries are removed.
            let temps = TEMPS.lock().unwrap_or_else(|e| e.into_inner());
            if temps.is_empty() && COMMITTED.load(std::sync::atomic::Ordering::SeqCst) {
                // Every output is complete and in place; only the summary is left to print.
                continue;
            }
            // The main thread may still be creating files in a temporary while it is
            // removed (then the folder is not empty and stays): remove until it is gone.
            for p in temps.iter() {
                for _ in 0..200 {
                    remove_path(p);
                    if !p.exists() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
            std::process::exit(128 + sig);
        }
    });
}

/// Whether a process with this id is alive (Linux: /proc; elsewhere assumed alive).
fn pid_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes temporary siblings of `out` (`.NAME.tmp-PID`, `.NAME.old-PID`) left by runs that
/// were killed, whose process is gone, saying so in one line each.
pub fn remove_stale_temps(out: &Path) {
    let Some(name) = out.file_name().map(|n| n.to_string_lossy().to_string()) else {
        return;
    };
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let f = e.file_name().to_string_lossy().to_string();
        let pid = [".tmp-", ".old-"].iter().find_map(|k| {
            f.strip_prefix(&format!(".{name}{k}"))
                .and_then(|p| p.parse::<u32>().ok())
        });
        if let Some(pid) = pid
            && pid != std::process::id()
            && !pid_alive(pid)
        {
            remove_path(&e.path());
            eprintln!(
                "note: removed {} left by an interrupted run (process {pid})",
                e.path().display()
            );
        }
    }
}

/// Refuses a report or side output file (`--json`, `--save-teacher-logits`, ...) that is, or
/// lies inside, one of `inputs`, or that exists without `force`.
pub fn check_output_file(
    out: &Path,
    flag: &str,
    inputs: &[&Path],
    force: bool,
) -> anyhow::Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Ok(p) = parent.canonicalize() {
        let target = p.join(out.file_name().unwrap_or_default());
        for input in inputs {
            if let Ok(i) = input.canonicalize()
                && (target == i || target.starts_with(&i))
            {
                bail!(
                    "{}: {flag} would overwrite the input {}; choose another path",
                    out.display(),
                    input.display()
                );
            }
        }
    }
    if out.is_dir() {
        bail!("{}: {flag} names a folder, not a file", out.display());
    }
    if out.exists() && !force {
        bail!(
            "{}: {flag} already exists (use --force to replace it)",
            out.display()
        );
    }
    Ok(())
}
