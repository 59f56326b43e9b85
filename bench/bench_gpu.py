"""A paper-size family step on the device it finds, as a ratio to that device's bf16 matmul limit.

    python bench/bench_gpu.py                 # CUDA if visible: 2^15 latents, d 768, k 32, 65,536 tokens, 9 seeds
    python bench/bench_gpu.py --scale 0.125   # a smaller shape (CPUs: the full one needs ~GBs and minutes per step)

What it prints, in one run:
- the bf16 matmul limit it measured (a large `[B, d] x [d, n]` matmul, best of a few);
- `train_saes` throughput for the family (every seed steps on each batch; top-k selected in bf16, values,
  gradients and master weights in fp32): SAE-tokens/s, and that rate as a fraction of the limit, counting
  the encoder matmul only (2·B·d·n flops per SAE and step, the step's floor);
- what that means for the paper: GPU-hours for 8B tokens x 9 seeds at the measured rate.

Nothing here assumes CUDA: the same script measures a CPU (it then says so). The numbers of a GPU run belong
in the README's paper-scale section; none has been lent to this project yet.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replication.devices import resolve_device  # noqa: E402
from replication.sae.training import DataConfig, TrainConfig, train_saes  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_limit(device: torch.device, b: int, d: int, n: int, repeats: int = 5) -> float:
    """Best bf16 FLOP/s of a `[b, d] x [d, n]` matmul (the encoder's shape) on `device`."""
    x = torch.randn(b, d, device=device, dtype=torch.bfloat16)
    w = torch.randn(d, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(b, n, device=device, dtype=torch.bfloat16)
    torch.mm(x, w, out=out)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(x, w, out=out)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * b * d * n / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (cuda where visible)")
    ap.add_argument("--scale", type=float, default=None,
                    help="shrink latents and batch by this factor (default: 1 on CUDA, 1/32 on CPU)")
    ap.add_argument("--seeds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    args = ap.parse_args()

    device = torch.device(resolve_device(args.device))
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" else 1 / 32)
    d, k = 768, 32
    n = max(k * 2, int(2**15 * scale))
    batch = max(256, int(65_536 * scale))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}); shape: {n} latents, d {d}, k {k}, batch {batch}, {args.seeds} seeds "
          f"(scale {scale:g} of the paper's)")

    limit = matmul_limit(device, batch, d, n)
    print(f"bf16 matmul limit ({batch} x {d} x {n}): {limit / 1e12:.2f} TFLOP/s")

    rng = np.random.default_rng(0)
    acts = rng.standard_normal((batch * (args.steps + 1), d)).astype(np.float32)
    cfgs = [TrainConfig(architecture="topk", n_latents=n, k=k, seed=s, lr=2e-4, select_dtype="bfloat16",
                        device=str(device)) for s in range(args.seeds)]
    data = DataConfig(batch_size=batch, n_tokens=batch * (args.steps + 1))
    res = train_saes(acts, cfgs, data, progress=False, max_steps=1)            # warm-up (allocations, kernels)
    sync(device)
    t = time.perf_counter()
    res = train_saes(acts, cfgs, data, progress=False)
    sync(device)
    wall = time.perf_counter() - t
    steps = res[0].steps
    rate = args.seeds * batch * steps / wall
    floor_flops = 2.0 * d * n                                               # encoder matmul per token and SAE
    print(f"train_saes: {steps} steps in {wall:.2f} s -> {rate:,.0f} SAE-tokens/s "
          f"({rate * floor_flops / limit:.1%} of the bf16 matmul limit, counting the encoder matmul only)")
    paper_tokens = 8e9 * 9
    full_rate = rate * (n / 2**15)          # the per-token cost grows linearly with the number of latents
    print(f"paper (8B tokens x 9 seeds at 2^15 latents) at this rate: {paper_tokens / full_rate / 3600:,.1f} "
          f"device-hours on {name}" + ("" if scale == 1 else " (extrapolated from the smaller shape: the cost "
                                                              "per token grows linearly with the number of latents)"))


if __name__ == "__main__":
    main()
