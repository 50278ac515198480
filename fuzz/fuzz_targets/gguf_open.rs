//! Any bytes as a GGUF file: opening, building the config and dequantizing every tensor must
//! return errors, never panic or allocate without bound.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One scratch file per process, rewritten for every input (the map of the previous input
/// is dropped by then).
fn scratch() -> &'static PathBuf {
    static P: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &P.get_or_init(|| {
        let d = tempfile::tempdir().expect("temp dir");
        let p = d.path().join("input.gguf");
        (d, p)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).expect("write input");
    if let Ok(g) = model::gguf::GgufFile::open(path) {
        let _ = g.config();
        for t in g.tensors() {
            let _ = g.read_f32(t);
        }
    }
});
