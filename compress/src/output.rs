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

/// A temporary sibling path for `out`.
pub fn temp_sibling(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Moves a completed temporary file or folder into place, replacing `out` if it exists.
pub fn commit(tmp: &Path, out: &Path) -> anyhow::Result<()> {
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
