"""The Opacus twin of the fused model: ``DPLSTM`` layers with the same weights, and back."""

from __future__ import annotations

import torch

from fedrnn.model.rnn import SentimentRNN


def to_dp_model(model: SentimentRNN) -> SentimentRNN:
    """The Opacus twin of ``model`` (``DPLSTM`` layers), same weights, trainable flags and mode."""
    dp = SentimentRNN(model.cfg, dp=True)
    src, dst = dict(model.named_parameters()), dict(dp.named_parameters())
    if set(src) != set(dst):
        raise ValueError(f"DP model parameters differ from the plain model's: {sorted(set(src) ^ set(dst))}")
    with torch.no_grad():
        for name, p in dst.items():
            p.copy_(src[name])
            p.requires_grad_(src[name].requires_grad)
    return dp.train(model.training)


def from_dp_state(dp_model: SentimentRNN) -> dict[str, torch.Tensor]:
    """A state dict for the plain model: ``DPLSTM``'s alias keys (``l0.ih.weight``…) dropped."""
    with torch.device("meta"):
        plain_keys = list(SentimentRNN(dp_model.cfg).state_dict())
    state = dp_model.state_dict()
    missing = [k for k in plain_keys if k not in state]
    if missing:
        raise ValueError(f"DP model state lacks plain-model keys {missing}")
    return {k: state[k].detach().clone() for k in plain_keys}


