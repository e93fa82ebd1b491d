//! `paged-gqa bench` on the CPU: a small sweep prints the table and writes the JSON records
//! and the SVG plot; bad options are errors with exit code 2.
#![cfg(feature = "cli")]

use std::process::Command;

/// `paged-gqa COMMAND ARGS`.
fn paged_gqa(command: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_paged-gqa"))
        .arg(command)
        .args(args)
        .output()
        .unwrap()
}

fn bench(args: &[&str]) -> std::process::Output {
    paged_gqa("bench", args)
}

fn profile(args: &[&str]) -> std::process::Output {
    paged_gqa("profile", args)
}

/// `paged-gqa bench ARGS`, which must succeed: its stdout.
fn bench_ok(args: &[&str]) -> String {
    succeeded(bench(args))
}

/// `paged-gqa profile ARGS`, which must succeed: its stdout.
fn profile_ok(args: &[&str]) -> String {
    succeeded(profile(args))
}

/// The stdout of a run that must have succeeded (else its stdout and stderr are the failure).
fn succeeded(output: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The JSON a run wrote to `path`.
fn read_json(path: impl AsRef<std::path::Path>) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("paged-gqa-bench-{}-{name}", std::process::id()))
}

/// `run(ARGS --json FILE)` (`bench_ok` or `profile_ok`), FILE `name` in the temp dir: the run's
/// stdout and the JSON it wrote (the file then removed).
fn with_json(run: fn(&[&str]) -> String, name: &str, args: &[&str]) -> (String, serde_json::Value) {
    let json = temp(name);
    let stdout = run(&[args, &["--json", json.to_str().unwrap()]].concat());
    let value = read_json(&json);
    let _ = std::fs::remove_file(json);
    (stdout, value)
}

#[test]
fn a_cpu_sweep_prints_the_table_and_writes_json_and_svg() {
    let svg = temp("plot.svg");
    let (stdout, records) = with_json(
        bench_ok,
        "records.json",
        &[
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
            "--svg",
            svg.to_str().unwrap(),
        ],
    );
    assert!(
        stdout.contains("speedup") && stdout.contains("Qwen2.5-0.5B"),
        "{stdout}"
    );

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
    let _ = std::fs::remove_file(svg);
}

#[test]
fn a_cpu_prefill_sweep_reports_tflops() {
    let (_, records) = with_json(
        bench_ok,
        "prefill.json",
        &[
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
        ],
    );
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

/// On the emulator the table says its times are emulation, and the traffic counter shows each
/// visible K/V byte fetched exactly once per group (Llama-3-8B, Qwen2-7B: decode on the narrow
/// tensor-core layout; Falcon-7B's 71 heads: one wide block of 5 warps; a prompt on the wide
/// layout; gpt-oss-20b's sliding layer, only its window).
#[test]
fn sim_sweep_counts_kv_traffic_and_labels_times_as_emulation() {
    let run = |args: &[&str]| {
        let (stdout, records) = with_json(bench_ok, "sim-records.json", args);
        assert!(
            stdout.contains("emulated ms") && stdout.contains("EMULATION"),
            "{stdout}"
        );
        records.as_array().unwrap().clone()
    };
    let ratio = |r: &serde_json::Value| {
        r["kv_bytes_fetched"].as_u64().unwrap() as f64
            / r["kv_bytes_needed"].as_u64().unwrap() as f64
    };
    let decode = run(&[
        "--backend",
        "sim",
        "--model",
        "Llama-3-8B",
        "--model",
        "Qwen2-7B",
        "--model",
        "Falcon-7B",
        "--model",
        "gpt-oss-20b",
        "--batch",
        "2",
        "--context",
        "300",
    ]);
    assert_eq!(decode.len(), 4);
    // gpt-oss-20b's layer 0 slides over 128 keys: that is all it needs and all it fetches.
    let gpt_oss = decode.iter().find(|r| r["model"] == "gpt-oss-20b").unwrap();
    assert_eq!(gpt_oss["variant"], "window 128, sinks");
    assert_eq!(gpt_oss["kv_bytes_needed"], 2 * 128 * 2 * 8 * 64 * 2);
    for r in &decode {
        assert_eq!(r["backend"], "sim");
        assert!(r["timing"].as_str().unwrap().contains("EMULATION"), "{r}");
        assert_eq!(ratio(r), 1.0, "{}: fetched/needed", r["model"]);
    }
    let prefill = run(&[
        "--backend",
        "sim",
        "--mode",
        "prefill",
        "--model",
        "Llama-3-8B",
        "--batch",
        "1",
        "--context",
        "256",
    ]);
    // 256 rows x group 4 in blocks of 64 rows (16 query rows): 16 blocks per K/V head, block b
    // reading exactly the keys up to its last row's causal limit, 16 (b + 1) (tiles above the
    // diagonal are never loaded).
    let r = &prefill[0];
    let fetched = r["kv_bytes_fetched"].as_u64().unwrap();
    let needed = r["kv_bytes_needed"].as_u64().unwrap();
    let per_block_keys: u64 = (1..=16u64).map(|b| 16 * b).sum();
    assert_eq!(
        fetched,
        needed * per_block_keys / 256,
        "prefill fetched {fetched}, needed {needed}"
    );
}

/// `--kv-dtype fp8-e4m3|fp8-e5m2` on the emulator: the table and the records carry the page
/// dtype and its bytes, and every kernel fetches exactly half the K/V bytes of bf16 pages on
/// the same shapes (Llama-3-8B and Qwen2-7B decode on CUDA cores, a prefill on tensor cores).
#[test]
fn sim_sweep_with_fp8_pages_fetches_half_the_bytes_of_bf16() {
    let run = |kv_dtype: &str, mode: &str| {
        let json = format!("fp8-{mode}.json");
        let (stdout, records) = with_json(
            bench_ok,
            &json,
            &[
                "--backend",
                "sim",
                "--mode",
                mode,
                "--model",
                "Llama-3-8B",
                "--model",
                "Qwen2-7B",
                "--batch",
                "2",
                "--context",
                "200",
                "--kv-dtype",
                kv_dtype,
            ],
        );
        assert!(stdout.contains("KV dtype"), "{stdout}");
        (stdout, records.as_array().unwrap().clone())
    };
    for mode in ["decode", "prefill"] {
        let (_, bf16) = run("auto", mode);
        for kv_dtype in ["fp8-e4m3", "fp8-e5m2"] {
            let (stdout, fp8) = run(kv_dtype, mode);
            assert!(stdout.contains(kv_dtype), "{stdout}");
            assert_eq!(fp8.len(), bf16.len());
            for (f, b) in fp8.iter().zip(&bf16) {
                assert_eq!(f["model"], b["model"]);
                assert_eq!(
                    (&f["dtype"], &f["kv_dtype"]),
                    (&b["dtype"], &kv_dtype.into())
                );
                assert_eq!(b["kv_dtype"], "bf16");
                assert_eq!(
                    f["kv_bytes_per_token"].as_u64().unwrap() * 2,
                    b["kv_bytes_per_token"].as_u64().unwrap()
                );
                assert_eq!(
                    2 * f["kv_bytes_needed"].as_u64().unwrap(),
                    b["kv_bytes_needed"].as_u64().unwrap()
                );
                let (ff, bf) = (
                    f["kv_bytes_fetched"].as_u64().unwrap(),
                    b["kv_bytes_fetched"].as_u64().unwrap(),
                );
                assert_eq!(
                    2 * ff,
                    bf,
                    "{mode} {kv_dtype} {}: fetched {ff} against {bf}",
                    f["model"]
                );
                // The naive path has no fp8 pages on the emulator.
                assert!(f["baseline_ms"].is_null(), "{f}");
            }
        }
    }
}

/// The CPU fallback over fp8 pages, fused and naive (its scales repeated with the heads).
#[test]
fn cpu_sweep_with_fp8_pages_reports_the_page_dtype() {
    let (stdout, records) = with_json(
        bench_ok,
        "cpu-fp8.json",
        &[
            "--backend",
            "cpu",
            "--model",
            "Qwen2.5-0.5B",
            "--batch",
            "1",
            "--context",
            "100",
            "--iters",
            "1",
            "--kv-dtype",
            "fp8-e5m2",
        ],
    );
    assert!(stdout.contains("fp8-e5m2"), "{stdout}");
    let r = &records[0];
    assert_eq!(r["kv_dtype"], "fp8-e5m2");
    // 2 K/V heads of 64, 1 byte each, K and V.
    assert_eq!(r["kv_bytes_per_token"], 2 * 2 * 64);
    assert_eq!(r["kv_bytes"], 100 * 2 * 2 * 64);
    assert!(r["baseline_ms"].as_f64().unwrap() > 0.0);
    let bad = bench(&["--backend", "cpu", "--kv-dtype", "fp8"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("fp8-e4m3"));
}

#[test]
fn sim_profile_reports_each_launch_labelled_as_emulator_counts() {
    let (stdout, v) = with_json(
        profile_ok,
        "profile.json",
        &[
            "--model",
            "Qwen2.5-0.5B",
            "--batch",
            "2",
            "--context",
            "300",
            "--kernels",
            "cuda-cores",
        ],
    );
    for needle in [
        "EMULATOR COUNTS",
        "MODEL PREDICTIONS",
        "cuda_core_attend_kernel<__nv_bfloat16, __nv_bfloat16, 64>",
        "occupancy (theoretical, sm_90)",
        "wavefronts / ideal",
        "MODEL H100 SXM",
        "MODEL H200",
        "attend_cuda_cores.cuh:",
    ] {
        assert!(stdout.contains(needle), "missing {needle}: {stdout}");
    }
    let launches = v["launches"].as_array().unwrap();
    let attend = launches
        .iter()
        .find(|l| {
            l["headline"]["kernel"]
                .as_str()
                .unwrap()
                .starts_with("cuda_core_attend_kernel")
        })
        .expect("a cuda_core_attend_kernel launch");
    let h = &attend["headline"];
    // Every K/V byte of the batch once, in whole sectors: 2 sequences x 300 keys x 2 heads x
    // 64 x 2 bytes, K and V.
    let needed = 2 * 300 * 2 * 64 * 2 * 2;
    assert_eq!(h["kv_bytes_fetched"].as_u64().unwrap(), needed);
    assert_eq!(h["kv_sector_bytes"].as_u64().unwrap(), needed);
    assert!(
        h["shared"]["wavefronts"].as_u64().unwrap()
            >= h["shared"]["ideal_wavefronts"].as_u64().unwrap()
    );
    assert_eq!(h["predictions"].as_array().unwrap().len(), 2);
    assert!(!attend["source_lines"].as_array().unwrap().is_empty());
    assert!(!attend["profile"]["phases"].as_array().unwrap().is_empty());
}

#[test]
fn sim_bench_profile_adds_headlines_to_records_and_the_table() {
    let (stdout, records) = with_json(
        bench_ok,
        "bench-profile.json",
        &[
            "--backend",
            "sim",
            "--profile",
            "--model",
            "Qwen2.5-0.5B",
            "--batch",
            "1",
            "--context",
            "200",
        ],
    );
    assert!(stdout.contains("profile (EMULATOR COUNTS"), "{stdout}");
    let first = &records.as_array().unwrap()[0];
    let headlines = first["profile"].as_array().expect("profile headlines");
    // Qwen2.5-0.5B decodes 7 rows per K/V head: the narrow tensor-core layout (4 warps).
    assert!(headlines.iter().any(|h| {
        let kernel = h["kernel"].as_str().unwrap();
        kernel.starts_with("tensor_core_attend_kernel") && kernel.ends_with(", 4>")
    }));
    // --profile needs the emulator.
    let refused = bench(&["--backend", "cpu", "--profile"]);
    assert_eq!(refused.status.code(), Some(2));
}
