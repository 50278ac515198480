//! Any bytes as a saved teacher-logits file (`compress eval --teacher-logits`): reading it,
//! from memory and from a file, and checking it against a run must return errors, never
//! panic or allocate without bound; both readers must agree.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use eval::kld::TeacherLogits;
use eval::{PplOptions, Protocol};
use libfuzzer_sys::fuzz_target;

/// One scratch file per process, rewritten for every input.
fn scratch() -> &'static PathBuf {
    static P: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &P.get_or_init(|| {
        let d = tempfile::tempdir().expect("temp dir");
        let p = d.path().join("input.logits");
        (d, p)
    })
    .1
}

/// Checks `t` against a run of `chunks` windows of `ctx` tokens (ids cycling below `vocab`).
fn check(t: &TeacherLogits, ctx: usize, chunks: usize, protocol: Protocol, vocab: usize) {
    let first = match protocol {
        Protocol::Llama => ctx / 2,
        Protocol::Hf => 0,
    };
    let windows: Vec<Vec<u32>> = (0..chunks)
        .map(|c| (0..ctx).map(|i| ((c * ctx + i) % vocab) as u32).collect())
        .collect();
    let opts = PplOptions {
        ctx,
        chunks: Some(chunks),
        protocol,
    };
    let _ = t.check_run(vocab, &windows, first, &opts);
}

fuzz_target!(|data: &[u8]| {
    let parsed = TeacherLogits::parse(data, Path::new("input.logits"));
    let path = scratch();
    std::fs::write(path, data).expect("write input");
    let loaded = TeacherLogits::load(path);
    assert_eq!(parsed.is_ok(), loaded.is_ok(), "parse and load disagree");
    if let Ok(t) = parsed {
        // A fixed small run, and the run the header describes when it is small.
        check(&t, 16, 2, Protocol::Llama, 300);
        let h = &t.header;
        if h.ctx <= 4096 && h.chunks <= 16 && h.vocab <= 1 << 20 {
            let protocol = if h.protocol == "hf" {
                Protocol::Hf
            } else {
                Protocol::Llama
            };
            check(&t, h.ctx.max(8), h.chunks, protocol, h.vocab);
        }
    }
});
