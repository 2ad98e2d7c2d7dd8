"""What a deployed student may cost on each device class: p95 latency, inference RAM, download.

Derived from the device profiles (:mod:`fedrnn.devices.profiles`) by three stated rules; the
numbers are assumptions of this module, not measurements, and each is one line to change:

* **latency**: p95 batch-1 latency of one review <= 100 ms, the limit under which a response
  feels instantaneous (Nielsen, *Usability Engineering*, 1993, ch. 5). A device's latency is
  the latency measured with onnxruntime on one thread of this host divided by the class's
  ``relative_speed`` - the same single-core scaling the simulated clock applies to training.
* **RAM**: the predictor (runtime, model, tokenizer, activations; see
  :func:`fedrnn.devices.memory.estimate_inference_memory`) may take a quarter of the device's
  RAM: it is one part of an application, the fraction the profiles already allow an Android
  background job.
* **download**: the export (model file, tokenizer, config) downloads in 1 s on the class's
  network (its Wi-Fi radio cap applied), so an update reaches a fleet in one short burst.
* **model file** (optional, none by default): a cap a user sets on the model file's bytes
  (``--max-model-bytes``), e.g. flash space or an over-the-air update limit the profiles do not model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fedrnn.devices.profiles import NETWORKS, PROFILES, DeviceProfile

LATENCY_P95_MS = 100.0
RAM_FRACTION = 0.25
DOWNLOAD_SECONDS = 1.0


class BudgetError(ValueError):
    """An unknown device class."""


@dataclass(frozen=True)
class Budget:
    """One device class's limits and how much slower than one host core it computes."""

    device_class: str
    relative_speed: float
    latency_p95_ms: float
    ram_bytes: int
    download_bytes: int
    model_bytes: int | None = None  # a user's cap on the model file; None: no cap

    def violations(self, host_p95_ms: float, ram_bytes: int, download_bytes: int,
                   model_bytes: int = 0) -> dict[str, float]:
        """Per budget, how far over it a student is (<= 0: within), as a fraction of the budget."""
        out = {
            "latency": self.device_latency_ms(host_p95_ms) / self.latency_p95_ms - 1,
            "ram": ram_bytes / self.ram_bytes - 1,
            "download": download_bytes / self.download_bytes - 1,
        }
        if self.model_bytes is not None:
            out["model"] = model_bytes / self.model_bytes - 1
        return out

    def device_latency_ms(self, host_ms: float) -> float:
        return host_ms / self.relative_speed

    def to_dict(self) -> dict:
        return asdict(self)


def budget_for(profile: DeviceProfile, max_model_bytes: int | None = None) -> Budget:
    net = NETWORKS[profile.network]
    down = net.down_bps if profile.wifi_cap_bps is None else min(net.down_bps, profile.wifi_cap_bps)
    return Budget(
        device_class=profile.name, relative_speed=profile.relative_speed, latency_p95_ms=LATENCY_P95_MS,
        ram_bytes=int(profile.ram_total_bytes * RAM_FRACTION), download_bytes=int(down / 8 * DOWNLOAD_SECONDS),
        model_bytes=max_model_bytes,
    )


def resolve_class(name: str) -> str:
    """A profile name, matched ignoring dashes (``rpi-zero-2w`` is ``rpi-zero2w``)."""
    wanted = name.replace("-", "").lower()
    for known in PROFILES:
        if known.replace("-", "") == wanted:
            return known
    raise BudgetError(f"unknown device class {name!r}; known: {', '.join(PROFILES)}")
