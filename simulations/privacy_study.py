"""Privacy/accuracy study: record-level and client-level DP at several epsilons (delta = 1e-5).

    FEDRNN_DATA_DIR=../shared/data python simulations/privacy_study.py [--rounds 5] [--clients 100]
    FEDRNN_DATA_DIR=../shared/data python simulations/privacy_study.py --name privacy_study_uci \
        --target ../shared/data/uci_sentences/sentences.jsonl.gz --partition natural --partition-column group \
        --clients 30 --per-round 10 --rounds 20 --mode full --local-epochs 2 --lr 0.002 --seeds 0 1 2

For each partition setting (each ``--alphas`` value for Amazon's own label-skew partition, the
default, or ``--partition dirichlet``; one setting otherwise, e.g. a file target split naturally
by its source column) and
each seed, one non-private run (epsilon = inf, shared by both levels) and, for each finite
epsilon, one run with each kind of DP. Each is an ordinary fedrnn run (``Federation`` with the
configured strategy and plugins, its own run directory under ``--work``); the runs of one
setting share one Flower simulation, one after another on the same Ray executors, so that
start-up (Ray, imports, loading the teacher and the data in every worker) is paid once per
setting rather than once per run. An interrupted study continues where it stopped (finished
runs are kept, a cut run resumes).

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
With several ``--seeds`` (each seed its own partitions, client sampling and training) the table
gives mean ± standard error (sd / sqrt(seeds)) of the final target accuracy, and the gap to
non-private training is paired by seed.

The Amazon default is sized for a shared 2-core CPU (about 10 minutes on a quiet one): the
default teacher in feature-extraction mode (only the classifier head trains and travels), one
local epoch, the target accuracy measured once at the end on the whole target test split.
Results: simulations/results/NAME.{csv,png,md} (``--name``, default privacy_study).
"""

from __future__ import annotations

import argparse
import math
import statistics
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


def settings(a: argparse.Namespace) -> list[float | None]:
    """The partition settings a study runs: each alpha for Amazon's own or a Dirichlet partition, else one (None)."""
    by_alpha = a.partition == "dirichlet" or (not a.partition and a.target == "amazon")
    return list(a.alphas) if by_alpha else [None]


def setting_name(alpha: float | None, partition: str) -> str:
    return f"alpha={alpha:g}" if alpha is not None else partition or "own"


def run_config(a: argparse.Namespace, alpha: float | None, level: str, eps: float, seed: int) -> dict:
    run = {"clients": a.clients, "rounds": a.rounds, "clients_per_round": a.per_round, "mode": a.mode,
           "target": a.target, "seed": seed, "teacher": a.teacher, "partition": a.partition}
    if alpha is not None:
        run["alpha"] = alpha
    if a.partition_column:
        run["partition_column"] = a.partition_column
    cfg: dict = {
        "run": run,
        "client": {"local_epochs": a.local_epochs, "batch_size": a.batch_size, "lr": a.lr},
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


def summarize(level: str, setting: str, seed: int, eps: float, rows: list[dict], seconds: float | None) -> dict:
    last = rows[-1]
    spent = {"record": last.get("dp_record_epsilon_max"), "client": last.get("dp_client_epsilon")}.get(level)
    noise = {"record": last.get("dp_record_noise_multiplier_mean"),
             "client": last.get("dp_client_noise_multiplier")}.get(level)
    return {
        "level": level, "setting": setting, "seed": seed, "target_epsilon": eps, "epsilon_spent": spent,
        "noise_multiplier": noise, "target_accuracy": last["target_accuracy"],
        "zero_shot_accuracy": rows[0]["target_accuracy"],
        "retention_accuracy": last.get("retention_accuracy"), "rounds": last["round"],
        "updates_aggregated": sum(r["trained"] for r in rows[1:]),
        "clients_out_of_budget": last.get("dp_record_exhausted", 0),
        "run_seconds": None if seconds is None else round(seconds, 1),
    }


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 with one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd / math.sqrt(len(values))


def zero_shot(results: list[dict], setting: str) -> tuple[float, float]:
    """The teacher's accuracy before round 1 in ``setting`` (mean, standard error over seeds)."""
    return mean_se([r["zero_shot_accuracy"] for r in results if r["setting"] == setting and r["level"] == "none"])


def cells(results: list[dict], setting: str, level: str) -> dict[float, tuple[float, float]]:
    """Per epsilon (inf = no DP): mean ± standard error over seeds of the final target accuracy."""
    out: dict[float, tuple[float, float]] = {}
    for eps in sorted({r["target_epsilon"] for r in results}):
        acc = [r["target_accuracy"] for r in results if r["setting"] == setting and r["target_epsilon"] == eps
               and r["level"] in (level, "none")]
        if acc:
            out[eps] = mean_se(acc)
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["setting"] for r in results))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), sharey=True, squeeze=False)
    for ax, setting in zip(axes[0], names, strict=True):
        for level, marker in zip(LEVELS, "os", strict=True):
            if not any(r["level"] == level for r in results):
                continue
            pts = sorted((e, *ms) for e, ms in cells(results, setting, level).items() if not math.isinf(e))
            if pts:
                eps, mean, se = zip(*pts, strict=True)
                ax.errorbar(eps, mean, yerr=se, marker=marker, capsize=3, label=f"{level}-level DP")
        base = cells(results, setting, "none")[math.inf][0]
        ax.axhline(base, color="k", ls="--", label="no DP (epsilon = inf)")
        ax.axhline(zero_shot(results, setting)[0], color="grey", ls="-.", label="teacher zero-shot")
        ax.set_xscale("log", base=2)
        finite = sorted({r["target_epsilon"] for r in results if not math.isinf(r["target_epsilon"])})
        ax.set_xticks(finite, [f"{e:g}" for e in finite])
        ax.set_xlabel(f"epsilon (delta = {DELTA:g})")
        seeds = len({r["seed"] for r in results})
        ax.set_title(f"{setting}: mean ± s.e. over {seeds} seed(s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("target test accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: list[dict]) -> str:
    """Markdown: per level and setting, the final target accuracy (%) per epsilon, mean ± s.e. over seeds."""
    eps_cols = [*sorted({r["target_epsilon"] for r in results if not math.isinf(r["target_epsilon"])}), math.inf]
    lines = ["| DP level | setting | " + " | ".join(f"eps={e:g}" for e in eps_cols) + " | zero-shot |",
             "|---|---|" + "---|" * (len(eps_cols) + 1)]
    for level in [x for x in LEVELS if any(r["level"] == x for r in results)]:
        for setting in dict.fromkeys(r["setting"] for r in results):
            acc = cells(results, setting, level)
            zero = zero_shot(results, setting)
            lines.append(f"| {level} | {setting} | " + " | ".join(
                f"{100 * acc[e][0]:.1f} ± {100 * acc[e][1]:.1f}" if e in acc else "–" for e in eps_cols)
                + f" | {100 * zero[0]:.1f} ± {100 * zero[1]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=20)
    p.add_argument("--mode", default="feature-extraction")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and arm")
    p.add_argument("--teacher", default=str(ROOT / "cache" / "teacher"))
    p.add_argument("--target", default="amazon", help="amazon, imdb or a labelled file (as run.target)")
    p.add_argument("--partition", default="", help="as run.partition (\"\": the target's own; Amazon's and "
                   "dirichlet: one setting per --alphas)")
    p.add_argument("--partition-column", default="", help="as run.partition_column")
    p.add_argument("--work", default="runs/privacy_study", help="run directories (finished runs are reused)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="Dirichlet alphas to run")
    p.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS), help="target epsilons to run")
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS, help="DP levels to run")
    p.add_argument("--name", default="privacy_study", help="results file stem in simulations/results")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_study = time.perf_counter()
    results = []
    for alpha in settings(a):
        setting = setting_name(alpha, a.partition)
        plan = [("none", math.inf)] + [(level, eps) for level in a.levels for eps in a.epsilons]
        runs = {f"{setting.replace('=', '')}-s{seed}-{level}-eps{eps:g}": (level, eps, seed)
                for seed in a.seeds for level, eps in plan}
        summaries = run_batch({n: config_from_dict(run_config(a, alpha, level, eps, seed))
                               for n, (level, eps, seed) in runs.items()}, work)
        for name, (level, eps, seed) in runs.items():
            seconds = summaries[name]["wall_seconds"]
            results.append(summarize(level, setting, seed, eps, RunDir(work / name).read_metrics(), seconds))
            r = results[-1]
            print(f"{name:>32}: accuracy {r['target_accuracy']:.4f}  epsilon spent {r['epsilon_spent']}", flush=True)
    for r in results:  # paired by seed
        base = next(b for b in results if b["setting"] == r["setting"] and b["seed"] == r["seed"]
                    and b["level"] == "none")
        r["points_below_no_dp"] = round(100 * (base["target_accuracy"] - r["target_accuracy"]), 2)
    write_csv(RESULTS / f"{a.name}.csv", results)
    plot(results, RESULTS / f"{a.name}.png")
    md = table(results)
    (RESULTS / f"{a.name}.md").write_text(md + "\n")
    print(md)
    print(f"study wall time {time.perf_counter() - t_study:.0f} s")


if __name__ == "__main__":
    main()
