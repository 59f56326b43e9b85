"""Training throughput of every SAE configuration the default profile trains: the README's cost model.

    python bench/bench_family_rates.py [--steps 25] [--members 4] [--select-dtype auto]

Each row times the trainer's own step (`training._Member.train_step`: the sparse TopK kernels or the
penalised architectures' step, gradient handling, fused Adam, decoder renorm, dead-latent tracking) for a
family of `--members` SAEs sharing each batch, as `make figures` trains them: batch 1024, d_in 576
(SmolLM2-135M), random inputs. It prints SAE-tokens/s, the ratio to the core configuration (TopK, 1024
latents, k 32) measured in the same run, and the minutes a 4-seed family at the default profile's budget
(`n_tokens` in notebooks/params/family/default.yaml, or `--budget`) would take at that rate with the
end-to-end efficiency measured for the core family (~85%: batch gathering, hashing and checkpoints cost
the rest). Multiply by each notebook's families (README, "Cost on this 2-core CPU") to
estimate the default profile on another machine.

Measured here (2-core Xeon with AMX, torch 2.13.0+cpu, bf16 selection, quiet machine), 2026-11-29:

    configuration            SAE-tokens/s  vs core
    topk n=64 k=32                 69,693    1.63
    topk n=128 k=32                69,300    1.62
    topk n=256 k=32                61,920    1.45
    topk n=512 k=32                55,274    1.29
    topk n=576 k=32                61,230    1.43
    topk n=1024 k=32 (core)        42,767    1.00
    topk n=2048 k=32               33,378    0.78
    topk n=512 k=8                119,293    2.79
    topk n=512 k=16                85,891    2.01
    topk n=512 k=64                47,811    1.12
    topk n=512 k=128               27,832    0.65
    topk n=256 k=16               110,699    2.59
    relu n=512                     47,959    1.12
    gated n=512                    34,922    0.82
    jumprelu n=512                 30,693    0.72
    batchtopk n=512 k=32           31,279    0.73

Reading: below ~512 latents the k selected latents per token, not the encoder matmul, set the cost (64 and
128 latents train at the same rate); at 1024 latents no kernel dominates the ~26 ms step of one SAE (top-k
5.5 ms, encoder matmul and two sparse products 3.5 ms, two sampled dense-dense products 3 ms, two
`embedding_bag`s 2.6 ms, Adam 1 ms).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replication.devices import resolve_dtype  # noqa: E402
from replication.experiments import FamilySpec  # noqa: E402
from replication.sae.training import DataConfig, TrainConfig, _Member  # noqa: E402

CONFIGS: list[tuple[str, int, int | None]] = [
    ("topk", 64, 32), ("topk", 128, 32), ("topk", 256, 32), ("topk", 512, 32), ("topk", 576, 32), ("topk", 1024, 32),
    ("topk", 2048, 32), ("topk", 512, 8), ("topk", 512, 16), ("topk", 512, 64), ("topk", 512, 128), ("topk", 256, 16),
    ("relu", 512, None), ("gated", 512, None), ("jumprelu", 512, None), ("batchtopk", 512, 32),
]
"""(architecture, n_latents, k): the sizes, k values and architectures of notebooks 01, 06, 07, 09, 16 and 17."""

CORE = ("topk", 1024, 32)
END_TO_END = 0.85
"""A family's end-to-end rate over its step rate, measured on the core family (36.3k vs 42.8k SAE-tokens/s)."""


def family_rate(arch: str, n_latents: int, k: int | None, inputs: torch.Tensor, members: int, steps: int,
                select_dtype: str) -> float:
    """SAE-tokens/s of `members` SAEs of one configuration trained in turn on each shared batch."""
    d_in, batch = inputs.shape[1], 1024
    data = DataConfig(batch_size=batch)
    family = [_Member(s, TrainConfig(architecture=arch, n_latents=n_latents, k=k, seed=s, select_dtype=select_dtype,
                                     l1_coefficient=0.1), data, d_in, 10 * steps, None, "bench")
              for s in range(members)]
    workspace: dict[str, torch.Tensor] = {}
    n_batches = inputs.shape[0] // batch

    def step(i: int) -> None:
        x = inputs[(i % n_batches) * batch:(i % n_batches + 1) * batch]
        total_variance = x.var(dim=0, correction=0).sum() * batch
        for member in family:
            member.train_step(x, total_variance, workspace)

    for i in range(3):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return members * batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--select-dtype", default="auto", help="top-k selection dtype: auto, float32 or bfloat16")
    parser.add_argument("--budget", type=int, default=None,
                        help="training tokens per SAE for the minutes column (default: the default profile's n_tokens)")
    args = parser.parse_args()
    select = resolve_dtype(args.select_dtype, "cpu", what="select_dtype")
    torch.manual_seed(0)
    inputs = torch.randn(32 * 1024, 576) * 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, selection dtype {select}, "
          f"{args.members} SAEs per family, {args.steps} steps each")
    rates = {cfg: family_rate(*cfg, inputs, args.members, args.steps, select) for cfg in CONFIGS}
    core = rates[CORE]
    budget = args.budget or int(FamilySpec.from_profile("default").n_tokens)
    print(f"{'configuration':26s}{'SAE-tokens/s':>13s}{'vs core':>9s}{f'4 x {budget / 1e6:g}M tokens':>15s}")
    for (arch, n, k), rate in rates.items():
        name = f"{arch} n={n}" + (f" k={k}" if k is not None else "") + (" (core)" if (arch, n, k) == CORE else "")
        minutes = 4 * budget / (rate * END_TO_END) / 60
        print(f"{name:26s}{rate:13,.0f}{rate / core:9.2f}{minutes:12.1f} min")


if __name__ == "__main__":
    main()
