"""Short-text study: where federated learning matters for the IMDB teacher.

    FEDRNN_DATA_DIR=../shared/data python simulations/short_text_study.py --teacher cache/teacher [--seeds 0 1 2]

Targets (short texts, as devices hold them), read as user files through ``--target PATH``:
  uci_natural    uci_sentences (3,000 one-liners), natural partition by source (amazon, imdb, yelp):
                 each source split over 10 of 30 clients
  rt_dirichlet   rt_polarity (10,662 snippets; the clients hold a seeded 30% of its pool), Dirichlet(0.5)
                 label skew over 30 clients
  rt_full        the same with all of rt_polarity's pool (about 8,500 snippets)

Arms, each on the same seed's partitions and each file's fixed per-group test split:
  zero-shot      the teacher as is
  local-only     every client trains alone on its own training split (as many epochs as it trains
                 in total in the federated run); the mean over clients of its model's accuracy
  federated      FedAvg over the run's clients: each round a seeded sample of clients trains locally
                 (``fedrnn.federation.local.local_train``, the ClientApp's training) from the global
                 tensors, and the example-weighted average becomes the new global tensors
  federated + personalisation   the federated model, each client then fine-tuning the head on its
                 own data ([personalize] head_epochs); per-client accuracy only (one model per client)
  centralised    the teacher trained on the union of the clients' training splits, same total epochs

The federated arm runs in this process rather than on Flower's Ray engine: on the shared 2-core
machine, overloaded while this study was made, Ray's node start (a fixed 30 s wait) kept timing out.
The partitions and the per-group test split come from ``fedrnn.runs.prepare.prepare_run`` on the
target file, exactly as a ``python -m fedrnn.simulate --target FILE`` run prepares them.

Two views: accuracy on the target test split, and the per-client distribution (mean, p10, worst)
on each client's own held-out data. Writes simulations/results/short_text_study.csv (one row per
target, seed and arm) and .png, and prints the markdown table (mean ± sd over seeds).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from fedrnn.config import PersonalizeSection, config_from_dict  # noqa: E402
from fedrnn.data.loaders import resolve_data_dir  # noqa: E402
from fedrnn.data.partitions import load_partitions, split_holdout  # noqa: E402
from fedrnn.data.target import load_target  # noqa: E402
from fedrnn.federation.local import LocalTrainConfig, build_model, load_base, local_train  # noqa: E402
from fedrnn.federation.loop import sample  # noqa: E402
from fedrnn.federation.prepare import prepare_run  # noqa: E402
from fedrnn.io import write_csv  # noqa: E402
from fedrnn.model.rnn import trainable_names  # noqa: E402
from fedrnn.model.training import evaluate  # noqa: E402
from fedrnn.plugins.personalize import distribution, personalize_clients  # noqa: E402

RESULTS = ROOT / "simulations" / "results"
TARGETS = {
    "uci_natural": ("uci_sentences/sentences.jsonl.gz", {"partition": "natural", "partition_column": "group"}),
    # a seeded 30% of rt_polarity's pool (about 2,550 snippets, as many as uci_sentences) keeps the study short
    "rt_dirichlet": ("rt_polarity/sentences.jsonl.gz", {"partition": "dirichlet", "alpha": 0.5, "data_fraction": 0.3}),
    # all of rt_polarity's pool (about 8,500 snippets, some 280 a client): the data size at which the
    # teacher has something left to learn
    "rt_full": ("rt_polarity/sentences.jsonl.gz", {"partition": "dirichlet", "alpha": 0.5}),
}
ARMS = ("zero-shot", "local-only", "federated", "federated+personalisation", "centralised")


def base_config(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "run": {"clients": 30, "rounds": a.rounds, "clients_per_round": 10, "mode": a.mode, "strategy": "fedavg",
                "teacher": str(Path(a.teacher).resolve())},
        "client": {"local_epochs": a.local_epochs, "batch_size": 16, "lr": a.lr},
        "server": {"retention_examples": 0},
        "personalize": {"head_epochs": a.head_epochs},
        "simulation": {"actors": 2, "threads_per_actor": 1},
    }


def client_epochs(cfg: dict[str, Any]) -> int:
    """Epochs a client trains in the federated run, in expectation: rounds x sampling rate x local epochs."""
    r = cfg["run"]
    return max(1, round(r["rounds"] * r["clients_per_round"] / r["clients"] * cfg["client"]["local_epochs"]))


def train_copy(base: Any, data: Any, cfg: dict[str, Any], epochs: int, seed: int) -> torch.nn.Module:
    """The teacher trained (run.mode) on ``data`` with the clients' optimiser settings."""
    model = build_model(base, {}, cfg["run"]["mode"])
    c = cfg["client"]
    local_train(model, data, LocalTrainConfig(c["lr"], epochs, c["batch_size"], 0, 0.0, 1.0, seed), [])
    return model


def fedavg(base: Any, data: Any, splits: list[tuple[np.ndarray, np.ndarray]], cfg: dict[str, Any],
           seed: int) -> torch.nn.Module:
    """FedAvg (example-weighted) over ``splits``' training parts; the final global model."""
    r, c = cfg["run"], cfg["client"]
    model = build_model(base, {}, r["mode"])
    names = trainable_names(model, r["mode"])
    arrays = {n: model.state_dict()[n].numpy().copy() for n in names}
    for rnd in range(1, r["rounds"] + 1):
        rng = np.random.default_rng([seed, rnd])
        replies = []
        for k in sample(rng, list(range(r["clients"])), r["clients_per_round"]):
            train = data.pool.subset(splits[k][0])
            local = LocalTrainConfig(c["lr"], c["local_epochs"], c["batch_size"], 0, 0.0, 1.0,
                                     seed * 1_000_003 + rnd * 1009 + k)
            replies.append((local_train(build_model(base, arrays, r["mode"]), train, local, names)[0], len(train)))
        total = sum(n for _, n in replies)
        arrays = {name: sum(a[name] * n for a, n in replies) / total for name in names}
    return build_model(base, arrays, r["mode"])


def study_target(name: str, seed: int, a: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rel, run_keys = TARGETS[name]
    cfg = base_config(a)
    cfg["run"] |= {"target": str(resolve_data_dir() / rel), "seed": seed, **run_keys}
    run_cfg = config_from_dict(cfg)
    files = prepare_run(run_cfg, work / f"{name}-s{seed}", Console(quiet=True))
    base = load_base(files.teacher_dir)
    data = load_target(files.target_path)
    shards = load_partitions(files.partitions_path)
    hold = run_cfg.client.holdout_fraction
    splits = [split_holdout(s, hold, seed, k) for k, s in enumerate(shards)]
    no_head = PersonalizeSection(head_epochs=0)
    epochs = client_epochs(cfg)
    rows: list[dict[str, Any]] = []

    def add(arm: str, test_acc: float | None, per_client: dict[str, float], seconds: float) -> None:
        rows.append({"target": name, "seed": seed, "arm": arm, "test_accuracy": test_acc,
                     **{k.replace("personalized_accuracy", "client_accuracy"): v for k, v in per_client.items()
                        if k.startswith(("client_accuracy", "personalized_accuracy"))}, "seconds": seconds})

    zero = build_model(base, {}, cfg["run"]["mode"])
    add("zero-shot", evaluate(zero, data.test)["accuracy"],
        personalize_clients(zero, data.pool, shards, hold, seed, no_head), 0.0)
    t0 = time.perf_counter()
    local_test, local_held = [], []
    for k, (train_idx, hold_idx) in enumerate(splits):
        model = train_copy(base, data.pool.subset(train_idx), cfg, epochs, seed * 1000 + k)
        local_test.append(evaluate(model, data.test)["accuracy"])
        local_held.append(evaluate(model, data.pool.subset(hold_idx))["accuracy"])
    add("local-only", float(np.mean(local_test)), distribution(local_held, "client_accuracy"),
        time.perf_counter() - t0)
    t0 = time.perf_counter()
    fed_model = fedavg(base, data, splits, cfg, seed)
    fed_seconds = time.perf_counter() - t0
    per = personalize_clients(fed_model, data.pool, shards, hold, seed, PersonalizeSection(head_epochs=a.head_epochs))
    add("federated", evaluate(fed_model, data.test)["accuracy"],
        {k: v for k, v in per.items() if k.startswith("client_")}, fed_seconds)
    add("federated+personalisation", None, {k: v for k, v in per.items() if k.startswith("personalized_")}, 0.0)
    t0 = time.perf_counter()
    central = train_copy(base, data.pool.subset(np.concatenate([t for t, _ in splits])), cfg, epochs, seed)
    add("centralised", evaluate(central, data.test)["accuracy"],
        personalize_clients(central, data.pool, shards, hold, seed, no_head), time.perf_counter() - t0)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table: mean ± sd over seeds of each arm's test accuracy and per-client distribution."""

    def ms(values: list[float]) -> str:
        v = [x for x in values if x is not None and not np.isnan(x)]
        if not v:
            return "–"
        return f"{100 * np.mean(v):.1f} ± {100 * np.std(v, ddof=1):.1f}" if len(v) > 1 else f"{100 * v[0]:.1f}"

    out = ["| target | arm | test accuracy (%) | client mean (%) | client p10 (%) | worst client (%) |",
           "|---|---|---|---|---|---|"]
    for target in TARGETS:
        for arm in ARMS:
            sel = [r for r in rows if r["target"] == target and r["arm"] == arm]
            if sel:
                out.append(f"| {target} | {arm} | " + " | ".join(
                    ms([r.get(k) for r in sel]) for k in ("test_accuracy", "client_accuracy_mean",
                                                          "client_accuracy_p10", "client_accuracy_worst")) + " |")
        zero = [r["test_accuracy"] for r in rows if r["target"] == target and r["arm"] == "zero-shot"]
        fed = [r["test_accuracy"] for r in rows if r["target"] == target and r["arm"] == "federated"]
        if zero and fed:
            gain = 100 * (np.asarray(fed) - np.asarray(zero))
            out.append(f"| {target} | federated − zero-shot (points) | {gain.mean():+.1f} ± "
                       f"{gain.std(ddof=1) if len(gain) > 1 else 0.0:.1f} | | | |")
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TARGETS), figsize=(6 * len(TARGETS), 4), squeeze=False)
    for ax, target in zip(axes[0], TARGETS, strict=True):
        for i, (key, label) in enumerate((("test_accuracy", "target test"), ("client_accuracy_mean", "client mean"),
                                          ("client_accuracy_p10", "client p10"))):
            means, sds = [], []
            for arm in ARMS:
                v = [r[key] for r in rows if r["target"] == target and r["arm"] == arm and r.get(key) is not None]
                means.append(np.mean(v) if v else np.nan)
                sds.append(np.std(v, ddof=1) if len(v) > 1 else 0.0)
            ax.bar(np.arange(len(ARMS)) + (i - 1) * 0.27, means, 0.27, yerr=sds, label=label, capsize=2)
        ax.set_xticks(np.arange(len(ARMS)), [a.replace("+", "+\n") for a in ARMS], fontsize=8)
        ax.set_ylim(0.5, 1.0)
        ax.set_title(target)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save(rows: list[dict[str, Any]], results: Path) -> list[dict[str, Any]]:
    """Write the CSV and plot; rows of other (target, seed) pairs already in the CSV are kept, so targets
    and seeds can run as separate processes."""
    csv_path = results / "short_text_study.csv"
    mine = {(r["target"], float(r["seed"])) for r in rows}
    if csv_path.is_file():
        with csv_path.open() as f:
            kept = [r for r in csv.DictReader(f) if (r["target"], float(r["seed"])) not in mine]
        rows = [{k: (float(v) if k not in ("target", "arm") and v != "" else (v or None)) for k, v in r.items()}
                for r in kept] + rows
    write_csv(csv_path, rows)
    plot(rows, results / "short_text_study.png")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="cache/teacher")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    # full: short texts from another domain need new word meanings, i.e. the embedding trained too
    p.add_argument("--mode", default="full")
    p.add_argument("--head-epochs", type=int, default=5)
    p.add_argument("--work", default="runs/short_text_study")
    p.add_argument("--results", default=str(RESULTS), help="folder for short_text_study.csv and .png")
    a = p.parse_args()
    torch.set_num_threads(1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for target in a.targets:
        for seed in a.seeds:
            rows += study_target(target, seed, a, work)
            for r in rows:
                r["study_seconds"] = time.perf_counter() - t0
            merged = save(rows, Path(a.results))  # after every seed: an interrupted study keeps its rows
            print(json.dumps(rows[-5:]), flush=True)
    print("\n".join(summarise(merged)))


if __name__ == "__main__":
    main()
