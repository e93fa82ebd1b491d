#!/usr/bin/env python3
"""Peers of the benchmark, run on the GPU machine by .device-check/run.sh after `paged-gqa
bench`: for every record of the given bench JSON files, the same shape (heads, head_dim,
batch, context, dtype) timed with

  - sdpa_gqa: torch scaled_dot_product_attention(q, k, v, enable_gqa=True) on contiguous K/V
    (a dense upper bound: no paging); causal for prefill records;
  - repeat_kv_sdpa: the Llama reference path, repeat_interleave of K and V to every query
    head, then SDPA; timed whole;
  - flashinfer_decode (decode records): FlashInfer's paged decode
    (BatchDecodeWithPagedKVCacheWrapper, CUDA-core kernel, NHD pages of the record's page
    size in shuffled order), when the staged flashinfer wheels import (run.sh installs them;
    the kernel is JIT-compiled on first use);
  - fa3_decode (decode records) and fa3_prefill (prefill records): FlashAttention-3 for Hopper,
    the prebuilt `_vllm_fa3_C.abi3.so` of vllm 0.26.0 (--fa3-lib; run.sh unpacks the staged
    copy), called through torch.ops with the argument list of vllm's flash_attn_varlen_func
    (no vllm import). Decode: one query row per sequence over the page table (the record's page
    size, pages shuffled), scheduler metadata computed once outside the timing as vLLM does.
    Prefill: varlen causal over contiguous K/V. Each is first checked against an fp32
    reference on the first and last sequence (sampled rows for prefill); the relative error
    goes into the figure, and a figure off by more than 5% becomes an error. FA3 runs in a
    separate process (this script with --fa3-only) so that a crash or a sticky CUDA error there
    cannot touch the other peers; a record it did not reach gets an error naming why.

For prefill records, each record also gets the bf16 matrix rate of this GPU measured in the
same run (an 8192^3 torch.matmul), so the kernel's TFLOP/s reads as a fraction of it.

Random data from torch (fresh each run; the shapes, not the values, are the binary's), CUDA
events, warm-up, inputs rotated over two sets when a set is smaller than 2x L2. Results go
into each record under "peers" (milliseconds, bandwidth or TFLOP/s, and the fused kernel's
speedup over each peer), or {"error": "..."} when a peer fails; a peer's failure never fails
the script. Every file is rewritten in place after each record.

    python3 torch_peers.py --records OUTDIR/bench.json [--records OUTDIR/bench-prefill.json] [--iters 10]
                           [--fa3-lib PATH/_vllm_fa3_C.abi3.so [--fa3-timeout 60]]
"""
import argparse
import json
import os
import subprocess
import sys

WARMUP = 3
FA3_SOURCE = "vllm==0.26.0 vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so (FlashAttention-3, sm90a)"
FA3_TOL = 0.05  # max |FA3 - reference| over max |reference|: beyond it the output is wrong, not rounded


def cuda_time_ms(torch, fn, sets, iters):
    """Mean milliseconds of fn(*set) over iters calls (sets rotated), after WARMUP calls; CUDA events."""
    for i in range(WARMUP):
        fn(*sets[i % len(sets)])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(*sets[i % len(sets)])
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def figure(r, ms, kv_bytes):
    prefill = r.get("mode") == "prefill"
    out = {"ms": ms, "fused_speedup": ms / r["fused_ms"]}
    if prefill:
        out["tflops"] = r["flops"] / (ms * 1e-3) / 1e12
    else:
        out["bandwidth_gbs"] = kv_bytes / (ms * 1e-3) / 1e9
    return out


def kv_bytes_of(r):
    return 2 * r["batch"] * r["n_kv_heads"] * r["context"] * r["head_dim"] * 2


def one_line(e):
    """An exception as one short line (CUDA errors span lines; the results page is a table)."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def save_records(path, records):
    """Atomic rewrite: a run killed mid-write leaves the previous file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)


# FlashAttention-3 (vllm 0.26.0's _vllm_fa3_C). The op's schema (torch 2.11.0, checked on CPU):
#   _vllm_fa3_C::fwd(Tensor q, Tensor k, Tensor v, Tensor? k_new, Tensor? v_new, Tensor? q_v,
#     Tensor? out, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? cu_seqlens_k_new,
#     Tensor? seqused_q, Tensor? seqused_k, int? max_seqlen_q, int? max_seqlen_k,
#     Tensor? page_table, Tensor? kv_batch_idx, Tensor? leftpad_k, Tensor? rotary_cos,
#     Tensor? rotary_sin, Tensor? seqlens_rotary, Tensor? q_descale, Tensor? k_descale,
#     Tensor? v_descale, float softmax_scale, bool is_causal, int window_size_left,
#     int window_size_right, float softcap, bool is_rotary_interleaved,
#     Tensor? scheduler_metadata, int num_splits, bool? pack_gqa, int sm_margin, Tensor? s_aux,
#     int cp_world_size, int cp_rank, Tensor? cp_tot_seqused_k) -> Tensor[]  (out, lse, ...)
def fa3_fwd(torch, q, k, v, out, cu_seqlens_q, max_seqlen_q, max_seqlen_k, cu_seqlens_k=None,
            seqused_k=None, page_table=None, scheduler_metadata=None):
    """Causal (bottom-right) FA3 forward, the arguments vllm 0.26.0's flash_attn_varlen_func
    passes for fa_version=3. q: (total_q, Hq, D). K/V: (total_k, Hkv, D) with cu_seqlens_k, or
    pages (num_pages, page, Hkv, D) with page_table (B, pages per sequence, int32) and seqused_k."""
    return torch.ops._vllm_fa3_C.fwd(
        q, k, v,
        None, None,  # k_new, v_new
        None,  # q_v
        out,
        cu_seqlens_q, cu_seqlens_k,
        None,  # cu_seqlens_k_new
        None, seqused_k,  # seqused_q, seqused_k
        max_seqlen_q, max_seqlen_k,
        page_table,
        None, None,  # kv_batch_idx, leftpad_k
        None, None, None,  # rotary_cos, rotary_sin, seqlens_rotary
        None, None, None,  # q_descale, k_descale, v_descale
        q.shape[-1] ** -0.5,  # softmax_scale
        True, -1, -1,  # is_causal, window_size_left, window_size_right
        0.0,  # softcap
        True,  # is_rotary_interleaved (no rotary)
        scheduler_metadata,
        0,  # num_splits: FA3's heuristic
        None,  # pack_gqa: FA3's heuristic
        0,  # sm_margin
        None,  # s_aux
        1, 0, None,  # cp_world_size, cp_rank, cp_tot_seqused_k
    )[0]


def fa3_scheduler_metadata(torch, batch, max_seqlen_q, max_seqlen_k, hq, hkv, d, dtype, seqused_k,
                           cu_seqlens_q, page_size):
    """_vllm_fa3_C::get_scheduler_metadata for the same call as fa3_fwd (causal, no softcap,
    heuristic splits and pack_gqa), as vllm's get_scheduler_metadata passes it."""
    return torch.ops._vllm_fa3_C.get_scheduler_metadata(
        batch, max_seqlen_q, max_seqlen_k, hq, hkv, d, d, dtype, seqused_k,
        cu_seqlens_q, None, None, None, None,  # cu_seqlens_k, cu_seqlens_k_new, seqused_q, leftpad_k
        page_size, 0,  # page_size, max_seqlen_k_new
        True, -1, -1,  # is_causal, window_size_left, window_size_right
        False, 0, None, 0)  # has_softcap, num_splits, pack_gqa, sm_margin


def reference_rel_err(torch, o, q, k, v, rows=None):
    """max |o - ref| / max |ref| for one sequence, ref in fp32. q, o: (n, Hq, D); k, v: (L, Hkv, D);
    query i sits at key position rows[i] (causal), or sees every key when rows is None. Query
    head h reads K/V head h // (Hq / Hkv), as in FA3 and SDPA's enable_gqa."""
    n, hq, d = q.shape
    length, hkv = k.shape[0], k.shape[1]
    qf = q.float().reshape(n, hkv, hq // hkv, d).permute(1, 2, 0, 3)  # (Hkv, G, n, D)
    kf, vf = k.float().permute(1, 0, 2), v.float().permute(1, 0, 2)  # (Hkv, L, D)
    s = torch.matmul(qf, kf.unsqueeze(1).transpose(-1, -2)) * d ** -0.5  # (Hkv, G, n, L)
    if rows is not None:
        s.masked_fill_(torch.arange(length, device=q.device)[None, :] > rows[:, None], float("-inf"))
    ref = torch.matmul(torch.softmax(s, dim=-1), vf.unsqueeze(1)).permute(2, 0, 1, 3).reshape(n, hq, d)
    return float((o.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def fa3_decode(torch, r, dtype, dev, l2, timer):
    """FA3 paged decode on the record's shape -> (ms, rel_err, scheduler metadata used)."""
    b, hq, hkv, d, ctx, page = r["batch"], r["n_heads"], r["n_kv_heads"], r["head_dim"], r["context"], r["page_size"]
    pages_per_seq = (ctx + page - 1) // page
    num_pages = b * pages_per_seq
    page_table = torch.randperm(num_pages, dtype=torch.int32, device=dev).reshape(b, pages_per_seq)
    seqused_k = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)
    n_sets = 2 if kv_bytes_of(r) < 2 * l2 else 1
    sets = [(torch.rand(b, hq, d, dtype=dtype, device=dev) * 2 - 1,
             torch.rand(num_pages, page, hkv, d, dtype=dtype, device=dev) * 2 - 1,
             torch.rand(num_pages, page, hkv, d, dtype=dtype, device=dev) * 2 - 1,
             torch.empty(b, hq, d, dtype=dtype, device=dev)) for _ in range(n_sets)]
    try:
        sched = fa3_scheduler_metadata(torch, b, 1, ctx, hq, hkv, d, dtype, seqused_k, cu_q, page)
    except RuntimeError as e:
        print(f"torch_peers: FA3 get_scheduler_metadata failed ({e}); FA3 schedules each call", file=sys.stderr)
        sched = None

    def run(q, k, v, out):
        return fa3_fwd(torch, q, k, v, out, cu_q, 1, ctx, seqused_k=seqused_k, page_table=page_table,
                       scheduler_metadata=sched)

    q, k, v, out = sets[0]
    try:
        o = run(q, k, v, out)
    except RuntimeError:
        if sched is None:
            raise
        sched = None  # metadata refused (shape check): let FA3 compute its own
        o = run(q, k, v, out)
    err = 0.0
    for i in sorted({0, b - 1}):
        pages = page_table[i].long()
        err = max(err, reference_rel_err(torch, o[i:i + 1], q[i:i + 1], k[pages].reshape(-1, hkv, d)[:ctx],
                                         v[pages].reshape(-1, hkv, d)[:ctx]))
    return timer(run, sets), err, sched is not None


def fa3_prefill(torch, r, dtype, dev, l2, timer, check_rows=64):
    """FA3 varlen causal prefill (whole prompts, contiguous K/V) -> (ms, rel_err, False)."""
    b, hq, hkv, d, ctx = r["batch"], r["n_heads"], r["n_kv_heads"], r["head_dim"], r["context"]
    cu = torch.arange(0, (b + 1) * ctx, ctx, dtype=torch.int32, device=dev)
    n_sets = 2 if kv_bytes_of(r) < 2 * l2 else 1
    sets = [(torch.rand(b * ctx, hq, d, dtype=dtype, device=dev) * 2 - 1,
             torch.rand(b * ctx, hkv, d, dtype=dtype, device=dev) * 2 - 1,
             torch.rand(b * ctx, hkv, d, dtype=dtype, device=dev) * 2 - 1,
             torch.empty(b * ctx, hq, d, dtype=dtype, device=dev)) for _ in range(n_sets)]

    def run(q, k, v, out):
        return fa3_fwd(torch, q, k, v, out, cu, ctx, ctx, cu_seqlens_k=cu)

    q, k, v, out = sets[0]
    o = run(q, k, v, out)
    rows = torch.unique(torch.linspace(0, ctx - 1, min(check_rows, ctx), device=dev).long())
    err = 0.0
    for i in sorted({0, b - 1}):
        seq = slice(i * ctx, (i + 1) * ctx)
        err = max(err, reference_rel_err(torch, o[seq][rows], q[seq][rows], k[seq], v[seq], rows))
    return timer(run, sets), err, False


def fa3_main(args):
    """The FA3 pass (--fa3-only): adds fa3_decode / fa3_prefill to every record's peers."""
    import torch
    if not torch.cuda.is_available():
        print("torch_peers: FA3 pass: torch sees no GPU", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    try:
        torch.ops.load_library(args.fa3_lib)
        torch.ops._vllm_fa3_C.fwd  # the op registered
        load_error = None
        print(f"torch_peers: FA3 loaded: {FA3_SOURCE}", file=sys.stderr)
    except Exception as e:  # missing file, libcudart/libtorch ABI mismatch
        load_error = f"the FA3 library did not load: {one_line(e)}"
        print(f"torch_peers: {load_error}", file=sys.stderr)
    timer = lambda fn, sets: cuda_time_ms(torch, fn, sets, args.iters)
    for path in args.records:
        try:
            with open(path) as f:
                records = json.load(f)
        except (OSError, ValueError) as e:
            print(f"torch_peers: FA3 pass: {path}: {e}; skipped", file=sys.stderr)
            continue
        for i, r in enumerate(records):
            prefill = r.get("mode") == "prefill"
            name = "fa3_prefill" if prefill else "fa3_decode"
            peers = r.setdefault("peers", {})
            if load_error:
                peers[name] = {"error": load_error}
            else:
                try:
                    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[r["dtype"]]
                    ms, err, sched = (fa3_prefill if prefill else fa3_decode)(torch, r, dtype, dev, l2, timer)
                    fig = figure(r, ms, kv_bytes_of(r))
                    if err > FA3_TOL:
                        fig = {"error": f"wrong output: max error {err:.3g} of the fp32 reference's max "
                                        f"(tolerance {FA3_TOL})", "unchecked_ms": ms}
                    fig["max_rel_err"] = err
                    if not prefill:
                        fig["scheduler_metadata"] = sched
                    peers[name] = fig
                    peers["fa3_source"] = FA3_SOURCE
                except Exception as e:  # shape refused, out of memory, CUDA error: record, go on
                    peers[name] = {"error": one_line(e)}
            torch.cuda.empty_cache()
            p = peers[name]
            print(f"torch_peers FA3 [{i + 1}/{len(records)}] {r['model']} {r.get('mode', 'decode')} b{r['batch']} "
                  f"ctx {r['context']}: " + (f"{p['ms']:.3f} ms, error {p['max_rel_err']:.2g}" if "ms" in p
                                             else p["error"]), file=sys.stderr)
            save_records(path, records)
    return 0


def run_fa3_pass(args):
    """Runs fa3_main in a child process, then marks every record it did not reach."""
    cmd = [sys.executable, os.path.abspath(__file__), "--fa3-only", "--fa3-lib", args.fa3_lib,
           "--iters", str(args.iters)]
    for path in args.records:
        cmd += ["--records", path]
    try:
        rc = subprocess.run(cmd, timeout=args.fa3_timeout).returncode
        why = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
    except subprocess.TimeoutExpired:
        why = f"timed out after {args.fa3_timeout} s"
    except OSError as e:
        why = f"did not start: {e}"
    for path in args.records:
        try:
            with open(path) as f:
                records = json.load(f)
        except (OSError, ValueError):
            continue
        missing = 0
        for r in records:
            name = "fa3_prefill" if r.get("mode") == "prefill" else "fa3_decode"
            peers = r.setdefault("peers", {})
            if name not in peers:
                peers[name] = {"error": f"the FA3 pass (a separate process) ended before this record: {why}"}
                missing += 1
        if missing:
            print(f"torch_peers: FA3 pass {why}; {missing} record(s) of {path} marked", file=sys.stderr)
            save_records(path, records)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", action="append", required=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--fa3-lib", help="_vllm_fa3_C.abi3.so: also time FlashAttention-3 (in a child process)")
    parser.add_argument("--fa3-timeout", type=int, default=60, help="seconds for the FA3 child process")
    parser.add_argument("--fa3-only", action="store_true", help=argparse.SUPPRESS)  # the child itself
    args = parser.parse_args()
    if args.fa3_only:
        return fa3_main(args)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(f"torch_peers: no torch ({e}); peers not measured", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("torch_peers: torch sees no GPU; peers not measured", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    print(f"torch_peers: torch {torch.__version__}, {props.name}", file=sys.stderr)
    try:
        import flashinfer
        print(f"torch_peers: flashinfer {flashinfer.__version__}", file=sys.stderr)
    except Exception as e:  # not staged, or it does not import here
        flashinfer = None
        print(f"torch_peers: no flashinfer ({e}); that peer is skipped", file=sys.stderr)

    def time_ms(fn, sets):
        return cuda_time_ms(torch, fn, sets, args.iters)

    def sdpa_gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)

    def repeat_kv_sdpa(q, k, v):
        group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1),
                                              v.repeat_interleave(group, dim=1), is_causal=q.shape[2] > 1)

    def matrix_tflops():
        n = 8192
        a = torch.rand(n, n, dtype=torch.bfloat16, device=dev)
        b = torch.rand(n, n, dtype=torch.bfloat16, device=dev)
        return 2 * n ** 3 / (time_ms(lambda a, b: a @ b, [(a, b)]) * 1e-3) / 1e12

    def flashinfer_decode_ms(r, dtype):
        b, hq, hkv, d, ctx, page = r["batch"], r["n_heads"], r["n_kv_heads"], r["head_dim"], r["context"], r["page_size"]
        pages_per_seq = (ctx + page - 1) // page
        num_pages = b * pages_per_seq
        kv_indices = torch.randperm(num_pages, dtype=torch.int32, device=dev)
        kv_indptr = torch.arange(0, b + 1, dtype=torch.int32, device=dev) * pages_per_seq
        kv_last = torch.full((b,), (ctx - 1) % page + 1, dtype=torch.int32, device=dev)
        k_cache = torch.rand(num_pages, page, hkv, d, dtype=dtype, device=dev) * 2 - 1
        v_cache = torch.rand(num_pages, page, hkv, d, dtype=dtype, device=dev) * 2 - 1
        workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=False)
        wrapper.plan(kv_indptr, kv_indices, kv_last, hq, hkv, d, page, pos_encoding_mode="NONE",
                     q_data_type=dtype, kv_data_type=dtype)
        q = torch.rand(b, hq, d, dtype=dtype, device=dev) * 2 - 1
        return time_ms(lambda q, k, v: wrapper.run(q, (k, v)), [(q, k_cache, v_cache)])

    def measure(records, rate, save):
        for i, r in enumerate(records):
            dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[r["dtype"]]
            b, hq, hkv, d, ctx = r["batch"], r["n_heads"], r["n_kv_heads"], r["head_dim"], r["context"]
            prefill = r.get("mode") == "prefill"
            n_q = ctx if prefill else 1
            peers = {"torch": torch.__version__}
            if prefill and rate:
                peers["matrix_tflops"] = rate
                peers["fused_fraction_of_matrix_rate"] = r["tflops"] / rate
            kv_bytes = kv_bytes_of(r)
            try:
                n_sets = 2 if kv_bytes < 2 * l2 else 1
                sets = [(torch.rand(b, hq, n_q, d, dtype=dtype, device=dev) * 2 - 1,
                         torch.rand(b, hkv, ctx, d, dtype=dtype, device=dev) * 2 - 1,
                         torch.rand(b, hkv, ctx, d, dtype=dtype, device=dev) * 2 - 1) for _ in range(n_sets)]
                for name, fn in (("sdpa_gqa", sdpa_gqa), ("repeat_kv_sdpa", repeat_kv_sdpa)):
                    try:
                        peers[name] = figure(r, time_ms(fn, sets), kv_bytes)
                    except torch.OutOfMemoryError:
                        peers[name] = {"error": "out of memory"}
                        torch.cuda.empty_cache()
                    except RuntimeError as e:  # e.g. no SDPA backend for this shape
                        peers[name] = {"error": f"{e}"[:300]}
                del sets
                if flashinfer is not None and not prefill:
                    try:
                        peers["flashinfer_decode"] = figure(r, flashinfer_decode_ms(r, dtype), kv_bytes)
                    except Exception as e:  # JIT failure, out of memory, API drift: record, go on
                        peers["flashinfer_decode"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                        torch.cuda.empty_cache()
            except torch.OutOfMemoryError:
                peers["error"] = "out of memory allocating the inputs"
            torch.cuda.empty_cache()
            r["peers"] = peers
            timed = ", ".join(f"{k} {v['ms']:.3f} ms" for k, v in peers.items() if isinstance(v, dict) and "ms" in v)
            print(f"torch_peers [{i + 1}/{len(records)}] {r['model']} {r.get('mode', 'decode')} b{b} ctx {ctx}: {timed}",
                  file=sys.stderr)
            save()

    rate = None
    for path in args.records:
        try:
            with open(path) as f:
                records = json.load(f)
        except (OSError, ValueError) as e:
            print(f"torch_peers: {path}: {e}; skipped", file=sys.stderr)
            continue
        if rate is None and any(r.get("mode") == "prefill" for r in records):
            rate = matrix_tflops()
            print(f"torch_peers: bf16 matrix rate {rate:.0f} TFLOP/s (8192^3 matmul)", file=sys.stderr)
        measure(records, rate, lambda: save_records(path, records))
    if args.fa3_lib:
        run_fa3_pass(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
