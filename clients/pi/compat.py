"""The Pi compatibility table (clients/README.md), measured in the emulated arm64 userland.

    sudo clients/pi/emulate.sh build          # once
    FEDRNN_PI_RSS_OUT=clients/pi/rss.json python -m pytest -m slow tests/test_pi_emulation.py   # the round
    FEDRNN_DATA_DIR=... python clients/pi/compat.py [--cpus cortex-a53,cortex-a72] [--rss clients/pi/rss.json]

For each CPU model it runs ``clients/pi/probe.py`` inside the userland (``emulate.sh exec``) and
the same probe natively on this machine, and compares: the training step's losses and the int8
student's logits and predictions must match the native run (different CPUs round differently,
so within a tolerance; the differences are recorded). It adds the installed size of the lean
extra (the userland's venv, as the Pi guide installs it), and with ``--rss`` the peak RSS of each
SuperNode during a federated round, as the slow test ``tests/test_pi_emulation.py`` recorded it.
Writes ``clients/pi/compat.json``. Emulated wall-clock times are not device speeds and are not
recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fedrnn.data.loaders import DATA_DIR_ENV, load_amazon
from fedrnn.data.tokenizer import train_tokenizer
from fedrnn.edge.export import export_student
from fedrnn.model.checkpoint import save_checkpoint
from fedrnn.model.rnn import ModelConfig, SentimentRNN

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EMULATE = HERE / "emulate.sh"
PI_ROOT = Path(os.environ.get("FEDRNN_PI_ROOT", "/work/pi-rootfs/bookworm"))
CPUS = ("cortex-a53", "cortex-a72", "cortex-a76")
# The student a server ships (fedrnn.edge.distill.make_student's default shape) over the tiny test vocabulary.
STUDENT = ModelConfig(vocab_size=2000, embed_dim=32, hidden_size=64, num_layers=1, dropout=0.0)
LOSS_TOL, LOGIT_TOL, PROB_TOL = 1e-4, 1e-3, 1e-3


def inside(path: Path) -> str:
    """A host path under the userland, as the userland sees it."""
    return "/" + str(path.relative_to(PI_ROOT))


def prepare(work: Path, data_dir: str) -> tuple[Path, Path]:
    """A student-shaped model exported to ONNX (float + int8), and 10 Amazon reviews to classify.

    Its weights are a seeded random initialisation: what is checked is that the int8 model runs
    on the device and gives the native run's outputs, not its accuracy.
    """
    reviews = load_amazon(data_dir)
    tokenizer = train_tokenizer(reviews.texts[:2000], vocab_size=STUDENT.vocab_size)
    torch.manual_seed(0)
    model = SentimentRNN(ModelConfig(**{**STUDENT.to_dict(), "vocab_size": tokenizer.get_vocab_size()}))
    save_checkpoint(work / "student", model, tokenizer, max_len=128)
    export = work / "export"
    export_student(work / "student", export)
    texts = work / "texts.txt"
    texts.write_text("".join(" ".join(reviews.texts[i].split())[:2000] + "\n" for i in range(10)), encoding="utf-8")
    return export, texts


ALL_CHECKS = "import_torch,train_step,onnx_int8,predict"


def probe(cmd_prefix: list[str], export: str, texts: str, checks: str = ALL_CHECKS) -> dict:
    r = subprocess.run([*cmd_prefix, "clients/pi/probe.py", "--export", export, "--texts-file", texts,
                        "--checks", checks], cwd=REPO, capture_output=True, text=True, timeout=4 * 3600)
    if r.returncode != 0:
        return {"probe_failed": f"exit code {r.returncode}", "stderr_tail": r.stderr[-3000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def alt_torch(version: str) -> Path:
    """PyPI's aarch64 wheel of torch ``version``, unpacked in the userland (``PYTHONPATH`` puts it first)."""
    target = PI_ROOT / "opt" / f"torch-{version}"
    if not (target / "torch" / "__init__.py").is_file():
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--platform",
                            "manylinux_2_28_aarch64", "--python-version", "3.11", "--only-binary=:all:", "-d", d,
                            f"torch=={version}"], check=True, timeout=1800)
            (wheel,) = Path(d).glob("torch-*.whl")
            with zipfile.ZipFile(wheel) as z:
                z.extractall(target)
    return target


def compare(got: dict, ref: dict) -> dict:
    """Which checks worked, and how far their numbers are from the native run's."""
    out: dict = {}
    t, rt = got.get("train_step", {}), ref.get("train_step")
    if t.get("ok"):
        d = max(abs(t["loss_before"] - rt["loss_before"]), abs(t["loss_after"] - rt["loss_after"]))
        out["train_step"] = {"ok": d <= LOSS_TOL, "max_abs_loss_diff": d}
    o, ro = got.get("onnx_int8", {}), ref.get("onnx_int8")
    if o.get("ok"):
        d = float(np.abs(np.array(o["logits"]) - np.array(ro["logits"])).max())
        out["onnx_int8"] = {"ok": d <= LOGIT_TOL, "max_abs_logit_diff": d}
    p, rp = got.get("predict", {}), ref.get("predict")
    if p.get("ok"):
        d = float(np.abs(np.array(p["probabilities"]) - np.array(rp["probabilities"])).max())
        out["predict"] = {"ok": p["labels"] == rp["labels"] and d <= PROB_TOL, "max_abs_prob_diff": d,
                          "texts": len(p["labels"])}
    i = got.get("import_torch", {})
    if i.get("ok"):
        out["import_torch"] = {"ok": not i["cuda_build"], "torch": i["torch"], "cuda_build": i["cuda_build"]}
    for name in ("import_torch", "train_step", "onnx_int8", "predict"):
        # a check that itself failed: say how (signal, exit code, output)
        if name not in out and (name in got or "probe_failed" in got):
            out[name] = {"ok": False, **{k: v for k, v in got.get(name, got).items() if k != "ok"}}
    return out


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def install_size() -> dict:
    """Bytes of the userland's venv (the Pi guide's `pip install torch==...` + `pip install ".[device]"`)."""
    venv = PI_ROOT / "home/pi/fedrnn-venv"
    site = next((venv / "lib").glob("python3*/site-packages"))
    per_pkg: dict[str, int] = {}
    for d in site.iterdir():
        if d.is_dir() and not d.name.endswith((".dist-info", "__pycache__")):
            per_pkg[d.name] = du(d)
    top = dict(sorted(per_pkg.items(), key=lambda kv: -kv[1])[:12])
    dists = sorted(d.name.removesuffix(".dist-info").replace("-", "==", 1) for d in site.glob("*.dist-info"))
    return {"venv_bytes": du(venv), "site_packages_bytes": du(site), "largest_packages_bytes": top,
            "packages": dists}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", default=",".join(CPUS), help="QEMU CPU models, comma-separated")
    p.add_argument("--checks", default=ALL_CHECKS, help="which probe checks to run (comma-separated)")
    p.add_argument("--alt-torch", default="", help="other torch versions to try where the installed one fails, "
                   "comma-separated (PyPI aarch64 wheels, unpacked in the userland, import_torch + train_step only)")
    p.add_argument("--rss", help="peak RSS file written by tests/test_pi_emulation.py (FEDRNN_PI_RSS_OUT)")
    p.add_argument("--out", default=str(HERE / "compat.json"))
    a = p.parse_args()
    data_dir = os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        sys.exit(f"set {DATA_DIR_ENV} to the data sets directory")
    check = subprocess.run([str(EMULATE), "check"], capture_output=True, text=True)
    if check.returncode != 0:
        sys.exit(check.stderr.strip())
    (PI_ROOT / "tmp").mkdir(exist_ok=True)
    result: dict = {"load_average_start": os.getloadavg(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "torch_wheel": sorted(d.name for d in PI_ROOT.glob("home/pi/fedrnn-venv/lib/*/site-packages/torch-*"
                                                                        ".dist-info")),
                    "tolerances": {"loss": LOSS_TOL, "logit": LOGIT_TOL, "probability": PROB_TOL}}
    with tempfile.TemporaryDirectory(dir=PI_ROOT / "tmp", prefix="fedrnn-compat-") as tmp:
        export, texts = prepare(Path(tmp), data_dir)
        ref = probe([sys.executable], str(export), str(texts), a.checks)
        result["native"] = {"machine": ref["machine"], "probe": ref}
        cpus = a.cpus.split(",")
        with ThreadPoolExecutor(len(cpus)) as pool:  # each probe is its own emulated process tree
            got = pool.map(lambda cpu: probe([str(EMULATE), "exec", "--cpu", cpu, "python"], inside(export),
                                             inside(texts), a.checks), cpus)
            result["cpus"] = {cpu: {"checks": compare(g, ref), "hwcaps": g.get("hwcaps"), "probe": g}
                              for cpu, g in zip(cpus, got, strict=True)}
        for cpu, r in result["cpus"].items():
            print(cpu, {k: v["ok"] for k, v in r["checks"].items()}, flush=True)
        failing = [cpu for cpu, r in result["cpus"].items() if not r["checks"].get("train_step", {}).get("ok")]
        jobs = [(v, cpu) for v in filter(None, a.alt_torch.split(",")) for cpu in failing]
        with ThreadPoolExecutor(max(1, len(jobs))) as pool:
            got = pool.map(lambda job: probe([str(EMULATE), "exec", "--cpu", job[1], "env",
                                              f"PYTHONPATH={inside(alt_torch(job[0]))}", "python"],
                                             inside(export), inside(texts), "import_torch,train_step"), jobs)
            result["alt_torch"] = {f"{v} {cpu}": {"checks": compare(g, ref), "probe": g}
                                   for (v, cpu), g in zip(jobs, got, strict=True)}
        for job, r in result["alt_torch"].items():
            print("torch", job, {k: v["ok"] for k, v in r["checks"].items()}, flush=True)
    result["install"] = install_size()
    if a.rss:
        result["round_peak_rss"] = json.loads(Path(a.rss).read_text())
    result["load_average_end"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
