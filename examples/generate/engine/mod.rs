//! A small serving engine over the paged cache, for a GGUF Llama: the example's and the
//! real-model test's shared code, one job per file.
//!
//! - `gguf.rs`: opening and checking the file, the hyperparameters;
//! - `tokenizer.rs`: the tokenizer from the GGUF's vocabulary, the chat template;
//! - `model.rs`: the Llama forward over a flattened batch, attention through the cache;
//! - `kv.rs`: the paged cache over the crate's backends (candle CPU/CUDA, emulator, host fp8);
//! - `scheduler.rs`: continuous batching, chunked prefill, forks, preemption, sampling;
//! - `eval.rs`: teacher-forced perplexity and KL of page dtypes, fp8 calibration.

pub mod eval;
pub mod gguf;
pub mod kv;
pub mod model;
pub mod scheduler;
pub mod tokenizer;
