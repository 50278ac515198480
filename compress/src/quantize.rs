//! `compress quant MODEL --method rtn|awq|gptq --bits N ...`: weight-only post-training
//! quantization of every linear layer in the decoder blocks, calibrated on the layer-by-layer
//! engine, written compressed by default (packed HF folder, or GGUF for a GGUF input; see
//! [`default_format`]) or as a dense bf16 HF folder, with `quant_report.json`.

use anyhow::{Context, bail};
use comfy_table::Table;
use model::Checkpoint;
use model::safetensors_io::StoreDtype;
use quant::method::{MethodKind, MethodOptions};
use quant::pack::PackedSink;
use quant::pipeline::{DenseSink, OutputSink, PtqOptions};
use quant::scheme::QuantScheme;
use serde_json::json;

use crate::formats::Format;
use crate::output::{TempGuard, check_output, commit, temp_sibling};

/// Arguments of `quant`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF folder or a .gguf file (the teacher; never modified).
    pub(crate) model: crate::Path,
    /// The method.
    #[arg(long, value_enum, default_value = "rtn")]
    pub(crate) method: MethodKind,
    /// Bits per weight code (2 to 8).
    #[arg(long, default_value_t = 4)]
    bits: u8,
    /// Input channels per scale (32, 64, 128, ...). Any size works: a width it does not
    /// divide gets a shorter last group (576 with 128: 4 x 128 + 64).
    #[arg(long, default_value_t = 128, conflicts_with = "per_channel")]
    group: usize,
    /// One scale per output channel instead of groups.
    #[arg(long)]
    per_channel: bool,
    /// Symmetric quantization (no zero point).
    #[arg(long)]
    sym: bool,
    /// Calibration text: plain text, or JSONL with a `text` field.
    #[arg(long)]
    pub(crate) calib: Option<crate::Path>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 128)]
    calib_samples: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 512)]
    pub(crate) calib_len: usize,
    /// Write the calibration token ids drawn (JSON: a list of token-id lists, which `--calib
    /// FILE.json` reads back) to this file, so another tool can calibrate on exactly the same
    /// tokens.
    #[arg(long)]
    dump_calib: Option<crate::Path>,
    /// Seed for drawing calibration sequences.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Where block i's calibration inputs come from: `quantized` blocks 0..i-1 (GPTQ's
    /// default) or the `teacher` (AWQ's default).
    #[arg(long, value_enum)]
    pub(crate) propagate: Option<Propagate>,
    /// GPTQ: quantize columns in decreasing order of activation energy.
    #[arg(long)]
    pub(crate) act_order: bool,
    /// GPTQ: dampening as a fraction of the mean Hessian diagonal.
    #[arg(long)]
    damp: Option<f64>,
    /// GPTQ: every group's scale and zero point from the original weights, fixed before the
    /// column sweep (llm-compressor, AutoGPTQ `static_groups`), instead of from the
    /// error-updated weights when the sweep reaches the group (the GPTQ paper's code).
    #[arg(long)]
    pub(crate) static_groups: bool,
    /// GPTQ: how many times each calibration window's first position (the attention sink,
    /// which later tokens attend to) counts in the Hessian; 1 is plain GPTQ (default 30).
    #[arg(long)]
    sink_weight: Option<f32>,
    /// AWQ: skip the per-channel scale search.
    #[arg(long)]
    pub(crate) no_awq_scale: bool,
    /// AWQ: also run llm-awq's clipping search (each row and group's range shrunk to what best
    /// keeps its partial outputs); off by default, as it made SmolLM2's W4 g64 student worse.
    #[arg(long)]
    awq_clip: bool,
    /// AWQ: the candidate scales: `act` (default; mean|x|^α, llm-awq), `duo` (llm-compressor's
    /// duo scaling, mean|x|^α / mean|ŵ|^(1−α) with ŵ the weights over their group's largest,
    /// plus no scaling) or `both` (half the grid each).
    #[arg(long, value_enum)]
    awq_grid: Option<quant::method::awq::AwqGrid>,
    /// AWQ: what a candidate is scored on: `module` (default; q/k/v through the attention and
    /// o_proj, gate/up through the whole MLP, as llm-awq) or `own` (each group's own outputs).
    #[arg(long, value_enum)]
    awq_objective: Option<quant::method::awq::AwqObjective>,
    /// Calibration tokens AWQ's scale search scores each candidate on (whole windows, rounded
    /// up to a window), and rows kept per layer for the error report.
    #[arg(long, default_value_t = 2048)]
    pub(crate) sample_rows: usize,
    /// Output: an HF folder (dense or packed model and quant_report.json), or with a GGUF
    /// format a folder holding model.gguf, or a file when it ends in .gguf (the report then
    /// goes to NAME.quant_report.json next to it).
    #[arg(long)]
    pub(crate) out: crate::Path,
    /// Output formats, comma-separated: `packed` (compressed-tensors `pack-quantized`,
    /// int32-packed codes that vLLM loads; bits 2, 4 or 8) and/or `dense` (dequantized bf16
    /// HF folder, several times larger). With both, OUT holds the dense model and OUT/packed the
    /// packed one. Or alone `gguf:TYPE` (q4_0, q4_k_m, q8_0, ...: see `convert --type`) for
    /// llama.cpp, each block rounded with the importance of its calibration inputs when
    /// `--calib` is given (after AWQ scaling with `--method awq`, GPTQ's own rounding with
    /// `--method gptq`), or `gguf:auto` (each linear's type chosen under --target-bpw or
    /// --target-bytes); --bits, --group and --sym do not apply, the type decides. Default: the GGUF type closest to --bits/--sym (q4_1,
    /// q4_0, q5_1, q5_0, q6_k, q8_0) for a .gguf input or OUT (methods rtn and awq), else
    /// `packed` (bits 2, 4, 8), else `dense`. With --scheme: `bnb` (the default;
    /// OUT/bnb when combined with `dense`) and/or `dense`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) format: Vec<Format>,
    /// gguf:TYPE only: override tensor types, PATTERN=TYPE (as `convert --tensor-type`).
    #[arg(long = "tensor-type", value_name = "PATTERN=TYPE")]
    pub(crate) tensor_type: Vec<String>,
    /// gguf:auto: the size budget in bits per weight over all tensors (the report's
    /// `bits_per_weight`; Q4_0 of SmolLM2 is 5.36).
    #[arg(long)]
    pub(crate) target_bpw: Option<f64>,
    /// gguf:auto: the size budget in bytes of tensor data (the file adds its metadata).
    #[arg(long, conflicts_with = "target_bpw")]
    pub(crate) target_bytes: Option<u64>,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub(crate) force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// A data-free bitsandbytes scheme instead of an integer one: `nf4` or `fp4` (16-entry
    /// codebook, one absmax per --block values) or `int8-absmax` (int8 codes, one absmax per
    /// row). Written as `--format bnb` (transformers + bitsandbytes load it: 4-bit, or
    /// `load_in_8bit` for int8-absmax) and/or `dense`. The integer and calibration options do not apply.
    #[arg(long, value_enum, conflicts_with_all = [
        "bits", "group", "per_channel", "sym", "calib", "calib_samples", "calib_len", "seed",
        "propagate", "act_order", "damp", "static_groups", "sink_weight", "no_awq_scale", "awq_clip", "awq_grid", "awq_objective",
        "sample_rows", "tensor_type", "target_bpw", "target_bytes",
    ])]
    pub(crate) scheme: Option<crate::quant_bnb::SchemeArg>,
    /// --scheme nf4|fp4: values per absmax block along the flattened row-major weight (32, 64,
    /// ..., 4096; every input width has to be a multiple of it). Default 64.
    #[arg(long)]
    pub(crate) block: Option<usize>,
    /// --scheme nf4|fp4: QLoRA double quantization (the absmax values to 8 bits in blocks of 256).
    #[arg(long)]
    pub(crate) double_quant: bool,
    /// Why the format was chosen when --format was not given (printed at the end).
    #[arg(skip)]
    pub(crate) default_note: Option<String>,
}

impl Args {
    /// Whether the method calibrates: GPTQ and AWQ (RTN into GGUF takes `--calib` as an
    /// option for importance-weighted rounding, and a bitsandbytes scheme is data-free).
    pub(crate) fn calibrates(&self) -> bool {
        self.scheme.is_none() && matches!(self.method, MethodKind::Gptq | MethodKind::Awq)
    }
}

/// The GGUF type closest to a scheme of `bits` (`sym`: no zero point), if any.
fn closest_gguf(bits: u8, sym: bool) -> Option<&'static str> {
    Some(match (bits, sym) {
        (4, false) => "q4_1",
        (4, true) => "q4_0",
        (5, false) => "q5_1",
        (5, true) => "q5_0",
        (6, _) => "q6_k",
        (8, _) => "q8_0",
        _ => return None,
    })
}

/// The format when `--format` is not given, with the reason: the GGUF type closest to the
/// scheme for a GGUF input or a `.gguf` OUT (rtn and awq write GGUF), else `packed` when it
/// can hold the bits, else `dense`.
fn default_format(a: &Args) -> anyhow::Result<(Format, String)> {
    let gguf_in = a.model.is_file() || a.model.extension().is_some_and(|e| e == "gguf");
    let gguf_ty = closest_gguf(a.bits, a.sym);
    if out_is_file(&a.out) {
        let Some(ty) = gguf_ty else {
            bail!(
                "{}: no GGUF type matches --bits {}; give --format gguf:TYPE",
                a.out.display(),
                a.bits
            );
        };
        return Ok((Format::Gguf(ty.into()), "OUT ends in .gguf".into()));
    }
    if gguf_in
        && matches!(a.method, MethodKind::Rtn | MethodKind::Awq)
        && let Some(ty) = gguf_ty
    {
        return Ok((
            Format::Gguf(ty.into()),
            "the GGUF type closest to the scheme, for a GGUF input".into(),
        ));
    }
    if quant::pack::PACKED_BITS.contains(&a.bits) {
        let why = if gguf_in {
            format!(
                "--method {} with --bits {} has no GGUF output; packed is the compressed HF format",
                a.method.name(),
                a.bits
            )
        } else {
            "compressed-tensors, which vLLM and transformers load".into()
        };
        Ok((Format::Packed, why))
    } else {
        Ok((
            Format::Dense,
            format!("packed holds 2, 4 or 8 bits, not {}", a.bits),
        ))
    }
}

/// Whether `--out` names a GGUF file (ends in `.gguf`) rather than a folder.
pub(crate) fn out_is_file(out: &std::path::Path) -> bool {
    out.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    crate::set_threads(a.threads);
    let run = crate::manifest::Run::start("quant").input("teacher", Some(&a.model));
    if let Some(ty) = a.scheme {
        return crate::quant_bnb::run(&a, ty, run);
    }
    let run = run.input("calibration", a.calib.as_deref()).seed(a.seed);
    if a.block.is_some() || a.double_quant {
        bail!(
            "{} applies to --scheme nf4|fp4 only",
            if a.block.is_some() {
                "--block"
            } else {
                "--double-quant"
            }
        );
    }
    // Scheme errors (--bits 9) come first, whatever the format.
    if crate::formats::gguf(&a.format).is_none() {
        QuantScheme::new(a.bits, (!a.per_channel).then_some(a.group), a.sym)?;
    }
    crate::quant_auto::check(&a)?;
    if let Some(ty) = crate::formats::gguf(&a.format) {
        for (set, flag) in [
            (a.bits != 4, "--bits"),
            (a.group != 128, "--group"),
            (a.sym, "--sym"),
            (a.per_channel, "--per-channel"),
        ] {
            if set {
                bail!("{flag} does not apply to --format gguf:{ty} (the type decides the grid)");
            }
        }
    }
    if a.format.is_empty() {
        let (f, why) = default_format(&a)?;
        a.default_note = Some(format!(
            "format {f} by default ({why}); --format dense writes bf16 weights"
        ));
        a.format = vec![f];
    }
    let integer = |f: &Format| matches!(f, Format::Dense | Format::Packed | Format::Gguf(_));
    let list = "dense, packed, or gguf:TYPE alone";
    crate::formats::check(&a.format, integer, "integer quantization", list)?;
    if let Some(ty) = crate::formats::gguf(&a.format) {
        if a.format.len() > 1 {
            bail!("--format gguf:TYPE cannot be combined with other formats");
        }
        return crate::quant_gguf::run_gguf(&a, ty, run);
    }
    if out_is_file(&a.out) {
        bail!(
            "{}: a .gguf OUT is a GGUF file, but --format {} writes an HF folder (use --format gguf:TYPE, or another --out)",
            a.out.display(),
            crate::formats::joined(&a.format)
        );
    }
    if !a.tensor_type.is_empty() {
        bail!("--tensor-type applies to --format gguf:TYPE only");
    }
    if let Some(d) = a.damp
        && !(d.is_finite() && d > 0.0 && d <= 1.0)
    {
        bail!("--damp {d} must be in (0, 1]");
    }
    if let Some(k) = a.sink_weight
        && !(k.is_finite() && (1.0..=10_000.0).contains(&k))
    {
        bail!("--sink-weight {k} must be in [1, 10000]");
    }
    let scheme = QuantScheme::new(a.bits, (!a.per_channel).then_some(a.group), a.sym)?;
    if a.group == 0 {
        bail!("--group must be positive");
    }
    let (dense, packed) = (
        a.format.contains(&Format::Dense),
        a.format.contains(&Format::Packed),
    );
    // Groups in activation order are stored with `weight_g_idx` (GPTQ --act-order only).
    let act_order = a.act_order && a.method == MethodKind::Gptq;
    if packed {
        quant::pack::check_scheme(&scheme)?;
    }
    let opts = method_options(&a);
    let method = a.method.build(&opts)?;
    if a.calib.is_none() && method.needs_calibration() {
        bail!("--method {} needs --calib FILE", a.method.name());
    }
    check_dump_calib(&a)?;
    if crate::checks_done() {
        return Ok(());
    }
    let ckpt = Checkpoint::open(&a.model).context("cannot open model")?;
    ckpt.check_shapes().context("cannot open model")?;
    check_output(&a.model, &a.out, a.force)?;
    let tok = model::tokenizer::load_checked(&ckpt).context("cannot build the tokenizer")?;
    // Every input width must take the group size before any work starts.
    for (name, shape) in model::checkpoint::block_tensors(ckpt.config(), 0) {
        if shape.len() == 2
            && quant::block::LINEARS
                .iter()
                .any(|(n, _)| name.ends_with(&format!("{n}.weight")))
        {
            scheme.group_len(&name, shape[1])?;
        }
    }
    let calib = calibration(&a, &tok, ckpt.config())?;

    let tmp = temp_sibling(&a.out);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    // The packed model: OUT/packed next to the dense one, or OUT itself.
    let packed_dir = if dense {
        tmp.join("packed")
    } else {
        tmp.clone()
    };
    let mut sinks: Vec<Box<dyn OutputSink>> = Vec::new();
    if dense {
        let c = crate::hf_folder::write_config(&ckpt, StoreDtype::BF16, &tmp, None)?;
        crate::hf_folder::write_aux(&ckpt, &tok, &c, &tmp)?;
        sinks.push(Box::new(DenseSink::create(
            &tmp.join("model.safetensors"),
            &c,
            StoreDtype::BF16,
        )?));
    }
    if packed {
        std::fs::create_dir_all(&packed_dir)
            .with_context(|| format!("{}", packed_dir.display()))?;
        let qc = quant::pack::quantization_config(ckpt.config(), &scheme, act_order)?;
        let extra = json!({ "quantization_config": qc });
        let c = crate::hf_folder::write_config(&ckpt, StoreDtype::BF16, &packed_dir, Some(extra))?;
        crate::hf_folder::write_aux(&ckpt, &tok, &c, &packed_dir)?;
        sinks.push(Box::new(PackedSink::create(
            &packed_dir.join("model.safetensors"),
            &c,
            scheme,
            act_order,
        )?));
    }
    let popts = PtqOptions {
        scheme,
        calib,
        propagate_quantized: a.propagate.map(|p| p == Propagate::Quantized),
        sample_rows: a.sample_rows,
    };
    let report = run_ptq(&ckpt, method.as_ref(), &popts, sinks, a.method.name())?;
    let size = |p: std::path::PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let out_ckpt_bytes = if dense {
        size(tmp.join("model.safetensors"))
    } else {
        0
    };
    let packed_bytes = if packed {
        size(packed_dir.join("model.safetensors"))
    } else {
        0
    };
    let full = json!({
        "teacher": a.model, "scheme": scheme, "scheme_label": scheme.label(), "formats": a.format,
        "calibration": a.calib.as_ref().map(|p| json!({"file": p, "samples": a.calib_samples, "len": a.calib_len, "seed": a.seed})),
        "gptq_options": gptq_options(&a),
        "awq_options": awq_options(&a),
        "dense_bytes": dense.then_some(out_ckpt_bytes), "packed_bytes": packed.then_some(packed_bytes), "report": report,
    });
    std::fs::write(
        tmp.join("quant_report.json"),
        serde_json::to_string_pretty(&full)?,
    )?;
    let metrics = json!({"report": "quant_report.json", "linear_bits_per_weight": report.linear_bits_per_weight});
    run.write(&tmp, metrics)?;
    commit(&tmp, &a.out)?;
    guard.0 = None;

    let mean = |f: &dyn Fn(&quant::pipeline::LinearReport) -> Option<f64>| {
        let v: Vec<f64> = report.linears.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let cell = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |v| format!("{v:.4}"));
    let out_err = mean(&|r| r.output_rel_error);
    let mut t = Table::new();
    t.set_header(vec![
        "method",
        "scheme",
        "linear bpw",
        "quantized params",
        "mean weight err",
        "mean output err",
        "seconds",
    ]);
    t.add_row(vec![
        report.method.clone(),
        scheme.label(),
        format!("{:.3}", report.linear_bits_per_weight),
        crate::grouped(report.quantized_params),
        cell(mean(&|r| Some(r.weight_rel_error))),
        cell(out_err),
        format!("{:.1}", report.wall_seconds),
    ]);
    println!("{t}");
    if out_err.is_none() {
        println!(
            "–: the output error is measured on calibration inputs, and this run had none (give --calib FILE)"
        );
    }
    let input_bytes = ckpt.bytes_on_disk();
    let mut sizes = Vec::new();
    if dense {
        println!("wrote {} (dense bf16 HF folder)", a.out.display());
        sizes.push((out_ckpt_bytes, "dense bf16"));
    }
    if packed {
        let dir = if dense {
            a.out.join("packed")
        } else {
            a.out.clone()
        };
        println!(
            "wrote {} (compressed-tensors pack-quantized HF folder)",
            dir.display()
        );
        sizes.push((packed_bytes, "packed"));
        if act_order && scheme.group.is_some() {
            println!(
                "note: activation-order groups are stored with weight_g_idx (actorder \"group\"), which compressed-tensors 0.19+ no longer reads; load with compressed-tensors <= 0.18"
            );
        }
    }
    println!("report: {}", a.out.join("quant_report.json").display());
    print_sizes(input_bytes, &sizes);
    if let Some(n) = &a.default_note {
        println!("note: {n}");
    }
    Ok(())
}

/// `size: IN bytes (input) → OUT bytes (what), ...` with the ratio of each output to the input.
pub(crate) fn print_sizes(input: u64, outputs: &[(u64, &str)]) {
    let outs: Vec<String> = outputs
        .iter()
        .map(|(b, what)| {
            format!(
                "{} bytes ({what}, {:.2}x the input)",
                crate::grouped(*b),
                *b as f64 / input.max(1) as f64
            )
        })
        .collect();
    println!(
        "size: {} bytes (input) → {}",
        crate::grouped(input),
        outs.join(", ")
    );
}

/// Runs the PTQ pipeline over `ckpt` into `sinks` with a progress bar labelled `label`, and
/// completes the sinks (what `compress quant` and QAT's GPTQ/AWQ start share).
pub(crate) fn run_ptq(
    ckpt: &Checkpoint,
    method: &dyn quant::method::QuantMethod,
    opts: &PtqOptions,
    sinks: Vec<Box<dyn OutputSink>>,
    label: &str,
) -> anyhow::Result<quant::pipeline::PtqReport> {
    let blocks = ckpt.config().num_hidden_layers;
    crate::drive_sinks(label, blocks, sinks, |sinks, progress| {
        quant::pipeline::quantize(ckpt, method, opts, model::default_device(), sinks, progress)
    })
}

/// Reads `--calib` into windows (none without it).
pub(crate) fn calibration(
    a: &Args,
    tok: &model::Tokenizer,
    cfg: &model::Config,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let windows = crate::calib::windows(
        a.calib.as_deref(),
        a.calib_samples,
        a.calib_len,
        a.seed,
        tok,
        cfg,
    )?;
    if let Some(d) = &a.dump_calib {
        crate::calib::dump(&windows, d, &a.model, a.force)?;
    }
    Ok(windows)
}

/// `--dump-calib` writes the windows drawn from `--calib`, so it needs one.
pub(crate) fn check_dump_calib(a: &Args) -> anyhow::Result<()> {
    if a.dump_calib.is_some() && a.calib.is_none() {
        bail!("--dump-calib needs --calib FILE (it writes the windows drawn from it)");
    }
    Ok(())
}

/// `--format gguf:TYPE`: OUT/model.gguf and OUT/quant_report.json, or OUT itself and
/// NAME.quant_report.json when OUT ends in `.gguf`; calibration-aware when `--calib` is given.
/// `--propagate`: where a block's calibration inputs come from.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Propagate {
    /// The quantized blocks before it.
    Quantized,
    /// The teacher's blocks.
    Teacher,
}

/// GPTQ's options as run, defaults filled in (null for other methods), for the reports.
pub(crate) fn gptq_options(a: &Args) -> serde_json::Value {
    use quant::method::gptq::{Gptq, SINK_WEIGHT};
    (a.method == MethodKind::Gptq)
        .then(|| {
            json!({"damp": a.damp.unwrap_or(Gptq::default().damp), "act_order": a.act_order,
            "static_groups": a.static_groups, "sink_weight": a.sink_weight.unwrap_or(SINK_WEIGHT)})
        })
        .into()
}

/// AWQ's options as run, defaults filled in (null for other methods), for the reports.
pub(crate) fn awq_options(a: &Args) -> serde_json::Value {
    (a.method == MethodKind::Awq)
        .then(|| {
            let m = quant::method::awq::Awq::from_options(&method_options(a));
            json!({"scale_search": m.scale_search, "clip_search": m.clip_search,
            "grid": m.candidates, "grid_points": m.grid, "objective": m.objective})
        })
        .into()
}

/// The method options of the command line.
pub(crate) fn method_options(a: &Args) -> MethodOptions {
    MethodOptions {
        act_order: a.act_order,
        damp: a.damp,
        static_groups: a.static_groups,
        sink_weight: a.sink_weight,
        keep_latent: false,
        no_awq_scale: a.no_awq_scale,
        awq_clip: a.awq_clip,
        awq_grid: a.awq_grid,
        awq_objective: a.awq_objective,
        gguf: None,
    }
}
