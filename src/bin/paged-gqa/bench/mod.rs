//! `paged-gqa bench`: the fused decode against the naive repeat_kv path over a sweep of real
//! model shapes, batches and context lengths, on the GPU when there is one, else the CPU.
//! Prints a table, and writes JSON records and an SVG plot on request.

mod cpu;
mod data;
mod gpu;
mod report;
mod sim;

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use paged_gqa::models::{Model, MODELS};
use paged_gqa::plan::KernelChoice;
use paged_gqa::{AttendOptions, DType, GqaShape};

use crate::Failure;

/// The sinks the sweep gives models that have them: one illustrative logit per head (not a
/// checkpoint's values; the kernels' cost does not depend on them).
const BENCH_SINK: f32 = 0.5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchBackend {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
    /// The kernel emulator: the real kernels on the CPU; times are emulation, and the K/V bytes
    /// the kernels fetch are counted.
    Sim,
}

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// One new token per sequence over `context` cached keys: KV bandwidth.
    Decode,
    /// Whole prompts of `context` tokens, causal: TFLOP/s.
    Prefill,
}

/// Which attention kernels the fused path may use (GPU only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchKernels {
    /// Per sequence, as the library picks: the narrow tensor-core layout up to 16 rows, the
    /// wide one above (CUDA cores on GPUs without tensor cores).
    Auto,
    /// Every sequence on the CUDA-core kernel.
    CudaCores,
    /// Every sequence on the tensor-core kernel's wide layout.
    TensorCores,
    /// Every sequence on the tensor-core kernel's narrow layout.
    NarrowTensorCores,
}

impl BenchKernels {
    /// The library's kernel choice for this option.
    pub fn choice(self) -> KernelChoice {
        match self {
            BenchKernels::Auto => KernelChoice::Auto,
            BenchKernels::CudaCores => KernelChoice::CudaCores,
            BenchKernels::TensorCores => KernelChoice::TensorCores,
            BenchKernels::NarrowTensorCores => KernelChoice::NarrowTensorCores,
        }
    }

    /// The option's name on the command line ("auto", "cuda-cores", "tensor-cores",
    /// "narrow-tensor-cores").
    pub fn name(self) -> String {
        self.to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchDType {
    Bf16,
    F16,
}

impl BenchDType {
    pub fn dtype(self) -> DType {
        match self {
            BenchDType::Bf16 => DType::BF16,
            BenchDType::F16 => DType::F16,
        }
    }
}

/// The K/V pages' element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchKvDType {
    /// The compute dtype (`--dtype`), as vLLM's `kv_cache_dtype=auto`.
    Auto,
    /// OCP fp8 e4m3fn pages under per-head scales (calibrated from the random values).
    #[value(name = "fp8-e4m3")]
    Fp8E4m3,
    /// OCP fp8 e5m2 pages under per-head scales.
    #[value(name = "fp8-e5m2")]
    Fp8E5m2,
}

impl BenchKvDType {
    /// The page dtype under compute dtype `dtype`.
    pub fn dtype(self, dtype: DType) -> DType {
        match self {
            BenchKvDType::Auto => dtype,
            BenchKvDType::Fp8E4m3 => DType::F8E4M3,
            BenchKvDType::Fp8E5m2 => DType::F8E5M2,
        }
    }
}

/// A page dtype's name in the table and the records: "bf16", "f16", "fp8-e4m3", "fp8-e5m2".
pub fn kv_dtype_name(dtype: DType) -> String {
    match dtype {
        DType::F8E4M3 => "fp8-e4m3".to_string(),
        DType::F8E5M2 => "fp8-e5m2".to_string(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Options of `paged-gqa bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BenchBackend,
    /// Decode steps (bandwidth) or whole causal prompts (TFLOP/s).
    #[arg(long, value_enum, default_value = "decode")]
    pub mode: BenchMode,
    /// A short sweep (the default on the CPU): Llama-3-8B, batch 1 and 4, contexts 1k and 4k
    /// on the CPU; Llama-3-8B and -70B, batch 1/16/64, contexts 1k/8k/32k on the GPU.
    #[arg(long, conflicts_with = "full")]
    pub quick: bool,
    /// Every model of the table, more batches and contexts.
    #[arg(long)]
    pub full: bool,
    /// Model names (repeatable), e.g. --model Llama-3-8B.
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// Batch sizes, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Context lengths (keys per sequence), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub context: Vec<usize>,
    /// Tokens per page (a power of two up to 256).
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: BenchDType,
    /// The K/V pages' element type: `auto` (the compute dtype) or fp8 (half the bytes). The
    /// naive path has no fp8 pages on the GPU and the emulator: its columns are empty there.
    #[arg(long, value_enum, default_value = "auto")]
    pub kv_dtype: BenchKvDType,
    /// The fused path's kernels (GPU and emulator; repeatable: each case runs on each, to time
    /// one path against another). Default: auto.
    #[arg(long, value_enum)]
    pub kernels: Vec<BenchKernels>,
    /// Timed runs per measurement (after warm-up).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Writes the records as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draws bandwidth against context length as SVG.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// With `--backend sim`: profiles one fused call of each case on the traced kernels and
    /// adds each launch's headline figures (emulator counts, model predictions) to its record
    /// and the table (see `paged-gqa profile`).
    #[arg(long)]
    pub profile: bool,
}

/// One point of the sweep.
#[derive(Debug, Clone)]
pub struct Case {
    pub model: &'static str,
    pub shape: GqaShape,
    /// The attention of the model's layer 0 (its sliding window, soft-cap, sinks, ALiBi).
    pub options: AttendOptions,
    /// What `options` turn on, for the records ("plain causal" when nothing).
    pub variant: String,
    pub batch: usize,
    pub context: usize,
    pub page_size: usize,
    /// The compute dtype: q, out (and the pages when `kv_dtype` is the same).
    pub dtype: DType,
    /// The pages' element type: `dtype`, or fp8.
    pub kv_dtype: DType,
    pub mode: BenchMode,
    pub kernels: BenchKernels,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} batch {} context {}",
            self.model, self.batch, self.context
        )
    }
}

impl Case {
    /// Bytes of K and V the batch must read, in the page dtype: the floor of a decode step's
    /// memory traffic (a sliding window's keys only, for a windowed decode row).
    pub fn kv_bytes(&self) -> u64 {
        let keys = match self.mode {
            BenchMode::Decode => self.options.mask().visible_keys(self.context, 1, 0).len(),
            BenchMode::Prefill => self.context,
        };
        2 * (self.batch * keys * self.shape.kv_row_len() * self.kv_dtype.size_bytes()) as u64
    }

    /// Query rows per sequence: 1 for decode, the whole prompt for prefill.
    pub fn query_len(&self) -> usize {
        match self.mode {
            BenchMode::Decode => 1,
            BenchMode::Prefill => self.context,
        }
    }

    /// Floating-point operations of the attention actually computed (the causal region):
    /// 4 * head_dim * n_heads per visible (query row, key) pair (QK^T and PV, 2 each).
    pub fn flops(&self) -> f64 {
        let mask = self.options.mask();
        let query_len = self.query_len();
        let pairs: usize = (0..query_len)
            .map(|j| mask.visible_keys(self.context, query_len, j).len())
            .sum();
        let pairs = pairs as f64;
        4.0 * (self.shape.head_dim() * self.shape.n_heads() * self.batch) as f64 * pairs
    }
}

fn model(name: &str) -> Result<&'static Model, Failure> {
    MODELS
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            Failure::input(format!(
                "unknown model `{name}`; known: {}",
                MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
            ))
        })
}

/// The attention options of `model`'s layer 0 and a label of what they turn on.
fn layer0(model: &Model) -> Result<(AttendOptions, String), Failure> {
    let sinks = model.sinks.then(|| vec![BENCH_SINK; model.n_heads]);
    let options = model.options(0, sinks).map_err(Failure::input)?;
    let mut parts = Vec::new();
    if options.window_left() >= 0 {
        parts.push(format!("window {}", options.window_left() + 1));
    }
    if options.logit_softcap() > 0.0 {
        parts.push(format!("soft-cap {}", options.logit_softcap()));
    }
    if options.sinks().is_some() {
        parts.push("sinks".to_string());
    }
    if options.alibi_slopes().is_some() {
        parts.push("ALiBi".to_string());
    }
    let label = if parts.is_empty() {
        "plain causal".to_string()
    } else {
        parts.join(", ")
    };
    Ok((options, label))
}

/// Where the sweep runs: its default cases differ.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Cpu,
    Gpu,
    Sim,
}

fn sweep(args: &BenchArgs, target: Target) -> Result<Vec<Case>, Failure> {
    let on_gpu = target == Target::Gpu;
    let (models, batches, contexts): (Vec<&str>, Vec<usize>, Vec<usize>) =
        match (on_gpu, args.full, args.mode) {
            // The emulator runs every CUDA thread as a fiber: small cases, still both kernels
            // and the largest group.
            _ if target == Target::Sim && args.mode == BenchMode::Prefill => {
                (vec!["Llama-3-8B"], vec![1], vec![128, 512])
            }
            _ if target == Target::Sim => (
                vec!["Llama-3-8B", "Qwen2-7B", "Falcon-7B", "gpt-oss-20b"],
                vec![1, 4],
                vec![1024, 4096],
            ),
            (false, false, BenchMode::Prefill) => (vec!["Llama-3-8B"], vec![1], vec![256, 1024]),
            (false, true, BenchMode::Prefill) => (
                vec!["Llama-3-8B", "Qwen2-7B"],
                vec![1, 2],
                vec![256, 1024, 2048],
            ),
            (true, false, BenchMode::Prefill) => (
                vec!["Llama-3-8B", "Llama-3-70B"],
                vec![1],
                vec![1024, 4096, 8192],
            ),
            (true, true, BenchMode::Prefill) => (
                MODELS.iter().map(|m| m.name).collect(),
                vec![1, 4],
                vec![1024, 4096, 8192, 16_384],
            ),
            (false, false, BenchMode::Decode) => (vec!["Llama-3-8B"], vec![1, 4], vec![1024, 4096]),
            (false, true, BenchMode::Decode) => (
                vec!["Llama-3-8B", "Qwen2-7B", "Falcon-7B"],
                vec![1, 8],
                vec![1024, 4096, 16_384],
            ),
            (true, false, BenchMode::Decode) => (
                vec!["Llama-3-8B", "Llama-3-70B"],
                vec![1, 16, 64],
                vec![1024, 8192, 32_768],
            ),
            (true, true, BenchMode::Decode) => (
                MODELS.iter().map(|m| m.name).collect(),
                vec![1, 16, 64, 128],
                vec![1024, 4096, 8192, 32_768],
            ),
        };
    let models: Vec<String> = if args.models.is_empty() {
        models.into_iter().map(String::from).collect()
    } else {
        args.models.clone()
    };
    let batches = if args.batch.is_empty() {
        batches
    } else {
        args.batch.clone()
    };
    let contexts = if args.context.is_empty() {
        contexts
    } else {
        args.context.clone()
    };
    if !args.page_size.is_power_of_two() || args.page_size > 256 {
        return Err(Failure::input(format!(
            "--page-size {} is not a power of two from 1 to 256",
            args.page_size
        )));
    }
    if let Some(&bad) = batches.iter().chain(&contexts).find(|&&x| x == 0) {
        return Err(Failure::input(format!(
            "batch sizes and contexts must be positive, got {bad}"
        )));
    }
    let kernel_choices = if args.kernels.is_empty() {
        vec![BenchKernels::Auto]
    } else {
        args.kernels.clone()
    };
    let mut cases = Vec::new();
    for name in &models {
        let model = model(name)?;
        let shape = model.shape().map_err(Failure::input)?;
        let (options, variant) = layer0(model)?;
        for &batch in &batches {
            for (&context, &kernels) in contexts
                .iter()
                .flat_map(|c| kernel_choices.iter().map(move |k| (c, k)))
            {
                cases.push(Case {
                    model: model.name,
                    shape,
                    options: options.clone(),
                    variant: variant.clone(),
                    batch,
                    context,
                    page_size: args.page_size,
                    dtype: args.dtype.dtype(),
                    kv_dtype: args.kv_dtype.dtype(args.dtype.dtype()),
                    mode: args.mode,
                    kernels,
                });
            }
        }
    }
    Ok(cases)
}

/// The cases `args` name on the emulator.
pub fn sim_cases(args: &BenchArgs) -> Result<Vec<Case>, Failure> {
    sweep(args, Target::Sim)
}

pub use sim::profile_case;

pub fn run(args: BenchArgs) -> Result<(), Failure> {
    if args.backend == BenchBackend::Sim {
        let cases = sweep(&args, Target::Sim)?;
        return finish(
            &args,
            sim::run(&cases, args.iters.unwrap_or(1), args.profile)?,
        );
    }
    if args.profile {
        return Err(Failure::input(
            "--profile needs --backend sim: the profiler runs on the kernel emulator",
        ));
    }
    let gpu = match args.backend {
        BenchBackend::Cpu | BenchBackend::Sim => None,
        BenchBackend::Cuda => Some(paged_gqa::cuda::context(0).map_err(Failure::runtime)?),
        BenchBackend::Auto => paged_gqa::cuda::context(0).ok(),
    };
    if let Some(kernels) = args
        .kernels
        .iter()
        .find(|&&k| gpu.is_none() && k != BenchKernels::Auto)
    {
        return Err(Failure::input(format!(
            "--kernels {} picks GPU kernels; the CPU backend has one path",
            kernels.name()
        )));
    }
    let cases = sweep(
        &args,
        if gpu.is_some() {
            Target::Gpu
        } else {
            Target::Cpu
        },
    )?;
    let records = match &gpu {
        Some(ctx) => gpu::run(ctx, &cases, args.iters.unwrap_or(20))?,
        None => cpu::run(&cases, args.iters.unwrap_or(3))?,
    };
    finish(&args, records)
}

/// Prints the table and writes what was asked for.
fn finish(args: &BenchArgs, records: Vec<report::Record>) -> Result<(), Failure> {
    report::print_table(&records);
    if let Some(path) = &args.json {
        report::write_json(path, &records)?;
        println!("records: {}", path.display());
    }
    if let Some(path) = &args.svg {
        report::write_svg(path, &records)?;
        println!("plot: {}", path.display());
    }
    Ok(())
}
