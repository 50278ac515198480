//! `manifest.json` in every model folder this tool writes: what the output was made from and
//! how, so that a student can be traced and re-made from its folder: the command line, the
//! sha256 of every input file (teacher, student, calibration and training data), the tool's
//! version and git commit, the seed, wall and CPU seconds, peak RSS, headline metrics and the
//! machine. A GGUF file output carries the same object under `manifest` in the report written
//! next to it. Layout: docs/manifest.md.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The manifest's format name; bumped when a field changes meaning.
pub const FORMAT: &str = "compress-manifest/1";

/// Extensions of model-folder files no reader of this tool opens (other frameworks' weights):
/// not hashed, so a folder that also holds a 13 GB `pytorch_model.bin` costs nothing extra.
const NOT_READ: &[&str] = &["bin", "pt", "pth", "msgpack", "h5", "onnx", "ckpt"];

/// One command's run, started when the command starts and written when its output is
/// complete (before the temporary output is renamed into place).
pub struct Run {
    stage: &'static str,
    argv: Vec<String>,
    started_unix: u64,
    start: Instant,
    cpu0: f64,
    inputs: Vec<(String, PathBuf)>,
    seed: Option<u64>,
}

impl Run {
    /// Starts the record of `stage` (the subcommand) with this process's command line.
    pub fn start(stage: &'static str) -> Self {
        Self {
            stage,
            argv: std::env::args_os()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            start: Instant::now(),
            cpu0: usage().0,
            inputs: Vec::new(),
            seed: None,
        }
    }

    /// Adds an input file or model folder under `role` (`teacher`, `calibration`, ...);
    /// `None` is no input.
    pub fn input(mut self, role: &str, path: Option<&Path>) -> Self {
        if let Some(p) = path {
            self.inputs.push((role.to_string(), p.to_path_buf()));
        }
        self
    }

    /// Records the seed the run's sampling used.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The manifest as JSON, hashing every input now; `metrics` are the stage's headline
    /// figures (its report file holds the rest).
    pub fn to_json(&self, metrics: Value) -> anyhow::Result<Value> {
        let mut inputs = Vec::new();
        for (role, path) in &self.inputs {
            inputs.push(json!({
                "role": role,
                "path": path,
                "files": hash_input(path)?,
            }));
        }
        let (cpu, peak_rss) = usage();
        Ok(json!({
            "format": FORMAT,
            "tool": {
                "name": "compress",
                "version": env!("CARGO_PKG_VERSION"),
                "git_commit": env!("COMPRESS_GIT_COMMIT"),
            },
            "machine": machine(),
            "inputs": inputs,
            "stages": [{
                "stage": self.stage,
                "command": self.argv,
                "seed": self.seed,
                "started_unix": self.started_unix,
                "wall_seconds": self.start.elapsed().as_secs_f64(),
                "cpu_seconds": cpu - self.cpu0,
                "peak_rss_bytes": peak_rss,
                "metrics": metrics,
            }],
        }))
    }

    /// Writes `dir/manifest.json`.
    pub fn write(&self, dir: &Path, metrics: Value) -> anyhow::Result<()> {
        let path = dir.join("manifest.json");
        let text = serde_json::to_string_pretty(&self.to_json(metrics)?)?;
        std::fs::write(&path, text).with_context(|| format!("{}", path.display()))
    }
}

/// Name, size and sha256 of every file of an input: the file itself, or the top-level files
/// of a folder (sorted; hidden files and [`NOT_READ`] weights left out).
pub(crate) fn hash_input(path: &Path) -> anyhow::Result<Vec<Value>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("{}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .filter(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                let ext = p.extension().unwrap_or_default().to_string_lossy();
                !name.starts_with('.') && !NOT_READ.contains(&ext.as_ref())
            })
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    files
        .iter()
        .map(|f| {
            let (bytes, sha256) = sha256_file(f)?;
            let name = if path.is_dir() {
                f.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            } else {
                f.display().to_string()
            };
            Ok(json!({ "name": name, "bytes": bytes, "sha256": sha256 }))
        })
        .collect()
}

/// Size and hex sha256 of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((total, hex))
}

/// CPU seconds (user + system) of this process so far and its peak RSS in bytes.
fn usage() -> (f64, Option<u64>) {
    #[cfg(unix)]
    {
        // SAFETY: getrusage only writes the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            // Linux reports ru_maxrss in KiB, macOS in bytes.
            let unit = if cfg!(target_os = "macos") { 1 } else { 1024 };
            let rss = u64::try_from(ru.ru_maxrss).ok().map(|r| r * unit);
            return (secs(ru.ru_utime) + secs(ru.ru_stime), rss);
        }
    }
    (0.0, None)
}

/// CPU model, cores, memory, OS and architecture of this machine.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024);
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "memory_bytes": memory,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_files_and_folders_and_skips_foreign_weights() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("m");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("config.json"), b"abc").unwrap();
        std::fs::write(d.join("pytorch_model.bin"), b"x").unwrap();
        std::fs::write(d.join(".hidden"), b"x").unwrap();
        // sha256("abc"), FIPS 180-2 test vector.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let files = hash_input(&d).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!(files[0]["name"], "config.json");
        assert_eq!(files[0]["sha256"], abc);
        assert_eq!(files[0]["bytes"], 3);
        let one = hash_input(&d.join("config.json")).unwrap();
        assert_eq!(one[0]["sha256"], abc);
    }

    #[test]
    fn records_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("calib.txt");
        std::fs::write(&f, b"").unwrap();
        let run = Run::start("quant")
            .input("calibration", Some(&f))
            .input("absent", None)
            .seed(7);
        let m = run.to_json(json!({"ppl": 1.5})).unwrap();
        assert_eq!(m["format"], FORMAT);
        assert_eq!(m["inputs"].as_array().unwrap().len(), 1);
        // sha256 of the empty string.
        assert_eq!(
            m["inputs"][0]["files"][0]["sha256"],
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let s = &m["stages"][0];
        assert_eq!(s["stage"], "quant");
        assert_eq!(s["seed"], 7);
        assert_eq!(s["metrics"]["ppl"], 1.5);
        assert!(s["peak_rss_bytes"].as_u64().unwrap() > 0);
        assert!(m["machine"]["cores"].as_u64().unwrap() >= 1);
        assert_eq!(
            m["tool"]["git_commit"].as_str().unwrap().len(),
            if m["tool"]["git_commit"] == "unknown" {
                7
            } else {
                40
            }
        );
    }
}
