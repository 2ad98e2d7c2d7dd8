"""Packaging: a device's install is the lean core, and the test install is everything.

A Raspberry Pi installs ``fedrnn[device]`` (clients/README.md): no Ray, matplotlib or ONNX tooling.
That only holds while the ClientApp's import closure stays inside the core dependencies, which a
stray top-level import (say of ``fedrnn.edge.export``) would silently break on the device only.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NOT_ON_A_DEVICE = ("ray", "matplotlib", "onnx", "onnxscript", "onnxruntime", "dp_accounting")


def _names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name for r in requirements}


def test_client_app_imports_without_server_or_simulation_packages() -> None:
    # Each blocked module raises ImportError when imported, as if it were not installed.
    code = ("import sys\n"
            f"for m in {NOT_ON_A_DEVICE!r}: sys.modules[m] = None\n"
            "import clients.client_app\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_core_dependencies_are_the_device_set() -> None:
    core = _names(PYPROJECT["project"]["dependencies"])
    assert core == {"torch", "flwr", "opacus", "numpy", "tokenizers", "safetensors", "rich"}
    flwr = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("flwr"))
    assert not flwr.extras, "flwr's extras (simulation: Ray; dp) belong in fedrnn's extras"


def test_test_extra_installs_every_other_extra() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    (self_ref,) = [Requirement(r) for r in extras["test"] if Requirement(r).name == "fedrnn"]
    assert self_ref.extras == set(extras) - {"test"}


def test_license_metadata_is_spdx_with_the_file() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert "LICENSE" in PYPROJECT["tool"]["flwr"]["app"]["fab-include"]
