//! `paged-gqa`: replay an attention case dumped from an engine, or run the demo.
//!
//! Exit codes: 0 success, 1 a failure while running (I/O, CUDA), 2 a malformed case or bad
//! arguments (nothing is written then).

mod attend;
mod bench;
mod case;
mod demo;
mod profile;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "paged-gqa",
    version,
    about = "GQA attention over a paged KV cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the attention runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The CPU oracle: attention from the definition in f64.
    Cpu,
    /// The CUDA kernels.
    Cuda,
    /// The CUDA kernels on the kernel emulator (on the CPU, with strict checks).
    Sim,
}

#[derive(Subcommand)]
enum Command {
    /// Attention of one case file: CASE.safetensors -> OUT.safetensors (`out`, `lse`, f32).
    Attend {
        /// Case: q [tokens, heads, d]; k_cache, v_cache [blocks, block_size, kv_heads, d];
        /// block_tables i32 [batch, max_blocks]; context_lens, query_lens i32 [batch];
        /// optional metadata `scale`.
        case: PathBuf,
        /// Where to write `out` [tokens, heads, d] and `lse` [tokens, heads].
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
    },
    /// Builds a random paged case (Llama-3-8B heads), runs repeat_kv on the GPU if there is one
    /// (else the CPU), and prints how the fused GQA result agrees with the naive repeat_kv path.
    Demo {
        /// Seed of the random case (default: from the clock, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Where the fused decode runs (default: the GPU when there is one, else the CPU).
        #[arg(long, value_enum)]
        backend: Option<Backend>,
    },
    /// The fused decode against the naive repeat_kv path over real model shapes: a table of
    /// times, speedups and achieved KV bandwidth (GPU if present, else CPU).
    Bench(bench::BenchArgs),
    /// One attention call (a replay case or a bench shape) on the kernel emulator's traced
    /// kernels: per launch, shared-memory wavefronts and bank conflicts, global sectors, lane and
    /// warp utilisation, bytes in flight, theoretical occupancy and a speed-of-light model (EMULATOR
    /// COUNTS and MODEL PREDICTIONS, not GPU measurements), and the hottest source lines.
    Profile(profile::ProfileArgs),
}

/// A failure and the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// Bad input: exit code 2.
    pub fn input(message: impl ToString) -> Self {
        Self {
            code: 2,
            message: message.to_string(),
        }
    }
    /// A failure while running: exit code 1.
    pub fn runtime(message: impl ToString) -> Self {
        Self {
            code: 1,
            message: message.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Attend { case, out, backend } => attend::run(&case, &out, backend),
        Command::Demo { seed, backend } => demo::run(seed, backend),
        Command::Bench(args) => bench::run(args),
        Command::Profile(args) => profile::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}
