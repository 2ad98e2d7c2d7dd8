"""Per-sample clipped gradient sums of ``SentimentRNN`` for DP-SGD, without Opacus's DPLSTM.

DP-SGD needs every example's own gradient (to clip it) rather than the batch sum autograd
gives. Opacus gets them for recurrent nets by swapping ``nn.LSTM`` for ``DPLSTM``, a
Python-unrolled cell that runs one small matmul per time step: 12-30x slower than
non-private training here. Two exact alternatives keep the fused ``nn.LSTM`` kernel:

``microbatch_clipped_sum``: one forward/backward per example (trimmed to its length, so
no padding at all). On a single CPU thread a batch-1 LSTM costs about as much per token
as a batched one, so this is the fastest on the clients' CPUs (``benchmarks/bench_dp.py``).
The embedding's gradient is taken sparse (only the example's rows), else every example
would materialise and add a dense vocab x dim matrix.

``clipped_grad_sum`` with ``per_sample_taps``: per-sample gradients for a whole batch in
one backward pass, for hardware where batching pays (many threads, GPUs) and for
feature extraction. Each trainable layer is temporarily replaced by a *tap* that runs the
same computation on detached weights and keeps what its per-sample weight gradients are
made of:

* ``Linear`` (the head): input ``a_b`` and output gradient ``g_b``; the gradient is
  ``g_b a_b^T``, whose norm is ``|g_b| |a_b|``, so nothing is materialised.
* ``Embedding``: token ids and the gradient at each position; an example's gradient is
  the scatter-add of its positions into rows, whose norm is computed over its distinct tokens.
* ``LSTM``: the input projection ``u = x W_ih^T + b_ih`` is computed outside the fused
  kernel, which then runs with ``W_ih = I`` on ``u``. The gradient autograd returns for
  ``u`` is then exactly the gradient of each gate pre-activation, per example and time
  step, from which ``dW_ih[b] = sum_t dgates[b,t] x[b,t]^T``, ``dW_hh[b] = sum_t
  dgates[b,t] h[b,t-1]^T`` and both biases ``sum_t dgates[b,t]`` follow by batched matmuls.
  (The identity input weights make the kernel ~2.4x dearer: the price of batching.)

Frozen layers are left untouched and, since nothing below them needs a gradient, autograd
records nothing there. Padding contributes nothing: positions past an example's length
never reach its loss (see ``SentimentRNN``), so their gate gradients are exactly zero.
Both functions clip each example's gradient over all trainable parameters jointly by
``min(1, C / (norm + 1e-6))``, as Opacus's flat clipping does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from fedrnn.model.rnn import SentimentRNN


class _Tap(nn.Module):
    """A layer run on detached weights that can report per-sample gradient norms and clipped sums."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.out: torch.Tensor | None = None  # the tensor whose gradient the backward pass must return

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.inner.parameters())

    def sq_norms(self, grad_out: torch.Tensor) -> torch.Tensor:
        """Per-example squared gradient norm over this layer's parameters, [B]."""
        raise NotImplementedError

    def clipped_sum(self, factors: torch.Tensor) -> list[torch.Tensor]:
        """``sum_b factors[b] * grad_b`` for each parameter, in ``params`` order."""
        raise NotImplementedError

    def _track(self, out: torch.Tensor) -> torch.Tensor:
        if not out.requires_grad:  # lowest trainable layer: its input carries no graph
            out.requires_grad_(True)
        self.out = out
        return out


class _LinearTap(_Tap):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.dim() != 2:
            raise ValueError(f"per-sample Linear expects [batch, features] input, got shape {tuple(a.shape)}")
        bias = self.inner.bias.detach() if self.inner.bias is not None else None
        self.a = a.detach()
        return self._track(F.linear(a, self.inner.weight.detach(), bias))

    def sq_norms(self, grad_out: torch.Tensor) -> torch.Tensor:
        self.g = grad_out
        g2 = grad_out.square().sum(1)
        return g2 * self.a.square().sum(1) + (g2 if self.inner.bias is not None else 0.0)

    def clipped_sum(self, factors: torch.Tensor) -> list[torch.Tensor]:
        g = self.g * factors[:, None]
        return [g.t() @ self.a] + ([g.sum(0)] if self.inner.bias is not None else [])


class _EmbeddingTap(_Tap):
    def __init__(self, inner: nn.Embedding) -> None:
        if inner.max_norm is not None or inner.sparse or inner.scale_grad_by_freq:
            raise ValueError("per-sample Embedding supports plain dense embeddings only (no max_norm/sparse/scaling)")
        super().__init__(inner)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids = ids
        return self._track(F.embedding(ids, self.inner.weight.detach(), self.inner.padding_idx))

    def _positions(self, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(example index, token id, gradient) of every position that updates a row."""
        batch = torch.arange(self.ids.shape[0], device=self.ids.device)[:, None].expand_as(self.ids)
        keep = torch.ones_like(self.ids, dtype=torch.bool)
        if self.inner.padding_idx is not None:  # nn.Embedding never updates the padding row
            keep = self.ids != self.inner.padding_idx
        return batch[keep], self.ids[keep], grad_out[keep]

    def sq_norms(self, grad_out: torch.Tensor) -> torch.Tensor:
        self.b, self.tok, self.g = self._positions(grad_out)
        vocab = self.inner.num_embeddings
        rows, inverse = torch.unique(self.b * vocab + self.tok, return_inverse=True)  # (example, token) pairs
        summed = grad_out.new_zeros(len(rows), grad_out.shape[-1]).index_add_(0, inverse, self.g)
        return grad_out.new_zeros(self.ids.shape[0]).index_add_(0, rows // vocab, summed.square().sum(1))

    def clipped_sum(self, factors: torch.Tensor) -> list[torch.Tensor]:
        weight = self.inner.weight
        return [torch.zeros_like(weight).index_add_(0, self.tok, self.g * factors[self.b, None])]


class _LSTMTap(_Tap):
    def __init__(self, inner: nn.LSTM) -> None:
        if type(inner) is not nn.LSTM or inner.num_layers != 1 or inner.bidirectional or not inner.batch_first:
            raise ValueError("per-sample LSTM supports single-layer unidirectional batch_first nn.LSTM only")
        if not inner.bias or inner.proj_size:
            raise ValueError("per-sample LSTM needs bias=True and no projection")
        super().__init__(inner)
        gates = 4 * inner.hidden_size
        self.register_buffer("eye", torch.eye(gates), persistent=False)
        self.register_buffer("zero", torch.zeros(gates), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        lstm = self.inner
        u = self._track(F.linear(x, lstm.weight_ih_l0.detach(), lstm.bias_ih_l0.detach()))
        h0 = x.new_zeros(1, x.shape[0], lstm.hidden_size)
        weights = [self.eye, lstm.weight_hh_l0.detach(), self.zero, lstm.bias_hh_l0.detach()]
        out, hn, cn = torch.lstm(u, (h0, h0), weights, True, 1, 0.0, self.training, False, True)
        self.x, self.h = x.detach(), out.detach()
        return out, (hn, cn)

    @property
    def params(self) -> list[nn.Parameter]:
        lstm = self.inner
        return [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]

    def sq_norms(self, grad_out: torch.Tensor) -> torch.Tensor:
        h_prev = torch.cat([self.h.new_zeros(self.h.shape[0], 1, self.h.shape[2]), self.h[:, :-1]], dim=1)
        # one batched matmul gives [dW_ih | dW_hh] per example: [B, 4H, in + H]
        self.g_w = torch.bmm(grad_out.transpose(1, 2), torch.cat([self.x, h_prev], dim=2))
        self.g_b = grad_out.sum(1)  # [B, 4H], the gradient of both biases
        return self.g_w.square().sum((1, 2)) + 2 * self.g_b.square().sum(1)

    def clipped_sum(self, factors: torch.Tensor) -> list[torch.Tensor]:
        g_w = torch.einsum("b,bij->ij", factors, self.g_w)
        g_b = factors @ self.g_b
        n_in = self.inner.input_size
        return [g_w[:, :n_in].contiguous(), g_w[:, n_in:].contiguous(), g_b, g_b.clone()]


def _make_tap(module: nn.Module) -> _Tap:
    if isinstance(module, nn.Linear):
        return _LinearTap(module)
    if isinstance(module, nn.Embedding):
        return _EmbeddingTap(module)
    if isinstance(module, nn.LSTM):
        return _LSTMTap(module)
    raise ValueError(f"no per-sample gradient rule for trainable {type(module).__name__}")


@contextmanager
def per_sample_taps(model: SentimentRNN) -> Iterator[list[_Tap]]:
    """Swap each fully trainable layer of ``model`` for a tap while the block runs.

    Layers must be wholly trainable or wholly frozen (what ``set_trainable`` produces);
    the original modules are put back on exit, also on error.
    """
    slots: list[tuple[nn.Module, str]] = [(model, "embedding"), (model, "head")]
    slots += [(layer, d) for layer in model.rnn for d in layer]  # ModuleDict children are attributes too
    chosen: list[tuple[nn.Module, str, nn.Module]] = []
    for parent, name in slots:
        module = getattr(parent, name)
        flags = [p.requires_grad for p in module.parameters()]
        if any(flags) and not all(flags):
            raise ValueError(f"{name}: per-sample gradients need a layer wholly trainable or wholly frozen")
        if any(flags):
            chosen.append((parent, name, module))
    covered = {id(p) for _, _, module in chosen for p in module.parameters()}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if stray:
        raise ValueError(f"no per-sample gradient rule for trainable parameters {stray}")
    taps = [_make_tap(module).train(model.training) for _, _, module in chosen]
    try:
        for (parent, name, _), tap in zip(chosen, taps, strict=True):
            setattr(parent, name, tap)
        yield taps
    finally:
        for parent, name, module in chosen:
            setattr(parent, name, module)


def clipped_grad_sum(
    model: SentimentRNN,
    taps: list[_Tap],
    ids: torch.Tensor,
    lengths: torch.Tensor,
    labels: torch.Tensor,
    max_grad_norm: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add the sum of per-example clipped gradients to each trainable parameter's ``.grad``.

    Returns (per-example losses, logits, per-example gradient norms before clipping).
    """
    logits = model(ids, lengths)
    losses = F.cross_entropy(logits, labels, reduction="none")
    grads = torch.autograd.grad(losses.sum(), [tap.out for tap in taps])
    norms = torch.stack([tap.sq_norms(g) for tap, g in zip(taps, grads, strict=True)]).sum(0).sqrt()
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    for tap in taps:
        for p, g in zip(tap.params, tap.clipped_sum(factors), strict=True):
            p.grad = g if p.grad is None else p.grad + g
        tap.out = None
    return losses.detach(), logits.detach(), norms


def microbatch_clipped_sum(
    model: SentimentRNN,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    labels: torch.Tensor,
    max_grad_norm: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``clipped_grad_sum``'s result, one example at a time through the unmodified model."""
    params = [p for p in model.parameters() if p.requires_grad]
    totals = [torch.zeros_like(p) for p in params]
    losses, logits, norms = [], [], []
    sparse_before = model.embedding.sparse
    model.embedding.sparse = model.embedding.weight.requires_grad  # row gradients, not a dense vocab x dim
    try:
        for i in range(len(labels)):
            n = int(lengths[i])
            logit = model(ids[i : i + 1, :n], lengths[i : i + 1])
            loss = F.cross_entropy(logit, labels[i : i + 1])
            grads = [g.coalesce() if g.is_sparse else g for g in torch.autograd.grad(loss, params)]
            norm = torch.stack([(g.values() if g.is_sparse else g).square().sum() for g in grads]).sum().sqrt()
            factor = float((max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
            for total, g in zip(totals, grads, strict=True):
                if g.is_sparse:
                    total.index_add_(0, g.indices()[0], g.values(), alpha=factor)
                else:
                    total.add_(g, alpha=factor)
            losses.append(loss.detach())
            logits.append(logit.detach())
            norms.append(norm)
    finally:
        model.embedding.sparse = sparse_before
    for p, total in zip(params, totals, strict=True):
        p.grad = total if p.grad is None else p.grad + total
    return torch.stack(losses), torch.cat(logits), torch.stack(norms)
