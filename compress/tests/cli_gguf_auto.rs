//! `compress quant --format gguf:auto --target-bpw X | --target-bytes N`: per-tensor GGUF types
//! chosen under a size budget that the file never exceeds, the choice written into the
//! report, and every misuse refused up front with one line.

mod common;

use std::path::Path;

use common::{fails_str, ok};
use model::testkit::{calib_text, tiny_config, write_hf};
use serde_json::Value;

fn report(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("quant_report.json")).unwrap()).unwrap()
}

/// Two budgets: each file's tensor bytes stay within its target, the report's choice is
/// the file's types, and the larger budget buys a lower predicted cost with wider types.
#[test]
fn gguf_auto_stays_within_the_budget_and_reports_its_choice() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 5, |_, _| {});
    let calib = root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (t, c) = (s(&teacher), s(&calib));
    let mut seen = Vec::new();
    for (bpw, method) in [("5.0", "rtn"), ("7.0", "rtn"), ("5.0", "gptq")] {
        let out = root.join(format!("auto-{bpw}-{method}"));
        let o = s(&out);
        let args = [
            "quant",
            &t,
            "--format",
            "gguf:auto",
            "--target-bpw",
            bpw,
            "--method",
            method,
            "--calib",
            &c,
            "--calib-samples",
            "4",
            "--calib-len",
            "32",
            "--out",
            &o,
        ];
        let stdout = ok(&args);
        assert!(stdout.contains("gguf:auto:"), "{stdout}");
        let r = report(&out);
        let auto = &r["auto"];
        let target = auto["target_bytes"].as_u64().unwrap();
        let tensor_bytes = r["tensor_bytes"].as_u64().unwrap();
        assert!(tensor_bytes <= target, "{bpw}: {tensor_bytes} > {target}");
        assert!(auto["linear_bytes"].as_u64() <= auto["linear_budget"].as_u64());
        assert!(r["bits_per_weight"].as_f64().unwrap() <= bpw.parse::<f64>().unwrap());
        for l in auto["linears"].as_array().unwrap() {
            let name = l["tensor"].as_str().unwrap();
            assert_eq!(r["tensor_types"][name], l["type"], "{name}");
        }
        let cost = auto["predicted_cost"].as_f64().unwrap();
        seen.push((bpw, method, cost, tensor_bytes, r["tensor_types"].clone()));
    }
    let (small, large) = (&seen[0], &seen[1]);
    assert!(
        large.2 < small.2,
        "cost at 7 bpw {} vs 5 bpw {}",
        large.2,
        small.2
    );
    assert!(
        large.3 > small.3,
        "bytes at 7 bpw {} vs 5 bpw {}",
        large.3,
        small.3
    );
    // GPTQ writes the same allocation (it is measured on the teacher, before any rounding).
    assert_eq!(seen[2].4, small.4);

    // Refused before any work, one line each.
    let never = s(&root.join("never"));
    let refused = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["quant", t.as_str(), "--out", never.as_str()];
        args.extend(extra);
        fails_str(root, &args, needles[0], &needles[1..]);
    };
    let cal = [
        "--calib",
        c.as_str(),
        "--calib-samples",
        "2",
        "--calib-len",
        "32",
    ];
    refused(
        &[&["--format", "gguf:auto"], &cal[..]].concat(),
        &["gguf:auto", "--target-bpw"],
    );
    refused(
        &["--format", "gguf:q4_0", "--target-bpw", "5"],
        &["--target-bpw", "gguf:auto only"],
    );
    refused(
        &["--format", "gguf:auto", "--target-bpw", "5"],
        &["gguf:auto", "--calib"],
    );
    refused(
        &[&["--format", "gguf:auto", "--target-bpw", "NaN"], &cal[..]].concat(),
        &["--target-bpw", "[1, 32]"],
    );
    refused(
        &[
            &["--format", "gguf:auto", "--target-bytes", "1000"],
            &cal[..],
        ]
        .concat(),
        &["--target-bytes 1000", "do not even hold"],
    );
    refused(
        &[
            &[
                "--format",
                "gguf:auto",
                "--target-bpw",
                "5",
                "--tensor-type",
                "ffn_down=q8_0",
            ],
            &cal[..],
        ]
        .concat(),
        &["--tensor-type", "gguf:auto"],
    );
}
