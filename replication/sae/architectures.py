"""Sparse autoencoder architectures with one shared interface.

Every class exposes the same methods, so no caller branches on the architecture:

* `encode(x) -> Code` (one type: sparse values/indices for TopK, dense values otherwise) and
  `decode(code)`; `forward(x) -> dict`; `latent_directions()`, `n_latents`, `d_in`;
* the input scale lives inside the SAE: `encode_activations(x)` and `reconstruct(x, keep)` take
  model-unit activations (`encode`/`decode` work in SAE units, what the trainer feeds);
* `loss_and_grads(...)`: one training step's loss and gradients; the trainer calls only this;
* `iter_codes(sae, activations)`: the one batch loop over activation rows.

Parameter names equal the tensor names of the `sparsify` checkpoint layout (`encoder.weight
[n, d_in]`, `encoder.bias [n]`, `W_dec [n, d_in]`, `b_dec [d_in]`), so a state dict is the checkpoint.

* `TopKSAE` is the `sparsify` SAE the paper trained: `z = TopK(ReLU(W_enc (x - b_dec) + b_enc))`,
  `x_hat = W_dec^T z + b_dec`. Its gradients come from a sparse backward (only the k selected
  latents per token carry gradient), in `kernels`.
* `ReLUSAE`: ReLU + L1, the L1 weighted by decoder row norms (as SAELens does).
* `GatedSAE`: Rajamanoharan et al. 2024 (`b_gate`, `b_mag`, `r_mag`, auxiliary loss through a
  frozen decoder copy).
* `JumpReLUSAE`: Rajamanoharan et al. 2024b (`log_threshold`, L0 penalty, straight-through
  estimator with a rectangle kernel).

Initialisation (all architectures, as `sparsify`): the encoder weight gets `nn.Linear`'s default
init (`kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))), biases zero, the
decoder is a copy of the encoder weight with unit-norm rows. The random numbers come from a
local `torch.Generator(seed)` on the CPU, never from the global RNG, so the seed touches
nothing else (in particular not the data stream) and init is device independent.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..devices import torch_dtype
from .directions import LatentDirections
from .kernels import TopKAutoencode, fired_from_topk, topk_loss_and_grads, topk_select

ARCHITECTURES = ("topk", "relu", "gated", "jumprelu", "batchtopk")


class Code(NamedTuple):
    """A batch's latent code, one type for every architecture.

    TopK: `values [B, k]` and `indices [B, k]` (sparse; scattering costs `B x n_latents` memory).
    The others: dense `values [B, n_latents]` and `indices` None.
    """

    values: Tensor
    indices: Tensor | None

    def dense(self, n_latents: int) -> Tensor:
        """`[B, n_latents]` activations."""
        if self.indices is None:
            return self.values
        out = torch.zeros(self.values.shape[0], n_latents, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_(1, self.indices, self.values.clamp_min(0))

    def masked(self, keep: Tensor) -> "Code":
        """The code with every latent outside `keep` (bool `[n_latents]`) set to zero."""
        if self.indices is None:
            return Code(self.values * keep, None)
        return Code(self.values * keep[self.indices], self.indices)

    def totals(self, n_latents: int) -> Tensor:
        """float64 `[n_latents]`: each latent's summed activation over the batch."""
        if self.indices is None:
            return self.values.double().sum(0)
        out = torch.zeros(n_latents, dtype=torch.float64, device=self.values.device)
        return out.index_add_(0, self.indices.reshape(-1), self.values.reshape(-1).double())

    def counts(self, n_latents: int) -> Tensor:
        """int64 `[n_latents]`: on how many tokens of the batch each latent is active (> 0)."""
        if self.indices is None:
            return (self.values > 0).sum(dim=0, dtype=torch.int64)
        return torch.bincount(self.indices[self.values > 0], minlength=n_latents).to(torch.int64)

    def fired(self, n_latents: int) -> Tensor:
        """Bool `[B, n_latents]`: latent active (> 0) on the token."""
        if self.indices is None:
            return self.values > 0
        mask = torch.zeros(self.values.shape[0], n_latents, dtype=torch.bool, device=self.values.device)
        return mask.scatter_(1, self.indices, self.values > 0)


# ----------------------------------------------------------------------------------------------
# initialisation helpers
# ----------------------------------------------------------------------------------------------
def _encoder_init(n_latents: int, d_in: int, seed: int) -> Tensor:
    """`nn.Linear(d_in, n_latents)` default weight init from a local generator (float32, CPU)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    weight = torch.empty(n_latents, d_in, dtype=torch.float32)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)
    return weight


def _unit_rows(weight: Tensor) -> Tensor:
    """Rows divided by (norm + eps), exactly as `sparsify.set_decoder_norm_to_unit_norm`."""
    eps = torch.finfo(weight.dtype).eps
    return weight / (torch.norm(weight, dim=1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------
def _total_variance(x: Tensor, total_variance: Tensor | None) -> Tensor:
    """The FVU denominator: the batch's summed squared deviation from its mean, unless given."""
    return (x - x.mean(0)).pow(2).sum() if total_variance is None else total_variance


class SAEBase(nn.Module):
    """Shared plumbing: shapes, decoder-norm maintenance, directions, cfg for checkpoints."""

    architecture: str = ""

    def __init__(self, d_in: int, n_latents: int, *, normalize_decoder: bool, input_scale: float = 1.0):
        super().__init__()
        if d_in <= 0 or n_latents <= 0:
            raise ValueError(f"d_in and n_latents must be positive; got d_in={d_in}, n_latents={n_latents}")
        self.d_in = int(d_in)
        self.n_latents = int(n_latents)
        self.normalize_decoder = bool(normalize_decoder)
        # Model-unit activations times this are what `encode` takes; `encode_activations` applies it.
        self.input_scale = float(input_scale)

    # -- properties ------------------------------------------------------------------------
    @property
    def num_latents(self) -> int:  # sparsify's name
        return self.n_latents

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    # -- decoder maintenance (sparsify) ----------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Renormalise decoder rows to unit norm (after every optimiser step)."""
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(torch.norm(self.W_dec, dim=1, keepdim=True) + eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the gradient component along each (unit) decoder row, before the step."""
        grad = self.W_dec.grad
        if grad is None:
            return
        parallel = torch.einsum("nd,nd->n", grad, self.W_dec)    # batched dot: no [n, d] temporary
        grad.addcmul_(parallel[:, None], self.W_dec, value=-1.0)

    # -- interface -------------------------------------------------------------------------
    def latent_directions(self, name: str = "") -> LatentDirections:
        """Encoder rows and decoder rows (float32 numpy, rows = latents)."""
        enc = self.encoder.weight.detach().float().cpu().numpy()
        dec = self.W_dec.detach().float().cpu().numpy()
        return LatentDirections(enc, dec, name=name, meta={"architecture": self.architecture, **self.cfg_dict()})

    def cfg_dict(self) -> dict[str, Any]:
        """The `cfg.json` content (sparsify keys plus `architecture`)."""
        return {
            "architecture": self.architecture,
            "activation": "topk" if self.architecture == "topk" else self.architecture,
            "d_in": self.d_in,
            "num_latents": self.n_latents,
            "k": getattr(self, "k", None),
            # sparsify's field is an int; `num_latents` (nonzero) is what sparsify actually uses.
            "expansion_factor": self.n_latents // self.d_in,
            "normalize_decoder": self.normalize_decoder,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "input_scale": self.input_scale,
        }

    def loss_and_grads(self, x: Tensor, total_variance: Tensor, *, l1_coefficient: float = 0.0, step: int = 0,
                       total_steps: int = 1, dead_mask: Tensor | None = None, auxk_alpha: float = 0.0,
                       workspace: dict[str, Tensor] | None = None, select_dtype: torch.dtype | None = None) -> dict[str, Any]:
        """One training step's loss and gradients (written into `.grad`); returns the step's stats
        (`fvu`, `l0`, `fired`). Each architecture brings its own: autograd through `training_loss`
        here, the sparse manual backward for TopK. The trainer calls only this."""
        for p in self.parameters():
            p.grad = None
        loss, stats = self.training_loss(x, total_variance=total_variance, l1_coefficient=l1_coefficient,
                                         step=step, total_steps=total_steps)
        loss.backward()
        return stats

    # -- the interface every architecture shares --------------------------------------------
    def activations(self, x: Tensor) -> Tensor:
        """Dense latent activations `[B, n_latents]` of the (scaled) input; each dense architecture defines it."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Code:
        """The latent code of `x` (in SAE units, i.e. already multiplied by `input_scale`)."""
        return Code(self.activations(x), None)

    def decode(self, code: Code, bias: bool = True) -> Tensor:
        """Reconstruction `[B, d_in]` in SAE units (`bias=False`: the latents' sum only)."""
        out = code.values @ self.W_dec
        return out + self.b_dec if bias else out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        code = self.encode(x)
        return {"x_hat": self.decode(code), "latents": code.values}

    def scaled(self, x: Tensor) -> Tensor:
        """Model-unit activations in this SAE's units: `x * input_scale`, in the SAE's dtype and device."""
        return x.to(self.device, self.dtype) * self.input_scale

    def encode_activations(self, x: Tensor) -> Code:
        """The code of model-unit activations (the input scale is applied here, not by callers)."""
        return self.encode(self.scaled(x))

    def reconstruct(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Reconstruction of model-unit activations, in model units (float32); `keep` (bool `[n_latents]`)
        zeroes every other latent after encoding."""
        code = self.encode_activations(x)
        if keep is not None:
            code = code.masked(keep)
        return (self.decode(code) / self.input_scale).float()

    def firing_mask(self, x: Tensor) -> Tensor:
        """Bool `[B, n_latents]`: latent active on a token."""
        return self.encode(x).fired(self.n_latents)

    def count_firing(self, x: Tensor) -> Tensor:
        """Int64 `[n_latents]`: on how many tokens of `x` each latent is active."""
        return self.encode(x).counts(self.n_latents)

    def _create_weights(self, encoder_bias: bool, device: Any, dtype: torch.dtype | str | None) -> torch.dtype:
        """Zeroed `encoder` (Linear, optional bias), `W_dec [n, d_in]` and `b_dec [d_in]`; returns the dtype.

        Every architecture shares these tensors (sparsify names); `reset_parameters` fills them.
        """
        dtype = torch_dtype(dtype)
        self.encoder = _empty_linear(self.d_in, self.n_latents, encoder_bias, device, dtype)
        self.W_dec = nn.Parameter(torch.zeros(self.n_latents, self.d_in, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in, device=device, dtype=dtype))
        with torch.no_grad():
            self.encoder.weight.zero_()
            if encoder_bias:
                self.encoder.bias.zero_()
        return dtype

    def _init_tied(self, seed: int) -> Tensor:
        weight = _encoder_init(self.n_latents, self.d_in, seed).to(device=self.W_dec.device, dtype=self.W_dec.dtype)
        with torch.no_grad():
            self.encoder.weight.copy_(weight)
            self.W_dec.copy_(_unit_rows(weight))
            self.b_dec.zero_()
        return weight

    def reset_parameters(self, seed: int) -> None:
        """sparsify init from a local generator: nn.Linear weight, zero bias, tied unit-norm decoder."""
        self._init_tied(seed)
        with torch.no_grad():
            self.encoder.bias.zero_()

    def _extra_repr_fields(self) -> str:
        return f"d_in={self.d_in}, n_latents={self.n_latents}"

    def extra_repr(self) -> str:
        return self._extra_repr_fields()


def _empty_linear(d_in: int, n: int, bias: bool, device: Any, dtype: torch.dtype) -> nn.Linear:
    """An `nn.Linear` whose construction does not consume the global RNG."""
    return torch.nn.utils.skip_init(nn.Linear, d_in, n, bias=bias, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# TopK: sparse kernels
# ----------------------------------------------------------------------------------------------


class TopKSAE(SAEBase):
    """The `sparsify` TopK SAE (paper's trainer). See module docstring for the equations."""

    architecture = "topk"

    def __init__(self, d_in: int, n_latents: int, k: int, *, seed: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                 normalize_decoder: bool = True, input_scale: float = 1.0):
        super().__init__(d_in, n_latents, normalize_decoder=normalize_decoder, input_scale=input_scale)
        if not 0 < int(k) <= n_latents:
            raise ValueError(f"k={k} must be in 1..n_latents={n_latents}")
        self.k = int(k)
        self._create_weights(True, device, dtype)
        if seed is not None:
            self.reset_parameters(seed)

    def _extra_repr_fields(self) -> str:
        return f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}"

    def pre_activations(self, x: Tensor) -> Tensor:
        return F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias)

    def encode(self, x: Tensor) -> Code:
        """Code(values [B, k], indices [B, k]); values are ReLU'd, indices sorted within a row."""
        return Code(*topk_select(self.pre_activations(x), self.k))

    def decode(self, code: Code, bias: bool = True) -> Tensor:
        out = F.embedding_bag(code.indices, self.W_dec, per_sample_weights=code.values.to(self.W_dec.dtype), mode="sum")
        return out + self.b_dec if bias else out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x_hat, values, indices (differentiable through the sparse backward)."""
        x_hat, values, indices = TopKAutoencode.apply(x, self.encoder.weight, self.encoder.bias, self.W_dec, self.b_dec, self.k)
        return {"x_hat": x_hat, "values": values, "indices": indices}

    def training_loss(self, x: Tensor, total_variance: Tensor | None = None, **_: Any) -> tuple[Tensor, dict[str, Any]]:
        """Autograd version of the training loss (FVU); the trainer uses `topk_loss_and_grads`."""
        total_variance = _total_variance(x, total_variance)
        out = self(x)
        fvu = (out["x_hat"] - x).pow(2).sum() / total_variance
        return fvu, {"fvu": fvu.detach(), "l0": (out["values"] > 0).sum(1).float().mean(),
                     "fired": fired_from_topk(out["values"], out["indices"], self.n_latents)}

    def loss_and_grads(self, x: Tensor, total_variance: Tensor, *, dead_mask: Tensor | None = None,
                       auxk_alpha: float = 0.0, workspace: dict[str, Tensor] | None = None,
                       select_dtype: torch.dtype | None = None, **_: Any) -> dict[str, Any]:
        """The sparse manual backward (`kernels.topk_loss_and_grads`): same loss and gradients as
        autograd through `training_loss`, with buffers reused across steps and optional AuxK."""
        return topk_loss_and_grads(self, x, total_variance=total_variance, dead_mask=dead_mask, auxk_alpha=auxk_alpha,
                                   workspace=workspace, select_dtype=select_dtype)


# ----------------------------------------------------------------------------------------------
# dense architectures
# ----------------------------------------------------------------------------------------------
def _l1_weighted(acts: Tensor, W_dec: Tensor, total_variance: Tensor, batch: int) -> Tensor:
    """Scale-free norm-weighted L1: mean_b sum_i |z_bi| ||W_dec_i|| / sqrt(mean_b ||x_b - mean||^2).

    SAELens' penalty (sum_i |z_i| ||W_dec_i||, batch mean) divided by the root of the per-token
    variance, so that with the FVU reconstruction term the coefficient does not depend on the
    activation scale (SAELens' coefficient on sqrt(d_in)-normalised inputs ~ ours * sqrt(d_in)).
    """
    l1 = (acts.abs() * W_dec.norm(dim=1)).sum(1).mean()
    return l1 / torch.sqrt(total_variance / batch)


class ReLUSAE(SAEBase):
    """Standard SAE: z = ReLU(W_enc (x - b_dec) + b_enc), L1 weighted by decoder row norms."""

    architecture = "relu"

    def __init__(self, d_in: int, n_latents: int, *, seed: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None, normalize_decoder: bool = False, input_scale: float = 1.0):
        super().__init__(d_in, n_latents, normalize_decoder=normalize_decoder, input_scale=input_scale)
        dtype = self._create_weights(True, device, dtype)
        if seed is not None:
            self.reset_parameters(seed)

    def activations(self, x: Tensor) -> Tensor:
        return F.relu(F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))

    def training_loss(self, x: Tensor, total_variance: Tensor | None = None, l1_coefficient: float = 0.0,
                      **_: Any) -> tuple[Tensor, dict[str, Any]]:
        """FVU + l1_coefficient * norm-weighted L1 (see `_l1_weighted`)."""
        total_variance = _total_variance(x, total_variance)
        out = self(x)
        fvu = (out["x_hat"] - x).pow(2).sum() / total_variance
        l1 = _l1_weighted(out["latents"], self.W_dec, total_variance, x.shape[0])
        active = out["latents"] > 0
        return fvu + l1_coefficient * l1, {"fvu": fvu.detach(), "l1": l1.detach(),
                                           "l0": active.sum(1, dtype=torch.float32).mean(), "fired": active.any(0)}


class BatchTopKSAE(ReLUSAE):
    """BatchTopK SAE (Bussmann et al. 2024, as trained in dictionary_learning).

    Training keeps the k·B largest ReLU'd pre-activations of the whole batch (so a token's L0
    varies around k) and minimises FVU alone. Inference cannot depend on the batch, so a latent
    fires where its ReLU'd pre-activation exceeds `threshold`: an exponential moving average
    (beta 0.999) of the smallest activation kept in each training batch, updated from step
    `threshold_start_fraction · total_steps` on (dictionary_learning: step 1000 of its runs; here the
    same fraction of the run as the warm-up, 1000 of the paper's ~122k steps). Until a threshold
    exists (-1, the initial value), inference uses the batch-level top-k too. Decoder rows are kept
    at unit norm, as for TopK.
    """

    architecture = "batchtopk"
    threshold_beta = 0.999
    threshold_start_fraction = 1000 / 122_070

    def __init__(self, d_in: int, n_latents: int, k: int, *, seed: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                 normalize_decoder: bool = True, input_scale: float = 1.0):
        if not 0 < int(k) <= n_latents:
            raise ValueError(f"k={k} must be in 1..n_latents={n_latents}")
        self.k = int(k)
        super().__init__(d_in, n_latents, seed=seed, device=device, dtype=dtype, normalize_decoder=normalize_decoder,
                         input_scale=input_scale)
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32, device=device))

    def _extra_repr_fields(self) -> str:
        return f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, threshold={float(self.threshold):.4g}"

    def batch_topk_mask(self, acts: Tensor) -> Tensor:
        """Bool [B, n]: the k·B largest entries of the (ReLU'd) batch, ties broken by torch.topk."""
        flat = acts.reshape(-1)
        keep = min(self.k * acts.shape[0], flat.numel())
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.topk(keep, sorted=False).indices] = True
        return mask.view_as(acts) & (acts > 0)

    def activations(self, x: Tensor) -> Tensor:
        """Inference code: ReLU'd pre-activations above `threshold` (batch top-k before one exists)."""
        acts = F.relu(F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))
        if float(self.threshold) < 0:
            return acts * self.batch_topk_mask(acts)
        return acts * (acts > self.threshold.to(acts.dtype))

    @torch.no_grad()
    def update_threshold(self, kept: Tensor) -> None:
        """EMA of the smallest kept activation (the first update sets it)."""
        positive = kept[kept > 0]
        smallest = positive.min().float() if positive.numel() else kept.new_zeros((), dtype=torch.float32)
        if float(self.threshold) < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.mul_(self.threshold_beta).add_((1 - self.threshold_beta) * smallest)

    def training_loss(self, x: Tensor, total_variance: Tensor | None = None, step: int | None = None,
                      total_steps: int | None = None, **_: Any) -> tuple[Tensor, dict[str, Any]]:
        """FVU of the batch-level top-k code; updates `threshold` once past its start step."""
        total_variance = _total_variance(x, total_variance)
        acts = F.relu(F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))
        mask = self.batch_topk_mask(acts.detach())
        code = acts * mask
        fvu = (self.decode(Code(code, None)) - x).pow(2).sum() / total_variance
        start = round(self.threshold_start_fraction * total_steps) if total_steps else 0
        if step is None or step >= start:
            self.update_threshold(code.detach())
        return fvu, {"fvu": fvu.detach(), "l0": mask.sum(1, dtype=torch.float32).mean(), "fired": mask.any(0)}


class GatedSAE(SAEBase):
    """Gated SAE (Rajamanoharan et al. 2024).

    pi_gate = W_gate (x - b_dec) + b_gate; f_gate = 1[pi_gate > 0];
    f_mag = ReLU(exp(r_mag) * (W_gate (x - b_dec)) + b_mag); f = f_gate * f_mag;
    x_hat = W_dec^T f + b_dec. Loss: FVU + l1 * norm-weighted L1 of ReLU(pi_gate)
    + aux FVU of the frozen-decoder reconstruction from ReLU(pi_gate).
    `encoder.weight` is W_gate (the shared direction).
    """

    architecture = "gated"

    def __init__(self, d_in: int, n_latents: int, *, seed: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None, normalize_decoder: bool = False, input_scale: float = 1.0):
        super().__init__(d_in, n_latents, normalize_decoder=normalize_decoder, input_scale=input_scale)
        dtype = self._create_weights(False, device, dtype)
        self.b_gate = nn.Parameter(torch.zeros(n_latents, device=device, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(n_latents, device=device, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(n_latents, device=device, dtype=dtype))
        if seed is not None:
            self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        self._init_tied(seed)
        with torch.no_grad():
            self.b_gate.zero_()
            self.b_mag.zero_()
            self.r_mag.zero_()

    def _gate_and_mag(self, x: Tensor) -> tuple[Tensor, Tensor]:
        proj = F.linear(x - self.b_dec, self.encoder.weight)
        return proj + self.b_gate, F.relu(proj * torch.exp(self.r_mag) + self.b_mag)

    def activations(self, x: Tensor) -> Tensor:
        pi_gate, f_mag = self._gate_and_mag(x)
        return (pi_gate > 0).to(f_mag.dtype) * f_mag

    def training_loss(self, x: Tensor, total_variance: Tensor | None = None, l1_coefficient: float = 0.0,
                      **_: Any) -> tuple[Tensor, dict[str, Any]]:
        total_variance = _total_variance(x, total_variance)
        pi_gate, f_mag = self._gate_and_mag(x)
        acts = (pi_gate > 0).to(f_mag.dtype) * f_mag
        x_hat = self.decode(Code(acts, None))
        fvu = (x_hat - x).pow(2).sum() / total_variance
        gate_relu = F.relu(pi_gate)
        l1 = _l1_weighted(gate_relu, self.W_dec, total_variance, x.shape[0])
        x_hat_frozen = gate_relu @ self.W_dec.detach() + self.b_dec.detach()
        aux = (x_hat_frozen - x).pow(2).sum() / total_variance
        active = acts > 0
        return fvu + l1_coefficient * l1 + aux, {"fvu": fvu.detach(), "l1": l1.detach(), "aux": aux.detach(),
                                                 "l0": active.sum(1, dtype=torch.float32).mean(), "fired": active.any(0)}


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta) with the straight-through gradient wrt theta (rectangle kernel)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_z = g * (z > theta)
        kernel = ((z - theta).abs() < eps / 2).to(z.dtype) / eps
        g_theta = (-theta * kernel * g).sum(0)
        return g_z, g_theta, None


class _Step(torch.autograd.Function):
    """H(z - theta) with the straight-through gradient wrt theta (for the L0 penalty)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((z - theta).abs() < eps / 2).to(z.dtype) / eps
        return torch.zeros_like(z), (-kernel * g).sum(0), None


class JumpReLUSAE(SAEBase):
    """JumpReLU SAE (Rajamanoharan et al. 2024b): z = pre * H(pre - exp(log_threshold)).

    Loss: FVU + l1_coefficient * mean L0 (straight-through estimator, rectangle kernel of
    width `bandwidth`). Encoder/decoder init as the others; thresholds start at `init_threshold`.

    The paper's 0.001 for both is in units of inputs with unit mean squared norm; ours are
    normalised to mean squared norm `d_in` (`ActivationCache.input_scale`), so pre-activations are
    ~sqrt(d_in) larger and the defaults are `PAPER_SCALE * sqrt(d_in)`. With 0.001 itself (24x too
    small at d 576) almost no pre-activation falls inside the kernel, the thresholds cannot move in a
    run of a few thousand steps, and every latent ends up firing (held-out L0 511.8 of 512 at any
    penalty on the default profile). Saved SAEs keep their values in cfg.json.
    """

    architecture = "jumprelu"
    PAPER_SCALE = 0.001

    def __init__(self, d_in: int, n_latents: int, *, seed: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None, normalize_decoder: bool = False, input_scale: float = 1.0,
                 bandwidth: float | None = None, init_threshold: float | None = None):
        super().__init__(d_in, n_latents, normalize_decoder=normalize_decoder, input_scale=input_scale)
        scaled = self.PAPER_SCALE * math.sqrt(d_in)
        self.bandwidth = float(scaled if bandwidth is None else bandwidth)
        self.init_threshold = float(scaled if init_threshold is None else init_threshold)
        dtype = self._create_weights(True, device, dtype)
        self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(self.init_threshold), device=device, dtype=dtype))
        if seed is not None:
            self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        self._init_tied(seed)
        with torch.no_grad():
            self.encoder.bias.zero_()
            self.log_threshold.fill_(math.log(self.init_threshold))

    def cfg_dict(self) -> dict[str, Any]:
        return {**super().cfg_dict(), "bandwidth": self.bandwidth, "init_threshold": self.init_threshold}

    def activations(self, x: Tensor) -> Tensor:
        pre = F.relu(F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))
        return pre * (pre > torch.exp(self.log_threshold))

    def training_loss(self, x: Tensor, total_variance: Tensor | None = None, l1_coefficient: float = 0.0,
                      **_: Any) -> tuple[Tensor, dict[str, Any]]:
        total_variance = _total_variance(x, total_variance)
        pre = F.relu(F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))
        theta = torch.exp(self.log_threshold)
        acts = _JumpReLU.apply(pre, theta, self.bandwidth)
        fvu = (self.decode(Code(acts, None)) - x).pow(2).sum() / total_variance
        l0 = _Step.apply(pre, theta, self.bandwidth).sum(1).mean()
        active = acts > 0
        return fvu + l1_coefficient * l0, {"fvu": fvu.detach(), "l0": l0.detach().float(), "fired": active.any(0)}


SAE_CLASSES: dict[str, type[SAEBase]] = {"topk": TopKSAE, "relu": ReLUSAE, "gated": GatedSAE, "jumprelu": JumpReLUSAE,
                                         "batchtopk": BatchTopKSAE}
UNIT_NORM_DECODER = ("topk", "batchtopk")
"""Architectures whose decoder rows are kept at unit norm by default (sparsify, dictionary_learning)."""


def build_sae(architecture: str, d_in: int, n_latents: int, *, k: int | None = None, seed: int | None = None,
              device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
              normalize_decoder: bool | None = None, input_scale: float = 1.0, **extra: Any) -> SAEBase:
    """Construct an SAE by architecture name; `seed=None` leaves it zero (to load weights into)."""
    if architecture not in SAE_CLASSES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
    if normalize_decoder is None:
        normalize_decoder = architecture in UNIT_NORM_DECODER
    kwargs: dict[str, Any] = dict(seed=seed, device=device, dtype=dtype, normalize_decoder=normalize_decoder,
                                  input_scale=input_scale)
    if architecture in ("topk", "batchtopk"):
        if k is None:
            raise ValueError(f"a {architecture} SAE needs k")
        return SAE_CLASSES[architecture](d_in, n_latents, k, **kwargs)
    if architecture == "jumprelu":
        kwargs.update({key: extra[key] for key in ("bandwidth", "init_threshold") if key in extra})
    return SAE_CLASSES[architecture](d_in, n_latents, **kwargs)


# ----------------------------------------------------------------------------------------------
# firing counts
# ----------------------------------------------------------------------------------------------
def on_device(sae: SAEBase, device: str | torch.device | None) -> SAEBase:
    """`sae` itself, or a copy on `device` (the caller's module stays where it is)."""
    if device is None or torch.device(device) == sae.device:
        return sae
    return copy.deepcopy(sae).to(device)


def iter_batches(sae: SAEBase, activations: np.ndarray | Tensor, batch_size: int = 4096,
                 device: str | torch.device | None = None, *, input_scale: float | None = None, progress: bool = False,
                 desc: str = "encoding") -> Iterator[tuple[int, Tensor]]:
    """`(start, x)` per batch of `activations [N, d_in]` (model units): `x` in SAE units (times `input_scale`,
    default the SAE's own), in the SAE's dtype, on `device` or the SAE's. The SAE must already be there
    (`on_device`)."""
    if activations.ndim != 2 or activations.shape[1] != sae.d_in:
        raise ValueError(f"activations must be [N, {sae.d_in}]; got shape {tuple(activations.shape)}")
    target = torch.device(device) if device is not None else sae.device
    scale = sae.input_scale if input_scale is None else float(input_scale)
    n_rows = int(activations.shape[0])
    for start in tqdm(range(0, n_rows, batch_size), desc=desc, disable=not progress, leave=False):
        chunk = activations[start:start + batch_size]
        # a read-only memmap slice is copied (np.array): torch warns on non-writable arrays, and the cast below copies anyway
        x = torch.from_numpy(np.array(chunk)) if not isinstance(chunk, Tensor) else chunk
        x = x.to(device=target, dtype=sae.dtype)
        if scale != 1.0:
            x = x * scale
        yield start, x


def iter_codes(sae: SAEBase, activations: np.ndarray | Tensor, batch_size: int = 4096, device: str | torch.device | None = None,
               *, input_scale: float | None = None, progress: bool = False, desc: str = "encoding",
               ) -> Iterator[tuple[int, Tensor, Code]]:
    """The one batch loop over activation rows: yields `(start, x, code)` per batch (see `iter_batches`),
    `code` the batch's latent code. Firing counts, contexts, subspaces and splicing read activations
    through it; `training.evaluate_sae` through `iter_batches` (it needs the SAE's fused forward)."""
    sae = on_device(sae, device)
    for start, x in iter_batches(sae, activations, batch_size, input_scale=input_scale, progress=progress, desc=desc):
        yield start, x, sae.encode(x)


@torch.no_grad()
def firing_counts(sae: SAEBase, activations: np.ndarray | Tensor, batch_size: int = 4096,
                  device: str | torch.device | None = None, *, input_scale: float | None = None,
                  progress: bool = True) -> np.ndarray:
    """How many tokens (rows of `activations [N, d_in]`) each latent is active on: int64 `[n]`.

    TopK: in the top-k and > 0; other architectures: activation > 0. Rows are multiplied by
    `input_scale` (default: the SAE's own, i.e. what it was trained on) before encoding.
    """
    counts = torch.zeros(sae.n_latents, dtype=torch.int64, device=device or sae.device)
    for _, _, code in iter_codes(sae, activations, batch_size, device, input_scale=input_scale, progress=progress,
                                 desc="firing counts"):
        counts += code.counts(sae.n_latents)
    return counts.cpu().numpy()
