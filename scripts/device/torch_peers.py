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
    the kernel is JIT-compiled on first use).

For prefill records, each record also gets the bf16 matrix rate of this GPU measured in the
same run (an 8192^3 torch.matmul), so the kernel's TFLOP/s reads as a fraction of it.

Random data from torch (fresh each run; the shapes, not the values, are the binary's), CUDA
events, warm-up, inputs rotated over two sets when a set is smaller than 2x L2. Results go
into each record under "peers" (milliseconds, bandwidth or TFLOP/s, and the fused kernel's
speedup over each peer); every file is rewritten in place.

    python3 torch_peers.py --records OUTDIR/bench.json [--records OUTDIR/bench-prefill.json] [--iters 10]
"""
import argparse
import json
import sys

WARMUP = 3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", action="append", required=True)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
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
        for i in range(WARMUP):
            fn(*sets[i % len(sets)])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(args.iters):
            fn(*sets[i % len(sets)])
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.iters

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

    def figure(r, ms, kv_bytes):
        prefill = r.get("mode") == "prefill"
        out = {"ms": ms, "fused_speedup": ms / r["fused_ms"]}
        if prefill:
            out["tflops"] = r["flops"] / (ms * 1e-3) / 1e12
        else:
            out["bandwidth_gbs"] = kv_bytes / (ms * 1e-3) / 1e9
        return out

    def measure(records, rate):
        for i, r in enumerate(records):
            dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[r["dtype"]]
            b, hq, hkv, d, ctx = r["batch"], r["n_heads"], r["n_kv_heads"], r["head_dim"], r["context"]
            prefill = r.get("mode") == "prefill"
            n_q = ctx if prefill else 1
            peers = {"torch": torch.__version__}
            if prefill and rate:
                peers["matrix_tflops"] = rate
                peers["fused_fraction_of_matrix_rate"] = r["tflops"] / rate
            kv_bytes = 2 * b * hkv * ctx * d * 2
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
        measure(records, rate)
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
