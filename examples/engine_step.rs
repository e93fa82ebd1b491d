//! An engine's life with a paged cache, on the CPU backend: two requests with the same system
//! prompt, each added with its prompt's token ids. The second finds the system prompt's blocks
//! in the prefix cache and computes only its own tokens; both decode (each sampled token
//! appended before the step that computes it), the first forks for parallel sampling, and all
//! free. Every layer of every step only writes the step's new K/V and attends; the plan is made
//! once per step, and the write of its last layer makes the full prompt blocks it completed
//! findable (blocks filled by decoded tokens become findable when their sequence is freed).
//!
//! The whole run is served twice, with prefix caching on and off: the generated tokens and
//! every attention output both runs computed are identical, and the hit rate is printed.
//!
//! `cargo run --example engine_step`

use std::collections::BTreeMap;

use paged_gqa::cache::{CacheConfig, PagedCache, SeqId};
use paged_gqa::cpu::CpuStorage;
use paged_gqa::AttendOptions;
use paged_gqa::{DType, GqaShape};

/// A 32-bit mix (splitmix64's finaliser).
fn mix(a: u32, b: u32) -> u32 {
    let mut z = ((a as u64) << 32 | b as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

/// Stand-in for the model: the K, V (`[tokens, n_kv_heads, head_dim]`) and Q
/// (`[tokens, n_heads, head_dim]`) projections at one layer of the tokens whose prefixes (every
/// token up to each) digest to `digests`. Like a real model's, they depend on the prefix only,
/// so the K/V a request finds cached are exactly those it would have computed.
fn projections(
    config: &CacheConfig,
    digests: &[u32],
    layer: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = |what: u32, len: usize| -> Vec<f32> {
        digests
            .iter()
            .flat_map(|&d| {
                (0..len as u32).map(move |e| {
                    let x = mix(d, what << 24 | (layer as u32) << 16 | e);
                    (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
                })
            })
            .collect()
    };
    let (kv, q) = (config.shape().kv_row_len(), config.shape().q_row_len());
    (rows(1, kv), rows(2, kv), rows(3, q))
}

/// A request being served: its token ids (prompt, then sampled), and the digest of each
/// prefix computed so far.
struct Request {
    name: &'static str,
    tokens: Vec<u32>,
    digests: Vec<u32>,
}

impl Request {
    /// Digests of the tokens from `start` on (and of those before, if not yet known).
    fn digests_from(&mut self, start: usize) -> Vec<u32> {
        while self.digests.len() < self.tokens.len() {
            let last = self.digests.last().copied().unwrap_or(0x5eed);
            self.digests
                .push(mix(last, self.tokens[self.digests.len()]));
        }
        self.digests[start..].to_vec()
    }
}

/// A server over one cache: its requests by sequence, every attention output row it computed
/// by (request name, position, layer), and each sequence's last output row (sampled from).
struct Server {
    cache: PagedCache<CpuStorage<f32>>,
    requests: BTreeMap<SeqId, Request>,
    outputs: BTreeMap<(&'static str, usize, usize), Vec<f32>>,
    last: BTreeMap<SeqId, Vec<f32>>,
}

impl Server {
    /// Admits a request: the prompt's cached prefix is taken over, the rest is returned as the
    /// request's first batch entry.
    fn admit(&mut self, name: &'static str, prompt: Vec<u32>) -> paged_gqa::Result<(SeqId, usize)> {
        let admitted = self.cache.add_sequence_with_prompt(&prompt, b"")?;
        let to_compute = prompt.len() - admitted.computed;
        println!(
            "  {name}: {} prompt tokens, {} found cached, {to_compute} to compute",
            prompt.len(),
            admitted.computed
        );
        self.requests.insert(
            admitted.seq,
            Request {
                name,
                tokens: prompt,
                digests: Vec::new(),
            },
        );
        Ok((admitted.seq, to_compute))
    }

    /// A decode entry: the token sampled from `seq`'s last output is appended to the request
    /// and to the cache (so the blocks decode fills can be found by a later turn).
    fn sample(&mut self, seq: SeqId) -> paged_gqa::Result<(SeqId, usize)> {
        let request = &self.requests[&seq];
        let last = &self.last[&seq];
        // "Sampling": a function of the output (and of the request, so that forks differ).
        let seed = request.name.bytes().fold(0, |h, b| mix(h, b as u32));
        let token = last.iter().fold(seed, |h, x| mix(h, x.to_bits())) % 1000;
        self.requests.get_mut(&seq).unwrap().tokens.push(token);
        self.cache.append_tokens(seq, &[token])?;
        Ok((seq, 1))
    }

    /// One engine step: plan once, then per layer write the new K/V and attend (any mix of
    /// prompt chunks and decode tokens).
    fn step(&mut self, batch: &[(SeqId, usize)]) -> paged_gqa::Result<()> {
        let plan = self.cache.plan(batch)?; // reserves slots, copies shared partial blocks
        let config = *self.cache.config();
        let mut digests = Vec::new();
        for &(seq, n) in batch {
            let start = self.cache.manager().len(seq)? - n;
            digests.extend(self.requests.get_mut(&seq).unwrap().digests_from(start));
        }
        for layer in 0..config.num_layers() {
            let (k_new, v_new, q) = projections(&config, &digests, layer);
            // The write of the plan's last layer makes its full prompt blocks findable.
            self.cache.write(layer, &plan, &k_new, &v_new)?;
            let rows = plan.num_new_tokens() * config.shape().n_heads();
            let (mut out, mut lse) = (vec![0.0f32; q.len()], vec![0.0f32; rows]); // [tokens, n_heads, (head_dim)]
            let options = AttendOptions::default();
            self.cache
                .attend(layer, &plan, &q, &mut out, &mut lse, &options)?; // prompts and decode tokens alike
            let mut rows = out.chunks(config.shape().q_row_len());
            for &(seq, n) in batch {
                let request = &self.requests[&seq];
                let start = request.tokens.len() - n;
                for position in start..request.tokens.len() {
                    let row = rows.next().unwrap().to_vec();
                    if layer == config.num_layers() - 1 && position + 1 == request.tokens.len() {
                        self.last.insert(seq, row.clone());
                    }
                    self.outputs.insert((request.name, position, layer), row);
                }
            }
        }
        let lens: Vec<String> = batch
            .iter()
            .map(|&(s, n)| {
                format!(
                    "{} +{n} = {}",
                    self.requests[&s].name,
                    self.requests[&s].tokens.len()
                )
            })
            .collect();
        println!(
            "  step: {}; {} blocks free ({} of them cached)",
            lens.join(", "),
            self.cache.num_free_blocks(),
            self.cache.prefix_stats().parked_blocks
        );
        Ok(())
    }

    fn free(&mut self, seq: SeqId) -> paged_gqa::Result<()> {
        self.cache.free(seq)
    }
}

/// Serves the two requests; returns the server (its outputs and counters).
fn serve(caching: bool) -> paged_gqa::Result<Server> {
    // A small Llama-like model: 4 layers, 8 query heads sharing 2 K/V heads of 64, pages of 16.
    let config =
        CacheConfig::new(GqaShape::new(8, 2, 64)?, 4, 16, DType::F32)?.with_prefix_caching(caching);
    let cache = PagedCache::new(CpuStorage::with_budget(config, 1 << 20)?)?; // 1 MiB of pages
    println!(
        "prefix caching {}: {} blocks of {} tokens, {} bytes per token",
        if caching { "on" } else { "off" },
        cache.num_free_blocks(),
        config.block_size(),
        config.bytes_per_token()
    );
    let mut server = Server {
        cache,
        requests: BTreeMap::new(),
        outputs: BTreeMap::new(),
        last: BTreeMap::new(),
    };
    let system: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 1000).collect();
    let with_system = |question: std::ops::Range<u32>| -> Vec<u32> {
        system.iter().copied().chain(question).collect()
    };

    let (a, a_prompt) = server.admit("A", with_system(500..512))?;
    server.step(&[(a, a_prompt)])?; // prefill A: its full blocks become findable
    for _ in 0..3 {
        let entry = server.sample(a)?;
        server.step(&[entry])?; // decode
    }
    // B shares the system prompt: it computes only its own tokens, beside A's decode token.
    let (b, b_prompt) = server.admit("B", with_system(600..609))?;
    let entry = server.sample(a)?;
    server.step(&[entry, (b, b_prompt)])?;
    for _ in 0..2 {
        let batch = [server.sample(a)?, server.sample(b)?];
        server.step(&batch)?;
    }
    let a2 = server.cache.fork(a)?; // parallel sampling: a2 shares A's blocks
    let request = &server.requests[&a];
    let (tokens, digests) = (request.tokens.clone(), request.digests.clone());
    server.requests.insert(
        a2,
        Request {
            name: "A2",
            tokens,
            digests,
        },
    );
    server.last.insert(a2, server.last[&a].clone()); // it samples from A's last output too
    let batch = [server.sample(a)?, server.sample(a2)?, server.sample(b)?];
    server.step(&batch)?; // A copies the shared partial block first
    for seq in [b, a, a2] {
        server.free(seq)?;
    }
    let stats = server.cache.prefix_stats();
    println!(
        "  all freed: {} blocks free, {} cached; hit rate {:.1}% ({} of {} prompt tokens), {} evictions",
        server.cache.num_free_blocks(),
        stats.cached_blocks,
        100.0 * stats.hit_rate(),
        stats.hit_tokens,
        stats.prompt_tokens,
        stats.evictions
    );
    Ok(server)
}

fn main() -> paged_gqa::Result<()> {
    let on = serve(true)?;
    let off = serve(false)?;
    // Every row computed with caching on was computed with it off too, identically; the
    // cached run computed fewer.
    let mut same = 0;
    for (key, row) in &on.outputs {
        assert_eq!(Some(row), off.outputs.get(key), "output {key:?} differs");
        same += 1;
    }
    let tokens =
        |s: &Server| -> Vec<Vec<u32>> { s.requests.values().map(|r| r.tokens.clone()).collect() };
    assert_eq!(tokens(&on), tokens(&off), "the generated tokens differ");
    println!(
        "caching on computed {same} attention output rows (tokens x layers), off {}: every row \
         both computed is identical, and so are the generated tokens",
        off.outputs.len()
    );

    // The memory arithmetic of a real model: Llama-3-70B in 40 GiB of bf16 pages.
    let llama70b = CacheConfig::new(GqaShape::new(64, 8, 128)?, 80, 16, DType::BF16)?;
    let mha = CacheConfig::new(GqaShape::new(64, 64, 128)?, 80, 16, DType::BF16)?;
    for (name, c) in [
        ("Llama-3-70B GQA (8 K/V heads)", llama70b),
        ("the same with MHA (64 K/V heads)", mha),
    ] {
        let tokens = c.blocks_for_budget(40 << 30)? * c.block_size();
        println!(
            "{name}: {} KiB per token, {tokens} tokens in 40 GiB",
            c.bytes_per_token() / 1024
        );
    }
    Ok(())
}
