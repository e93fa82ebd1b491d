//! A real model served through the paged cache: SmolLM2-135M-Instruct (a GGUF Llama with 9
//! query heads over 3 K/V heads) generating text, the way an engine serves it: continuous
//! batching, chunked prefill, parallel sampling by fork, preemption, over the crate's
//! backends. `scripts/fetch-model` first, then:
//!
//! ```text
//! cargo run --release --features real-model --example generate -- --prompt "What is the capital of France?"
//! ```
//!
//! `--help` lists the flags. `--perplexity` prints the page dtypes' table on a fixed text
//! instead (README, "A real model").

mod engine;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Error, Result};
use candle_transformers::generation::Sampling;
use engine::gguf::{default_model_path, Gguf};
use engine::kv::{self, Backend, KvDtype};
use engine::model::Llama;
use engine::scheduler::{Engine, RequestSpec};
use engine::tokenizer::{chat_prompt, TextCodec};
use paged_gqa::fp8::Fp8Format;

const HELP: &str = "\
generate: SmolLM2-135M-Instruct through the paged cache

  --model PATH         the GGUF (default: $PAGED_GQA_MODEL, else models/ from scripts/fetch-model)
  --prompt TEXT        a request (repeatable; requests arrive --arrive-every steps apart)
  --max-tokens N       tokens to generate per request (64)
  --backend B          cpu | sim (the real kernels on the emulator) | cuda (feature candle-cuda)
  --kv-dtype D         f32 | bf16 | f16 | fp8-e4m3 | fp8-e5m2 (f32 on cpu, bf16 on sim and cuda)
  --page-size N        tokens per page (16)
  --num-blocks N       pages (default: enough for every request at once; fewer forces preemption)
  --token-budget N     tokens one step computes, decode and prompt chunks (256)
  --arrive-every N     steps between the requests' arrivals (2)
  --n N                samples per request: N - 1 forks after the prompt (1)
  --raw                the prompt as it is (no chat template)
  --temperature T      sample at temperature T (0: greedy, the default)
  --top-p P            nucleus sampling (with --temperature)
  --seed N             the samplers' seed (299792458)
  --ignore-eos         generate --max-tokens tokens past <|im_end|>
  --json PATH          each request's prompt and generated token ids
  --quantized          multiply by the Q4_1 weights as stored (candle's quantized kernels, which
                       quantize activations to 8 bits) instead of the weights dequantized to f32
  --perplexity         the page dtypes' teacher-forced table on the fixed text instead
";

/// The command line.
struct Args {
    model: PathBuf,
    prompts: Vec<String>,
    max_tokens: usize,
    backend: Backend,
    kv_dtype: Option<KvDtype>,
    page_size: usize,
    num_blocks: Option<usize>,
    token_budget: usize,
    arrive_every: usize,
    n: usize,
    raw: bool,
    temperature: f64,
    top_p: Option<f64>,
    seed: u64,
    ignore_eos: bool,
    json: Option<PathBuf>,
    perplexity: bool,
    quantized: bool,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        model: default_model_path(),
        prompts: Vec::new(),
        max_tokens: 64,
        backend: Backend::Cpu,
        kv_dtype: None,
        page_size: 16,
        num_blocks: None,
        token_budget: 256,
        arrive_every: 2,
        n: 1,
        raw: false,
        temperature: 0.0,
        top_p: None,
        seed: 299_792_458,
        ignore_eos: false,
        json: None,
        perplexity: false,
        quantized: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> std::result::Result<T, String> {
            v.parse()
                .map_err(|_| format!("{flag} {v:?}: not a valid number"))
        }
        match flag.as_str() {
            "--model" => a.model = value()?.into(),
            "--prompt" => a.prompts.push(value()?),
            "--max-tokens" => a.max_tokens = num(&flag, value()?)?,
            "--backend" => a.backend = Backend::parse(&value()?)?,
            "--kv-dtype" => a.kv_dtype = Some(KvDtype::parse(&value()?)?),
            "--page-size" => a.page_size = num(&flag, value()?)?,
            "--num-blocks" => a.num_blocks = Some(num(&flag, value()?)?),
            "--token-budget" => a.token_budget = num(&flag, value()?)?,
            "--arrive-every" => a.arrive_every = num(&flag, value()?)?,
            "--n" => a.n = num(&flag, value()?)?,
            "--raw" => a.raw = true,
            "--temperature" => a.temperature = num(&flag, value()?)?,
            "--top-p" => a.top_p = Some(num(&flag, value()?)?),
            "--seed" => a.seed = num(&flag, value()?)?,
            "--ignore-eos" => a.ignore_eos = true,
            "--json" => a.json = Some(value()?.into()),
            "--perplexity" => a.perplexity = true,
            "--quantized" => a.quantized = true,
            "--help" | "-h" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other:?} (--help lists them)")),
        }
    }
    if a.n == 0 || a.max_tokens == 0 || a.token_budget == 0 {
        return Err("--n, --max-tokens and --token-budget must be at least 1".into());
    }
    if a.prompts.is_empty() {
        a.prompts = vec![
            "What is the capital of France?".into(),
            "Write a haiku about memory pages.".into(),
            "Explain in two sentences why the sky is blue.".into(),
        ];
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("generate: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("generate: {}", without_backtrace(e));
        std::process::exit(1);
    }
}

/// The error's message (candle appends a backtrace when `RUST_BACKTRACE` is set).
fn without_backtrace(e: Error) -> Error {
    match e {
        Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        e => e,
    }
}

fn sampling(args: &Args) -> Sampling {
    match (args.temperature, args.top_p) {
        (t, _) if t <= 0.0 => Sampling::ArgMax,
        (temperature, None) => Sampling::All { temperature },
        (temperature, Some(p)) => Sampling::TopP { p, temperature },
    }
}

fn run(args: Args) -> Result<()> {
    let device = match args.backend {
        Backend::Cuda => Device::new_cuda(0).map_err(|e| {
            Error::msg(format!(
                "--backend cuda: {e} (build with --features candle-cuda on a machine with a GPU)"
            ))
        })?,
        _ => Device::Cpu,
    };
    let start = Instant::now();
    let mut gguf = Gguf::open(&args.model)?;
    let codec = TextCodec::from_gguf(&gguf)?;
    let model = Llama::load(&mut gguf, &device, !args.quantized)?;
    let c = model.config;
    println!(
        "{}: {} layers, {} query heads over {} K/V heads of {}, loaded in {:.2} s",
        args.model.display(),
        c.num_layers,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        start.elapsed().as_secs_f64()
    );
    if args.perplexity {
        return perplexity_table(&model, &codec, args.page_size);
    }

    let kv_dtype = args.kv_dtype.unwrap_or(match args.backend {
        Backend::Cpu => KvDtype::F32,
        _ => KvDtype::BF16,
    });
    let prompts: Vec<Vec<u32>> = args
        .prompts
        .iter()
        .map(|p| codec.encode(&if args.raw { p.clone() } else { chat_prompt(p) }))
        .collect::<Result<_>>()?;
    let num_blocks = args.num_blocks.unwrap_or_else(|| {
        let tokens: usize = prompts.iter().map(|p| p.len() + args.max_tokens).sum();
        (tokens * args.n).div_ceil(args.page_size) + prompts.len() * args.n
    });
    let scales = match kv_dtype {
        KvDtype::Fp8E4M3 | KvDtype::Fp8E5M2 => {
            let format = if kv_dtype == KvDtype::Fp8E4M3 {
                Fp8Format::E4M3
            } else {
                Fp8Format::E5M2
            };
            let text = &codec.encode(EVAL_TEXT)?[..CALIBRATION_TOKENS];
            let amax = engine::eval::calibrate(&model, text, args.page_size)?;
            println!("fp8 scales from the K/V amax of the fixed text's first {CALIBRATION_TOKENS} tokens");
            Some(kv::scales_from_amax(format, &amax)?)
        }
        _ => None,
    };
    let cache = kv::build(
        args.backend,
        kv_dtype,
        engine::eval::gqa_shape(&model)?,
        c.num_layers,
        args.page_size,
        num_blocks,
        scales.as_deref(),
        Some(&device),
    )?;
    let config = *cache.config();
    let mut engine = Engine::new(model, cache, args.token_budget);
    for (i, prompt) in prompts.iter().enumerate() {
        engine.submit(RequestSpec {
            name: format!("request {i}"),
            prompt: prompt.clone(),
            max_tokens: args.max_tokens,
            arrival: i * args.arrive_every,
            n: args.n,
            sampling: sampling(&args),
            seed: args.seed.wrapping_add(1000 * i as u64),
            stop: if args.ignore_eos {
                vec![]
            } else {
                vec![codec.eos]
            },
        })?;
    }
    println!(
        "{} request(s) over {num_blocks} pages of {} tokens ({:?} pages, backend {:?}), token budget {}",
        prompts.len(),
        args.page_size,
        kv_dtype,
        args.backend,
        args.token_budget
    );

    // Stream the text of a lone request; with several, print each as it finishes.
    let streaming = prompts.len() == 1 && args.n == 1;
    let mut shown = 0;
    let start = Instant::now();
    engine.run(|e, (i, _token)| {
        let r = &e.requests[i];
        if streaming {
            if let Ok(text) = codec.decode(&r.generated) {
                if text.len() > shown && text.is_char_boundary(shown) {
                    print!("{}", &text[shown..]);
                    shown = text.len();
                    let _ = std::io::stdout().flush();
                }
            }
        } else if r.finished() {
            let text = codec.decode(&r.generated).unwrap_or_default();
            println!("[{}] {}", r.name, text.trim_end());
        }
    })?;
    let wall = start.elapsed().as_secs_f64();
    if streaming {
        println!();
    }
    let s = &engine.stats;
    println!(
        "{} tokens generated, {} computed in {} steps in {wall:.2} s: {:.1} generated tokens/s, \
         {:.1} computed tokens/s ({} mixed prefill+decode steps, {} partial prompt chunks, {} forks, {} preemptions)",
        s.generated_tokens,
        s.computed_tokens,
        s.steps,
        s.generated_tokens as f64 / wall,
        s.computed_tokens as f64 / wall,
        s.mixed_steps,
        s.partial_chunks,
        s.forks,
        s.preemptions
    );
    // The seed's point on a real model: paged GQA pages against a contiguous multi-head cache.
    let mha_per_token =
        2 * c.num_layers * c.n_heads * c.head_dim * config.page_dtype().size_bytes();
    let paged = s.peak_blocks as u64 * config.bytes_per_block();
    println!(
        "KV memory: at most {} pages held = {:.1} KiB of paged GQA cache ({} B/token); a contiguous \
         multi-head cache of the same {} tokens: {:.1} KiB ({} B/token)",
        s.peak_blocks,
        paged as f64 / 1024.0,
        config.bytes_per_token(),
        s.peak_tokens,
        (s.peak_tokens * mha_per_token) as f64 / 1024.0,
        mha_per_token
    );
    let stats = engine.kv.prefix_stats();
    println!(
        "prefix cache: {} of {} prompt tokens found cached",
        stats.hit_tokens, stats.prompt_tokens
    );
    if let Some(path) = &args.json {
        let requests: Vec<serde_json::Value> = engine
            .requests
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "prompt": r.prompt,
                    "generated": r.generated,
                    "text": codec.decode(&r.generated).unwrap_or_default(),
                })
            })
            .collect();
        let json = serde_json::to_string_pretty(&requests).map_err(Error::wrap)?;
        std::fs::write(path, json)
            .map_err(|e| Error::msg(format!("--json {}: {e}", path.display())))?;
    }
    Ok(())
}

/// The fixed text of the fp8 table (and the calibration prefix of `--kv-dtype fp8-*`).
const EVAL_TEXT: &str = include_str!("eval-text.txt");
/// fp8 scales come from the K/V amax of the fixed text's first tokens (the calibration prefix).
const CALIBRATION_TOKENS: usize = 128;

/// The page dtypes' table: teacher-forced over the fixed text (every page dtype on host pages,
/// queries and outputs f32, so that only the stored K/V differ), fp8 scales from the K/V amax
/// of its first [`CALIBRATION_TOKENS`] tokens.
fn perplexity_table(model: &Llama, codec: &TextCodec, page_size: usize) -> Result<()> {
    let tokens = codec.encode(EVAL_TEXT)?;
    let amax = engine::eval::calibrate(model, &tokens[..CALIBRATION_TOKENS], page_size)?;
    let blocks = tokens.len().div_ceil(page_size);
    let shape = engine::eval::gqa_shape(model)?;
    let layers = model.config.num_layers;
    let run = |dtype: KvDtype| -> Result<candle_core::Tensor> {
        let scales = match dtype {
            KvDtype::Fp8E4M3 => Some(kv::scales_from_amax(Fp8Format::E4M3, &amax)?),
            KvDtype::Fp8E5M2 => Some(kv::scales_from_amax(Fp8Format::E5M2, &amax)?),
            _ => None,
        };
        let mut cache = kv::host_pages(dtype, shape, layers, page_size, blocks, scales.as_deref())?;
        engine::eval::teacher_forced(model, cache.as_mut(), &tokens, 128)
    };
    println!(
        "teacher-forced over {} tokens in chunks of 128, host pages of {page_size} tokens; fp8 \
         scales per (layer, K/V head) from the K/V amax of the first {CALIBRATION_TOKENS} tokens",
        tokens.len()
    );
    let base = run(KvDtype::BF16)?;
    println!("| pages | perplexity | top-1 agreement with bf16 | mean KL(bf16 ‖ pages), nats |");
    println!("|---|---|---|---|");
    for (name, dtype) in [
        ("f32", KvDtype::F32),
        ("bf16", KvDtype::BF16),
        ("fp8 e4m3", KvDtype::Fp8E4M3),
        ("fp8 e5m2", KvDtype::Fp8E5M2),
    ] {
        let logp = if dtype == KvDtype::BF16 {
            base.clone()
        } else {
            run(dtype)?
        };
        let f = engine::eval::figures(&logp, &base, &tokens)?;
        println!(
            "| {name} | {:.4} | {:.2}% | {:.2e} |",
            f.perplexity,
            100.0 * f.top1_agreement,
            f.mean_kl
        );
    }
    Ok(())
}
