"""Byzantine robustness study: FedAvg vs robust aggregation rules under attack.

    FEDRNN_DATA_DIR=../shared/data python simulations/attack_study.py [--rounds 4] [--teacher cache/teacher]

A fixed, seeded 30% of the clients are malicious (``[attack]``; about 3 of every 10 sampled)
and carry out one attack for the whole run: ``sign-flip`` (send the opposite of the honest
update), ``scale`` (boost it 10x) or ``label-flip`` (train on flipped labels). Each of FedAvg,
FedMedian, FedTrimmedAvg (beta 0.3), Krum and MultiKrum (f = 3) faces each attack and no
attack. In these arms the reply validator's norm checks are off, so the aggregation rule
alone stands between the attackers and the model; two extra FedAvg arms show what the
validator's norm check (``robust.max_norm_ratio = 3``) does by itself, with and without the
scaling attack.

Sized for a shared 2-core CPU: the default IMDB teacher fine-tuned (top LSTM layer + head)
on Amazon reviews by 30 clients, 10 per round, 8 local steps each (lr 3e-3), target accuracy on
800 Amazon test reviews after the last round. All arms run one after another inside one
Flower simulation (one Ray start-up instead of one per arm); each arm is a normal run
directory under ``runs/attack_study/`` and a killed study resumes where it stopped.
Results: simulations/results/attack_study.{csv,png} and a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedrnn.config import RunConfig, config_from_dict  # noqa: E402
from fedrnn.federation.rundir import RunDir  # noqa: E402
from fedrnn.io import write_csv  # noqa: E402
from fedrnn.runs.lifecycle import run_batch  # noqa: E402

RESULTS = ROOT / "simulations" / "results"
RULES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum")
ATTACKS = ("none", "sign-flip", "scale", "label-flip")
MALICIOUS_FRACTION = 0.3


@dataclass(frozen=True)
class Arm:
    rule: str
    attack: str
    norm_check: bool

    @property
    def name(self) -> str:
        return f"{self.rule}-{self.attack}" + ("-normcheck" if self.norm_check else "")


def arm_config(a: argparse.Namespace, arm: Arm) -> RunConfig:
    attackers = round(MALICIOUS_FRACTION * a.clients) if arm.attack != "none" else 0
    return config_from_dict({
        "run": {"clients": a.clients, "clients_per_round": a.per_round, "rounds": a.rounds, "target": "amazon",
                "alpha": 1.0, "mode": "fine-tune", "strategy": arm.rule, "seed": a.seed, "teacher": a.teacher},
        "client": {"local_epochs": 1, "batch_size": 16, "lr": a.lr, "max_steps": a.steps},
        "server": {"eval_every": a.rounds, "target_test_examples": a.test_examples, "retention_examples": 64,
                   "fraction_evaluate": 0.0, "trimmed_beta": 0.3,
                   "krum_byzantine": round(MALICIOUS_FRACTION * a.per_round)},
        "robust": {"max_norm_ratio": 3.0 if arm.norm_check else 0.0},
        "attack": {"clients": attackers, "kind": "sign-flip" if arm.attack == "none" else arm.attack, "scale": 10.0},
        "simulation": {"actors": 2, "threads_per_actor": 1},
    })


def round_line(name: str):
    return lambda row: print(f"{name} round {row['round']}: trained {row['trained']} rejected {row['rejected']} "
                             f"attackers {row.get('attackers', 0)} ({row['round_seconds']:.1f} s)", flush=True)


def summarize(arm: Arm, work: Path, summaries: dict[str, dict]) -> dict:
    rows = RunDir(work / arm.name).read_metrics()
    rounds = [r for r in rows if r["round"] >= 1]
    norms = [r["update_norm_max"] / r["update_norm_median"] for r in rounds if r.get("update_norm_median")]
    return {
        "arm": arm.name, "rule": arm.rule, "attack": arm.attack, "norm_check": arm.norm_check,
        "target_accuracy": rounds[-1]["target_accuracy"], "zero_shot_accuracy": rows[0]["target_accuracy"],
        "attackers_sampled": sum(r.get("attackers", 0) for r in rounds),
        "attackers_accepted": sum(r.get("attackers_accepted", 0) for r in rounds),
        "rejected": sum(r["rejected"] for r in rounds),
        "max_norm_over_median": max(norms) if norms else None,
        "seconds": round(summaries[arm.name]["wall_seconds"], 1),
    }


def table(results: list[dict]) -> str:
    by = {(r["rule"], r["attack"], r["norm_check"]): r for r in results}
    head = "| aggregation | " + " | ".join(f"{a}" for a in ATTACKS) + " |"
    lines = [head, "|" + "---|" * (len(ATTACKS) + 1)]
    for rule in RULES:
        cells = [f"{by[(rule, a, False)]['target_accuracy']:.3f}" for a in ATTACKS]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    cells = [f"{by[('fedavg', a, True)]['target_accuracy']:.3f}" if ("fedavg", a, True) in by else "-"
             for a in ATTACKS]
    lines.append("| fedavg + norm check (3x median) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [*RULES, "fedavg+norm"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(ATTACKS)
    for i, attack in enumerate(ATTACKS):
        ys = []
        for label in labels:
            rule, check = ("fedavg", True) if label == "fedavg+norm" else (label, False)
            hit = [r for r in results if (r["rule"], r["attack"], r["norm_check"]) == (rule, attack, check)]
            ys.append(hit[0]["target_accuracy"] if hit else float("nan"))
        ax.bar([j + i * width for j in range(len(labels))], ys, width, label=attack)
    ax.axhline(results[0]["zero_shot_accuracy"], color="gray", linestyle="--", label="teacher zero-shot")
    ax.set_xticks([j + width * (len(ATTACKS) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_ylabel("Amazon test accuracy after the last round")
    ax.set_ylim(0.5, 0.85)  # the differences are a few points; a 0-1 axis would hide them
    ax.set_title(f"{MALICIOUS_FRACTION:.0%} of clients malicious (fixed set), {len(ATTACKS) - 1} attacks")
    ax.legend(ncol=5, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=30)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="local steps per client per round")
    p.add_argument("--lr", type=float, default=3e-3, help="client learning rate")
    p.add_argument("--test-examples", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", default=str(ROOT / "cache" / "teacher"))
    p.add_argument("--work", default=str(ROOT / "runs" / "attack_study"))
    a = p.parse_args()
    arms = [Arm(rule, attack, False) for attack in ATTACKS for rule in RULES]
    arms += [Arm("fedavg", "none", True), Arm("fedavg", "scale", True)]
    configs = {arm: arm_config(a, arm) for arm in arms}
    work = Path(a.work)
    t0 = time.perf_counter()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    summaries = run_batch({arm.name: cfg for arm, cfg in configs.items()}, work, on_round=round_line)
    results = [summarize(arm, work, summaries) for arm in arms]
    write_csv(RESULTS / "attack_study.csv", results)
    plot(results, RESULTS / "attack_study.png")
    print(table(results))
    print(f"\n{len(arms)} arms, {time.perf_counter() - t0:.0f} s; results in {RESULTS / 'attack_study.csv'}")


if __name__ == "__main__":
    main()
