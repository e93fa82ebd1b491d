//! The CPU backend. Today: the reference (oracle) attention every kernel is tested against,
//! computed from the definition in f64, and the naive `repeat_kv` path.

mod cache;
mod kv;
mod reference;
mod repeat_kv;

pub use cache::CpuStorage;
pub use kv::{ContiguousKv, KvSource, PagedKv};
pub use reference::{attention, Attention};
pub use repeat_kv::{attention_naive, gather_paged, repeat_kv};
