"""What a run prints: one line per round."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console


def round_printer(console: Console, rounds: int) -> Callable[[dict[str, Any]], None]:
    """A per-round hook printing the round's accuracies, bytes and time."""
    def show(row: dict[str, Any]) -> None:
        def f(key: str) -> str:
            v = row.get(key)
            return f"{v:.4f}" if isinstance(v, float) else "  -   "

        console.print(
            f"round {row['round']:>3}/{rounds}  target {f('target_accuracy')}  source {f('retention_accuracy')}  "
            f"clients {f('fed_eval_accuracy_mean')} p10 {f('fed_eval_accuracy_p10')}  "
            f"down {row['bytes_down'] / 1e6:.1f} MB  up {row['bytes_up'] / 1e6:.1f} MB  "
            f"failed {row['failures']}  {row['round_seconds']:.1f} s",
            soft_wrap=True,
        )
        groups = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("target_accuracy/")}
        if groups:
            console.print("          per group  " + "  ".join(f"{g} {v:.4f}" for g, v in groups.items()),
                          soft_wrap=True)
        if "client_accuracy_mean" in row:
            line = (f"          per client (held-out)  mean {row['client_accuracy_mean']:.4f}  "
                    f"p10 {row['client_accuracy_p10']:.4f}  worst {row['client_accuracy_worst']:.4f}")
            if "personalized_accuracy_mean" in row:
                line += (f"  ->  personalised mean {row['personalized_accuracy_mean']:.4f}  "
                         f"p10 {row['personalized_accuracy_p10']:.4f}  worst {row['personalized_accuracy_worst']:.4f}")
            console.print(line, soft_wrap=True)

    return show
