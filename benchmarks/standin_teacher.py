"""A stand-in teacher for *speed* benchmarks when the pretrained one is not built yet.

    python benchmarks/standin_teacher.py --out cache/standin_teacher [--reviews 4000]

The default ``ModelConfig()`` (same shapes, so the same compute and bytes as the real teacher)
with seeded random weights and a tokenizer trained on ``--reviews`` IMDB training reviews.
Timings and byte counts measured with it hold for the pretrained teacher (they depend on
shapes and review lengths, not on weights); accuracies do not, and no accuracy measured with
it may be reported as the teacher's. The checkpoint's metrics.json says so.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fedrnn.data.loaders import load_imdb
from fedrnn.data.tokenizer import train_tokenizer
from fedrnn.model.checkpoint import save_checkpoint
from fedrnn.model.pretrain import PretrainConfig
from fedrnn.model.rnn import ModelConfig, SentimentRNN


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="cache/standin_teacher")
    p.add_argument("--reviews", type=int, default=4000)
    a = p.parse_args()
    reviews = load_imdb("train")
    texts = [reviews.texts[i] for i in np.random.default_rng(0).permutation(len(reviews))[: a.reviews]]
    tok = train_tokenizer(texts, vocab_size=ModelConfig().vocab_size)
    torch.manual_seed(0)
    model = SentimentRNN(ModelConfig())  # the default shapes, whatever vocabulary the sample reached
    save_checkpoint(a.out, model, tok, PretrainConfig().max_len,
                    metrics={"standin": True, "note": "random weights: for speed and byte benchmarks only",
                             "tokenizer_reviews": a.reviews, "tokenizer_vocab": tok.get_vocab_size()})
    print(f"wrote {a.out} (tokenizer vocabulary {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
