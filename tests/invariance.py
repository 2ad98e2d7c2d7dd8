"""The padding-invariance check shared by the model and pruning tests."""

from __future__ import annotations

import torch

from fedrnn.model.rnn import SentimentRNN


@torch.no_grad()
def assert_padding_invariant(model: SentimentRNN) -> None:
    """A review's logits are the same alone, right-padded in a batch, and with garbage in its padding."""
    ids = torch.randint(2, model.cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([12, 5, 8])
    batch = model(ids, lengths)
    alone = torch.cat([model(ids[i : i + 1, : int(n)], lengths[i : i + 1]) for i, n in enumerate(lengths)])
    garbage = ids.clone()
    garbage[1, 5:] = 7
    garbage[2, 8:] = 9
    assert torch.allclose(batch, alone, atol=1e-6)
    assert torch.allclose(batch, model(garbage, lengths), atol=1e-6)
