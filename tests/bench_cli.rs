//! `paged-gqa bench` on the CPU: a small sweep prints the table and writes the JSON records
//! and the SVG plot; bad options are errors with exit code 2.
#![cfg(feature = "cli")]

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_paged-gqa"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap()
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("paged-gqa-bench-{}-{name}", std::process::id()))
}

#[test]
fn a_cpu_sweep_prints_the_table_and_writes_json_and_svg() {
    let (json, svg) = (temp("records.json"), temp("plot.svg"));
    let output = bench(&[
        "--backend",
        "cpu",
        "--model",
        "Qwen2.5-0.5B",
        "--batch",
        "1,2",
        "--context",
        "64,300",
        "--iters",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("speedup") && stdout.contains("Qwen2.5-0.5B"),
        "{stdout}"
    );

    let records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 4, "2 batches x 2 contexts");
    for r in records {
        for field in [
            "model",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "batch",
            "context",
            "page_size",
            "dtype",
            "kernels",
            "backend",
            "fused_ms",
            "baseline_ms",
            "speedup",
            "kv_bytes",
            "bandwidth_gbs",
            "bandwidth_frac",
        ] {
            assert!(r.get(field).is_some(), "record lacks {field}: {r}");
        }
        assert_eq!(r["backend"], "cpu");
        assert_eq!(r["kernels"], "auto");
        assert!(r["fused_ms"].as_f64().unwrap() > 0.0);
        // 14 query heads over 2 K/V heads of 64, bf16: K and V bytes of the batch.
        let expected =
            2 * r["batch"].as_u64().unwrap() * r["context"].as_u64().unwrap() * 2 * 64 * 2;
        assert_eq!(r["kv_bytes"].as_u64().unwrap(), expected);
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(
        plot.starts_with("<svg") && plot.contains("Qwen2.5-0.5B b2 fused"),
        "not the expected SVG"
    );
    let _ = (std::fs::remove_file(json), std::fs::remove_file(svg));
}

#[test]
fn a_cpu_prefill_sweep_reports_tflops() {
    let json = temp("prefill.json");
    let output = bench(&[
        "--backend",
        "cpu",
        "--mode",
        "prefill",
        "--model",
        "Qwen2.5-0.5B",
        "--batch",
        "1",
        "--context",
        "40,100",
        "--iters",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for r in records.as_array().unwrap() {
        assert_eq!(r["mode"], "prefill");
        // The causal region of an n-token prompt: n (n + 1) / 2 pairs, 4 * head_dim * n_heads each.
        let n = r["context"].as_f64().unwrap();
        assert_eq!(
            r["flops"].as_f64().unwrap(),
            4.0 * 64.0 * 14.0 * n * (n + 1.0) / 2.0
        );
        assert!(r["tflops"].as_f64().unwrap() > 0.0);
    }
    let _ = std::fs::remove_file(json);
}

#[test]
fn bad_bench_options_are_errors() {
    for (args, needle) in [
        (
            &["--backend", "cpu", "--page-size", "3"][..],
            "--page-size 3",
        ),
        (
            &["--backend", "cpu", "--model", "GPT-5"][..],
            "unknown model `GPT-5`",
        ),
        (
            &["--backend", "cpu", "--batch", "0"][..],
            "must be positive",
        ),
        (
            &["--backend", "cpu", "--kernels", "tensor-cores"][..],
            "--kernels tensor-cores picks GPU kernels",
        ),
    ] {
        let output = bench(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
