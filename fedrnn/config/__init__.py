"""Run configuration: TOML files in ``configs/`` plus command-line overrides, all validated.

Layers, last wins: the dataclass defaults, the TOML file (after the files it ``extends``), then
overrides (``--set section.key=value`` and the named flags of ``python -m fedrnn.simulate``).
Every value is checked, cross-field rules included, before anything runs; an error names the key
(``client.lr``), what was wrong, and where the value came from (the file that set it, or the
command-line flag), so a typo never surfaces as a stack trace mid-run. Validation reads no files:
the files a config names (a device trace) are checked where the run is prepared
(``fedrnn.federation.prepare.check_files``).
"""

from fedrnn.config.errors import ConfigError
from fedrnn.config.loading import (
    Overrides,
    apply_overrides,
    config_from_dict,
    dump_toml,
    extend_rounds,
    load_config,
    parse_set,
    parse_value,
    read_toml,
)
from fedrnn.config.sections import (
    ATTACKS,
    CLIENT_DP,
    DEADLINE_POLICIES,
    ROUNDINGS,
    STRATEGIES,
    TARGETS,
    WIRE_DTYPES,
    AttackSection,
    ClientSection,
    CompressionSection,
    DevicesSection,
    DistillSection,
    FaultsSection,
    PersonalizeSection,
    PrivacySection,
    RobustSection,
    RunConfig,
    RunSection,
    ServerSection,
    SimulationSection,
)

__all__ = [
    "ATTACKS",
    "AttackSection",
    "CLIENT_DP",
    "ClientSection",
    "CompressionSection",
    "ConfigError",
    "DEADLINE_POLICIES",
    "DevicesSection",
    "DistillSection",
    "FaultsSection",
    "Overrides",
    "PersonalizeSection",
    "PrivacySection",
    "ROUNDINGS",
    "RobustSection",
    "RunConfig",
    "RunSection",
    "STRATEGIES",
    "ServerSection",
    "SimulationSection",
    "TARGETS",
    "WIRE_DTYPES",
    "apply_overrides",
    "config_from_dict",
    "dump_toml",
    "extend_rounds",
    "load_config",
    "parse_set",
    "parse_value",
    "read_toml",
]
