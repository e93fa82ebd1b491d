//! The names of cached blocks: chained SHA-256 hashes over an unambiguous encoding.
//!
//! A full block is named by `block(parent, tokens)`, its parent being the previous block's
//! name; the first block's parent is `root(identity, salt)`, which keys everything that changes
//! the K/V of the same tokens: the page identity ([`page_identity`]: compute and page dtypes,
//! geometry, every layer's fp8 scales) and the salt (a tenant, a LoRA adapter, a model
//! revision). Two blocks share a name only if they hold the same tokens after the same prefix,
//! under the same identity and salt.
//!
//! **Why a cryptographic hash.** The name is all a lookup compares: a block whose name
//! collides with another prompt's is served to it as that prompt's K/V. With a fast,
//! non-cryptographic hash (xxHash, FxHash, SipHash-1-3 with a known or leaked key, Python's
//! `hash()`) collisions can be computed: vLLM's CVE-2025-25183 (GHSA-rm76-4mrf-v9r8) was a
//! predictable `hash(None)` seeding the chain, which let one tenant precompute prompts whose
//! blocks would be served to another. SHA-256 makes a crafted collision infeasible, with or
//! without a secret seed, so names are also reproducible across processes. It costs about a
//! microsecond per block of 16 tokens, paid once when a block fills.
//!
//! **Timing side channel.** A hit shortens prefill, and time to first token shows it: a tenant
//! can probe whether another's prompt prefix is cached (CVE-2025-46570, GHSA-4qjh-9fv9-r85r).
//! The salt is the answer: give each tenant its own salt, chosen by the server (a salt the
//! client picks can copy the victim's), and prefixes are shared only within a tenant.
//!
//! The encoding: each hash starts with its own 8-byte tag (all tags differ and have the same
//! length, so none is a prefix of another), then fixed-size fields and length-prefixed
//! variable ones, so no two inputs of any kind share bytes.

use sha2::{Digest, Sha256};

use crate::cache::CacheConfig;
use crate::dtype::DType;
use crate::fp8::KvScales;

/// A 256-bit name: of a cached block, of a chain's root, or of a page identity.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

/// Feeds a hash map's hasher the first 64 bits only: they are as uniform as the rest, and the
/// maps that key on names use std's randomly keyed SipHash, so a prompt ground to give names
/// chosen bits still cannot crowd one bucket (equality compares all 256 bits).
impl std::hash::Hash for BlockHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (first, _) = self.0.split_first_chunk::<8>().expect("32 bytes");
        state.write_u64(u64::from_le_bytes(*first));
    }
}

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "..")
    }
}

// Tags of one length (so none is a prefix of another), short enough that a block of 16 tokens
// hashes 112 bytes: two SHA-256 compressions, not three.
const ROOT_TAG: &[u8; 8] = b"pgqa-rt1";
const BLOCK_TAG: &[u8; 8] = b"pgqa-bk1";
const IDENTITY_TAG: &[u8; 8] = b"pgqa-id1";

impl BlockHash {
    /// The parent of a chain's first block: `SHA-256(tag, identity, len(salt) as u64 LE,
    /// salt)`. An empty salt is "no salt".
    pub fn root(identity: &BlockHash, salt: &[u8]) -> BlockHash {
        let mut h = Sha256::new();
        h.update(ROOT_TAG);
        h.update(identity.0);
        h.update((salt.len() as u64).to_le_bytes());
        h.update(salt);
        BlockHash(h.finalize().into())
    }

    /// A full block holding `tokens` after the block (or root) `parent`:
    /// `SHA-256(tag, parent, len(tokens) as u64 LE, tokens as u32 LE)`.
    pub fn block(parent: &BlockHash, tokens: &[u32]) -> BlockHash {
        let mut h = Sha256::new();
        h.update(BLOCK_TAG);
        h.update(parent.0);
        h.update((tokens.len() as u64).to_le_bytes());
        // One update per token would cost a call each; 64 tokens at a time on the stack.
        let mut bytes = [0u8; 256];
        for chunk in tokens.chunks(64) {
            for (dst, t) in bytes.chunks_exact_mut(4).zip(chunk) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            h.update(&bytes[..4 * chunk.len()]);
        }
        BlockHash(h.finalize().into())
    }
}

/// A stable byte per dtype (the enum's order is not part of any format).
fn dtype_tag(dtype: DType) -> u8 {
    match dtype {
        DType::F32 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
        DType::F8E4M3 => 4,
        DType::F8E5M2 => 5,
    }
}

/// What the pages' bytes mean for the same tokens: the compute and page dtypes, the geometry
/// (heads, layers, page size) and every layer's K/V scales (`scales[layer]`; `None` for
/// storage without scales, as 16-bit pages are). Blocks written under another identity never
/// match: fp8 values decode correctly only under the scales they were stored with.
pub fn page_identity(config: &CacheConfig, scales: &[Option<KvScales>]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(IDENTITY_TAG);
    h.update([dtype_tag(config.dtype()), dtype_tag(config.page_dtype())]);
    let shape = config.shape();
    for n in [
        shape.n_heads(),
        shape.n_kv_heads(),
        shape.head_dim(),
        config.num_layers(),
        config.block_size(),
        scales.len(),
    ] {
        h.update((n as u64).to_le_bytes());
    }
    for layer in scales {
        match layer {
            None => h.update([0u8]),
            Some(s) => {
                h.update([1u8]);
                for half in [s.k(), s.v()] {
                    h.update((half.len() as u64).to_le_bytes());
                    for x in half {
                        h.update(x.to_bits().to_le_bytes());
                    }
                }
            }
        }
    }
    BlockHash(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_separates_parents_tokens_and_salts() {
        let id = BlockHash([7; 32]);
        let root = BlockHash::root(&id, b"");
        assert_ne!(root, BlockHash::root(&id, b"a"));
        assert_ne!(
            BlockHash::root(&id, b"a"),
            BlockHash::root(&BlockHash([8; 32]), b"a")
        );
        let a = BlockHash::block(&root, &[1, 2]);
        assert_eq!(a, BlockHash::block(&root, &[1, 2]));
        assert_ne!(a, BlockHash::block(&root, &[2, 1]));
        assert_ne!(a, BlockHash::block(&root, &[1, 2, 0]));
        assert_ne!(a, BlockHash::block(&a, &[1, 2]));
        // A block's name is never a root's for the same bytes after the tag.
        let mut salt = id.0.to_vec();
        salt.extend([1, 0, 0, 0, 2, 0, 0, 0]);
        assert_ne!(BlockHash::block(&id, &[1, 2]), BlockHash::root(&id, &salt));
        // Many tokens (past one 64-token chunk) hash as their bytes in order.
        let long: Vec<u32> = (0..200).collect();
        let mut h = Sha256::new();
        h.update(BLOCK_TAG);
        h.update(root.0);
        h.update(200u64.to_le_bytes());
        for t in &long {
            h.update(t.to_le_bytes());
        }
        assert_eq!(
            BlockHash::block(&root, &long).0,
            <[u8; 32]>::from(h.finalize())
        );
    }
}
