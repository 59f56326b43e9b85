"""float32 vs bfloat16 on this machine: what `auto` picks, and how close each path gets to its limit.

    python bench/bench_dtypes.py [--seqs 8] [--latents 1024] [--batch 1024] [--threads N]
    EMULATE_AVX2=1 make bench    # the same on torch's AVX2 kernels (a CPU without native bf16)

For each dtype, in one run:
- `matmul limit`: GFLOP/s of a [4096, 576] x [576, 1536] matmul (the MLP shape of SmolLM2-135M),
  the most this dtype can give on these shapes;
- `forward`: SmolLM2-135M run to layer 16 (what the activation cache does), tokens/s and its
  GFLOP/s (2 x weights used per token, plus attention scores) as a ratio to the matmul limit;
- `train step`: one TopK SAE step of the trainer (`training._Member.train_step`: sparse backward,
  Adam, decoder renorm) with the top-k selected in that dtype; tokens/s, and the encoder matmul's
  GFLOP/s (2 B d n per step: the step's dominant term) as a ratio to the same-dtype matmul limit.

Emulated bf16 is ~100x slower, so its forward is timed on one sequence and one repeat only.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replication import devices  # noqa: E402
from replication.lm.models import load_model  # noqa: E402
from replication.sae.training import DataConfig, TrainConfig, _Member, resolve_config  # noqa: E402


def best_time(fn, repeats: int, budget_s: float = 20.0) -> float:
    """Fastest of `repeats` calls after one warm-up (fewer if the budget is spent)."""
    start = time.perf_counter()
    fn()
    if time.perf_counter() - start > budget_s / 2:
        return time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return best


def matmul_limit(dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(4096, 576).to(dtype)
    b = torch.randn(576, 1536).to(dtype)
    out = torch.empty(4096, 1536, dtype=dtype)
    t = best_time(lambda: torch.mm(a, b, out=out), repeats)
    return 2 * 4096 * 576 * 1536 / t / 1e9


def forward_flops_per_token(model, n_layers: int, seq_len: int) -> float:
    """2 x (weights of the first `n_layers` blocks) + attention scores and mixing, per token."""
    blocks = model.blocks[:n_layers]
    weights = sum(p.numel() for b in blocks for name, p in b.named_parameters() if p.dim() >= 2)
    attn = 2 * 2 * seq_len * model.cfg.d_model * n_layers   # QK^T and AV, full (unmasked) as computed
    return 2.0 * weights + attn


def time_forward(dtype_name: str, n_seqs: int, seq_len: int, repeats: int, emulated: bool) -> dict[str, float]:
    model = load_model("smollm2-135m", dtype=dtype_name)
    n_layers = 16
    n = 1 if emulated else n_seqs
    tokens = torch.randint(0, model.cfg.d_vocab, (n, seq_len))
    with torch.inference_mode():
        t = best_time(lambda: model(tokens, stop_at_layer=n_layers), 1 if emulated else repeats)
    flops = forward_flops_per_token(model, n_layers, seq_len) * n * seq_len
    return {"tokens_per_s": n * seq_len / t, "gflops": flops / t / 1e9}


def time_train_step(select: str, n_latents: int, batch: int, repeats: int) -> dict[str, float]:
    d_in = 576
    cfg = resolve_config(TrainConfig(n_latents=n_latents, k=32, seed=0, select_dtype=select))
    member = _Member(0, cfg, DataConfig(batch_size=batch), d_in, total_steps=10_000, out_dir=None, key="bench")
    x = torch.randn(batch, d_in)
    tv = x.var(dim=0, correction=0).sum() * batch
    ws: dict[str, torch.Tensor] = {}
    member.train_step(x, tv, ws)
    t = best_time(lambda: member.train_step(x, tv, ws), repeats)
    return {"tokens_per_s": batch / t, "encoder_gflops": 2 * batch * d_in * n_latents / t / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=8, help="sequences of 256 tokens per forward")
    ap.add_argument("--latents", type=int, default=1024, help="SAE latents (default: the core family's)")
    ap.add_argument("--batch", type=int, default=1024, help="tokens per SAE step (default: the core family's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = devices.cpu_bf16_support()
    auto = devices.resolve_dtype("auto", "cpu")
    print(f"CPU capability {info['capability']}, AVX512_BF16 {info['avx512_bf16']}, AMX {info['amx_tile']}"
          f"{', capped by ' + info['capped_by'] if info['capped_by'] else ''}; native bf16: {info['native_bf16']}")
    print(f"auto picks: {auto}   (torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    emulated = not info["native_bf16"]
    rows = []
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        limit = matmul_limit(dtype, args.repeats)
        with warnings.catch_warnings():   # the header already says when bf16 is emulated
            warnings.simplefilter("ignore", RuntimeWarning)
            fwd = time_forward(name, args.seqs, 256, args.repeats, emulated and name == "bfloat16")
            step = time_train_step(name, args.latents, args.batch, args.repeats)
        rows.append((name, limit, fwd, step))
    print(f"{'dtype':9} {'matmul limit':>13} | {'forward tok/s':>13} {'GFLOP/s':>8} {'of limit':>8} | "
          f"{'SAE step tok/s':>14} {'enc GFLOP/s':>11} {'of limit':>8}")
    for name, limit, fwd, step in rows:
        print(f"{name:9} {limit:10.0f} GF | {fwd['tokens_per_s']:13,.0f} {fwd['gflops']:8.1f} {fwd['gflops'] / limit:8.0%} | "
              f"{step['tokens_per_s']:14,.0f} {step['encoder_gflops']:11.1f} {step['encoder_gflops'] / limit:8.0%}")
    (f32, l32, fwd32, st32), (b16, l16, fwd16, st16) = rows
    print(f"\nbf16 / float32: matmul limit {l16 / l32:.2f}x, forward {fwd16['tokens_per_s'] / fwd32['tokens_per_s']:.2f}x, "
          f"SAE step {st16['tokens_per_s'] / st32['tokens_per_s']:.2f}x  ->  auto = {auto}"
          f" ({'right' if (auto == 'bfloat16') == (fwd16['tokens_per_s'] > fwd32['tokens_per_s']) else 'WRONG'} "
          f"for the forward pass on this machine)")


if __name__ == "__main__":
    main()
