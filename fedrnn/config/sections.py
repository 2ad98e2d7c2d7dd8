"""The config's sections: one dataclass per TOML table, with its defaults and its ``validate``.

Cross-field rules live in ``RunConfig.validate``; reading and layering files and flags is
``fedrnn.config.loading``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from fedrnn.config.errors import _check
from fedrnn.data.partitions import PARTITIONS
from fedrnn.data.reviews import TABLE_SUFFIXES
from fedrnn.devices import NETWORKS, PROFILES
from fedrnn.devices.availability import KINDS as AVAILABILITY_KINDS
from fedrnn.model.rnn import CELLS, TRANSFER_MODES

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum")
TARGETS = ("amazon", "imdb")
DEADLINE_POLICIES = ("drop", "partial", "wait")
WIRE_DTYPES = ("float32", "int8", "int4")
ROUNDINGS = ("nearest", "stochastic")
ATTACKS = ("sign-flip", "scale", "label-flip")
CLIENT_DP = ("off", "fixed", "adaptive")


@dataclass
class RunSection:
    clients: int = 100
    rounds: int = 20
    clients_per_round: int = 10
    seed: int = 0
    target: str = "amazon"
    alpha: float = 1.0
    mode: str = "fine-tune"
    strategy: str = "fedavg"
    teacher: str = ""  # checkpoint dir; "" = cache/teacher, pretrained on first use
    data_dir: str = ""  # "" = $FEDRNN_DATA_DIR or ./data
    min_client_examples: int = 4
    init: str = "teacher"  # teacher | scratch (random weights: the no-transfer baseline, mode "full")
    data_fraction: float = 1.0  # share of the target pool given to clients (data-per-client sweeps)
    # A file target (run.target = "path/to/file.jsonl.gz|.jsonl|.csv|.tsv"): its columns and split.
    text_column: str = "text"
    label_column: str = "label"
    group_column: str = "group"  # per-group test split and accuracy; a missing column = one group
    classes: list[str] = field(default_factory=list)  # label values in class-id order; [] = from the file
    test_fraction: float = 0.2  # of each (group, class), carved with a fixed seed
    partition: str = ""  # natural | dirichlet | quantity; "" = the target's own (amazon, imdb) or natural (file)
    partition_column: str = ""  # natural partitioning's column; "" = run.group_column
    quantity_sigma: float = 1.0  # partition = quantity: log-normal sigma of client sizes

    def validate(self) -> None:
        _check(self.clients >= 1, "run.clients", "must be >= 1", self.clients)
        _check(self.rounds >= 1, "run.rounds", "must be >= 1", self.rounds)
        _check(1 <= self.clients_per_round <= self.clients, "run.clients_per_round",
               f"must be in [1, run.clients={self.clients}]", self.clients_per_round)
        _check(self.target in TARGETS or self.target.lower().endswith(TABLE_SUFFIXES), "run.target",
               f"must be one of {TARGETS} or a labelled file ending in {', '.join(TABLE_SUFFIXES)}", self.target)
        for key in ("text_column", "label_column", "group_column"):
            _check(bool(getattr(self, key)), f"run.{key}", "must name a column", getattr(self, key))
        _check(len(set(self.classes)) == len(self.classes) != 1, "run.classes",
               "must list at least two distinct class names (or none)", self.classes)
        _check(0 < self.test_fraction < 1, "run.test_fraction", "must be in (0, 1)", self.test_fraction)
        _check(self.partition in ("", *PARTITIONS), "run.partition", f"must be \"\" or one of {PARTITIONS}",
               self.partition)
        _check(self.target not in TARGETS or self.partition_column in ("", "group"), "run.partition_column",
               f"must be \"\" or \"group\" with run.target = {self.target!r}", self.partition_column)
        _check(self.quantity_sigma > 0, "run.quantity_sigma", "must be > 0", self.quantity_sigma)
        _check(self.alpha > 0 and math.isfinite(self.alpha), "run.alpha", "must be a finite number > 0", self.alpha)
        _check(self.mode in TRANSFER_MODES, "run.mode", f"must be one of {TRANSFER_MODES}", self.mode)
        _check(self.strategy in STRATEGIES, "run.strategy", f"must be one of {STRATEGIES}", self.strategy)
        _check(self.min_client_examples >= 2, "run.min_client_examples", "must be >= 2", self.min_client_examples)
        _check(self.init in ("teacher", "scratch"), "run.init", "must be teacher or scratch", self.init)
        _check(self.init == "teacher" or self.mode == "full", "run.mode", "must be full with run.init = scratch",
               self.mode)
        _check(0 < self.data_fraction <= 1, "run.data_fraction", "must be in (0, 1]", self.data_fraction)


@dataclass
class ClientSection:
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    max_steps: int = 0  # 0 = no cap beyond local_epochs
    proximal_mu: float = 0.01  # FedProx only
    clip_norm: float = 1.0
    holdout_fraction: float = 0.2  # of each shard, for federated evaluation
    deadline_s: float = 0.0  # a client job running longer is aborted, freeing its worker; 0 = server.timeout_s
    frozen_cache_mb: int = 0  # fine-tune: replay the frozen bottom layer across local epochs (MB cap; 0 = off)

    def validate(self) -> None:
        _check(self.local_epochs >= 1, "client.local_epochs", "must be >= 1", self.local_epochs)
        _check(self.batch_size >= 1, "client.batch_size", "must be >= 1", self.batch_size)
        _check(0 < self.lr < 10 and math.isfinite(self.lr), "client.lr", "must be in (0, 10)", self.lr)
        _check(self.max_steps >= 0, "client.max_steps", "must be >= 0", self.max_steps)
        _check(self.proximal_mu >= 0, "client.proximal_mu", "must be >= 0", self.proximal_mu)
        _check(self.clip_norm > 0, "client.clip_norm", "must be > 0", self.clip_norm)
        _check(0 < self.holdout_fraction < 1, "client.holdout_fraction", "must be in (0, 1)", self.holdout_fraction)
        _check(self.deadline_s >= 0, "client.deadline_s", "must be >= 0 (0 = server.timeout_s)", self.deadline_s)
        _check(self.frozen_cache_mb >= 0, "client.frozen_cache_mb", "must be >= 0 (0 = off)", self.frozen_cache_mb)


@dataclass
class ServerSection:
    server_lr: float = 0.01  # FedAdam/FedYogi eta
    server_momentum: float = 0.9  # FedAvgM (bias-corrected, see fedrnn.federation.strategies.AveragedFedAvgM)
    eval_every: int = 1
    retention_examples: int = 500  # fixed IMDB test subset for source retention
    target_test_examples: int = 0  # 0 = the whole target test split
    fraction_evaluate: float = 1.0  # of the round's sampled clients that evaluate
    timeout_s: float = 600.0  # bound on waiting for one round's replies
    trimmed_beta: float = 0.2
    krum_byzantine: int = 1
    # A run stops with an error when a round's clients all fail, or more than this fraction of
    # the training jobs sent so far has failed (1 = only the all-failed round stops it).
    max_failure_fraction: float = 0.5
    keep_checkpoints: int = 2  # round checkpoints kept (the last ones; plus the best); 0 = every round's

    def validate(self) -> None:
        _check(self.keep_checkpoints >= 0, "server.keep_checkpoints", "must be >= 0 (0 = every round's)",
               self.keep_checkpoints)
        _check(self.server_lr > 0, "server.server_lr", "must be > 0", self.server_lr)
        _check(0 <= self.server_momentum < 1, "server.server_momentum", "must be in [0, 1)", self.server_momentum)
        _check(self.eval_every >= 1, "server.eval_every", "must be >= 1", self.eval_every)
        _check(self.retention_examples >= 0, "server.retention_examples", "must be >= 0", self.retention_examples)
        _check(self.target_test_examples >= 0, "server.target_test_examples", "must be >= 0", self.target_test_examples)
        _check(0 <= self.fraction_evaluate <= 1, "server.fraction_evaluate", "must be in [0, 1]",
               self.fraction_evaluate)
        _check(self.timeout_s > 0, "server.timeout_s", "must be > 0", self.timeout_s)
        _check(0 <= self.trimmed_beta < 0.5, "server.trimmed_beta", "must be in [0, 0.5)", self.trimmed_beta)
        _check(self.krum_byzantine >= 0, "server.krum_byzantine", "must be >= 0", self.krum_byzantine)
        _check(0 <= self.max_failure_fraction <= 1, "server.max_failure_fraction", "must be in [0, 1]",
               self.max_failure_fraction)


@dataclass
class SimulationSection:
    actors: int = 2  # concurrent ClientApp workers (Ray actors)
    threads_per_actor: int = 1  # torch intra-op threads in each worker
    ray_address: str = ""  # "" = start a local Ray; "auto" or "HOST:PORT" attaches to a cluster
    gpus_per_actor: float = 0.0  # Ray num_gpus of each ClientApp worker (e.g. 0.25: four share a GPU); needs CUDA

    def validate(self) -> None:
        _check(self.actors >= 1, "simulation.actors", "must be >= 1", self.actors)
        _check(isinstance(self.gpus_per_actor, (int, float)) and not isinstance(self.gpus_per_actor, bool)
               and 0 <= self.gpus_per_actor <= 1, "simulation.gpus_per_actor", "must be in [0, 1]",
               self.gpus_per_actor)
        _check(self.threads_per_actor >= 1, "simulation.threads_per_actor", "must be >= 1", self.threads_per_actor)


@dataclass
class DevicesSection:
    """Simulated device fleet (see ``fedrnn.devices``); off = every client is an ideal device."""

    enabled: bool = False
    mix: dict[str, float] = field(default_factory=dict)  # profile -> fraction, e.g. {rpi4 = 0.5, rpi5 = 0.5}
    trace: str = ""  # CSV/JSON trace file instead of a mix
    network: str = ""  # "" = each profile's own; wifi | 4g | 3g
    network_mix: dict[str, float] = field(default_factory=dict)  # instead of network: e.g. {"4g" = 0.7, "3g" = 0.3}
    availability: str = ""  # "" = each profile's own; always | diurnal | churn
    policy: str = "wait"  # drop | partial | wait
    deadline_s: float = 0.0  # needed by drop and partial
    start_hour: float = 0.0  # UTC hour of day 0 at which the simulated clock starts (diurnal devices care)
    host_samples_per_s: float = 0.0  # 0 = measure this host once at the start of the run
    min_batch_size: int = 4
    per_class_eval: bool = True  # global model accuracy on each device class's held-out data
    class_eval_examples: int = 0  # per device class, a fixed seeded subset of its held-out data; 0 = all

    def validate(self) -> None:
        if not self.enabled:
            return
        _check(bool(self.mix) != bool(self.trace), "devices.mix/devices.trace", "needs exactly one of them",
               (self.mix, self.trace))
        for name, frac in self.mix.items():
            _check(name in PROFILES, f"devices.mix.{name}", f"is not a device profile; known: {sorted(PROFILES)}",
                   name)
            _check(frac >= 0, f"devices.mix.{name}", "must be >= 0", frac)
        if self.mix:
            _check(abs(sum(self.mix.values()) - 1) < 1e-6, "devices.mix", "fractions must sum to 1", self.mix)
        _check(self.network in ("", *NETWORKS), "devices.network", f"must be \"\" or one of {sorted(NETWORKS)}",
               self.network)
        _check(not (self.network and self.network_mix), "devices.network/devices.network_mix", "needs at most one",
               (self.network, self.network_mix))
        for name, frac in self.network_mix.items():
            _check(name in NETWORKS and frac >= 0, f"devices.network_mix.{name}",
                   f"must be a network in {sorted(NETWORKS)} with a fraction >= 0", frac)
        if self.network_mix:
            _check(abs(sum(self.network_mix.values()) - 1) < 1e-6, "devices.network_mix", "fractions must sum to 1",
                   self.network_mix)
        _check(0 <= self.start_hour < 24, "devices.start_hour", "must be in [0, 24)", self.start_hour)
        _check(self.availability in ("", *AVAILABILITY_KINDS), "devices.availability",
               f"must be \"\" or one of {AVAILABILITY_KINDS}", self.availability)
        _check(self.policy in DEADLINE_POLICIES, "devices.policy", f"must be one of {DEADLINE_POLICIES}", self.policy)
        _check(self.policy == "wait" or self.deadline_s > 0, "devices.deadline_s",
               f"must be > 0 with policy {self.policy!r}", self.deadline_s)
        _check(self.host_samples_per_s >= 0, "devices.host_samples_per_s", "must be >= 0", self.host_samples_per_s)
        _check(self.min_batch_size >= 1, "devices.min_batch_size", "must be >= 1", self.min_batch_size)
        _check(self.class_eval_examples >= 0, "devices.class_eval_examples", "must be >= 0", self.class_eval_examples)


@dataclass
class DistillSection:
    """Server-side distillation of a compact student (see ``fedrnn.plugins.distill``); off by default."""

    enabled: bool = False
    every_k_rounds: int = 1  # distil after every k-th round (and always after the last)
    steps: int = 200  # optimizer steps per distillation
    batch_size: int = 64
    temperature: float = 2.0
    lr: float = 3e-3
    transfer_pool: int = 50000  # unlabelled IMDB reviews the server holds (tokenized and cached once)
    transfer_examples: int = 5000  # fresh random subsample of the pool used by each distillation
    embed_dim: int = 32
    hidden_size: int = 64
    num_layers: int = 1
    cell: str = "lstm"
    feddf: bool = False  # teacher = ensemble of the round's client models (FedDF) instead of the global model
    ship: bool = True  # send the int8 student to the round's clients, which report on-device accuracy
    per_class: bool = False  # one student per device class of [devices], each device gets its class's
    class_students: str = ""  # per_class sizes: summary.json of python -m fedrnn.edge.search ("" = this section's)

    def validate(self) -> None:
        for key in ("every_k_rounds", "steps", "batch_size", "transfer_pool", "transfer_examples", "embed_dim",
                    "hidden_size", "num_layers"):
            _check(getattr(self, key) >= 1, f"distill.{key}", "must be >= 1", getattr(self, key))
        _check(self.temperature > 0, "distill.temperature", "must be > 0", self.temperature)
        _check(0 < self.lr < 10, "distill.lr", "must be in (0, 10)", self.lr)
        _check(self.transfer_examples <= self.transfer_pool, "distill.transfer_examples",
               f"must be <= distill.transfer_pool = {self.transfer_pool}", self.transfer_examples)
        _check(self.cell in CELLS, "distill.cell", f"must be one of {CELLS}", self.cell)


@dataclass
class CompressionSection:
    """What travels as int8 or int4 (see ``fedrnn.plugins.compression``); float32 both ways by default."""

    downlink: str = "float32"  # the global tensors sent to clients: float32 | int8 (per-row scales) | int4 (blocks)
    uplink: str = "float32"  # clients' replies: float32 weights | int8 / int4 updates (delta from what they received)
    rounding: str = "nearest"  # quantized uplink rounding: nearest | stochastic (unbiased)
    error_feedback: bool = False  # quantized uplink: carry each client's rounding residual into its next update

    def validate(self) -> None:
        _check(self.downlink in WIRE_DTYPES, "compression.downlink", f"must be one of {WIRE_DTYPES}", self.downlink)
        _check(self.uplink in WIRE_DTYPES, "compression.uplink", f"must be one of {WIRE_DTYPES}", self.uplink)
        _check(self.rounding in ROUNDINGS, "compression.rounding", f"must be one of {ROUNDINGS}", self.rounding)
        _check(self.rounding == "nearest" or self.uplink != "float32", "compression.rounding",
               "applies to a quantized uplink only; set compression.uplink = \"int8\" or \"int4\"", self.rounding)
        _check(not self.error_feedback or self.uplink != "float32", "compression.error_feedback",
               "applies to a quantized uplink only; set compression.uplink = \"int8\" or \"int4\"",
               self.error_feedback)

    @property
    def active(self) -> bool:
        return self.downlink != "float32" or self.uplink != "float32"


@dataclass
class RobustSection:
    """Bounds every client reply must meet to be aggregated (see ``fedrnn.plugins.robust``)."""

    max_update_norm: float = 0.0  # L2 bound on ||w_client - w_global||; 0 = none (honest scale depends on mode, lr)
    max_norm_ratio: float = 10.0  # reject updates > ratio x the round's (lower) median norm; 0 = off
    max_num_examples: int = 1_000_000  # num-examples cap for real devices (simulated ones: their shard size)

    def validate(self) -> None:
        _check(self.max_update_norm >= 0, "robust.max_update_norm", "must be >= 0 (0 = no bound)", self.max_update_norm)
        _check(self.max_norm_ratio == 0 or self.max_norm_ratio >= 1, "robust.max_norm_ratio",
               "must be 0 (off) or >= 1", self.max_norm_ratio)
        _check(self.max_num_examples >= 1, "robust.max_num_examples", "must be >= 1", self.max_num_examples)


@dataclass
class AttackSection:
    """Byzantine clients for robustness studies (see ``fedrnn.plugins.attack``); off while clients = 0."""

    clients: int = 0  # k malicious clients: a seeded set of client ids, fixed for the run
    kind: str = "sign-flip"  # sign-flip | scale | label-flip
    scale: float = 10.0  # update multiplier of the "scale" attack

    def validate(self) -> None:
        _check(self.clients >= 0, "attack.clients", "must be >= 0", self.clients)
        _check(self.kind in ATTACKS, "attack.kind", f"must be one of {ATTACKS}", self.kind)
        _check(self.scale > 1, "attack.scale", "must be > 1", self.scale)


@dataclass
class FaultsSection:
    """Fault injection for tests and studies (see ``fedrnn.plugins.faults``); off while no client is named."""

    raise_clients: list[int] = field(default_factory=list)  # these clients' ClientApp raises mid-training
    hang_clients: list[int] = field(default_factory=list)  # ... sleeps hang_s seconds mid-training
    crash_clients: list[int] = field(default_factory=list)  # ... kills its own process (os._exit)
    hang_s: float = 30.0
    rounds: list[int] = field(default_factory=list)  # rounds in which the faults fire; empty = every round

    @property
    def enabled(self) -> bool:
        return bool(self.raise_clients or self.hang_clients or self.crash_clients)

    def validate(self) -> None:
        named = self.raise_clients + self.hang_clients + self.crash_clients
        _check(len(named) == len(set(named)), "faults", "must name each client at most once", named)
        _check(all(c >= 0 for c in named), "faults.*_clients", "must hold client ids >= 0", named)
        _check(self.hang_s > 0, "faults.hang_s", "must be > 0", self.hang_s)
        _check(all(r >= 1 for r in self.rounds), "faults.rounds", "must hold round numbers >= 1", self.rounds)


@dataclass
class PrivacySection:
    """Differential privacy (``fedrnn.plugins.record_dp``, ``fedrnn.plugins.client_dp``); both levels off by default.

    Record-level DP-SGD on every client protects each single review; client-level DP (the
    server clips whole updates and noises their average) protects a device's whole data set.
    """

    record_level: bool = False
    noise_multiplier: float = 0.0  # record-level sigma; 0 = calibrate it from target_epsilon
    target_epsilon: float = 0.0  # each client's record-level budget at delta; 0 = none (account only)
    planned_rounds: int = 0  # rounds a calibrated client budget covers; 0 = ceil(rounds * clients_per_round / clients)
    max_grad_norm: float = 1.0  # per-review gradient clip
    delta: float = 1e-5  # both levels
    client_level: str = "off"  # off | fixed | adaptive (Flower's server-side clipping wrappers)
    clipping_norm: float = 0.1  # L2 clip of a client's update (adaptive: the initial one)
    clients_noise_multiplier: float = 0.0  # 0 = calibrate it from clients_target_epsilon over run.rounds
    clients_target_epsilon: float = 0.0  # client-level budget at delta; 0 = none (account only)
    target_clipped_quantile: float = 0.5  # adaptive only: the fraction of updates the norm aims to clip
    clip_norm_lr: float = 0.2  # adaptive only
    clipped_count_stddev: float = 0.0  # adaptive only; 0 = Flower's default (clients per round / 20)

    def validate(self) -> None:
        _check(0 < self.delta < 1, "privacy.delta", "must be in (0, 1)", self.delta)
        if self.record_level:
            _check(self.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0", self.noise_multiplier)
            _check(self.target_epsilon >= 0, "privacy.target_epsilon", "must be >= 0", self.target_epsilon)
            _check(self.noise_multiplier > 0 or self.target_epsilon > 0, "privacy.noise_multiplier/target_epsilon",
                   "record_level needs one of them > 0", (self.noise_multiplier, self.target_epsilon))
            _check(self.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0", self.max_grad_norm)
            _check(self.planned_rounds >= 0, "privacy.planned_rounds", "must be >= 0", self.planned_rounds)
        _check(self.client_level in CLIENT_DP, "privacy.client_level", f"must be one of {CLIENT_DP}", self.client_level)
        if self.client_level != "off":
            _check(self.clipping_norm > 0, "privacy.clipping_norm", "must be > 0", self.clipping_norm)
            _check(self.clients_noise_multiplier >= 0, "privacy.clients_noise_multiplier", "must be >= 0",
                   self.clients_noise_multiplier)
            _check(self.clients_target_epsilon >= 0, "privacy.clients_target_epsilon", "must be >= 0",
                   self.clients_target_epsilon)
            _check(self.clients_noise_multiplier > 0 or self.clients_target_epsilon > 0,
                   "privacy.clients_noise_multiplier/clients_target_epsilon", "client_level needs one of them > 0",
                   (self.clients_noise_multiplier, self.clients_target_epsilon))
            _check(0 <= self.target_clipped_quantile <= 1, "privacy.target_clipped_quantile", "must be in [0, 1]",
                   self.target_clipped_quantile)
            _check(self.clip_norm_lr > 0, "privacy.clip_norm_lr", "must be > 0", self.clip_norm_lr)
            _check(self.clipped_count_stddev >= 0, "privacy.clipped_count_stddev", "must be >= 0",
                   self.clipped_count_stddev)

    def check_strategy(self, strategy: str) -> None:
        """Flower's central-DP noise is calibrated to a plain average of clipped updates."""
        _check(self.client_level == "off" or strategy in ("fedavg", "fedprox"), "run.strategy",
               f"must be fedavg or fedprox with privacy.client_level = {self.client_level!r}", strategy)

    def check_robust(self, robust: RobustSection) -> None:  # client-level DP: no rule relative to other replies
        _check(self.client_level == "off" or robust.max_norm_ratio == 0, "robust.max_norm_ratio", f"must be 0 with "
               f"privacy.client_level = {self.client_level!r} (relative to the round's median, it breaks the "
               f"sensitivity bound C/m; use robust.max_update_norm)", robust.max_norm_ratio)


@dataclass
class TrackingSection:
    mlflow: bool = False  # log params, per-round metrics and plots to MLflow (pip install 'fedrnn[tracking]')
    tracking_uri: str = ""  # "" = a local store in runs/mlruns; else an MLflow tracking URI
    experiment: str = "fedrnn"

    def validate(self) -> None:
        _check(bool(self.experiment), "tracking.experiment", "must not be empty", self.experiment)


@dataclass
class PersonalizeSection:
    """After the last round each client fine-tunes the head on its own data (``fedrnn.plugins.personalize``).

    Every run reports the per-client accuracy distribution on the clients' held-out data; with
    head_epochs > 0 also after each client's own head fine-tuning.
    """

    head_epochs: int = 0  # 0 = report the global model's per-client accuracy only
    lr: float = 5e-3
    batch_size: int = 16

    def validate(self) -> None:
        _check(self.head_epochs >= 0, "personalize.head_epochs", "must be >= 0", self.head_epochs)
        _check(0 < self.lr < 10, "personalize.lr", "must be in (0, 10)", self.lr)
        _check(self.batch_size >= 1, "personalize.batch_size", "must be >= 1", self.batch_size)


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    client: ClientSection = field(default_factory=ClientSection)
    server: ServerSection = field(default_factory=ServerSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    devices: DevicesSection = field(default_factory=DevicesSection)
    distill: DistillSection = field(default_factory=DistillSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    robust: RobustSection = field(default_factory=RobustSection)
    attack: AttackSection = field(default_factory=AttackSection)
    faults: FaultsSection = field(default_factory=FaultsSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    personalize: PersonalizeSection = field(default_factory=PersonalizeSection)

    def validate(self) -> RunConfig:
        """Each section's own checks, then the rules that span sections."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        self.privacy.check_strategy(self.run.strategy)
        _check(self.attack.clients <= self.run.clients, "attack.clients",
               f"must be <= run.clients = {self.run.clients}", self.attack.clients)
        named = self.faults.raise_clients + self.faults.hang_clients + self.faults.crash_clients
        _check(all(c < self.run.clients for c in named), "faults.*_clients",
               f"must hold client ids < run.clients = {self.run.clients}", named)
        self.privacy.check_robust(self.robust)
        _check(not (self.distill.enabled and self.distill.per_class) or self.devices.enabled, "distill.per_class",
               "needs [devices] enabled = true (the device classes to build students for)", self.distill.per_class)
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)
