//! The CPU backend: the reference (oracle) attention every kernel is tested against, computed
//! from the definition in f64; the naive `repeat_kv` path; host page storage; and fused f32
//! attention (any query lengths) that serves as the fallback when there is no GPU.

mod cache;
mod error_bound;
mod fast;
mod kv;
mod merge;
mod reference;
mod repeat_kv;

pub use cache::CpuStorage;
#[cfg(feature = "candle")]
pub(crate) use cache::{copy_blocks, write_rows};
pub use error_bound::{Accumulation, Conditioning, RoundingModel};
pub use fast::{attend, attend_naive};
pub use kv::{ContiguousKv, KvSource, PagedKv};
pub use merge::{lse_ln_to_log2, lse_log2_to_ln, merge_states};
pub use reference::{attention, attention_of_tokens, attention_with_conditioning, Attention};
pub use repeat_kv::{attention_naive, gather_paged, gather_repeated, repeat_kv};
