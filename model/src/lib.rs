//! The foundation of the toolkit: HF-mirrored [`Config`], checkpoint reading (safetensors
//! folders, compressed-tensors ones included, and GGUF files, memory-mapped, one tensor at a
//! time), the tokenizer, the Llama-family transformer in burn, and the layer-by-layer
//! [`engine`] that runs one decoder block at a time over cached activations so a 7B model
//! never has to fit in memory.

pub mod attention;
pub mod checkpoint;
pub mod compressed;
pub mod config;
pub mod decode;
pub mod engine;
pub mod error;
pub mod fused;
pub mod gguf;
pub mod hash;
pub mod io;
mod kernels;
pub mod safetensors_io;
pub mod testkit;
pub mod tokenizer;
pub mod transformer;

pub use burn::tensor::{Device, Tensor};
pub use checkpoint::{Checkpoint, TensorMeta};
pub use config::Config;
pub use error::{ModelError, Result};
pub use tokenizer::Tokenizer;

/// The compute device: CUDA when built with the `cuda` feature, else burn's Flex CPU backend.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        Device::cuda(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Device::flex()
    }
}

/// Tells the kernel it may drop the mapped pages of a range we have finished converting, so
/// peak RSS stays at one block even though the whole checkpoint is mapped.
pub(crate) fn release_pages(mmap: &memmap2::Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        // madvise wants a page-aligned start; round inwards so no neighbour is touched.
        let page = 4096;
        let start = offset.div_ceil(page) * page;
        let end = (offset + len) / page * page;
        if end > start {
            // SAFETY: the map is private and read-only; dropped pages are re-read from the
            // file on the next access, so no Rust reference observes changed bytes.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// Opens a checkpoint's tokenizer: `tokenizer.json` in an HF folder, or one built from the
/// GGUF metadata.
pub fn load_tokenizer(ckpt: &Checkpoint) -> Result<Tokenizer> {
    match ckpt.gguf() {
        Some(g) => Tokenizer::from_gguf(g),
        None => Tokenizer::from_file(&ckpt.path().join("tokenizer.json")),
    }
}
