"""Sparse autoencoder architectures with one shared interface.

Every class exposes `encode`, `decode`, `forward(x) -> dict`, `latent_directions()`,
`n_latents`, `d_in` and `training_loss(...)`. Parameter names equal the tensor names of
the `sparsify` checkpoint layout (`encoder.weight [n, d_in]`, `encoder.bias [n]`,
`W_dec [n, d_in]`, `b_dec [d_in]`), so a state dict is the checkpoint.

* `TopKSAE` is the `sparsify` SAE the paper trained: `z = TopK(ReLU(W_enc (x - b_dec) + b_enc))`,
  `x_hat = W_dec^T z + b_dec`. Its gradients come from a sparse backward (only the k selected
  latents per token carry gradient): `TopKAutoencode` (an autograd Function) and
  `topk_loss_and_grads` (the trainer's manual, buffer-reusing path) share the same kernels.
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

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .directions import LatentDirections

ARCHITECTURES = ("topk", "relu", "gated", "jumprelu", "batchtopk")


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor built without invariant checks: the kernels below only build valid ones
    (sorted, in-range indices). Silences torch's once-per-process "beta" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


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


def _to_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if not hasattr(torch, name) or not isinstance(getattr(torch, name), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (use e.g. 'float32', 'float64', 'bfloat16')")
    return getattr(torch, name)


# ----------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------
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
        # The trainer multiplies every batch by this; users must do the same before `encode`.
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

    def firing_mask(self, x: Tensor) -> Tensor:
        """Bool `[B, n_latents]`: latent active on a token (dense architectures: act > 0)."""
        return self.encode(x) > 0

    def count_firing(self, x: Tensor) -> Tensor:
        """Int64 `[n_latents]`: on how many tokens of `x` each latent is active."""
        return self.firing_mask(x).sum(dim=0, dtype=torch.int64)

    def _create_weights(self, encoder_bias: bool, device: Any, dtype: torch.dtype | str | None) -> torch.dtype:
        """Zeroed `encoder` (Linear, optional bias), `W_dec [n, d_in]` and `b_dec [d_in]`; returns the dtype.

        Every architecture shares these tensors (sparsify names); `reset_parameters` fills them.
        """
        dtype = _to_dtype(dtype)
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
def _latent_major_pattern(indices: Tensor, n_latents: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR pattern of the `[n_latents, B]` matrix whose (i, b) entry is set when token b selected i.

    Returns (crow, col, order): `values.reshape(-1)[order]` lays `[B, K]` values out in it.
    """
    flat = indices.reshape(-1)
    if flat.device.type == "cpu" and n_latents <= 65536:
        # numpy's stable sort of uint16 keys is a single-threaded radix sort: ~0.3 ms here, where
        # torch's parallel argsort degrades to tens of ms when other jobs load the CPU.
        keys = flat.numpy().astype(np.uint16)
        order = torch.from_numpy(np.argsort(keys, kind="stable"))
    else:
        order = torch.argsort(flat, stable=True)
    crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(flat, minlength=n_latents), 0, out=crow[1:])
    col = torch.div(order, indices.shape[1], rounding_mode="floor")
    return crow, col, order


def _latent_by_token_mm(pattern: tuple[Tensor, Tensor, Tensor], values: Tensor, dense: Tensor,
                        n_latents: int, out: Tensor | None, accumulate: bool) -> Tensor:
    """`S^T @ dense` where S is `[B, n]` with `values [B, K]` at the selected columns: `[n, d]`."""
    crow, col, order = pattern
    mat = _csr(crow, col, values.reshape(-1)[order], (n_latents, dense.shape[0]))
    if out is None:
        return mat @ dense
    if accumulate:
        return out.addmm_(mat, dense)
    return torch.mm(mat, dense, out=out)


def _gather_dot(indices: Tensor, dense: Tensor, weight: Tensor) -> Tensor:
    """`[B, K]` with entry (b, j) = dense[b] . weight[indices[b, j]] (sampled dense-dense mm)."""
    B, K = indices.shape
    try:
        crow = torch.arange(0, B * K + 1, K, device=indices.device, dtype=torch.int64)
        pattern = _csr(crow, indices.reshape(-1), dense.new_zeros(B * K), (B, weight.shape[0]))
        return torch.sparse.sampled_addmm(pattern, dense, weight.T, beta=0.0).values().view(B, K)
    except (RuntimeError, NotImplementedError):  # pragma: no cover - backend without sampled_addmm
        pass
    out = dense.new_empty(B, K)
    step = 256
    for s in range(0, B, step):
        out[s:s + step] = torch.linalg.vecdot(F.embedding(indices[s:s + step], weight), dense[s:s + step, None, :])
    return out


def _topk_select(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of ReLU(pre) per row, indices sorted ascending within each row (valid CSR rows)."""
    values, indices = pre.topk(k, dim=1, sorted=False)
    indices, perm = indices.sort(dim=1)
    values = values.gather(1, perm).relu_()
    return values, indices


def _sparse_term_backward(
    xc: Tensor, W_enc: Tensor, W_dec: Tensor, indices: Tensor, values: Tensor, g_out: Tensor,
    g_values_extra: Tensor | None, grads: dict[str, Tensor], accumulate: bool,
) -> None:
    """Gradients of one sparse decode `out = sum_j values[:, j] W_dec[indices[:, j]]` (+ b_dec).

    `g_out [B, d]` is dL/d(out). Writes (or adds, when `accumulate`) into `grads` entries
    `W_dec`, `W_enc`, `b_enc`, `b_dec`, `x` (the last is dL/dx through `xc = x - b_dec`).
    Only the selected latents of each token get encoder gradient (TopK's derivative).
    """
    n = W_dec.shape[0]
    pattern = _latent_major_pattern(indices, n)
    _latent_by_token_mm(pattern, values, g_out, n, grads["W_dec"], accumulate)
    g_values = _gather_dot(indices, g_out, W_dec)
    if g_values_extra is not None:
        g_values = g_values + g_values_extra
    g_pre = g_values * (values > 0)          # ReLU derivative; zero-valued picks carry none
    _latent_by_token_mm(pattern, g_pre, xc, n, grads["W_enc"], accumulate)
    if not accumulate:
        grads["b_enc"].zero_()
    grads["b_enc"].index_add_(0, indices.reshape(-1), g_pre.reshape(-1))
    g_xc = F.embedding_bag(indices, W_enc, per_sample_weights=g_pre, mode="sum")
    g_bdec = g_out.sum(0) - g_xc.sum(0)
    if accumulate:
        grads["b_dec"].add_(g_bdec)
        if grads.get("x") is not None:
            grads["x"].add_(g_xc)
    else:
        grads["b_dec"].copy_(g_bdec)
        if "x" in grads:
            grads["x"] = g_xc


class TopKAutoencode(torch.autograd.Function):
    """(x, W_enc, b_enc, W_dec, b_dec, k) -> (x_hat, values, indices) with a sparse backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int):
        xc = x - b_dec
        pre = torch.addmm(b_enc, xc, W_enc.T)
        values, indices = _topk_select(pre, k)
        del pre
        x_hat = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec
        ctx.save_for_backward(xc, W_enc, W_dec, values, indices)
        ctx.mark_non_differentiable(indices)
        return x_hat, values, indices

    @staticmethod
    def backward(ctx: Any, g_xhat: Tensor, g_values: Tensor | None, _g_idx: Any):
        xc, W_enc, W_dec, values, indices = ctx.saved_tensors
        if g_xhat is None:
            g_xhat = xc.new_zeros(xc.shape)
        grads = {
            "W_dec": torch.empty_like(W_dec), "W_enc": torch.empty_like(W_enc),
            "b_enc": W_enc.new_empty(W_enc.shape[0]), "b_dec": W_dec.new_empty(W_dec.shape[1]), "x": None,
        }
        _sparse_term_backward(xc, W_enc, W_dec, indices, values, g_xhat.contiguous(), g_values,
                              grads, accumulate=False)
        return grads["x"], grads["W_enc"], grads["b_enc"], grads["W_dec"], grads["b_dec"], None


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

    def reset_parameters(self, seed: int) -> None:
        """sparsify init from a local generator: nn.Linear weight, zero bias, tied unit-norm decoder."""
        self._init_tied(seed)
        with torch.no_grad():
            self.encoder.bias.zero_()

    def _extra_repr_fields(self) -> str:
        return f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}"

    def pre_activations(self, x: Tensor) -> Tensor:
        return F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values [B, k], indices [B, k]); values are ReLU'd, indices sorted within a row."""
        return _topk_select(self.pre_activations(x), self.k)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum") + self.b_dec

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x_hat, values, indices (differentiable through the sparse backward)."""
        x_hat, values, indices = TopKAutoencode.apply(x, self.encoder.weight, self.encoder.bias, self.W_dec, self.b_dec, self.k)
        return {"x_hat": x_hat, "values": values, "indices": indices}

    def training_loss(self, x: Tensor, total_variance: Tensor | None = None, **_: Any) -> tuple[Tensor, dict[str, Any]]:
        """Autograd version of the training loss (FVU); the trainer uses `topk_loss_and_grads`."""
        if total_variance is None:
            total_variance = (x - x.mean(0)).pow(2).sum()
        out = self(x)
        fvu = (out["x_hat"] - x).pow(2).sum() / total_variance
        return fvu, {"fvu": fvu.detach(), "l0": (out["values"] > 0).sum(1).float().mean(),
                     "fired": _fired_from_topk(out["values"], out["indices"], self.n_latents)}

    def firing_mask(self, x: Tensor) -> Tensor:
        values, indices = self.encode(x)
        mask = torch.zeros(x.shape[0], self.n_latents, dtype=torch.bool, device=x.device)
        return mask.scatter_(1, indices, values > 0)

    def count_firing(self, x: Tensor) -> Tensor:
        values, indices = self.encode(x)
        return torch.bincount(indices[values > 0], minlength=self.n_latents).to(torch.int64)


def _fired_from_topk(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """Bool [n]: latent selected with a positive value on some token (scatter, no nonzero())."""
    hits = torch.zeros(n_latents, dtype=torch.int32, device=values.device)
    hits.index_add_(0, indices.reshape(-1), (values > 0).reshape(-1).to(torch.int32))
    return hits > 0


def _buffer(workspace: dict[str, Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> Tensor:
    """A reusable scratch tensor from `workspace` (re-allocated only when shape/dtype/device change)."""
    buf = workspace.get(name)
    if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device:
        buf = torch.empty(shape, dtype=dtype, device=device)
        workspace[name] = buf
    return buf


def _select_then_recompute(pre_low: Tensor, k: int, xc: Tensor, W_enc: Tensor, b_enc: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k indices from low-precision pre-activations; their values recomputed exactly in xc's dtype."""
    _, indices = pre_low.topk(k, dim=1, sorted=False)
    indices = indices.sort(dim=1).values
    values = (_gather_dot(indices, xc, W_enc) + b_enc[indices]).relu_()
    return values, indices


@torch.no_grad()
def topk_loss_and_grads(
    sae: TopKSAE, x: Tensor, *, total_variance: Tensor | None = None, dead_mask: Tensor | None = None,
    auxk_alpha: float = 0.0, workspace: dict[str, Tensor] | None = None, select_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """One TopK training forward + sparse backward, gradients written into the params' `.grad`.

    Same loss and gradients as `TopKSAE.training_loss(x).backward()` (plus sparsify's AuxK term
    when `auxk_alpha > 0` and `dead_mask` marks dead latents), but without autograd: the
    `[B, n]` pre-activation buffer (kept in `workspace`) and the gradient tensors are reused
    across steps, which matters on CPU where a fresh 100+ MB allocation costs page faults.

    `select_dtype` (e.g. torch.bfloat16) computes the encoder matmul in that dtype **only to
    choose** the top-k latents (sparsify trains under bf16 autocast on GPU); the chosen values,
    the loss and all gradients are then recomputed exactly in x's dtype. On CPUs with bf16
    instructions this is several times faster for large n_latents.
    Returns fvu, auxk (0-d tensors), l0, fired (bool [n]).
    """
    W_enc, b_enc, W_dec, b_dec = sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec
    B, n = x.shape[0], sae.n_latents
    ws = workspace if workspace is not None else {}
    if total_variance is None:
        total_variance = x.var(dim=0, correction=0).sum() * B
    xc = x - b_dec
    low = select_dtype is not None and select_dtype != x.dtype
    if low:
        w_low = _buffer(ws, "W_enc_low", tuple(W_enc.shape), select_dtype, x.device)
        w_low.copy_(W_enc)
        pre = _buffer(ws, "pre_low", (B, n), select_dtype, x.device)
        torch.addmm(b_enc.to(select_dtype), xc.to(select_dtype), w_low.T, out=pre)
        values, indices = _select_then_recompute(pre, sae.k, xc, W_enc, b_enc)
    else:
        pre = _buffer(ws, "pre", (B, n), x.dtype, x.device)
        torch.addmm(b_enc, xc, W_enc.T, out=pre)
        values, indices = _topk_select(pre, sae.k)
    # x_hat - x = (sum_j v_j W_dec[i_j] + b_dec) - x = decoded - xc
    err = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum").sub_(xc)
    flat_err = err.view(-1)
    fvu = torch.dot(flat_err, flat_err) / total_variance
    terms = [(indices, values, err)]

    auxk = x.new_zeros(())
    if auxk_alpha > 0 and dead_mask is not None and (num_dead := int(dead_mask.sum())) > 0:
        k_aux = min(sae.d_in // 2, num_dead)        # sparsify: heuristic from the OpenAI paper
        scale = min(num_dead / (sae.d_in // 2), 1.0)
        pre.masked_fill_(~dead_mask[None], -torch.inf)
        if low:
            aux_values, aux_indices = _select_then_recompute(pre, k_aux, xc, W_enc, b_enc)
        else:
            aux_values, aux_indices = _topk_select(pre, k_aux)
        # sparsify: e_hat - e.detach() with e_hat = decode(aux) (incl. b_dec), e = x - x_hat
        diff = F.embedding_bag(aux_indices, W_dec, per_sample_weights=aux_values, mode="sum").add_(b_dec).add_(err)
        flat = diff.view(-1)
        auxk = scale * torch.dot(flat, flat) / total_variance
        diff.mul_(2.0 * scale * auxk_alpha / total_variance)
        terms.append((aux_indices, aux_values, diff))
    err.mul_(2.0 / total_variance)                  # now dL/dx_hat

    for param in (W_enc, b_enc, W_dec, b_dec):
        if param.grad is None or param.grad.shape != param.shape:
            param.grad = torch.empty_like(param)
    grads = {"W_dec": W_dec.grad, "W_enc": W_enc.grad, "b_enc": b_enc.grad, "b_dec": b_dec.grad}
    for i, (idx, vals, g_out) in enumerate(terms):
        _sparse_term_backward(xc, W_enc, W_dec, idx, vals, g_out, None, grads, accumulate=i > 0)
    return {"fvu": fvu, "auxk": auxk, "l0": (values > 0).sum(1, dtype=torch.float32).mean(),
            "fired": _fired_from_topk(values, indices, n)}


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

    def reset_parameters(self, seed: int) -> None:
        self._init_tied(seed)
        with torch.no_grad():
            self.encoder.bias.zero_()

    def encode(self, x: Tensor) -> Tensor:
        return F.relu(F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        acts = self.encode(x)
        return {"x_hat": self.decode(acts), "latents": acts}

    def training_loss(self, x: Tensor, total_variance: Tensor | None = None, l1_coefficient: float = 0.0,
                      **_: Any) -> tuple[Tensor, dict[str, Any]]:
        """FVU + l1_coefficient * norm-weighted L1 (see `_l1_weighted`)."""
        if total_variance is None:
            total_variance = (x - x.mean(0)).pow(2).sum()
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

    def encode(self, x: Tensor) -> Tensor:
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
        if total_variance is None:
            total_variance = (x - x.mean(0)).pow(2).sum()
        acts = F.relu(F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))
        mask = self.batch_topk_mask(acts.detach())
        code = acts * mask
        fvu = (self.decode(code) - x).pow(2).sum() / total_variance
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

    def encode(self, x: Tensor) -> Tensor:
        pi_gate, f_mag = self._gate_and_mag(x)
        return (pi_gate > 0).to(f_mag.dtype) * f_mag

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        acts = self.encode(x)
        return {"x_hat": self.decode(acts), "latents": acts}

    def training_loss(self, x: Tensor, total_variance: Tensor | None = None, l1_coefficient: float = 0.0,
                      **_: Any) -> tuple[Tensor, dict[str, Any]]:
        if total_variance is None:
            total_variance = (x - x.mean(0)).pow(2).sum()
        pi_gate, f_mag = self._gate_and_mag(x)
        acts = (pi_gate > 0).to(f_mag.dtype) * f_mag
        x_hat = self.decode(acts)
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
    width `bandwidth` in units of the input scale). Encoder/decoder init as the others;
    thresholds start at `init_threshold`.
    """

    architecture = "jumprelu"

    def __init__(self, d_in: int, n_latents: int, *, seed: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None, normalize_decoder: bool = False, input_scale: float = 1.0,
                 bandwidth: float = 0.001, init_threshold: float = 0.001):
        super().__init__(d_in, n_latents, normalize_decoder=normalize_decoder, input_scale=input_scale)
        self.bandwidth = float(bandwidth)
        self.init_threshold = float(init_threshold)
        dtype = self._create_weights(True, device, dtype)
        self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(init_threshold), device=device, dtype=dtype))
        if seed is not None:
            self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        self._init_tied(seed)
        with torch.no_grad():
            self.encoder.bias.zero_()
            self.log_threshold.fill_(math.log(self.init_threshold))

    def cfg_dict(self) -> dict[str, Any]:
        return {**super().cfg_dict(), "bandwidth": self.bandwidth, "init_threshold": self.init_threshold}

    def encode(self, x: Tensor) -> Tensor:
        pre = F.relu(F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))
        return pre * (pre > torch.exp(self.log_threshold))

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        acts = self.encode(x)
        return {"x_hat": self.decode(acts), "latents": acts}

    def training_loss(self, x: Tensor, total_variance: Tensor | None = None, l1_coefficient: float = 0.0,
                      **_: Any) -> tuple[Tensor, dict[str, Any]]:
        if total_variance is None:
            total_variance = (x - x.mean(0)).pow(2).sum()
        pre = F.relu(F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))
        theta = torch.exp(self.log_threshold)
        acts = _JumpReLU.apply(pre, theta, self.bandwidth)
        fvu = (self.decode(acts) - x).pow(2).sum() / total_variance
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
@torch.no_grad()
def firing_counts(sae: SAEBase, activations: np.ndarray | Tensor, batch_size: int = 4096,
                  device: str | torch.device | None = None, *, input_scale: float | None = None,
                  progress: bool = True) -> np.ndarray:
    """How many tokens (rows of `activations [N, d_in]`) each latent is active on: int64 `[n]`.

    TopK: in the top-k and > 0; other architectures: activation > 0. Rows are multiplied by
    `input_scale` (default: the SAE's own, i.e. what it was trained on) before encoding.
    """
    from tqdm.auto import tqdm

    if activations.ndim != 2 or activations.shape[1] != sae.d_in:
        raise ValueError(f"activations must be [N, {sae.d_in}]; got shape {tuple(activations.shape)}")
    if device is not None and torch.device(device) != sae.device:
        import copy

        sae = copy.deepcopy(sae).to(device)   # leave the caller's module where it is
    device = sae.device
    scale = sae.input_scale if input_scale is None else float(input_scale)
    counts = torch.zeros(sae.n_latents, dtype=torch.int64, device=device)
    n_rows = int(activations.shape[0])
    for start in tqdm(range(0, n_rows, batch_size), desc="firing counts", disable=not progress, leave=False):
        chunk = activations[start:start + batch_size]
        x = torch.as_tensor(np.asarray(chunk)) if not isinstance(chunk, Tensor) else chunk
        x = x.to(device=device, dtype=sae.dtype)
        if scale != 1.0:
            x = x * scale
        counts += sae.count_firing(x)
    return counts.cpu().numpy()
