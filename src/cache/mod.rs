//! The paged K/V cache: page geometry and block tables (validated on the host, so that no
//! kernel ever reads outside the cache), and the bookkeeping of sequences and blocks.
//!
//! Data flows one way: [`BlockManager`] (pure bookkeeping) makes a [`StepPlan`] per engine
//! step; a storage backend (CPU or CUDA) runs its block copies and writes, and attention reads
//! the pages through its block tables.
//!
//! Prefix caching is part of the bookkeeping, so it works the same over every storage: full
//! blocks are named by chained SHA-256 hashes ([`BlockHash`], `block_hash.rs`), the index maps
//! names to blocks and each sequence's progress along its chain (`prefix.rs`), the allocator
//! parks cached blocks nobody holds in least-recently-used order (`allocator.rs`, `lru.rs`),
//! and [`BlockManager::add_sequence_with_prompt`] and [`BlockManager::commit`] (`admit.rs`)
//! find and name them. [`PagedCache`] commits a plan when the write of its last unwritten layer
//! returns (`writes.rs`), and keys the names on its storage's dtypes and scales
//! ([`page_identity`]).

mod admit;
mod allocator;
mod block_hash;
pub(crate) mod block_tables;
mod config;
mod layout;
mod lru;
mod manager;
mod prefix;
mod step;
mod storage;
mod writes;

pub use admit::Admission;
pub use allocator::BlockAllocator;
pub use block_hash::{page_identity, BlockHash};
pub use block_tables::BlockTables;
pub use config::{CacheConfig, MAX_BLOCK_SIZE};
pub use layout::PagedLayout;
pub use manager::{BlockManager, SeqId};
pub use prefix::PrefixStats;
pub use step::{PlanStamp, StepPlan};
pub use storage::{PageStorage, PagedCache};
