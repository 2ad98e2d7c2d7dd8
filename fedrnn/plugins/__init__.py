"""Step 4: round plugins, one module per config section, and the order they act in each round.

``refusals`` (always), ``record_dp`` / ``client_dp`` ([privacy]), ``compression``, ``robust``, ``attack``,
``faults``, ``devices``, ``distill``, ``personalize``; the interface they implement is ``fedrnn.federation.plugin``.
"""

from __future__ import annotations

from fedrnn.config import RunConfig
from fedrnn.federation.plugin import RoundPlugin
from fedrnn.plugins.attack import AttackSimulation
from fedrnn.plugins.client_dp import ClientLevelLedger
from fedrnn.plugins.compression import Int8Compression
from fedrnn.plugins.devices import DeviceSimulation
from fedrnn.plugins.distill import StudentDistillation
from fedrnn.plugins.faults import FaultInjection
from fedrnn.plugins.personalize import Personalization
from fedrnn.plugins.record_dp import PrivacyLedger
from fedrnn.plugins.refusals import RefusalRecord
from fedrnn.plugins.robust import ReplyValidator


def build_plugins(cfg: RunConfig) -> list[RoundPlugin]:
    """The round plugins a config switches on, in the order they act each round.

    The refusal record goes first: a device's refusal carries no update for any other plugin. The
    privacy plugins go next: the record-level ledger reads only each reply's privacy state,
    and every update a client released must be accounted, even one the validator then rejects.
    An int8 uplink decoder goes next, since the validator checks decoded float32 weights. Then the
    reply validator: nothing unchecked reaches another plugin or the strategy. Distillation goes
    next to last: it distils from the aggregate of the replies every other plugin accepted.
    Personalisation, last, only reads the final aggregate.
    """
    plugins: list[RoundPlugin] = [RefusalRecord()]
    if cfg.privacy.record_level:
        plugins.append(PrivacyLedger(cfg.privacy))
    if cfg.privacy.client_level != "off":
        plugins.append(ClientLevelLedger(cfg))
    if cfg.compression.active:
        plugins.append(Int8Compression(cfg.compression))
    plugins.append(ReplyValidator(cfg.robust))
    if cfg.attack.clients:
        plugins.append(AttackSimulation(cfg.attack))
    if cfg.faults.enabled:
        plugins.append(FaultInjection(cfg.faults))
    if cfg.devices.enabled:
        plugins.append(DeviceSimulation(cfg.devices))
    if cfg.distill.enabled:
        plugins.append(StudentDistillation(cfg.distill))
    plugins.append(Personalization(cfg.personalize))  # every simulated run reports per-client accuracy
    return plugins
