//! The paged K/V cache: page geometry and block tables (validated on the host, so that no
//! kernel ever reads outside the cache).

mod block_tables;
mod layout;

pub use block_tables::BlockTables;
pub use layout::PagedLayout;
