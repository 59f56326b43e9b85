"""TopK kernels: the sparse forward/backward the TopK SAE trains with (only the k selected latents
per token carry gradient), as `sparsify` computes it.

* `topk_select`: the top-k of ReLU'd pre-activations, indices sorted within a row.
* `TopKAutoencode`: an autograd Function (forward reconstruction, sparse backward).
* `topk_loss_and_grads`: the trainer's manual, buffer-reusing path; it selects in a low-precision
  matmul where asked (`select_dtype`, as sparsify under autocast) and recomputes the chosen values
  exactly, then writes the gradients into the SAE's parameters.

Both share the latent-major CSR products below. Pure torch; the SAE classes live in `sae`.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .architectures import TopKSAE


def csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor built without invariant checks: the kernels below only build valid ones
    (sorted, in-range indices). Silences torch's once-per-process "beta" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def latent_major_pattern(indices: Tensor, n_latents: int) -> tuple[Tensor, Tensor, Tensor]:
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


def latent_by_token_mm(pattern: tuple[Tensor, Tensor, Tensor], values: Tensor, dense: Tensor,
                        n_latents: int, out: Tensor | None, accumulate: bool) -> Tensor:
    """`S^T @ dense` where S is `[B, n]` with `values [B, K]` at the selected columns: `[n, d]`."""
    crow, col, order = pattern
    mat = csr(crow, col, values.reshape(-1)[order], (n_latents, dense.shape[0]))
    if out is None:
        return mat @ dense
    if accumulate:
        return out.addmm_(mat, dense)
    return torch.mm(mat, dense, out=out)


def gather_dot(indices: Tensor, dense: Tensor, weight: Tensor) -> Tensor:
    """`[B, K]` with entry (b, j) = dense[b] . weight[indices[b, j]] (sampled dense-dense mm)."""
    B, K = indices.shape
    try:
        crow = torch.arange(0, B * K + 1, K, device=indices.device, dtype=torch.int64)
        pattern = csr(crow, indices.reshape(-1), dense.new_zeros(B * K), (B, weight.shape[0]))
        return torch.sparse.sampled_addmm(pattern, dense, weight.T, beta=0.0).values().view(B, K)
    except (RuntimeError, NotImplementedError):  # pragma: no cover - backend without sampled_addmm
        pass
    out = dense.new_empty(B, K)
    step = 256
    for s in range(0, B, step):
        out[s:s + step] = torch.linalg.vecdot(F.embedding(indices[s:s + step], weight), dense[s:s + step, None, :])
    return out


def topk_select(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of ReLU(pre) per row, indices sorted ascending within each row (valid CSR rows)."""
    values, indices = pre.topk(k, dim=1, sorted=False)
    indices, perm = indices.sort(dim=1)
    values = values.gather(1, perm).relu_()
    return values, indices


def sparse_term_backward(
    xc: Tensor, W_enc: Tensor, W_dec: Tensor, indices: Tensor, values: Tensor, g_out: Tensor,
    g_values_extra: Tensor | None, grads: dict[str, Tensor], accumulate: bool,
) -> None:
    """Gradients of one sparse decode `out = sum_j values[:, j] W_dec[indices[:, j]]` (+ b_dec).

    `g_out [B, d]` is dL/d(out). Writes (or adds, when `accumulate`) into `grads` entries
    `W_dec`, `W_enc`, `b_enc`, `b_dec`, `x` (the last is dL/dx through `xc = x - b_dec`).
    Only the selected latents of each token get encoder gradient (TopK's derivative).
    """
    n = W_dec.shape[0]
    pattern = latent_major_pattern(indices, n)
    latent_by_token_mm(pattern, values, g_out, n, grads["W_dec"], accumulate)
    g_values = gather_dot(indices, g_out, W_dec)
    if g_values_extra is not None:
        g_values = g_values + g_values_extra
    g_pre = g_values * (values > 0)          # ReLU derivative; zero-valued picks carry none
    latent_by_token_mm(pattern, g_pre, xc, n, grads["W_enc"], accumulate)
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
        values, indices = topk_select(pre, k)
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
        sparse_term_backward(xc, W_enc, W_dec, indices, values, g_xhat.contiguous(), g_values,
                              grads, accumulate=False)
        return grads["x"], grads["W_enc"], grads["b_enc"], grads["W_dec"], grads["b_dec"], None


def fired_from_topk(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
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
    values = (gather_dot(indices, xc, W_enc) + b_enc[indices]).relu_()
    return values, indices


@torch.no_grad()
def topk_loss_and_grads(
    sae: "TopKSAE", x: Tensor, *, total_variance: Tensor | None = None, dead_mask: Tensor | None = None,
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
        values, indices = topk_select(pre, sae.k)
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
            aux_values, aux_indices = topk_select(pre, k_aux)
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
        sparse_term_backward(xc, W_enc, W_dec, idx, vals, g_out, None, grads, accumulate=i > 0)
    return {"fvu": fvu, "auxk": auxk, "l0": (values > 0).sum(1, dtype=torch.float32).mean(),
            "fired": fired_from_topk(values, indices, n)}
