//! LoRA adapters in the layout HF PEFT loads (`PeftModel.from_pretrained`):
//! `adapter_config.json` and `adapter_model.safetensors` with
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use distill::lm::ParamRef;
use distill::{CausalLm, LoraOptions, LoraTarget};
use model::safetensors_io::{StoreDtype, StreamingWriter};
use serde_json::json;

/// PEFT's module name of a target.
fn module_name(t: LoraTarget) -> &'static str {
    match t {
        LoraTarget::QProj => "q_proj",
        LoraTarget::KProj => "k_proj",
        LoraTarget::VProj => "v_proj",
        LoraTarget::OProj => "o_proj",
        LoraTarget::GateProj => "gate_proj",
        LoraTarget::UpProj => "up_proj",
        LoraTarget::DownProj => "down_proj",
    }
}

/// Writes the adapters of `student` (not merged) into `dir` for the base model `base`.
pub fn write_adapters(
    student: &CausalLm,
    lora: &LoraOptions,
    base: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    // Ours are a `[in, r]` and b `[r, out]` on the `[in, out]` weight; PEFT's A is `[r, in]`
    // and B `[out, r]` on the `[out, in]` weight: each is the other's transpose.
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    student.for_each_param(&mut |name, p| {
        let ParamRef::Plain2(param) = p else { return };
        let (module, which) = match name.rsplit_once('.') {
            Some((m, "lora_a")) => (m, "lora_A"),
            Some((m, "lora_b")) => (m, "lora_B"),
            _ => return,
        };
        let t = param.val();
        let [rows, cols] = t.dims();
        let data = model::transformer::transpose(&distill::lm::values(t), rows, cols);
        tensors.insert(
            format!("base_model.model.{module}.{which}.weight"),
            (vec![cols, rows], data),
        );
    });
    let plan: Vec<_> = tensors
        .iter()
        .map(|(n, (s, _))| (n.clone(), s.clone(), StoreDtype::F32))
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let mut w = StreamingWriter::create(&dir.join("adapter_model.safetensors"), plan, &meta)?;
    for (name, (_, data)) in &tensors {
        w.write_next(name, data)?;
    }
    w.finish()?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": lora.targets.iter().map(|&t| module_name(t)).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}
