//! Zero-shot multiple-choice accuracy of one model, as a table.
//!
//! ```sh
//! cargo run --release -p eval --example tasks -- MODEL [TASKS] [LIMIT]
//! # e.g. all tasks, first 100 documents of each:
//! cargo run --release -p eval --example tasks -- models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     piqa,arc_easy,medqa,pubmedqa,mmlu_medical 100
//! ```
//! Data comes from `$COMPRESS_DATA` when set (see `scripts/get-data.sh`), else `$SHARED/data`
//! when `SHARED` is set, else `../shared/data` next to the workspace. Progress goes to stderr.
#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use eval::tasks::{KNOWN_TASKS, default_data_dir, run_tasks};
use model::Checkpoint;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(model_path) = args.first() else {
        return Err(format!(
            "usage: tasks MODEL [TASK,TASK,...] [LIMIT]  (tasks: {})",
            KNOWN_TASKS.join(", ")
        )
        .into());
    };
    let names: Vec<String> = match args.get(1) {
        Some(list) => list
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        None => KNOWN_TASKS.iter().map(|s| s.to_string()).collect(),
    };
    let limit = args
        .get(2)
        .map(|s| s.parse::<usize>())
        .transpose()
        .map_err(|e| format!("LIMIT: {e}"))?;
    let data_dir = match (
        std::env::var_os("COMPRESS_DATA"),
        std::env::var_os("SHARED"),
    ) {
        (Some(d), _) => PathBuf::from(d),
        (None, Some(s)) => PathBuf::from(s).join("data"),
        (None, None) => default_data_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("..")),
    };
    let start = Instant::now();
    let ckpt = Checkpoint::open(Path::new(model_path))?;
    let tok = model::load_tokenizer(&ckpt)?;
    let mut last = (String::new(), 0u64);
    let results = run_tasks(
        &ckpt,
        &tok,
        &names,
        &[],
        Some(&data_dir),
        limit,
        model::default_device(),
        |task, done, total| {
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            if task != last.0 || pct >= last.1 + 10 || done == total {
                eprintln!(
                    "[{:7.1}s] {task}: {done}/{total} ({pct}%)",
                    start.elapsed().as_secs_f64()
                );
                last = (task.to_string(), pct);
            }
        },
    )?;
    println!(
        "model: {model_path}  limit: {}  threads: {}",
        limit.map_or("none".into(), |l| l.to_string()),
        rayon::current_num_threads()
    );
    println!("| task | n | acc | ± stderr | acc_norm | ± stderr | seconds |");
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in &results {
        println!(
            "| {name} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.1} |",
            r.n, r.acc, r.acc_stderr, r.acc_norm, r.acc_norm_stderr, r.seconds
        );
    }
    println!("total wall time: {:.1} s", start.elapsed().as_secs_f64());
    println!("{}", serde_json::to_string(&results)?);
    Ok(())
}
