#!/usr/bin/env python3
"""PyTorch peers of the decode benchmark, run on the GPU machine by .device-check/run.sh after
`paged-gqa bench`: for every record of OUTDIR/bench.json, the same shape (heads, head_dim,
batch, context, dtype) timed with

  - sdpa_gqa: torch scaled_dot_product_attention(q, k, v, enable_gqa=True) on contiguous K/V
    (a dense upper bound: no paging);
  - repeat_kv_sdpa: the Llama reference path, repeat_interleave of K and V to every query
    head, then SDPA; timed whole;
  - flashinfer_decode: FlashInfer's paged decode (BatchDecodeWithPagedKVCacheWrapper, CUDA-core
    kernel, NHD pages of the record's page size, pages in shuffled order), when the staged
    flashinfer wheels import (run.sh installs them; the kernel is JIT-compiled on first use).

Random data from torch (fresh each run; the shapes, not the values, are the binary's), CUDA
events, warm-up, inputs rotated over two sets when a set is smaller than 2x L2. The results
are added to each record under "peers" (milliseconds, KV GB/s and the fused kernel's ratio to
each peer), and bench.json is rewritten in place.

    python3 torch_peers.py --records OUTDIR/bench.json [--iters 10]
"""
import argparse
import json
import sys

WARMUP = 3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True)
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
    with open(args.records) as f:
        records = json.load(f)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    print(f"torch_peers: torch {torch.__version__}, {props.name}", file=sys.stderr)

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

    try:
        import flashinfer
        print(f"torch_peers: flashinfer {flashinfer.__version__}", file=sys.stderr)
    except Exception as e:  # not staged, or it does not import here
        flashinfer = None
        print(f"torch_peers: no flashinfer ({e}); that peer is skipped", file=sys.stderr)

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

    def sdpa_gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def repeat_kv_sdpa(q, k, v):
        group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))

    for i, r in enumerate(records):
        dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[r["dtype"]]
        b, hq, hkv, d, ctx = r["batch"], r["n_heads"], r["n_kv_heads"], r["head_dim"], r["context"]
        peers = {"torch": torch.__version__}
        try:
            kv_bytes = 2 * b * hkv * ctx * d * 2
            n_sets = 2 if kv_bytes < 2 * l2 else 1
            sets = [(torch.rand(b, hq, 1, d, dtype=dtype, device=dev) * 2 - 1,
                     torch.rand(b, hkv, ctx, d, dtype=dtype, device=dev) * 2 - 1,
                     torch.rand(b, hkv, ctx, d, dtype=dtype, device=dev) * 2 - 1) for _ in range(n_sets)]
            for name, fn in (("sdpa_gqa", sdpa_gqa), ("repeat_kv_sdpa", repeat_kv_sdpa)):
                try:
                    ms = time_ms(fn, sets)
                    peers[name] = {"ms": ms, "bandwidth_gbs": kv_bytes / (ms * 1e-3) / 1e9,
                                   "fused_speedup": ms / r["fused_ms"]}
                except torch.OutOfMemoryError:
                    peers[name] = {"error": "out of memory"}
                    torch.cuda.empty_cache()
            del sets
            if flashinfer is not None:
                try:
                    ms = flashinfer_decode_ms(r, dtype)
                    peers["flashinfer_decode"] = {"ms": ms, "bandwidth_gbs": kv_bytes / (ms * 1e-3) / 1e9,
                                                  "fused_speedup": ms / r["fused_ms"]}
                except Exception as e:  # JIT failure, out of memory, API drift: record, go on
                    peers["flashinfer_decode"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    torch.cuda.empty_cache()
        except torch.OutOfMemoryError:
            peers["error"] = "out of memory allocating the inputs"
        torch.cuda.empty_cache()
        r["peers"] = peers
        print(f"torch_peers [{i + 1}/{len(records)}] {r['model']} b{b} ctx {ctx}: "
              + ", ".join(f"{k} {v['ms']:.3f} ms" for k, v in peers.items() if isinstance(v, dict) and "ms" in v),
              file=sys.stderr)
    with open(args.records, "w") as f:
        json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
