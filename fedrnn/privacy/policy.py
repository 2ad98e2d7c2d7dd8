"""A device's own privacy policy: the least privacy it accepts, whatever the server asks.

Record-level DP runs on the device, but the server's message says whether to run it and with
what noise, clip and budget. A device that must protect its owner's reviews cannot leave that to
the server, so its node config (``~/.fedrnn/node.toml``, i.e. the SuperNode's ``--node-config``)
may set a floor:

=========================== ==============================================================
``dp-required``             ``true``: never train without record-level DP
``dp-max-epsilon``          the largest record-level epsilon it will ever spend (at its delta)
``dp-delta``                its delta: a request for a larger delta is refused
``dp-min-noise-multiplier`` the least noise it adds
``dp-max-clip-norm``        the largest per-review clip it uses
=========================== ==============================================================

Server instructions can only tighten this. A request for less privacy (no DP when DP is
required, a larger budget, less noise, a larger clip, a larger delta) is **refused**: the device
does not train and says why in its reply, and the server records the refusal
(``fedrnn.plugins.refusals``). Where the server leaves a choice to the device (no budget, noise
to be calibrated), the device's bounds fill it in (:meth:`DevicePolicy.tighten`), and they are
applied to the state file the device keeps its budget in, so a file created under an older,
looser policy is tightened too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fedrnn.privacy.accounting import PrivacyState

KEYS = ("dp-required", "dp-max-epsilon", "dp-delta", "dp-min-noise-multiplier", "dp-max-clip-norm")


def _number(node_config: Mapping[str, Any], key: str, low: float, high: float = math.inf) -> float | None:
    if key not in node_config:
        return None
    value = node_config[key]
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and low < number < high):
        raise ValueError(f"node config {key} = {value!r}: expected a number in ({low:g}, {high:g})")
    return number


def _flag(node_config: Mapping[str, Any], key: str) -> bool:
    value = node_config.get(key, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"node config {key} = {value!r}: expected true or false")
    return value


@dataclass(frozen=True)
class DevicePolicy:
    """The least privacy a device accepts; ``None`` bounds are not set."""

    required: bool = False
    max_epsilon: float | None = None
    delta: float | None = None
    min_noise_multiplier: float | None = None
    max_clip_norm: float | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> DevicePolicy:
        """The policy in a node config (no ``dp-*`` key: no policy); a bad value names its key."""
        return cls(
            required=_flag(node_config, "dp-required"),
            max_epsilon=_number(node_config, "dp-max-epsilon", 0.0),
            delta=_number(node_config, "dp-delta", 0.0, 1.0),
            min_noise_multiplier=_number(node_config, "dp-min-noise-multiplier", 0.0),
            max_clip_norm=_number(node_config, "dp-max-clip-norm", 0.0),
        )

    def refusal(self, *, record_dp: bool, noise_multiplier: float = 0.0, target_epsilon: float = 0.0,
                max_grad_norm: float = 0.0, delta: float = 0.0) -> str | None:
        """Why the device refuses this request (``None``: it may go ahead). ``0`` = not set by the server."""
        if not record_dp:
            return "dp-required = true but the server asked for training without record-level DP" \
                if self.required else None
        reasons = []
        if self.max_epsilon is not None and target_epsilon > self.max_epsilon:
            reasons.append(f"the server's budget epsilon = {target_epsilon:g} exceeds dp-max-epsilon = "
                           f"{self.max_epsilon:g}")
        if self.delta is not None and delta > self.delta:
            reasons.append(f"the server's delta = {delta:g} exceeds dp-delta = {self.delta:g}")
        if self.min_noise_multiplier is not None and 0 < noise_multiplier < self.min_noise_multiplier:
            reasons.append(f"the server's noise multiplier {noise_multiplier:g} is below dp-min-noise-multiplier = "
                           f"{self.min_noise_multiplier:g}")
        if self.max_clip_norm is not None and max_grad_norm > self.max_clip_norm:
            reasons.append(f"the server's clip norm {max_grad_norm:g} exceeds dp-max-clip-norm = "
                           f"{self.max_clip_norm:g}")
        return "; ".join(reasons) or None

    def budget(self, requested: float | None) -> float | None:
        """The budget to spend: the server's, capped by the device's (``None``: unbounded)."""
        caps = [b for b in (requested, self.max_epsilon) if b is not None]
        return min(caps) if caps else None

    def tighten(self, state: PrivacyState) -> PrivacyState:
        """``state`` with the device's bounds applied (more noise, smaller clip, delta and budget where looser)."""
        return replace(
            state,
            noise_multiplier=max(state.noise_multiplier, self.min_noise_multiplier or 0.0),
            max_grad_norm=min(state.max_grad_norm, self.max_clip_norm or math.inf),
            delta=min(state.delta, self.delta or 1.0),
            target_epsilon=self.budget(state.target_epsilon),
        )
