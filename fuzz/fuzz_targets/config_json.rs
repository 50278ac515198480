//! Any bytes as `config.json`: parsing and validating it (`Config::from_json_str_with_origin`,
//! both RoPE layouts), then the sizes a checkpoint opener and the transformer derive from it
//! (head_dim, key/value heads, parameter count, RoPE inverse frequencies, one block's tensor
//! shapes) must return errors, never panic, overflow or allocate without bound. A config that
//! parses must also read back from its own serialization (what the converters write).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use model::Config;
use model::checkpoint::block_tensors;

fuzz_target!(|data: &[u8]| {
    // `io::read_text` refuses invalid UTF-8 before the parser sees it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("config.json");
    let Ok((c, _origin)) = Config::from_json_str_with_origin(text, path) else {
        return;
    };
    let _ = c.num_kv_heads();
    let hd = c.head_dim();
    let _ = c.qkv_bias();
    let _ = c.o_bias();
    let _ = c.num_params();
    let inv = c.rope_inv_freq();
    assert_eq!(inv.len(), hd / 2);
    let _ = block_tensors(&c, 0);
    let out = serde_json::to_string(&c).expect("serializable");
    let back = Config::from_json_str(&out, path);
    assert!(
        back.is_ok(),
        "written config does not read back: {back:?}\n{out}"
    );
});
