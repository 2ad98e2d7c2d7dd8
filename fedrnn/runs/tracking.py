"""Optional MLflow tracking (``[tracking] mlflow = true``; ``pip install 'fedrnn[tracking]'``).

One MLflow run per fedrnn run: the resolved config as parameters (``run.rounds``, ``client.lr``,
...), every round's scalar metrics at step = round, and at the end the plots, ``summary.json``
and ``metrics.csv`` as artifacts. The store is ``tracking.tracking_uri``, or by default a local
file store ``mlruns/`` beside the run directory (``runs/mlruns`` for runs in ``runs/``). A
resumed run logs into the same MLflow run (its id is kept in the run directory).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from fedrnn.config import RunConfig
from fedrnn.federation.rundir import RunDir

MLFLOW_RUN_ID = "mlflow_run_id.txt"
ARTIFACTS = ("summary.json", "metrics.csv", "accuracy.png", "loss.png", "config.json")


def store_uri(cfg: RunConfig, run_dir: RunDir) -> str:
    """``tracking.tracking_uri``, or a local file store beside the run directory.

    MLflow 3 keeps its file store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE`` is set; a database store needs the full ``mlflow`` package
    (SQLAlchemy), while the ``tracking`` extra installs ``mlflow-skinny``. So the default local
    store opts in (an explicit ``MLFLOW_ALLOW_FILE_STORE`` wins); give a URI for anything else.
    """
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (run_dir.path.resolve().parent / "mlruns").as_uri()


class MlflowTracker:
    """Per-round hook logging to MLflow; :meth:`finish` uploads the artifacts and closes the MLflow run."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise RuntimeError("[tracking] mlflow = true needs MLflow: pip install 'fedrnn[tracking]'") from e
        self.run_dir = run_dir
        self.client = MlflowClient(tracking_uri=store_uri(cfg, run_dir))
        id_file = run_dir.path / MLFLOW_RUN_ID
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.tracking.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.path.name).info.run_id
        id_file.write_text(self.run_id + "\n")
        from mlflow.entities import Param

        params = [Param(f"{section}.{key}", str(value)[:6000])
                  for section, values in cfg.to_dict().items() for key, value in values.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def __call__(self, row: dict[str, Any]) -> None:
        """Log one round's scalar metrics at step = round."""
        from mlflow.entities import Metric

        step, stamp = int(row["round"]), int(time.time() * 1000)
        metrics = [Metric(k, float(v), stamp, step) for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, rows: list[dict[str, Any]], status: str = "FINISHED") -> None:
        """Log round 0 (the model before training, written before the per-round hooks run) and the artifacts."""
        if rows and rows[0].get("round") == 0:
            self(rows[0])
        for name in ARTIFACTS:
            path: Path = self.run_dir.path / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=status)

