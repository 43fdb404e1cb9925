#!/usr/bin/env python3
"""
GPU benchmark of build/libreform_cuda.so through ctypes (no bun, no torch needed; numpy only).

Llama-3.1-8B shape with random weights generated on the device (rf_model_init_random):
  * compress throughput (tokens/s) over --lengths tokens of random ids, and model FLOP utilisation
    (FLOPs of the layers actually run, incl. attention over the cache and the H2O pass, vs --peak-tflops)
  * compress with the embedding file written and fsync'd per chunk, as the server does: one chunk at a time
    (rf_compressor_process) vs overlapped (rf_compressor_submit / _collect: chunk i is written while chunk i + 1
    computes), over --overlap-tokens tokens
  * scoring time over --score-tokens rows (rf_score, f16 ctx, --score-queries queries), and score + select over the
    same rows streamed from host memory (rf_score_select, the embedding file's path) vs resident on the device
    (rf_embstore, uploaded once); resident with the queries' neighbouring rows as query row pairs (ABI 7), and their
    k-th best matches (rf_embstore_score_kth)
  * recompute prefill time for --prefill tokens, decode time per token (--decode steps), plain and replayed as a
    CUDA graph (REFORM_CUDA_GRAPH=1)
Prints figures, no assertions. --quick: smaller run.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from gpu_check import (RF_BF16, RF_F16, RF_ROPE_LLAMA3, Compressor, EmbStore, Lib, Model, Seq,  # noqa: E402
                       compress_params, score, score_select)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                  num_kv_heads=8, head_dim=128, qkv_bias=0, tie_embeddings=0, rope_type=RF_ROPE_LLAMA3, rms_eps=1e-5,
                  rope_theta=500000.0, rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                  rope_original_max_pos=8192, weight_dtype=RF_BF16)


# --shape tiny: a small Llama-shaped model for a smoke run of this script itself (e.g. on the CPU emulation of the
# CUDA build, --lib build/libreform_cuda_emu.so); its figures mean nothing.
TINY = dict(LLAMA31_8B, vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
            num_kv_heads=2, head_dim=32)


def parse_heads(s):
    out = []
    for part in s.split(","):
        l, k, h = part.split(":")
        out.append((int(l), k, int(h)))
    return out


def compress_flops(c, n, cache_len, exit_layer, obs_window):
    """FLOPs of one compress chunk of n tokens with cache_len entries already cached (as run)."""
    H, I, nH, nKV, hd = c["hidden_size"], c["intermediate_size"], c["num_heads"], c["num_kv_heads"], c["head_dim"]
    qd, kvd = nH * hd, nKV * hd
    qkv = 2 * n * H * (qd + 2 * kvd)
    rest = 2 * n * (qd * H + H * 2 * I + I * H)
    # causal attention: query i sees cache_len + i + 1 keys; QK^T and PV: 4 * hd per (query, key, head)
    keys_all = n * cache_len + n * (n + 1) // 2
    w = min(obs_window, n)
    keys_last = sum(cache_len + i + 1 for i in range(n - w, n))
    attn_full = 4 * hd * nH * keys_all
    attn_exit = 4 * hd * nH * keys_last
    h2o = 2 * hd * nH * keys_last  # second pass over the last w queries
    full_layers = exit_layer  # layers 0..exit-1 run completely
    if exit_layer < c["num_layers"] - 1:  # the exit layer: q/k/v only (its cache is not kept below full depth)
        return full_layers * (qkv + rest + attn_full + h2o) + qkv
    return full_layers * (qkv + rest + attn_full + h2o) + (qkv + attn_exit + h2o)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=os.path.join(ROOT, "build", "libreform_cuda.so"))
    ap.add_argument("--heads", default="4:q:0,8:k:3,12:v:5,16:q:17", help="layer:kind:head,...")
    ap.add_argument("--capacity", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--n-recent", type=int, default=128)
    ap.add_argument("--obs-window", type=int, default=128)
    ap.add_argument("--lengths", default="131072,1048576", help="compress lengths (tokens)")
    ap.add_argument("--score-tokens", type=int, default=1048576)
    ap.add_argument("--score-queries", type=int, default=64)
    ap.add_argument("--overlap-tokens", type=int, default=131072,
                    help="compress with the embedding file written, plain vs overlapped (0: skip)")
    ap.add_argument("--budget", type=int, default=8192, help="tokens selected by score + select")
    ap.add_argument("--tmp", default=None, help="folder of the embedding file the overlap figure writes")
    ap.add_argument("--prefill", type=int, default=8192)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--layers", type=int, default=0, help="override num_layers (0: 32)")
    ap.add_argument("--quick", action="store_true", help="small run: 32K compress, 128K scoring, 2K prefill")
    ap.add_argument("--shape", choices=["llama3-8b", "tiny"], default="llama3-8b",
                    help="tiny: a small model and small sizes, to smoke-test this script (e.g. on the CPU emulation)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--targets", action="store_true",
                    help="print the project's targets against the figures: 1M tokens compressed in < 40 s, "
                         "time per output token < 15 ms, and the derived time to first token of a 1M-token query")
    args = ap.parse_args()
    if args.quick:
        args.lengths = "32768"
        args.score_tokens = 131072
        args.prefill = 2048
        args.decode = 16

    if args.shape == "tiny":  # small sizes, where not given on the command line
        tiny = dict(heads="1:q:0,2:k:1", capacity=256, chunk=128, n_recent=32, obs_window=32, lengths="1024",
                    score_tokens=4096, score_queries=8, prefill=256, decode=8, overlap_tokens=512, budget=256)
        for k, v in tiny.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    lib = Lib(args.lib)
    print("device:", lib.device_info())
    if lib.L.rf_device_count() < 1:
        sys.exit("no CUDA device: " + lib.err())
    cfg = dict(TINY if args.shape == "tiny" else LLAMA31_8B)
    if args.layers:
        cfg["num_layers"] = args.layers
    t0 = time.perf_counter()
    m = Model(lib, cfg)
    m.init_random(args.seed, 0.02)
    m.finalize()
    print(f"model: {'tiny' if args.shape == 'tiny' else 'Llama-3.1-8B'} shape, {cfg['num_layers']} layers, {m.memory_bytes() / 2**30:.2f} GiB on device, "
          f"init {time.perf_counter() - t0:.1f}s")

    # ---- compress ----
    heads = parse_heads(args.heads)
    params = compress_params(args.capacity, args.n_sink, args.n_recent, args.obs_window, args.chunk, RF_F16)
    c = Compressor(m, params, heads)
    exit_layer = lib.L.rf_compressor_exit_layer(c.h)
    print(f"compressor: heads {args.heads} (exit layer {exit_layer}), capacity {args.capacity}, chunk {args.chunk}, "
          f"emb dim {c.dim}")
    rng = np.random.default_rng(args.seed)
    c.process(rng.integers(0, cfg["vocab_size"], args.chunk, dtype=np.int32))  # warm-up
    lib.check(lib.L.rf_compressor_reset(c.h), "reset")
    peak = args.peak_tflops * 1e12
    compress_s = {}
    for total in [int(x) for x in args.lengths.split(",") if x]:
        lib.check(lib.L.rf_compressor_reset(c.h), "reset")
        toks = rng.integers(0, cfg["vocab_size"], total, dtype=np.int32)
        flops = 0
        cache = 0
        t0 = time.perf_counter()
        for off in range(0, total, args.chunk):
            n = min(args.chunk, total - off)
            flops += compress_flops(cfg, n, cache, exit_layer, args.obs_window)
            c.process(toks[off:off + n])
            cache = min(args.capacity, cache + n)
        dt = time.perf_counter() - t0
        compress_s[total] = dt
        print(f"compress {total:>8} tokens: {dt:8.2f} s  {total / dt:10.0f} tok/s  "
              f"{flops / dt / 1e12:7.1f} TFLOP/s  MFU {100 * flops / dt / peak:5.1f}%  "
              f"(cache {c.cache_len()})", flush=True)

    # ---- compress writing the embedding file: one chunk at a time vs overlapped (the server's two loops) ----
    overlap = {}
    if args.overlap_tokens > 0:
        total = args.overlap_tokens
        toks = rng.integers(0, cfg["vocab_size"], total, dtype=np.int32)
        fd, path = tempfile.mkstemp(prefix="reform-emb-", suffix=".bin", dir=args.tmp)
        os.close(fd)

        def write(f, rows):
            f.write(rows.tobytes())
            f.flush()
            os.fsync(f.fileno())

        try:
            for mode in ("plain", "overlapped"):
                lib.check(lib.L.rf_compressor_reset(c.h), "reset")
                with open(path, "wb") as f:
                    t0 = time.perf_counter()
                    for off in range(0, total, args.chunk):
                        chunk = toks[off:off + args.chunk]
                        if mode == "plain":
                            write(f, c.process(chunk))
                        else:
                            c.submit(chunk)  # chunk i + 1 goes to the device, then chunk i is written
                            if c.pending() > 1:
                                write(f, c.collect())
                    while c.pending() > 0:
                        write(f, c.collect())
                    overlap[mode] = time.perf_counter() - t0
                print(f"compress {total:>8} tokens writing the embedding file ({mode}): {overlap[mode]:8.2f} s  "
                      f"{total / overlap[mode]:10.0f} tok/s  ({os.path.getsize(path) / 2**20:.0f} MiB, fsync per "
                      f"chunk)", flush=True)
        finally:
            os.unlink(path)
        print(f"overlapped writes: {overlap['plain'] / overlap['overlapped']:.2f}x the plain loop's throughput")
    c.destroy()

    # ---- scoring ----
    dim = len(heads) * cfg["head_dim"]
    ctx = rng.standard_normal((args.score_tokens, dim), dtype=np.float32).astype(np.float16)
    q = rng.standard_normal((args.score_queries, dim), dtype=np.float32)
    score(lib, ctx[:1024], q)  # warm-up
    t0 = time.perf_counter()
    score(lib, ctx, q)
    dt = time.perf_counter() - t0
    score_s = dt
    print(f"score {args.score_tokens} x {dim} (f16) vs {args.score_queries} queries: {dt * 1e3:8.1f} ms "
          f"({ctx.nbytes / dt / 1e9:.1f} GB/s host->device)", flush=True)
    # score + select (the query path): the rows streamed from host memory vs resident on the device
    window, edge = 129, 256
    score_select(lib, ctx[:1024], q, window, min(args.budget, 512), 16)  # warm-up
    t0 = time.perf_counter()
    _, idx_streamed = score_select(lib, ctx, q, window, args.budget, edge)
    streamed_s = time.perf_counter() - t0
    st = EmbStore(m, dim)
    t0 = time.perf_counter()
    st.append(ctx)
    st.score_select(1, q, 1, 1, 0)  # the upload has completed (the store's stream ran it)
    upload_s = time.perf_counter() - t0
    st.score_select(min(1024, args.score_tokens), q, window, min(args.budget, 512), 16)  # warm-up
    t0 = time.perf_counter()
    _, idx_resident = st.score_select(args.score_tokens, q, window, args.budget, edge)
    resident_s = time.perf_counter() - t0
    print(f"score+select {args.score_tokens} x {dim} vs {args.score_queries} queries, budget {args.budget}: "
          f"streamed {streamed_s * 1e3:8.1f} ms, resident {resident_s * 1e3:8.1f} ms (uploaded once in "
          f"{upload_s * 1e3:.1f} ms, {st.memory_bytes() / 2**30:.2f} GiB on the device; same selection: "
          f"{'yes' if np.array_equal(idx_streamed, idx_resident) else 'NO'})", flush=True)
    # with query row pairs (ABI 7): the question's neighbouring tokens, as the server pairs them (background.ts)
    pairs = np.stack([np.arange(args.score_queries - 1), np.arange(1, args.score_queries)], 1).astype(np.int32)
    if len(pairs) > 0:
        st.score_select(min(1024, args.score_tokens), q, window, min(args.budget, 512), 16, pairs=pairs)  # warm-up
        t0 = time.perf_counter()
        st.score_select(args.score_tokens, q, window, args.budget, edge, pairs=pairs)
        pairs_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        st.score_kth(args.score_tokens, q, 32, pairs=pairs)
        kth_s = time.perf_counter() - t0
        print(f"score+select {args.score_tokens} x {dim} with {len(pairs)} query row pairs, resident: "
              f"{pairs_s * 1e3:8.1f} ms (without: {resident_s * 1e3:.1f} ms); their k-th best (k = 32): "
              f"{kth_s * 1e3:8.1f} ms", flush=True)
    st.destroy()
    del ctx

    # ---- recompute prefill + decode ----
    s = Seq(m, args.prefill + args.decode + 16)
    toks = rng.integers(0, cfg["vocab_size"], args.prefill, dtype=np.int32)
    s.forward(toks[:512], want_logits=False)  # warm-up
    s.reset()
    t0 = time.perf_counter()
    s.forward(toks)
    dt = time.perf_counter() - t0
    H, I, nH, nKV, hd, L = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                                             "head_dim", "num_layers"))
    n = args.prefill
    lin = 2 * n * (H * (nH + 2 * nKV) * hd + nH * hd * H + 3 * H * I) * L + 2 * H * cfg["vocab_size"]
    att = 4 * hd * nH * (n * (n + 1) // 2) * L
    prefill_s = dt
    print(f"prefill {n} tokens: {dt * 1e3:8.1f} ms  {n / dt:8.0f} tok/s  MFU {100 * (lin + att) / dt / peak:5.1f}%",
          flush=True)
    times = []
    for _ in range(args.decode):  # one output token: sample (on the device) + forward
        t0 = time.perf_counter()
        t = s.sample(0.0)
        s.forward(np.array([t], dtype=np.int32), want_logits=False)
        times.append(time.perf_counter() - t0)
    times = np.array(times)
    print(f"decode at context {n}: {np.median(times) * 1e3:.2f} ms/token (median of {len(times)}, "
          f"min {times.min() * 1e3:.2f}, max {times.max() * 1e3:.2f})")
    tpot_ms = float(np.median(times)) * 1e3
    s.destroy()
    # the same decode steps replayed as a CUDA graph (REFORM_CUDA_GRAPH=1 when the sequence is created)
    os.environ["REFORM_CUDA_GRAPH"] = "1"
    try:
        sg = Seq(m, args.prefill + args.decode + 16)
    finally:
        del os.environ["REFORM_CUDA_GRAPH"]
    sg.forward(toks, want_logits=False)
    gtimes = []
    for _ in range(args.decode):
        t0 = time.perf_counter()
        t = sg.sample(0.0)
        sg.forward(np.array([t], dtype=np.int32), want_logits=False)
        gtimes.append(time.perf_counter() - t0)
    gtimes = np.array(gtimes[1:] if len(gtimes) > 1 else gtimes)  # the first step captures the graph
    print(f"decode at context {n} with CUDA graphs: {np.median(gtimes) * 1e3:.2f} ms/token (median of {len(gtimes)} "
          f"after the capture step; plain {tpot_ms:.2f})")
    sg.destroy()
    m.destroy()
    if args.targets:
        # time to first token of a query over a context of score_tokens tokens, from the measured parts: scoring every
        # context token (the embedding file streamed to the device) + prefill of the gathered budget and question +
        # the first output token (the question's embedding and the host selection are a few ms and not included)
        ttft_ms = (score_s + prefill_s) * 1e3 + tpot_ms
        print(f"ttft of a {args.score_tokens}-token query (derived: score + prefill {args.prefill} + one token): "
              f"{ttft_ms:.1f} ms")
        ttft_res = (resident_s + prefill_s) * 1e3 + tpot_ms
        print(f"ttft of a {args.score_tokens}-token query with resident embeddings (derived: resident score + select "
              f"+ prefill {args.prefill} + one token): {ttft_res:.1f} ms")
        print("targets:")
        one_m = [t for t in compress_s if t >= 1048576]
        if one_m:
            t = min(one_m)
            secs = compress_s[t] * 1048576 / t
            print(f"  compress 1M tokens < 40 s: {'PASS' if secs < 40 else 'MISS'} ({secs:.1f} s; paper: 108.6 s for "
                  f"Mistral-NeMo-12B on an H200)")
        else:
            print("  compress 1M tokens < 40 s: not measured (no --lengths entry >= 1048576)")
        print(f"  time per output token < 15 ms: {'PASS' if tpot_ms < 15 else 'MISS'} ({tpot_ms:.2f} ms at context "
              f"{args.prefill}; paper: 40 ms)")


if __name__ == "__main__":
    main()
