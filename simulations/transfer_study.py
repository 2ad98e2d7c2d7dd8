"""Transfer-learning study: what pretraining on IMDB buys federated clients on Amazon reviews.

    FEDRNN_DATA_DIR=../shared/data python simulations/transfer_study.py [--rounds 12]

Variants, for each non-IID alpha in {0.1, 1, 100}:
  zero-shot     the IMDB teacher as is (round 0 of any teacher-initialised run)
  scratch       federated training from random weights (no transfer), mode full
  feature-extraction / fine-tune / full   federated transfer from the teacher
  centralised-MODE   training the teacher in the same transfer mode on the pooled client
                data (upper bound), with as many passes over the data as the federated
                run's total local work
Data sweep (the seed's claim: feature extraction wins with little target data, fine-tuning
with more): feature-extraction vs fine-tune at alpha = 1 with 10%, 30% and 100% of the pool.

Writes simulations/results/transfer_study.csv and .png and prints a markdown table.

    python simulations/transfer_study.py --part noniid [--seeds 0 1 2]

The hardest split, alpha = 0.1, over several seeds (one seed's 1,600 test reviews put about a
point of noise on each accuracy): each transfer mode with FedAvg and FedAvgM, against
centralised training in the same mode on the same seed's pooled client data. Writes
simulations/results/transfer_noniid.csv and prints the gap to centralised, mean and spread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedrnn.config import dump_toml  # noqa: E402
from fedrnn.data.partitions import load_partitions, split_holdout  # noqa: E402
from fedrnn.data.target import load_target  # noqa: E402
from fedrnn.federation.local import LocalTrainConfig, build_model, load_base, local_train  # noqa: E402
from fedrnn.federation.rundir import RunDir  # noqa: E402
from fedrnn.io import write_csv  # noqa: E402
from fedrnn.model.training import evaluate  # noqa: E402

RESULTS = ROOT / "simulations" / "results"


def run_variant(name: str, cfg: dict, work: Path) -> list[dict]:
    out = work / name
    if not (out / "summary.json").is_file():
        (work / f"{name}.toml").write_text(dump_toml(cfg))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run(
            [sys.executable, "-m", "fedrnn.simulate", "--config", str(work / f"{name}.toml"), "--out", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return RunDir(out).read_metrics()


def centralised(run: Path, cfg: dict, epochs: int, mode: str = "fine-tune", seed: int = 0) -> float:
    """Train the teacher (``mode``) on the union of the clients' training splits; target test accuracy."""
    torch.set_num_threads(1)
    run_cfg = json.loads((run / "config.json").read_text())
    base = load_base(str((ROOT / "cache" / "teacher").resolve()))
    target = next(Path(os.environ.get("FEDRNN_CACHE_DIR", ROOT / "cache"), "target").glob("amazon-*.npz"))
    data = load_target(str(target))
    shards = load_partitions(str(run / "partitions.npz"))
    hold = run_cfg["client"]["holdout_fraction"]
    train_idx = np.concatenate([split_holdout(s, hold, run_cfg["run"]["seed"], k)[0] for k, s in enumerate(shards)])
    model = build_model(base, {}, mode)
    local = LocalTrainConfig(
        lr=cfg["client"]["lr"],
        epochs=epochs,
        batch_size=cfg["client"]["batch_size"],
        max_steps=0,
        proximal_mu=0.0,
        clip_norm=1.0,
        seed=seed,
    )
    local_train(model, data.pool.subset(train_idx), local, [])
    return evaluate(model, data.test)["accuracy"]


def centralised_epochs(base: dict) -> int:
    """Passes over the pooled data matching a federated run's total local work."""
    run = base["run"]
    return max(1, round(run["rounds"] * run["clients_per_round"] * base["client"]["local_epochs"] / run["clients"]))


def centralised_cached(work: Path, key: str, run: str, cfg: dict, base: dict, mode: str, seed: int) -> float:
    """``centralised`` on run ``run``'s partitions, computed once and kept as ``work/<key>-centralised.json``."""
    cached = work / f"{key}-centralised.json"
    if not cached.is_file():
        accuracy = centralised(work / run, cfg, centralised_epochs(base), mode, seed)
        cached.write_text(json.dumps({"accuracy": accuracy}))
    return json.loads(cached.read_text())["accuracy"]


def noniid(base: dict, work: Path, seeds: list[int], strategies: list[str]) -> None:
    rows = []
    for seed in seeds:
        for mode in ("feature-extraction", "fine-tune", "full"):
            for strategy in strategies:
                cfg = {**base, "run": {**base["run"], "alpha": 0.1, "mode": mode, "strategy": strategy, "seed": seed}}
                name = f"noniid-s{seed}-{mode}-{strategy}"
                final = run_variant(name, cfg, work)[-1]
                # the same seed gives the same partitions whatever the strategy: one centralised run per (seed, mode)
                central = centralised_cached(work, f"noniid-s{seed}-{mode}", name, cfg, base, mode, seed)
                rows.append(
                    {
                        "seed": seed,
                        "mode": mode,
                        "strategy": strategy,
                        "federated_accuracy": final["target_accuracy"],
                        "centralised_accuracy": central,
                        "gap_points": 100 * (final["target_accuracy"] - central),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    write_csv(RESULTS / "transfer_noniid.csv", rows)
    print("| mode | strategy | federated | centralised | gap (points), mean ± sd | seeds within 2 points |")
    print("|---|---|---|---|---|---|")
    for mode in ("feature-extraction", "fine-tune", "full"):
        for strategy in strategies:
            sel = [r for r in rows if r["mode"] == mode and r["strategy"] == strategy]
            gaps = np.array([r["gap_points"] for r in sel])
            fed = np.mean([r["federated_accuracy"] for r in sel])
            cen = np.mean([r["centralised_accuracy"] for r in sel])
            spread = gaps.std(ddof=1) if len(gaps) > 1 else 0.0
            print(
                f"| {mode} | {strategy} | {fed:.4f} | {cen:.4f} | {gaps.mean():+.2f} ± {spread:.2f} "
                f"| {int((gaps >= -2).sum())} of {len(gaps)} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["grid", "noniid"], default="grid")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="noniid part")
    p.add_argument("--strategies", nargs="+", default=["fedavg", "fedavgm"], help="noniid part")
    p.add_argument("--work", default="runs/transfer_study")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base = tomllib.loads((ROOT / "configs" / "default.toml").read_text())
    base["run"]["rounds"] = a.rounds
    base.setdefault("server", {})["eval_every"] = a.rounds // 2
    if a.part == "noniid":
        noniid(base, work, a.seeds, a.strategies)
        return
    rows = []

    def record(study: str, alpha: float, variant: str, data_fraction: float, metrics: list[dict]) -> None:
        final = metrics[-1]
        rows.append(
            {
                "study": study,
                "alpha": alpha,
                "variant": variant,
                "data_fraction": data_fraction,
                "target_accuracy": final["target_accuracy"],
                "retention_accuracy": final.get("retention_accuracy"),
                "fed_eval_p10": final.get("fed_eval_accuracy_p10"),
                "rounds": final["round"],
            }
        )

    for alpha in (0.1, 1.0, 100.0):
        for mode in ("feature-extraction", "fine-tune", "full"):
            cfg = {**base, "run": {**base["run"], "alpha": alpha, "mode": mode}}
            metrics = run_variant(f"a{alpha}-{mode}", cfg, work)
            record("transfer", alpha, mode, 1.0, metrics)
            if mode == "fine-tune":
                rows.append(
                    {
                        "study": "transfer",
                        "alpha": alpha,
                        "variant": "zero-shot",
                        "data_fraction": 1.0,
                        "target_accuracy": metrics[0]["target_accuracy"],
                        "retention_accuracy": metrics[0].get("retention_accuracy"),
                        "fed_eval_p10": None,
                        "rounds": 0,
                    }
                )
            rows.append(
                {
                    "study": "transfer",
                    "alpha": alpha,
                    "variant": f"centralised-{mode}",
                    "data_fraction": 1.0,
                    "target_accuracy": centralised_cached(
                        work, f"a{alpha}-{mode}", f"a{alpha}-{mode}", cfg, base, mode, base["run"]["seed"]
                    ),
                    "retention_accuracy": None,
                    "fed_eval_p10": None,
                    "rounds": centralised_epochs(base),
                }
            )
        cfg = {**base, "run": {**base["run"], "alpha": alpha, "mode": "full", "init": "scratch"}}
        record("transfer", alpha, "scratch", 1.0, run_variant(f"a{alpha}-scratch", cfg, work))
    for fraction in (0.1, 0.3):
        for mode in ("feature-extraction", "fine-tune"):
            cfg = {
                **base,
                "run": {**base["run"], "alpha": 1.0, "mode": mode, "data_fraction": fraction, "min_client_examples": 2},
            }
            record("data-sweep", 1.0, mode, fraction, run_variant(f"d{fraction}-{mode}", cfg, work))
    for r in rows:
        if r["study"] == "transfer" and r["alpha"] == 1.0 and r["variant"] in ("feature-extraction", "fine-tune"):
            rows.append({**r, "study": "data-sweep"})

    write_csv(RESULTS / "transfer_study.csv", rows)
    plot(rows)
    print_table(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    modes = ["feature-extraction", "fine-tune", "full"]
    variants = ["zero-shot", "scratch"] + [v for m in modes for v in (m, f"centralised-{m}")]
    alphas = [0.1, 1.0, 100.0]
    width = 0.1
    for i, v in enumerate(variants):
        ys = [
            next(
                (
                    r["target_accuracy"]
                    for r in rows
                    if r["study"] == "transfer" and r["alpha"] == al and r["variant"] == v
                ),
                np.nan,
            )
            for al in alphas
        ]
        ax1.bar(np.arange(3) + (i - 3.5) * width, ys, width, label=v, hatch="//" if "centralised" in v else None)
    ax1.set_xticks(range(3), [f"alpha={al:g}" for al in alphas])
    ax1.set_ylim(0.5, 0.95)
    ax1.set_ylabel("Amazon target test accuracy")
    ax1.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    for mode in ("feature-extraction", "fine-tune"):
        pts = sorted(
            (r["data_fraction"], r["target_accuracy"])
            for r in rows
            if r["study"] == "data-sweep" and r["variant"] == mode
        )
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
    ax2.set_xscale("log")
    ax2.set_xlabel("fraction of the pool given to clients")
    ax2.set_ylabel("target accuracy")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "transfer_study.png", dpi=110)


def print_table(rows: list[dict]) -> None:
    print("| study | alpha | variant | data | target acc | IMDB retention | clients p10 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:

        def f(v: float | None) -> str:
            return f"{v:.4f}" if isinstance(v, float) else "-"

        print(
            f"| {r['study']} | {r['alpha']:g} | {r['variant']} | {r['data_fraction']:g} | "
            f"{f(r['target_accuracy'])} | {f(r['retention_accuracy'])} | {f(r['fed_eval_p10'])} |"
        )


if __name__ == "__main__":
    main()
