//! Post-training quantization. GGUF block quantizers (the formats themselves are declared in
//! `model::gguf::blocks`, which the reader needs), and the weight-only methods (RTN, AWQ,
//! GPTQ) behind one small trait.
