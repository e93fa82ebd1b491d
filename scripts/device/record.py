#!/usr/bin/env python3
"""Usage (run.sh calls it): python3 record.py --staged DIR --out OUTDIR --steps STEPS.tsv
                                  --gpu-csv FILE --start EPOCH [--sanitizer PATH]

The parser of the GPU check that scripts/device-check stages as .device-check/record.py (source:
scripts/device/record.py). Reads the steps run.sh ran (STEPS.tsv: kind, name, log, exit status
or "skipped"/"absent", seconds) and their logs in OUTDIR, then writes

  OUTDIR/device-check.log  every step's log, concatenated, and the summary;
  OUTDIR/record.json       commit, kernels_sha256, date, gpu, driver, passed, failed, tests
                           (name -> "pass"/"fail"), sanitizer (tool -> errors, -1 when not
                           checked), figures, logs, and the details behind them;

packs the step logs into OUTDIR/logs.tar.gz when OUTDIR would otherwise hold more than the 8
files the device tool brings back, prints the summary, and exits 1 when a test failed or a
sanitizer found an error, else 0. record.json is written even when parsing breaks.
"""

import argparse
import datetime
import json
import os
import platform
import re
import tarfile
import traceback

MAX_FILES = 8  # files the device tool brings back from $OUT
SANITIZER_TOOLS = ("memcheck", "racecheck")

TEST_RESULT = re.compile(r"^test (\S+) \.\.\. (ok|FAILED|ignored)\b")
TEST_STARTED = re.compile(r"^test (\S+) \.\.\. ?(.*)$")
BARE_RESULT = re.compile(r"^(ok|FAILED|ignored)\b")
WORD = {"ok": "pass", "FAILED": "fail", "ignored": "ignored"}
ERROR_SUMMARY = re.compile(r"=+ ERROR SUMMARY: (\d+) errors?")
RACECHECK_SUMMARY = re.compile(r"=+ RACECHECK SUMMARY: .*?\((\d+) errors?")
UNSUPPORTED = re.compile(r"device not supported|device is not supported|not supported on this (device|platform)", re.I)


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def parse_libtest(text):
    """libtest's per-test lines -> ([(test, "pass"|"fail"|"ignored")], [tests started, never finished]).
    A result may land on a later line when other output (a sanitizer's, an unbuffered eprint)
    interleaves with `test NAME ... `."""
    results, pending = [], None
    for line in text.splitlines():
        match = TEST_RESULT.match(line)
        if match:
            results.append((match[1], WORD[match[2]]))
            pending = None
            continue
        match = TEST_STARTED.match(line)
        if match:
            pending = match[1]
            continue
        match = BARE_RESULT.match(line)
        if match and pending:
            results.append((pending, WORD[match[1]]))
            pending = None
    return results, [pending] if pending else []


def parse_sanitizer(text):
    """-> (errors or None when no summary line, whether the device was refused)."""
    counts = [int(n) for n in ERROR_SUMMARY.findall(text)]
    if not counts:
        counts = [int(n) for n in RACECHECK_SUMMARY.findall(text)]
    return (sum(counts) if counts else None), bool(UNSUPPORTED.search(text))


def utc(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build(args, record, notes):
    out = args.out
    steps = []
    for line in read(args.steps).splitlines():
        kind, name, log, status, seconds = (line.split("\t") + [""] * 5)[:5]
        steps.append({"kind": kind, "name": name, "log": log, "status": status, "seconds": seconds})

    # The GPU.
    lines = [l.strip() for l in read(args.gpu_csv).splitlines() if l.strip()]
    if lines and "," in lines[0] and "failed" not in lines[0].lower():
        gpu, driver = (part.strip() for part in lines[0].rsplit(",", 1))
        record["gpu"], record["driver"] = gpu, driver
        if len(lines) > 1:
            record["gpus_queried"] = lines
    else:
        notes.append("no GPU name or driver version: " + (" ".join(lines) or "nvidia-smi not found or gave nothing"))
    record["gpus"] = [l for l in read(os.path.join(out, "nvidia-smi.log")).splitlines() if l.startswith("GPU ")]

    # The GPU test binaries.
    entries = []  # (binary, test, result)
    binaries = {}
    for s in (s for s in steps if s["kind"] == "test"):
        binary, text = s["name"], read(os.path.join(out, s["log"]))
        results, unfinished = parse_libtest(text)
        info = {"exit": s["status"], "seconds": s["seconds"], "log": s["log"], "tests": len(results)}
        for test in unfinished:
            results.append((test, "fail"))
            notes.append(f"{binary}: {test} started but never finished (crash or timeout)")
        failed_here = any(r == "fail" for _, r in results)
        if s["status"] == "skipped":
            notes.append(f"{binary}: not run, the time budget was spent")
            results.append((binary, "fail"))
        elif s["status"] != "0":
            if s["status"] in ("124", "137"):
                notes.append(f"{binary}: timed out (exit status {s['status']})")
            if not failed_here:
                notes.append(f"{binary}: exit status {s['status']} without a failed test line; counted as the failure `{binary}`")
                results.append((binary, "fail"))
        elif not results:
            notes.append(f"{binary}: exit status 0 but no test ran")
        for line in text.splitlines():
            if line.startswith("SKIPPED "):
                notes.append(f"{binary}: {line}")
        info["passed"] = sum(r == "pass" for _, r in results)
        info["failed"] = sum(r == "fail" for _, r in results)
        binaries[binary] = info
        entries += [(binary, test, result) for test, result in results]
    record["binaries"] = binaries

    # The CLI demo: its exit status, and whether the fused decode ran on the GPU.
    demo = next((s for s in steps if s["kind"] == "demo"), None)
    if demo is not None:
        text = read(os.path.join(out, demo["log"]))
        ran_on = next((l.split(":", 1)[1].strip() for l in text.splitlines() if "fused decode ran on:" in l), None)
        agreement = [l.strip() for l in text.splitlines() if "max |diff|" in l or l.strip().startswith("agree")]
        record["demo"] = {"exit": demo["status"], "decode_ran_on": ran_on, "agreement": agreement, "log": demo["log"]}
        entries.append(("paged-gqa", "cli_demo", "pass" if demo["status"] == "0" else "fail"))
        used_gpu = bool(ran_on and ran_on.startswith("GPU"))
        entries.append(("paged-gqa", "cli_demo_used_gpu", "pass" if used_gpu else "fail"))
        if not used_gpu:
            notes.append(f"cli_demo: the decode did not run on the GPU ({ran_on or 'no such line'})")

    # The benchmark sweep: it must finish and write its records.
    for bench in (s for s in steps if s["kind"] == "bench"):
        records = {"bench": "bench.json", "bench_kernels": "bench-kernels.json"}.get(bench["name"], "bench-prefill.json")
        wrote = os.path.exists(os.path.join(out, records))
        entries.append(("paged-gqa", f"{bench['name']}_sweep", "pass" if bench["status"] == "0" and wrote else "fail"))

    # name -> result; a name two binaries share is qualified as binary::name.
    count = {}
    for _, test, _ in entries:
        count[test] = count.get(test, 0) + 1
    tests, ignored = {}, []
    for binary, test, result in entries:
        key = test if count[test] == 1 else f"{binary}::{test}"
        if result == "ignored":
            ignored.append(key)
        elif tests.get(key) != "fail":
            tests[key] = result
    record["tests"] = tests
    record["ignored"] = ignored
    record["passed"] = sum(r == "pass" for r in tests.values())
    record["failed"] = sum(r == "fail" for r in tests.values())

    # compute-sanitizer: tool -> total errors; -1 when it could not check.
    record["sanitizer_path"] = args.sanitizer or None
    totals, runs = {}, []
    for tool in SANITIZER_TOOLS:
        mine = [s for s in steps if s["kind"] == f"sanitizer-{tool}"]
        if not mine or any(s["status"] == "absent" for s in mine):
            totals[tool] = -1
            why = "compute-sanitizer not found" if mine else "no GPU test binary to run it on"
            notes.append(f"{tool}: {why}; recorded as -1 (not checked)")
            continue
        total, checked = 0, 0
        for s in mine:
            text = read(os.path.join(out, s["log"]))
            errors, refused = parse_sanitizer(text)
            run = {"tool": tool, "binary": s["name"], "exit": s["status"], "errors": errors, "log": s["log"]}
            if s["status"] == "skipped":
                run["status"] = "skipped"
                total += 1
                notes.append(f"{tool} {s['name']}: not run, the time budget was spent; counted as 1 error")
            elif refused:
                run["status"] = "device not supported"
                notes.append(f"{tool} {s['name']}: compute-sanitizer refused the device; not checked")
            elif errors is None:
                run["status"] = "no summary"
                total += 1
                notes.append(f"{tool} {s['name']}: no ERROR SUMMARY line (exit status {s['status']}); counted as 1 error")
            else:
                run["status"] = "checked"
                checked += 1
                total += errors
                if errors == 0 and s["status"] != "0":
                    notes.append(f"{tool} {s['name']}: no sanitizer error, but exit status {s['status']} (tests failed under the tool?)")
            runs.append(run)
        refused_all = all(r.get("status") == "device not supported" for r in runs if r["tool"] == tool)
        totals[tool] = -1 if refused_all and total == 0 and checked == 0 else total
    record["sanitizer"] = totals
    record["sanitizer_runs"] = runs

    # Logs: one concatenated file, and the step logs (packed if OUTDIR would hold too many files).
    step_logs = []
    for s in steps:
        if s["log"] and s["log"] not in step_logs and os.path.isfile(os.path.join(out, s["log"])):
            step_logs.append(s["log"])
    record["step_logs"] = step_logs
    return step_logs


def summary(record, notes):
    lines = [
        f"device-check: commit {record.get('commit')}, kernels {str(record.get('kernels_sha256'))[:16]}..., "
        f"{record.get('date')}",
        f"device-check: GPU {record.get('gpu')}, driver {record.get('driver')}",
        f"device-check: {record.get('passed', 0)} passed, {record.get('failed', 0)} failed"
        + (f", {len(record['ignored'])} ignored" if record.get("ignored") else ""),
    ]
    for name, result in sorted(record.get("tests", {}).items()):
        lines.append(f"  {result:4}  {name}")
    lines.append("device-check: sanitizer errors: " + ", ".join(f"{k} {v}" for k, v in record.get("sanitizer", {}).items()))
    for note in notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--staged", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", required=True)
    parser.add_argument("--gpu-csv", required=True)
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--sanitizer", default="")
    args = parser.parse_args()
    out = args.out

    notes = []
    record = {"commit": None, "kernels_sha256": None, "date": utc(args.start), "gpu": None, "driver": None,
              "passed": 0, "failed": 0, "tests": {}, "sanitizer": {}, "figures": [], "logs": []}
    try:
        source = json.loads(read(os.path.join(args.staged, "source.json")) or "{}")
        if not source:
            notes.append("source.json missing from the staged folder")
        record["commit"] = source.get("commit")
        record["dirty"] = source.get("dirty")
        record["kernels_sha256"] = source.get("kernels_sha256")
        record["build"] = {k: source[k] for k in ("built_at", "rustc", "nvcc", "cuda_archs", "dirty_files",
                                                    "source_changed_during_build", "kernels_sha256_scheme")
                           if k in source}
    except (OSError, ValueError) as e:
        notes.append(f"source.json unreadable: {e}")
    record["host"] = {"node": platform.node(), "kernel": platform.release()}
    # The benchmark sweeps' records (paged-gqa bench --json: decode, prefill, the three paths).
    for name in ("bench.json", "bench-prefill.json", "bench-kernels.json"):
        try:
            bench = read(os.path.join(out, name))
            if bench:
                record["figures"] += json.loads(bench)
        except ValueError as e:
            notes.append(f"{name} unreadable: {e}")

    step_logs = []
    try:
        step_logs = build(args, record, notes)
    except Exception:
        notes.append("record.py broke while parsing:\n" + traceback.format_exc())
        record["failed"] = record.get("failed", 0) + 1
        record.setdefault("tests", {})["record_py"] = "fail"

    sanitizer_errors = sum(v for v in record.get("sanitizer", {}).values() if v > 0)
    status = 1 if record["failed"] or sanitizer_errors else 0
    record["exit_status"] = status
    record["duration_s"] = int(datetime.datetime.now().timestamp()) - args.start
    record["notes"] = notes
    text = summary(record, notes)

    try:
        with open(os.path.join(out, "device-check.log"), "w") as log:
            for name in step_logs:
                log.write(f"\n===== {name} =====\n")
                log.write(read(os.path.join(out, name)))
            log.write("\n===== summary =====\n" + text)
        logs = ["device-check.log"]
        existing = {os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files}
        if len(existing | {"device-check.log", "record.json"}) > MAX_FILES and step_logs:
            with tarfile.open(os.path.join(out, "logs.tar.gz"), "w:gz") as tar:
                for name in step_logs:
                    tar.add(os.path.join(out, name), arcname=name)
            for name in step_logs:
                os.remove(os.path.join(out, name))
            logs.append("logs.tar.gz")
            existing = {os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files}
            if len(existing | {"record.json"}) > MAX_FILES:
                notes.append(f"{out} holds more than {MAX_FILES} files; some will not come back")
        else:
            logs += step_logs
        record["logs"] = logs
    except OSError as e:
        notes.append(f"writing the logs failed: {e}")

    with open(os.path.join(out, "record.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(text, end="")
    print(f"device-check: wrote {os.path.join(out, 'record.json')}; exit status {status}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
