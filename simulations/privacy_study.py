"""Privacy/accuracy study: record-level and client-level DP at epsilon in {1, 2, 4, 8, inf}, delta = 1e-5.

    FEDRNN_DATA_DIR=../shared/data python simulations/privacy_study.py [--rounds 5] [--clients 100]

For each non-IID alpha in {0.1, 1}, one non-private run (epsilon = inf, shared by both
levels) and, for each finite epsilon, one run with each kind of DP, all from the same seed.
Each is an ordinary fedrnn run (``Federation`` with the configured strategy and plugins, its
own run directory under ``--work``); the runs of one alpha share one Flower simulation, one
after another on the same Ray executors, so that start-up (Ray, imports, loading the teacher
and the data in every worker) is paid once per alpha rather than once per run. An
interrupted study continues where it stopped (finished runs are kept, a cut run resumes).

* record-level: DP-SGD on every client (``privacy.record_level``); each client's noise is
  calibrated so that its expected share of rounds (``ceil(rounds * per_round / clients)``)
  just spends ``epsilon``; a client selected more often than that has spent its budget and
  is not selected again. The reported epsilon is the largest any client spent.
* client-level: server-side fixed clipping (``privacy.client_level = "fixed"``; the average of
  clipped updates over the clients *sampled*, noise from the server's secret key) with the noise
  calibrated so that all rounds together spend ``epsilon``, accounted without amplification by
  subsampling (see ``fedrnn.plugins.client_dp``). The reply validator's median-relative norm
  check is off in these runs (``robust.max_norm_ratio = 0``): client-level DP refuses it.

DP randomness comes from secret keys (``fedrnn.privacy.entropy``) in ``$FEDRNN_STATE_DIR``
(default ``~/.fedrnn``): the same seed gives the same study on the same machine, with the same keys.

Sized for a shared 2-core CPU (about 10 minutes on a quiet one): the default teacher in
feature-extraction mode (only the classifier head trains and travels: 514 numbers, which is
also the only setting where client-level noise is not overwhelming at ~100 clients), one
local epoch, the target accuracy measured once at the end on the whole Amazon test split,
one seed. Results: simulations/results/privacy_study.{csv,png} and a markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from fedrnn.config import config_from_dict  # noqa: E402
from fedrnn.federation.rundir import RunDir  # noqa: E402
from fedrnn.io import write_csv  # noqa: E402
from fedrnn.runs.lifecycle import run_batch  # noqa: E402

RESULTS = ROOT / "simulations" / "results"
EPSILONS = (1.0, 2.0, 4.0, 8.0)
ALPHAS = (0.1, 1.0)
LEVELS = ("record", "client")
DELTA = 1e-5
# The clip on a client's update, fixed a priori (not tuned on the private runs). Updates are
# larger (the validator's update_norm_median), so all are clipped and C acts as the server's
# step size: the averaged signal and the noise (sigma C / clients) both scale with it.
CLIENT_CLIP = 0.1


def run_config(a: argparse.Namespace, alpha: float, level: str, eps: float) -> dict:
    cfg: dict = {
        "run": {"clients": a.clients, "rounds": a.rounds, "clients_per_round": a.per_round, "alpha": alpha,
                "mode": a.mode, "target": "amazon", "seed": a.seed, "teacher": a.teacher},
        "client": {"local_epochs": 1, "batch_size": a.batch_size, "lr": a.lr},
        "server": {"eval_every": a.rounds, "fraction_evaluate": 0.0},  # round 0 (zero-shot) and the last round
        "simulation": {"actors": 2, "threads_per_actor": 1},
    }
    if level == "record":
        cfg["privacy"] = {"record_level": True, "target_epsilon": eps, "max_grad_norm": 1.0, "delta": DELTA}
    elif level == "client":
        cfg["privacy"] = {"client_level": "fixed", "clients_target_epsilon": eps, "clipping_norm": CLIENT_CLIP,
                          "delta": DELTA}
        cfg["robust"] = {"max_norm_ratio": 0.0}  # relative to the round's median: breaks the C/m sensitivity
    return cfg


def summarize(level: str, alpha: float, eps: float, rows: list[dict], seconds: float | None) -> dict:
    last = rows[-1]
    spent = {"record": last.get("dp_record_epsilon_max"), "client": last.get("dp_client_epsilon")}.get(level)
    noise = {"record": last.get("dp_record_noise_multiplier_mean"),
             "client": last.get("dp_client_noise_multiplier")}.get(level)
    return {
        "level": level, "alpha": alpha, "target_epsilon": eps, "epsilon_spent": spent, "noise_multiplier": noise,
        "target_accuracy": last["target_accuracy"], "zero_shot_accuracy": rows[0]["target_accuracy"],
        "retention_accuracy": last.get("retention_accuracy"), "rounds": last["round"],
        "updates_aggregated": sum(r["trained"] for r in rows[1:]),
        "clients_out_of_budget": last.get("dp_record_exhausted", 0),
        "run_seconds": None if seconds is None else round(seconds, 1),
    }


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({r["alpha"] for r in results})
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.5 * len(alphas), 4), sharey=True, squeeze=False)
    for ax, alpha in zip(axes[0], alphas, strict=True):
        mine = [r for r in results if r["alpha"] == alpha]
        base = next(r for r in mine if math.isinf(r["target_epsilon"]))
        for level, marker in zip(LEVELS, "os", strict=True):
            pts = sorted((r["target_epsilon"], r["target_accuracy"]) for r in mine
                         if r["level"] == level and not math.isinf(r["target_epsilon"]))
            ax.plot(*zip(*pts, strict=True), marker=marker, label=f"{level}-level DP")
        ax.axhline(base["target_accuracy"], color="k", ls="--", label="no DP (epsilon = inf)")
        ax.axhline(base["target_accuracy"] - 0.03, color="k", ls=":", lw=0.8, label="no DP - 3 points")
        ax.axhline(base["zero_shot_accuracy"], color="grey", ls="-.", label="teacher zero-shot")
        ax.set_xscale("log", base=2)
        finite = sorted({r["target_epsilon"] for r in mine if not math.isinf(r["target_epsilon"])})
        ax.set_xticks(finite, [f"{e:g}" for e in finite])
        ax.set_xlabel(f"epsilon (delta = {DELTA:g})")
        ax.set_title(f"Dirichlet alpha = {alpha:g}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Amazon target accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "privacy_study.png", dpi=110)


def table(results: list[dict]) -> str:
    eps_cols = [*sorted({r["target_epsilon"] for r in results if not math.isinf(r["target_epsilon"])}), math.inf]
    lines = ["| DP level | alpha | " + " | ".join(f"eps={e:g}" for e in eps_cols) + " | zero-shot |",
             "|---|---|" + "---|" * (len(eps_cols) + 1)]
    for level in LEVELS:
        for alpha in sorted({r["alpha"] for r in results}):
            acc = {r["target_epsilon"]: r["target_accuracy"] for r in results if r["alpha"] == alpha
                   and r["level"] in (level, "none")}
            zero = next(r["zero_shot_accuracy"] for r in results if r["alpha"] == alpha)
            lines.append(f"| {level} | {alpha:g} | " + " | ".join(f"{100 * acc[e]:.1f}" for e in eps_cols)
                         + f" | {100 * zero:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=20)
    p.add_argument("--mode", default="feature-extraction")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", default=str(ROOT / "cache" / "teacher"))
    p.add_argument("--work", default="runs/privacy_study", help="run directories (finished runs are reused)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="Dirichlet alphas to run")
    p.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS), help="target epsilons to run")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_study = time.perf_counter()
    results = []
    for alpha in a.alphas:
        plan = [("none", math.inf)] + [(level, eps) for level in LEVELS for eps in a.epsilons]
        runs = {f"a{alpha:g}-{level}-eps{eps:g}": (level, eps) for level, eps in plan}
        summaries = run_batch({n: config_from_dict(run_config(a, alpha, *le)) for n, le in runs.items()}, work)
        for name, (level, eps) in runs.items():
            seconds = summaries[name]["wall_seconds"]
            results.append(summarize(level, alpha, eps, RunDir(work / name).read_metrics(), seconds))
            r = results[-1]
            print(f"{name:>24}: accuracy {r['target_accuracy']:.4f}  epsilon spent {r['epsilon_spent']}", flush=True)
    for r in results:
        base = next(b for b in results if b["alpha"] == r["alpha"] and b["level"] == "none")
        r["points_below_no_dp"] = round(100 * (base["target_accuracy"] - r["target_accuracy"]), 2)
    write_csv(RESULTS / "privacy_study.csv", results)
    plot(results)
    print(table(results))
    print(f"study wall time {time.perf_counter() - t_study:.0f} s")


if __name__ == "__main__":
    main()
