//! # paged-gqa
//!
//! Grouped-query attention (GQA) over a paged KV cache: hand-written CUDA kernels, a safe Rust
//! API over [cudarc] buffers and streams, and a CPU oracle that computes attention from the
//! definition in f64.
//!
//! In GQA, `n_heads` query heads share `n_kv_heads` K/V heads: query head `h` reads K/V head
//! `h / group` with `group = n_heads / n_kv_heads` (the `repeat_kv` semantics of the Llama
//! reference code). The kernels never copy K/V per query head; the naive path that does
//! ([`cpu::attention_naive`], [`cuda::repeat_kv`]) is kept as the comparison point.
//!
//! Data flows one way: shapes and cache bookkeeping ([`GqaShape`], [`SeqLens`],
//! [`PagedLayout`], [`BlockTables`]) -> the launch plan ([`plan::AttendSchedule`]: which
//! kernel serves each sequence, CUDA cores for few rows or tensor cores for prompts and large
//! groups, and how the keys are split) -> a backend ([`cpu`] or [`cuda`]) -> kernels.
//!
//! ```
//! use paged_gqa::{cpu, GqaShape, PagedLayout, SeqLens};
//!
//! // Llama-3-8B heads, two sequences decoding one token each, pages of 16 tokens.
//! let shape = GqaShape::new(32, 8, 128)?;
//! let layout = PagedLayout::new(shape, 4, 16)?;
//! let lens = SeqLens::decode(&[20, 5])?;
//! let block_tables = [3, 1, 0, -1]; // [batch, max_blocks]: seq 0 in pages 3 and 1, seq 1 in 0
//! let k_cache: Vec<f32> = (0..layout.cache_len()).map(|i| (i % 7) as f32 * 0.1).collect();
//! let v_cache: Vec<f32> = (0..layout.cache_len()).map(|i| (i % 5) as f32 * 0.2).collect();
//! let q = vec![0.01f32; lens.num_tokens() * shape.q_row_len()];
//!
//! let kv = cpu::PagedKv::new(layout, &lens, &block_tables, 2, &k_cache, &v_cache)?;
//! let fused = cpu::attention(&q, &kv, &Default::default())?; // query head h reads K/V head h / 4
//! let naive = cpu::attention_naive(&q, &kv, &Default::default())?; // gather + repeat_kv + per-head
//! let diff = fused.out.iter().zip(&naive.out).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
//! assert!(diff < 1e-12);
//! # Ok::<(), paged_gqa::Error>(())
//! ```
//!
//! [cudarc]: https://docs.rs/cudarc

pub mod batch;
pub mod cache;
#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod models;
#[rustfmt::skip] // bindgen output, compared verbatim by tests/ffi_bindings.rs
pub mod ffi;
pub mod fp8;
mod launch;
pub mod plan;
pub mod shape;
pub mod sim;
pub mod state;
pub mod variants;

pub use batch::SeqLens;
pub use cache::{BlockTables, PagedLayout};
pub use dtype::{DType, DeviceValue, Element, PageElement};
pub use error::{Error, Result};
pub use launch::storage::DeviceStepPlan;
pub use shape::GqaShape;
pub use state::AttentionState;
pub use variants::{AttendOptions, KeyMask};

/// The README's Rust examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
