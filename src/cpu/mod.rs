//! The CPU backend: the reference (oracle) attention every kernel is tested against, computed
//! from the definition in f64; the naive `repeat_kv` path; host page storage; and a fused f32
//! decode that serves as the fallback when there is no GPU.

mod cache;
mod decode;
mod kv;
mod reference;
mod repeat_kv;

pub use cache::CpuStorage;
pub use decode::{decode, decode_naive};
pub use kv::{ContiguousKv, KvSource, PagedKv};
pub use reference::{attention, Attention};
pub use repeat_kv::{attention_naive, gather_paged, repeat_kv};
