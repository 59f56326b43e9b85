"""Throughput of one TopK SAE training step on this machine (tokens/s), several ways.

    python bench/bench_training.py [--repeats 4] [--threads 2] [--quick] [--cpu-time]

Rows: `encoder-only` is the limit (just the `[B, d] x [d, n]` encoder matmul into a reused
buffer); `sparse+fused` is the trainer's real step (`training._Member.train_step`: sparse
backward, parallel-gradient removal, grad clipping, fused Adam, decoder renorm, dead-latent
tracking); `autograd-embbag` is plain autograd through an `embedding_bag` decoder;
`dense-decoder` scatters the code into `[B, n]` and decodes with a matmul; `encoder-alloc` is the
matmul through an allocating `F.linear`; `encoder-only-bf16` the same matmul in bf16;
`sparse+fused-bf16sel` the real step with `select_dtype="bfloat16"`. All use
batch 4096, k 32, float32; best of `--repeats` steps after one warm-up step, the methods timed
in turn (the machine is shared: the minimum is the least disturbed measurement).

Measured on this machine (AMD EPYC, 2 cores with AVX512-BF16, torch 2.13.0+cpu, MKL), 2026-11-22.
The machine is shared with other jobs, so absolute numbers move by up to 2x between runs; the
ratios within one run move much less. Wall clock, 2 threads (d_in 768 rows: a quiet run after the
final code; d_in 576 rows: an earlier quiet run, before the last overhead fix to the argsort and
fired-mask code, so slightly pessimistic for sparse+fused):

    d_in  n_latents  method                 tokens/s  vs encoder-only
     768       4096  encoder-only             29,516    100%
     768       4096  encoder-alloc            26,762     91%
     768       4096  sparse+fused             20,270     69%
     768       4096  encoder-only-bf16       122,144    414%
     768       4096  sparse+fused-bf16sel     40,359    137%
     768       4096  autograd-embbag           7,046     24%
     768       4096  dense-decoder             4,166     14%
     768      16384  encoder-only              7,011    100%
     768      16384  encoder-alloc             6,372     91%
     768      16384  sparse+fused              5,601     80%
     768      16384  encoder-only-bf16        29,759    424%
     768      16384  sparse+fused-bf16sel     14,429    206%
     768      16384  autograd-embbag           1,223     17%
     768      16384  dense-decoder               837     12%
     576       4096  encoder-only             36,960    100%
     576       4096  sparse+fused             22,932     62%
     576       4096  sparse+fused-bf16sel     41,809    113%
     576       4096  autograd-embbag           8,264     22%
     576       4096  dense-decoder             5,104     14%
     576      16384  encoder-only              8,590    100%
     576      16384  sparse+fused              6,700     78%
     576      16384  sparse+fused-bf16sel     10,414    121%
     576      16384  autograd-embbag           1,381     16%
     576      16384  dense-decoder               898     10%

`--cpu-time` (1 thread, thread CPU clock; hardly affected by other jobs), final code:

    d_in  n_latents   encoder-only  sparse+fused  sparse+bf16sel  autograd-embbag  dense-decoder
     768       4096    15,051 100%    10,041 67%     19,960 133%       3,955 26%      2,195 15%
     768      16384     3,646 100%     2,941 81%      7,029 193%         756 21%        464 13%
     576       4096    19,715 100%    11,753 60%     20,105 102%       4,493 23%      2,538 13%
     576      16384     4,652 100%     3,584 77%      7,657 165%         922 20%        548 12%

End to end (`train_saes`: gather from the array, hash, NaN check; 2 seeds share each batch;
d_in 576, n 4096, batch 1024), quiet: 17,853 SAE-tokens/s exact, 26,892 with bf16 selection.

Reading: the exact sparse step costs the encoder matmul plus a top-k (~20% of the matmul at
n = 4096) plus an O(B k d) sparse backward and an O(n d) optimiser step. It reaches 60-70% of
the matmul-only limit at 4096 latents and ~80% at 16384 (the brief's reference figures, 20k and
4.8k tokens/s for encoder-only, were measured with an allocating F.linear, our `encoder-alloc`
row; against those the exact step is at 100%+). It is 3-5x faster than plain autograd and 5-7x
faster than a dense decoder. `select_dtype="bfloat16"` picks the top-k from a bf16 matmul (4x
faster on this CPU) and recomputes the chosen values and every gradient exactly in float32: it
runs at 1.0-2.1x the fp32 encoder-only limit.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replication.sae.training import DataConfig, TrainConfig, _Member  # noqa: E402

B, K = 4096, 32


CLOCK = time.perf_counter


def _time_interleaved(steps: dict[str, object], repeats: int) -> dict[str, float]:
    """Best time per method, methods timed in turn (round-robin) so a burst of load from
    another job on this shared machine hurts every method alike rather than one row."""
    for step in steps.values():
        step()  # warm-up (allocations, first-touch page faults)
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = CLOCK()
            step()
            best[name] = min(best[name], CLOCK() - t0)
    return best


def _member(d_in: int, n: int, select_dtype: str | None = None) -> _Member:
    cfg = TrainConfig(architecture="topk", n_latents=n, k=K, seed=0, select_dtype=select_dtype)
    return _Member(0, cfg, DataConfig(batch_size=B, n_tokens=B * 1000), d_in, 1000, None, "bench")


def _finish_step(member: _Member) -> None:
    """The optimiser part of a step, identical for the autograd baselines and the real step."""
    sae = member.sae
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.nn.utils.clip_grad_norm_(member.params, 1.0, foreach=True)
    member.optimizer.step()
    sae.set_decoder_norm_to_unit_norm()


def bench_one(d_in: int, n: int, repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, d_in, generator=gen)
    tv = (x - x.mean(0)).pow(2).sum()

    exact, low = _member(d_in, n), _member(d_in, n, "bfloat16")
    W, b = exact.sae.encoder.weight.detach(), exact.sae.encoder.bias.detach()
    buf = torch.empty(B, n)
    Wl, bl, xl = W.bfloat16(), b.bfloat16(), x.bfloat16()
    buf_low = torch.empty(B, n, dtype=torch.bfloat16)
    ws_exact: dict[str, torch.Tensor] = {}
    ws_low: dict[str, torch.Tensor] = {}
    plain, dense = _member(d_in, n), _member(d_in, n)

    def autograd_step(member: _Member, dense_decoder: bool) -> None:
        sae = member.sae
        for p in member.params:
            p.grad = None
        pre = F.relu(F.linear(x - sae.b_dec, sae.encoder.weight, sae.encoder.bias))
        vals, idx = pre.topk(K, sorted=False)
        if dense_decoder:
            z = torch.zeros_like(pre).scatter(1, idx, vals)
            x_hat = z @ sae.W_dec + sae.b_dec
        else:
            x_hat = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
        ((x_hat - x).pow(2).sum() / tv).backward()
        _finish_step(member)

    steps = {
        "encoder-only": lambda: torch.addmm(b, x, W.T, out=buf),
        "encoder-alloc": lambda: F.linear(x, W, b),
        "sparse+fused": lambda: exact.train_step(x, tv, ws_exact),
        "encoder-only-bf16": lambda: torch.addmm(bl, xl, Wl.T, out=buf_low),
        "sparse+fused-bf16sel": lambda: low.train_step(x, tv, ws_low),
        "autograd-embbag": lambda: autograd_step(plain, False),
        "dense-decoder": lambda: autograd_step(dense, True),
    }
    return {name: B / seconds for name, seconds in _time_interleaved(steps, repeats).items()}


def bench_end_to_end(d_in: int, n: int, batch: int, seeds: int, steps: int, select_dtype: str | None) -> float:
    """`train_saes` on a random array (data gather, hashing, NaN check included): SAE-tokens/s."""
    from replication.sae.training import train_saes

    acts = np.random.default_rng(0).standard_normal((batch * (steps + 1), d_in)).astype(np.float32)
    configs = [TrainConfig(n_latents=n, k=K, seed=s, select_dtype=select_dtype) for s in range(seeds)]
    data = DataConfig(batch_size=batch, n_tokens=batch * (steps + 1))
    train_saes(acts, configs, DataConfig(batch_size=batch, n_tokens=batch), progress=False)  # warm-up
    t0 = time.perf_counter()
    train_saes(acts, configs, data, progress=False)
    return seeds * batch * (steps + 1) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="only d_in 768, n 4096")
    parser.add_argument("--cpu-time", action="store_true",
                        help="1 thread, timed by the thread's CPU clock: robust when other jobs load the machine")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        args.threads, CLOCK = 1, time.thread_time
    torch.set_num_threads(args.threads)
    shapes = [(768, 4096)] if args.quick else [(768, 4096), (768, 16384), (576, 4096), (576, 16384)]
    clock = "thread CPU time" if args.cpu_time else "wall clock"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock}, batch {B}, k {K}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'d_in':>5} {'n_latents':>9}  {'method':<21} {'tokens/s':>9}  {'vs encoder-only':>15}")
    for d_in, n in shapes:
        rates = bench_one(d_in, n, args.repeats)
        limit = rates["encoder-only"]
        for name, rate in rates.items():
            print(f"{d_in:>5} {n:>9}  {name:<21} {rate:>9,.0f}  {rate / limit:>14.0%}", flush=True)
    if not args.quick and not args.cpu_time:
        print("\nend to end: train_saes, 2 seeds sharing the stream, d_in 576, n 4096, batch 1024, 20 steps")
        for sel in (None, "bfloat16"):
            rate = bench_end_to_end(576, 4096, 1024, 2, 20, sel)
            print(f"  select_dtype={sel!s:<9} {rate:>9,.0f} SAE-tokens/s (tokens/s per SAE x 2 seeds)", flush=True)


if __name__ == "__main__":
    np.set_printoptions(suppress=True)
    main()
