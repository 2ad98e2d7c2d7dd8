"""Start-up work kept off a run's critical path: Opacus imported only for DP, Ray started early
on loopback with workers that import the ClientApp as they start.

Each check runs in a fresh interpreter, since what is already imported or initialised in the
test process would hide the behaviour.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, timeout: float = 120) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_apps_import_without_opacus() -> None:
    """Opacus costs ~1.2 s to import; a run without DP must not pay it in the server or any worker."""
    out = _python("import sys, clients.client_app, server.server_app, fedrnn.simulate; print('opacus' in sys.modules)")
    assert out == "False"


def test_privacy_accounting_still_imports_opacus_when_used() -> None:
    out = _python(
        "import json, sys; from fedrnn.privacy.accounting import calibrate_noise; "
        "s = calibrate_noise(4.0, 1e-5, 0.1, 100); "
        "print(json.dumps([s > 0, 'opacus' in sys.modules]))"
    )
    assert json.loads(out) == [True, True]


def test_start_ray_local_loopback_and_preloaded_workers() -> None:
    code = """
import json
from fedrnn.config import load_config
from fedrnn.runs.ray_engine import start_ray
start_ray(load_config("configs/tiny.toml"))
import ray

@ray.remote(num_cpus=1)
def probe():
    import sys
    return "clients.client_app" in sys.modules, "torch" in sys.modules

try:
    print(json.dumps([ray.util.get_node_ip_address(), ray.get(probe.remote())]))
finally:
    ray.shutdown()
"""
    ip, (client_app_loaded, torch_loaded) = json.loads(_python(code))
    assert ip == "127.0.0.1"
    assert client_app_loaded and torch_loaded
