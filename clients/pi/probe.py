"""What works on this device: run on the device itself (or in the emulated userland), prints JSON.

    python clients/pi/probe.py --export EXPORT_DIR --texts-file TEXTS [--seed 0]

Each check runs in its own Python process, so an illegal instruction (SIGILL) or another crash
in one wheel is reported as that check's failure, with its signal, instead of ending the probe:

* ``import_torch``: ``import torch``; its version and whether it is a CUDA build;
* ``train_step``: one forward/backward/Adam step of a small ``SentimentRNN`` (the ClientApp's
  model class) on fixed random ids; prints the loss before and after, which the caller compares
  with the same step on another machine;
* ``onnx_int8``: an onnxruntime session on the export's ``model.int8.onnx``, run on fixed ids;
* ``predict``: ``python -m fedrnn.edge.predict EXPORT_DIR --file TEXTS`` (the deployable path,
  no torch), its probabilities parsed from the output.

The CPU features the (emulated) kernel reports to programs are read from ``/proc/self/auxv``
(``AT_HWCAP``), which shows the ARMv8.2 extensions a Cortex-A76 has and an A53/A72 lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import struct
import subprocess
import sys

TIMEOUT_S = 1800  # per check; emulation is slow

# AT_HWCAP bits (arch/arm64/include/uapi/asm/hwcap.h) that tell ARMv8.0 from ARMv8.2 cores
HWCAP_BITS = {"fp": 0, "asimd": 1, "aes": 3, "crc32": 7, "atomics": 8, "fphp": 9, "asimdhp": 10, "asimdrdm": 12,
              "lrcpc": 15, "dcpop": 16, "asimddp": 20, "sve": 22}
AT_HWCAP = 16

TRAIN_STEP = """
import json, torch
from fedrnn.model.rnn import ModelConfig, SentimentRNN
torch.manual_seed({seed}); torch.set_num_threads(1)
model = SentimentRNN(ModelConfig(vocab_size=2000, embed_dim=24, hidden_size=24, num_layers=2, dropout=0.0))
g = torch.Generator().manual_seed({seed})
ids = torch.randint(1, 2000, (8, 32), generator=g)
lengths = torch.randint(4, 33, (8,), generator=g)
labels = torch.randint(0, 2, (8,), generator=g)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
loss = torch.nn.functional.cross_entropy(model(ids, lengths), labels)
opt.zero_grad(); loss.backward(); opt.step()
after = torch.nn.functional.cross_entropy(model(ids, lengths), labels)
print(json.dumps({{"loss_before": loss.item(), "loss_after": after.item()}}))
"""

IMPORT_TORCH = """
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda_build": torch.version.cuda is not None,
                  "threads": torch.get_num_threads()}))
"""

ONNX_INT8 = """
import json, numpy as np, onnxruntime as ort
s = ort.InferenceSession({model!r}, providers=["CPUExecutionProvider"])
rng = np.random.default_rng({seed})
ids = rng.integers(1, {vocab}, size=(4, 32), dtype=np.int64)
lengths = np.array([32, 20, 9, 1], dtype=np.int64)
logits = s.run(["logits"], {{"ids": ids, "lengths": lengths}})[0]
print(json.dumps({{"onnxruntime": ort.__version__, "logits": logits.tolist()}}))
"""


def hwcaps() -> list[str]:
    try:
        raw = open("/proc/self/auxv", "rb").read()
    except OSError:
        return []
    pairs = struct.iter_unpack("<QQ", raw[: len(raw) // 16 * 16])
    value = next((v for k, v in pairs if k == AT_HWCAP), 0)
    return [name for name, bit in HWCAP_BITS.items() if value >> bit & 1]


def last_json_line(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.strip()][-1])


def predictions(stdout: str) -> dict:
    """``fedrnn.edge.predict``'s lines: label, probability of that label, snippet (tab-separated)."""
    rows = [line.split("\t") for line in stdout.splitlines() if line.strip()]
    return {"labels": [r[0] for r in rows], "probabilities": [float(r[1]) for r in rows]}


def run_check(args: list[str], parse=last_json_line) -> dict:
    """Run one check in a fresh interpreter; ``parse`` reads its output."""
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {TIMEOUT_S} s"}
    if r.returncode != 0:
        why = (f"killed by {signal.Signals(-r.returncode).name}" if r.returncode < 0
               else f"exit code {r.returncode}")
        return {"ok": False, "error": why, "stderr_tail": r.stderr[-1500:]}
    try:
        return {"ok": True, **parse(r.stdout)}
    except (IndexError, ValueError):
        return {"ok": False, "error": "unexpected output", "stdout_tail": r.stdout[-1500:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="directory written by `python -m fedrnn.edge.export`")
    p.add_argument("--texts-file", required=True, help="reviews for the predict check, one per line")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = json.load(open(os.path.join(a.export, "config.json")))
    py = sys.executable
    out = {
        "machine": platform.machine(), "qemu_cpu": os.environ.get("QEMU_CPU"),
        "hwcaps": hwcaps() if platform.machine() == "aarch64" else None,
        "import_torch": run_check([py, "-c", IMPORT_TORCH]),
        "train_step": run_check([py, "-c", TRAIN_STEP.format(seed=a.seed)]),
        "onnx_int8": run_check([py, "-c", ONNX_INT8.format(model=os.path.join(a.export, "model.int8.onnx"),
                                                          seed=a.seed, vocab=cfg["model"]["vocab_size"])]),
    }
    out["predict"] = run_check([py, "-m", "fedrnn.edge.predict", a.export, "--file", a.texts_file], predictions)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
