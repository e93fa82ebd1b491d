//! Benchmark records: the table, JSON, and the SVG plot.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use super::Case;
use crate::Failure;

/// (fused, naive whole path, naive attention alone), milliseconds per step.
pub type Times = (f64, Option<f64>, Option<f64>);

/// One measured point of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub model: String,
    /// The attention variants of the model's layer 0 that ran ("plain causal", "window 128,
    /// sinks", ...): the fused and the naive path run the same.
    pub variant: String,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub batch: usize,
    pub context: usize,
    pub page_size: usize,
    /// The compute dtype (q, out).
    pub dtype: String,
    /// The K/V pages' element type: the compute dtype, "fp8-e4m3" or "fp8-e5m2".
    pub kv_dtype: String,
    /// Bytes one token's K and V take in one layer's pages (`2 * n_kv_heads * head_dim *`
    /// the page dtype's size).
    pub kv_bytes_per_token: u64,
    /// "decode" (one new token per sequence) or "prefill" (whole causal prompts).
    pub mode: String,
    /// The fused path's kernel choice (`--kernels`): "auto", "cuda-cores" or "tensor-cores".
    pub kernels: String,
    pub backend: String,
    pub device: String,
    /// The fused attention, milliseconds per step (one layer).
    pub fused_ms: f64,
    /// The naive path whole: gather, repeat_kv, per-head attention (on the GPU, prefill's
    /// attention step is this crate's kernels with the MHA shape over the repeated K/V).
    pub baseline_ms: Option<f64>,
    /// The naive path's attention step alone (K/V already materialised).
    pub baseline_attention_ms: Option<f64>,
    /// baseline_ms / fused_ms
    pub speedup: Option<f64>,
    /// Attention FLOPs of the causal region computed (4 * head_dim * n_heads per visible pair).
    pub flops: f64,
    /// flops / fused time, in TFLOP/s.
    pub tflops: f64,
    /// K and V bytes the batch must read (in the page dtype).
    pub kv_bytes: u64,
    /// The same: each visible K/V byte of the batch once (named beside `kv_bytes_fetched`).
    pub kv_bytes_needed: u64,
    /// K/V bytes the fused kernels brought from the pages, counted by the kernel emulator
    /// (`--backend sim`); absent on other backends.
    pub kv_bytes_fetched: Option<u64>,
    /// kv_bytes / fused time.
    pub bandwidth_gbs: f64,
    /// bandwidth_gbs / copy_bandwidth_gbs.
    pub bandwidth_frac: f64,
    /// Copy bandwidth measured in the same run (bytes read + written per second).
    pub copy_bandwidth_gbs: f64,
    pub timing: String,
    pub crate_version: String,
    /// `--profile` on the emulator: each launch's headline figures (emulator counts and model
    /// predictions, not measurements).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<crate::profile::Headline>>,
}

impl Record {
    pub fn new(
        case: &Case,
        backend: &str,
        device: &str,
        (fused_ms, baseline_ms, baseline_attention_ms): Times,
        copy_gbs: f64,
        timing: &str,
    ) -> Self {
        let bandwidth_gbs = case.kv_bytes() as f64 / (fused_ms * 1e-3) / 1e9;
        Self {
            model: case.model.to_string(),
            variant: case.variant.clone(),
            n_heads: case.shape.n_heads(),
            n_kv_heads: case.shape.n_kv_heads(),
            head_dim: case.shape.head_dim(),
            batch: case.batch,
            context: case.context,
            page_size: case.page_size,
            dtype: format!("{:?}", case.dtype).to_lowercase(),
            kv_dtype: super::kv_dtype_name(case.kv_dtype),
            kv_bytes_per_token: (2 * case.shape.kv_row_len() * case.kv_dtype.size_bytes()) as u64,
            mode: format!("{:?}", case.mode).to_lowercase(),
            kernels: case.kernels.name(),
            backend: backend.to_string(),
            device: device.to_string(),
            fused_ms,
            baseline_ms,
            baseline_attention_ms,
            speedup: baseline_ms.map(|b| b / fused_ms),
            flops: case.flops(),
            tflops: case.flops() / (fused_ms * 1e-3) / 1e12,
            kv_bytes: case.kv_bytes(),
            kv_bytes_needed: case.kv_bytes(),
            kv_bytes_fetched: None,
            bandwidth_gbs,
            bandwidth_frac: bandwidth_gbs / copy_gbs,
            copy_bandwidth_gbs: copy_gbs,
            timing: timing.to_string(),
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
            profile: None,
        }
    }
}

/// The emulator's table: traffic counted, times labelled as emulation.
fn print_traffic_table(records: &[Record]) {
    println!(
        "{:<13} {:>7} {:>5} {:>7} {:>4} {:>5} {:>8} {:>12} {:>12} {:>14} {:>15} {:>9}",
        "model",
        "mode",
        "batch",
        "context",
        "page",
        "dtype",
        "KV dtype",
        "emulated ms",
        "naive emul.",
        "KV needed MB",
        "KV fetched MB",
        "fetched/"
    );
    for r in records {
        let fetched = r.kv_bytes_fetched.unwrap_or(0);
        println!(
            "{:<13} {:>7} {:>5} {:>7} {:>4} {:>5} {:>8} {:>12.1} {:>12} {:>14.3} {:>15.3} {:>8.3}x",
            r.model,
            r.mode,
            r.batch,
            r.context,
            r.page_size,
            r.dtype,
            r.kv_dtype,
            r.fused_ms,
            ms(r.baseline_ms),
            r.kv_bytes_needed as f64 / 1e6,
            fetched as f64 / 1e6,
            fetched as f64 / r.kv_bytes_needed.max(1) as f64
        );
    }
    if let Some(r) = records.first() {
        println!(
            "device: {}; timing: {}; fetched = bytes cp.async brought from the K/V pages, \
             needed = each visible K/V byte of the batch once",
            r.device, r.timing
        );
    }
}

fn ms(x: Option<f64>) -> String {
    x.map_or("-".to_string(), |v| format!("{v:.3}"))
}

pub fn print_table(records: &[Record]) {
    if records
        .first()
        .is_some_and(|r| r.kv_bytes_fetched.is_some())
    {
        print_traffic_table(records);
    } else {
        print_time_table(records);
    }
    print_variants(records);
    print_profile_table(records);
}

/// `--profile`: each record's launches, their headline figures (emulator counts; the bound is a
/// model's prediction for an H100 SXM).
fn print_profile_table(records: &[Record]) {
    if !records.iter().any(|r| r.profile.is_some()) {
        return;
    }
    println!("profile (EMULATOR COUNTS; `H100 bound`: a MODEL's prediction, not a measurement):");
    println!(
        "{:<13} {:>5} {:>7} {:<34} {:>6} {:>10} {:>8} {:>7} {:>7} {:>11} {:>10}",
        "model",
        "batch",
        "context",
        "kernel",
        "occup.",
        "conflicts",
        "KV eff.",
        "lanes",
        "warps",
        "flight/SM",
        "H100 bound"
    );
    for r in records {
        for h in r.profile.iter().flatten() {
            let h100 = h.predictions.first();
            println!(
                "{:<13} {:>5} {:>7} {:<34} {:>5.0}% {:>10} {:>7.1}% {:>6.1}% {:>6.1}% {:>8.1} KiB {:>10}",
                r.model,
                r.batch,
                r.context,
                h.kernel,
                100.0 * h.occupancy.occupancy,
                h.bank_conflicts,
                100.0 * h.kv.sector_efficiency(),
                100.0 * h.lane_utilisation,
                100.0 * h.warp_utilisation,
                h100.map_or(0.0, |p| p.inflight_per_sm / 1024.0),
                h100.map_or("-".to_string(), |p| format!("{:?}", p.bound).to_lowercase())
            );
        }
    }
}

/// Which attention each model's rows ran (its layer 0: a sliding window, sinks, ...).
fn print_variants(records: &[Record]) {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for r in records {
        if !seen.iter().any(|(m, _)| *m == r.model) {
            seen.push((&r.model, &r.variant));
        }
    }
    let list: Vec<String> = seen.iter().map(|(m, v)| format!("{m}: {v}")).collect();
    if !list.is_empty() {
        println!(
            "attention (layer 0 of each model, fused and naive alike): {}",
            list.join("; ")
        );
    }
}

/// The GPU's and the CPU's table: times, speedup, bandwidth, TFLOP/s.
fn print_time_table(records: &[Record]) {
    println!(
        "{:<13} {:>7} {:>5} {:>7} {:>4} {:>5} {:>8} {:>11} {:>11} {:>11} {:>8} {:>9} {:>8} {:>8} {:>7}",
        "model",
        "mode",
        "batch",
        "context",
        "page",
        "dtype",
        "KV dtype",
        "fused ms",
        "naive ms",
        "naive attn",
        "speedup",
        "KV MB",
        "GB/s",
        "of copy",
        "TFLOP/s"
    );
    for r in records {
        println!(
            "{:<13} {:>7} {:>5} {:>7} {:>4} {:>5} {:>8} {:>11.3} {:>11} {:>11} {:>8} {:>9.1} {:>8.1} {:>7.1}% {:>7.3}",
            r.model,
            r.mode,
            r.batch,
            r.context,
            r.page_size,
            r.dtype,
            r.kv_dtype,
            r.fused_ms,
            ms(r.baseline_ms),
            ms(r.baseline_attention_ms),
            r.speedup.map_or("-".to_string(), |s| format!("{s:.2}x")),
            r.kv_bytes as f64 / 1e6,
            r.bandwidth_gbs,
            100.0 * r.bandwidth_frac,
            r.tflops
        );
    }
    if let Some(r) = records.first() {
        println!(
            "device: {}; copy bandwidth {:.1} GB/s (read + write); timing: {}",
            r.device, r.copy_bandwidth_gbs, r.timing
        );
    }
}

pub fn write_json(path: &Path, records: &[Record]) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(records)
        .map_err(|e| Failure::runtime(format!("JSON: {e}")))?;
    std::fs::write(path, text)
        .map_err(|e| Failure::runtime(format!("cannot write {}: {e}", path.display())))
}

/// Decode: achieved KV bandwidth against context length, with the copy bandwidth measured in
/// the same run. Prefill: TFLOP/s against prompt length. One line per (model, batch): fused
/// solid, naive dashed (its K/V bytes or FLOPs over its time) where there is one.
pub fn write_svg(path: &Path, records: &[Record]) -> Result<(), Failure> {
    let fail =
        |e: &dyn std::fmt::Display| Failure::runtime(format!("plot {}: {e}", path.display()));
    let prefill = records.first().is_some_and(|r| r.mode == "prefill");
    let metric = |r: &Record| if prefill { r.tflops } else { r.bandwidth_gbs };
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let max_ctx = records.iter().map(|r| r.context).max().unwrap_or(1) as f64;
    let min_ctx = records.iter().map(|r| r.context).min().unwrap_or(1) as f64;
    let top = records
        .iter()
        .map(|r| {
            if prefill {
                r.tflops
            } else {
                r.bandwidth_gbs.max(r.copy_bandwidth_gbs)
            }
        })
        .fold(f64::MIN_POSITIVE, f64::max);
    let title = records.first().map_or(String::new(), |r| {
        format!(
            "{} {}, {} ({})",
            r.mode,
            if prefill { "throughput" } else { "bandwidth" },
            r.device,
            r.dtype
        )
    });
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((min_ctx * 0.8..max_ctx * 1.25).log_scale(), 0.0..top * 1.1)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc(if prefill {
            "prompt length (tokens)"
        } else {
            "context length (keys)"
        })
        .y_desc(if prefill {
            "attention TFLOP/s (causal region)"
        } else {
            "KV bytes / time (GB/s)"
        })
        .draw()
        .map_err(|e| fail(&e))?;

    let mut series: Vec<(String, usize)> =
        records.iter().map(|r| (r.model.clone(), r.batch)).collect();
    series.sort();
    series.dedup();
    for (i, (model, batch)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut points: Vec<&Record> = records
            .iter()
            .filter(|r| &r.model == model && r.batch == *batch)
            .collect();
        points.sort_by_key(|r| r.context);
        let fused: Vec<(f64, f64)> = points
            .iter()
            .map(|r| (r.context as f64, metric(r)))
            .collect();
        let naive: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|r| {
                r.baseline_ms
                    .map(|b| (r.context as f64, metric(r) * r.fused_ms / b))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(fused, color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(format!("{model} b{batch} fused"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if !naive.is_empty() {
            chart
                .draw_series(DashedLineSeries::new(naive, 6, 4, color.stroke_width(1)))
                .map_err(|e| fail(&e))?
                .label(format!("{model} b{batch} naive repeat_kv"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
                });
        }
    }
    if let (Some(r), false) = (records.first(), prefill) {
        let copy = r.copy_bandwidth_gbs;
        chart
            .draw_series(LineSeries::new(
                vec![(min_ctx * 0.8, copy), (max_ctx * 1.25, copy)],
                BLACK.stroke_width(1),
            ))
            .map_err(|e| fail(&e))?
            .label("measured copy bandwidth")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}
