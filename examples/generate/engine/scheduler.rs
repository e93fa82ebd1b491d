//! Continuous batching over the paged cache: requests arrive at different steps; every step
//! carries the decode tokens of the running requests and chunks of prompts up to a token
//! budget (chunked prefill); a request asking for `n` samples forks after its prompt (the
//! samples share its pages, copy-on-write); a step that does not fit preempts the request
//! admitted last (its pages freed, its tokens recomputed when it is admitted again).

use std::time::{Duration, Instant};

use candle_core::{Error, Result, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use paged_gqa::cache::SeqId;

use super::kv::KvCache;
use super::model::{Llama, StepInput};

/// What a request asks for.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub name: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// The step at which it arrives (0: at once).
    pub arrival: usize,
    /// Parallel samples: `n - 1` forks of the request after its prompt.
    pub n: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// Tokens that end it (`<|im_end|>` for chat); empty: it runs to `max_tokens`.
    pub stop: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    /// In the cache as `seq`, the first `computed` tokens' K/V written.
    Running {
        seq: SeqId,
        computed: usize,
    },
    Finished,
}

/// A request being served (a fork is a request of its own).
pub struct Request {
    pub name: String,
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
    /// The logits each generated token was sampled from, when the engine records them.
    pub logits: Vec<Vec<f32>>,
    /// Times it was preempted (freed and recomputed).
    pub preemptions: usize,
    /// Prompt tokens the prefix cache held when it was (last) admitted.
    pub cached_tokens: usize,
    max_tokens: usize,
    arrival: usize,
    forks: usize,
    stop: Vec<u32>,
    sampler: LogitsProcessor,
    sampling: Sampling,
    seed: u64,
    state: State,
    /// Order of admission (preemption takes the latest).
    admitted_at: usize,
}

impl Request {
    /// Prompt then generated tokens.
    pub fn tokens(&self) -> Vec<u32> {
        let mut t = self.prompt.clone();
        t.extend(&self.generated);
        t
    }

    fn len(&self) -> usize {
        self.prompt.len() + self.generated.len()
    }

    pub fn finished(&self) -> bool {
        self.state == State::Finished
    }
}

/// Counters of a run.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub steps: usize,
    /// Tokens whose K/V were computed (prompt and recomputed tokens included).
    pub computed_tokens: usize,
    pub generated_tokens: usize,
    pub preemptions: usize,
    pub forks: usize,
    /// Steps that carried both a prompt chunk and a decode token.
    pub mixed_steps: usize,
    /// Prompt chunks shorter than what was left of their prompt.
    pub partial_chunks: usize,
    /// Most blocks held at once.
    pub peak_blocks: usize,
    /// Most tokens held by sequences at once (forks counted apart).
    pub peak_tokens: usize,
    pub forward_time: Duration,
}

/// A token a step produced, for streaming: (request index, token).
pub type Event = (usize, u32);

/// The model, the cache and the requests.
pub struct Engine {
    pub model: Llama,
    pub kv: Box<dyn KvCache>,
    pub requests: Vec<Request>,
    /// Most tokens (decode and prompt chunks) one step computes.
    pub token_budget: usize,
    /// Keep each generated token's logits in its request (the parity test).
    pub record_logits: bool,
    pub stats: Stats,
    step: usize,
    admissions: usize,
}

impl Engine {
    pub fn new(model: Llama, kv: Box<dyn KvCache>, token_budget: usize) -> Self {
        Self {
            model,
            kv,
            requests: Vec::new(),
            token_budget,
            record_logits: false,
            stats: Stats::default(),
            step: 0,
            admissions: 0,
        }
    }

    /// Tokens the cache can hold for one sequence.
    pub fn capacity_tokens(&self) -> usize {
        self.kv.num_blocks() * self.kv.config().block_size()
    }

    /// Queues a request; an error if it could never fit in the cache, or past the RoPE
    /// tables.
    pub fn submit(&mut self, spec: RequestSpec) -> Result<usize> {
        let need = spec.prompt.len() + spec.max_tokens;
        let capacity = self.capacity_tokens();
        if need > capacity {
            return Err(Error::msg(format!(
                "request {:?}: a prompt of {} tokens plus --max-tokens {} needs {need} tokens, \
                 but the cache holds at most {capacity} ({} blocks of {} tokens; raise --num-blocks)",
                spec.name,
                spec.prompt.len(),
                spec.max_tokens,
                self.kv.num_blocks(),
                self.kv.config().block_size()
            )));
        }
        if need > super::model::MAX_SEQ_LEN {
            return Err(Error::msg(format!(
                "request {:?}: {need} tokens (prompt {} + --max-tokens {}) is past the {} positions RoPE is tabulated for",
                spec.name,
                spec.prompt.len(),
                spec.max_tokens,
                super::model::MAX_SEQ_LEN
            )));
        }
        if spec.prompt.is_empty() {
            return Err(Error::msg(format!("request {:?}: empty prompt", spec.name)));
        }
        self.requests.push(Request {
            name: spec.name,
            prompt: spec.prompt,
            generated: Vec::new(),
            logits: Vec::new(),
            preemptions: 0,
            cached_tokens: 0,
            max_tokens: spec.max_tokens,
            arrival: spec.arrival,
            forks: spec.n.saturating_sub(1),
            stop: spec.stop,
            sampler: LogitsProcessor::from_sampling(spec.seed, spec.sampling.clone()),
            sampling: spec.sampling,
            seed: spec.seed,
            state: State::Waiting,
            admitted_at: 0,
        });
        Ok(self.requests.len() - 1)
    }

    /// Whether every request finished.
    pub fn done(&self) -> bool {
        self.requests.iter().all(Request::finished)
    }

    /// Runs every request to the end; `on_token` sees each generated token.
    pub fn run(&mut self, mut on_token: impl FnMut(&Engine, Event)) -> Result<()> {
        while !self.done() {
            for event in self.step()? {
                on_token(self, event);
            }
        }
        Ok(())
    }

    /// The running requests in admission order, and the waiting ones that arrived (FCFS).
    fn order(&self, state: impl Fn(&State) -> bool) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.requests.len())
            .filter(|&i| state(&self.requests[i].state))
            .collect();
        idx.sort_by_key(|&i| (self.requests[i].admitted_at, i));
        idx
    }

    /// Frees request `i`'s pages and puts it back in the queue (its tokens kept).
    fn preempt(&mut self, i: usize) -> Result<()> {
        if let State::Running { seq, .. } = self.requests[i].state {
            self.kv.free(seq)?;
        }
        self.requests[i].state = State::Waiting;
        self.requests[i].preemptions += 1;
        self.stats.preemptions += 1;
        Ok(())
    }

    /// One engine step: schedule, plan, forward, sample. Returns the tokens it generated.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let step = self.step;
        self.step += 1;
        let running = self.order(|s| matches!(s, State::Running { .. }));
        // Admit the arrived waiting requests (preempted ones first: they were admitted before).
        let mut waiting: Vec<usize> = (0..self.requests.len())
            .filter(|&i| {
                self.requests[i].state == State::Waiting && self.requests[i].arrival <= step
            })
            .collect();
        waiting.sort_by_key(|&i| {
            (
                self.requests[i].preemptions == 0,
                self.requests[i].admitted_at,
                i,
            )
        });

        // Decode tokens first, then prompt chunks, within the token budget.
        let mut entries: Vec<(usize, usize)> = Vec::new(); // (request, new tokens)
        let mut budget = self.token_budget;
        let pending = |r: &Request| match r.state {
            State::Running { computed, .. } => r.len() - computed,
            _ => 0,
        };
        let (decode, prefill): (Vec<usize>, Vec<usize>) = running
            .iter()
            .copied()
            .partition(|&i| pending(&self.requests[i]) == 1);
        for i in decode.into_iter().chain(prefill) {
            let take = pending(&self.requests[i]).min(budget);
            if take > 0 {
                entries.push((i, take));
                budget -= take;
            }
        }
        // Admit while the pages free now hold the step's tokens so far (each entry may open a
        // block more than its tokens fill) and a chunk of the newcomer, its first chunk capped
        // to what fits; a plan that still does not fit un-admits below. A step with nothing
        // else admits its first request whatever the count says (the plan decides).
        let bs = self.kv.config().block_size();
        let blocks_for = |n: usize| n.div_ceil(bs) + 1;
        let mut reserved: usize = entries.iter().map(|&(_, n)| blocks_for(n)).sum();
        let mut admitted = Vec::new();
        for i in waiting {
            let free = self.kv.num_free_blocks().saturating_sub(reserved);
            let cap = if entries.is_empty() {
                budget
            } else {
                budget.min(free.saturating_sub(1) * bs)
            };
            if cap == 0 {
                break;
            }
            let tokens = self.requests[i].tokens();
            let a = self.kv.add_sequence_with_prompt(&tokens)?;
            self.admissions += 1;
            let r = &mut self.requests[i];
            r.state = State::Running {
                seq: a.seq,
                computed: a.computed,
            };
            r.cached_tokens = a.computed;
            r.admitted_at = self.admissions;
            let take = (tokens.len() - a.computed).min(cap);
            entries.push((i, take));
            admitted.push(i);
            budget -= take;
            reserved += blocks_for(take);
        }

        // Plan; when the step does not fit, un-admit the newest admissions, then preempt the
        // running request admitted last.
        loop {
            let batch: Vec<(SeqId, usize)> = entries
                .iter()
                .map(|&(i, n)| match self.requests[i].state {
                    State::Running { seq, .. } => (seq, n),
                    _ => unreachable!("only running requests are scheduled"),
                })
                .collect();
            if batch.is_empty() {
                return Ok(Vec::new());
            }
            match self.kv.plan(&batch) {
                Ok(()) => break,
                Err(paged_gqa::Error::OutOfBlocks { .. }) => {
                    if let Some(i) = admitted.pop() {
                        // Not started: back to the queue as if never admitted.
                        if let State::Running { seq, .. } = self.requests[i].state {
                            self.kv.free(seq)?;
                        }
                        self.requests[i].state = State::Waiting;
                        entries.retain(|&(j, _)| j != i);
                    } else {
                        let victim = entries
                            .iter()
                            .map(|&(j, _)| j)
                            .max_by_key(|&j| self.requests[j].admitted_at)
                            .expect("batch not empty");
                        self.preempt(victim)?;
                        entries.retain(|&(j, _)| j != victim);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }

        // The step's tokens, flattened in batch order, and the rows to sample from.
        let (mut tokens, mut positions, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        let mut samplers = Vec::new(); // (request, logits row)
        let (mut has_decode, mut has_prefill) = (false, false);
        for &(i, n) in &entries {
            let r = &self.requests[i];
            let State::Running { computed, .. } = r.state else {
                unreachable!()
            };
            let all = r.tokens();
            tokens.extend_from_slice(&all[computed..computed + n]);
            positions.extend((computed..computed + n).map(|p| p as u32));
            if computed + n == all.len() {
                rows.push((tokens.len() - 1) as u32);
                samplers.push((i, rows.len() - 1));
            } else {
                self.stats.partial_chunks += 1;
            }
            if computed < r.prompt.len() || n > 1 {
                has_prefill = true;
            } else {
                has_decode = true;
            }
        }
        self.stats.mixed_steps += (has_decode && has_prefill) as usize;
        self.stats.steps += 1;
        self.stats.computed_tokens += tokens.len();
        let held = self.kv.num_blocks() - self.kv.num_free_blocks();
        self.stats.peak_blocks = self.stats.peak_blocks.max(held);
        let start = Instant::now();
        let logits = self.model.forward(
            &StepInput {
                tokens: &tokens,
                positions: &positions,
                logit_rows: &rows,
            },
            self.kv.as_mut(),
        )?; // [rows, vocab]
        self.stats.forward_time += start.elapsed();

        for &(i, n) in &entries {
            if let State::Running { seq, computed } = self.requests[i].state {
                self.requests[i].state = State::Running {
                    seq,
                    computed: computed + n,
                };
            }
        }
        let mut events = Vec::new();
        for (i, row) in samplers {
            let row_logits = logits.get(row)?; // [vocab]
            let mut group = vec![i];
            // Parallel sampling: the forks share the prompt's pages and sample from its logits.
            if self.requests[i].generated.is_empty() && self.requests[i].forks > 0 {
                group.extend(self.fork(i)?);
            }
            for j in group {
                events.extend(self.sample(j, &row_logits)?);
            }
        }
        let live: usize = self
            .requests
            .iter()
            .filter_map(|r| match r.state {
                State::Running { computed, .. } => Some(computed),
                _ => None,
            })
            .sum();
        self.stats.peak_tokens = self.stats.peak_tokens.max(live);
        Ok(events)
    }

    /// Forks request `i` `forks` times; returns the new requests.
    fn fork(&mut self, i: usize) -> Result<Vec<usize>> {
        let State::Running { seq, computed } = self.requests[i].state else {
            unreachable!()
        };
        let mut children = Vec::new();
        for f in 0..std::mem::take(&mut self.requests[i].forks) {
            let child = self.kv.fork(seq)?;
            self.admissions += 1;
            let parent = &self.requests[i];
            let request = {
                // Each sample has its own seed (the same greedy tokens, other random draws).
                let seed = parent.seed.wrapping_add(f as u64 + 1);
                let sampler = LogitsProcessor::from_sampling(seed, parent.sampling.clone());
                Request {
                    name: format!("{}#{}", parent.name, f + 1),
                    prompt: parent.prompt.clone(),
                    generated: Vec::new(),
                    logits: Vec::new(),
                    preemptions: 0,
                    cached_tokens: parent.cached_tokens,
                    max_tokens: parent.max_tokens,
                    arrival: parent.arrival,
                    forks: 0,
                    stop: parent.stop.clone(),
                    sampler,
                    sampling: parent.sampling.clone(),
                    seed,
                    state: State::Running {
                        seq: child,
                        computed,
                    },
                    admitted_at: self.admissions,
                }
            };
            self.requests.push(request);
            self.stats.forks += 1;
            children.push(self.requests.len() - 1);
        }
        Ok(children)
    }

    /// Samples request `j`'s next token from `logits` `[vocab]`; appends it (or finishes).
    fn sample(&mut self, j: usize, logits: &Tensor) -> Result<Option<Event>> {
        let record = self.record_logits;
        let r = &mut self.requests[j];
        if record {
            r.logits.push(logits.to_vec1::<f32>()?);
        }
        let token = r.sampler.sample(logits)?;
        r.generated.push(token);
        self.stats.generated_tokens += 1;
        let State::Running { seq, .. } = r.state else {
            unreachable!()
        };
        if r.generated.len() >= r.max_tokens || r.stop.contains(&token) {
            r.state = State::Finished;
            self.kv.free(seq)?;
        } else {
            self.kv.append_tokens(seq, &[token])?;
        }
        Ok(Some((j, token)))
    }
}
