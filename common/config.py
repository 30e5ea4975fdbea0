"""The one typed configuration of fedcare.

Two doors lead here: YAML files (`load_yaml`) and Flower's run config
(`from_run_config`, flat keys such as ``privacy.target_epsilon``). Both end in
`from_mapping`, so there is one parser, one set of defaults and one validation.
Every error names the key, the bad value and what is allowed.

Size: one module on purpose. Every setting is declared once, here, with its default,
type and help, and one parser reads all of them from both doors; pyproject.toml
mirrors the defaults (tests/test_config.py keeps them in step).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from common.errors import ConfigError
from common.names import check_name

EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"
EMBEDDED_DATA = "icd10"


@dataclass(frozen=True)
class ModelConfig:
    base_model: str = field(
        default=EMBEDDED_MODEL,
        metadata={"help": "Local Hugging Face model folder, or the embedded MiniLM."},
    )
    max_length: int = field(default=64, metadata={"help": "Tokens kept per record."})
    pooling: Literal["mean", "cls"] = field(
        default="mean",
        metadata={"help": "How the encoder is read: attention-masked mean over tokens "
                          "(what sentence encoders such as MiniLM are trained for) or the "
                          "first token through the model's pooler (BERT's CLS)."})

    def __post_init__(self) -> None:
        _check(self.max_length >= 8, "model.max_length", self.max_length, ">= 8")


@dataclass(frozen=True)
class LoraConfig:
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    target_modules: tuple[str, ...] = field(
        default=("query", "value"), metadata={"help": "Module names that get adapters."}
    )

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", self.r, ">= 1")
        _check(self.alpha >= 1, "lora.alpha", self.alpha, ">= 1")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "in [0, 1)")
        _check(len(self.target_modules) > 0, "lora.target_modules", self.target_modules,
               "at least one module name")


@dataclass(frozen=True)
class DataConfig:
    source: str = field(
        default=EMBEDDED_DATA,
        metadata={"help": "'icd10' (embedded ICD-10-CM chapters) or 'files'."},
    )
    site_files: tuple[str, ...] = field(
        default=(), metadata={"help": "source=files: one CSV/JSONL file per hospital."}
    )
    test_file: str = field(default="", metadata={"help": "source=files: held-out test file."})
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = field(
        default=(), metadata={"help": "source=files: the label names, in class order; "
                                      "distinct, and without ',' (Flower's run config "
                                      "carries a list as one comma-joined string)."}
    )
    test_fraction: float = field(default=0.2, metadata={"help": "icd10: held-out share."})
    val_fraction: float = field(default=0.1, metadata={"help": "Per-site validation share."})
    partition: Literal["dirichlet", "iid"] = "dirichlet"
    alpha: float = field(default=1.0, metadata={"help": "Dirichlet label-skew concentration."})
    quantity_skew: float = field(
        default=0.0,
        metadata={"help": "0 = sites of similar size; larger = lognormal sigma of sizes."},
    )
    patient_column: str = field(
        default="", metadata={"help": "source=files: the column naming each record's "
                                      "patient ('' = the files name no patients)."})
    patients: bool = field(
        default=False, metadata={"help": "icd10: group each site's notes into synthetic "
                                         "patients (common/patients.py)."})
    notes_per_patient: float = field(
        default=3.0, metadata={"help": "icd10 patients: the median number of notes a "
                                       "patient has (log-normal, heavy-tailed)."})
    notes_spread: float = field(
        default=1.2, metadata={"help": "icd10 patients: sigma of log(notes per patient); "
                                       "larger = a longer tail of patients with many notes."})
    comorbidity: float = field(
        default=0.7, metadata={"help": "icd10 patients: the chance that a patient's note "
                                       "comes from the chapter of their first note."})
    max_notes_per_patient: int = field(
        default=0, metadata={"help": "Simulation: keep at most this many of each "
                                     "patient's training notes (chosen by data.seed), "
                                     "dropping the rest; 0 = keep all. The group-privacy "
                                     "baseline bounds a patient's notes this way."})
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.source in (EMBEDDED_DATA, "files"), "data.source", self.source,
               "'icd10' or 'files'")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", self.test_fraction,
               "in (0, 1)")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction,
               "in (0, 1)")
        _check(self.alpha > 0, "data.alpha", self.alpha, "> 0")
        _check(self.quantity_skew >= 0, "data.quantity_skew", self.quantity_skew, ">= 0")
        _check(self.notes_per_patient >= 1, "data.notes_per_patient", self.notes_per_patient,
               ">= 1")
        _check(self.notes_spread >= 0, "data.notes_spread", self.notes_spread, ">= 0")
        _check(0 <= self.comorbidity <= 1, "data.comorbidity", self.comorbidity, "in [0, 1]")
        _check(self.max_notes_per_patient >= 0, "data.max_notes_per_patient",
               self.max_notes_per_patient, ">= 0")
        _check(not self.max_notes_per_patient or self.patients or self.patient_column,
               "data.max_notes_per_patient", self.max_notes_per_patient,
               "0 unless the data names patients (data.patients or data.patient_column)")
        _check(not (self.patients and self.source == "files"), "data.patients", self.patients,
               "false when data.source is 'files' (files name their patients in "
               "data.patient_column)")
        if self.source == "files":  # site_files: a simulation's; a hospital names its own
            _check(len(self.labels) > 1, "data.labels", self.labels,
                   "at least two label names when data.source is 'files'")
        _check_labels("data.labels", self.labels)


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = field(default=True, metadata={"help": "False = non-private baseline."})
    target_epsilon: float = field(default=8.0, metadata={"help": "Per-site epsilon for this run."})
    delta: float = field(default=1e-5, metadata={"help": "Per-site delta."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Per-example clipping norm."})
    count_noise: float = field(
        default=5.0,
        metadata={"help": "Noise multiplier of the Gaussian mechanism on every count a "
                          "site releases (its per-class validation counts at each "
                          "evaluation, its training-set size once per data version); each "
                          "release is charged to its ε. A site uses the larger of this "
                          "and its own."})
    accountant: Literal["prv", "rdp"] = field(
        default="prv",
        metadata={"help": "How ε is computed for calibration, budget checks and ledger "
                          "claims: Opacus's PRV accountant (tight, an upper bound within its "
                          "stated error) or RDP (looser)."})

    def __post_init__(self) -> None:
        _check(self.target_epsilon > 0, "privacy.target_epsilon", self.target_epsilon, "> 0")
        _check(0 < self.delta < 1, "privacy.delta", self.delta, "in (0, 1)")
        _check(self.max_grad_norm > 0, "privacy.max_grad_norm", self.max_grad_norm, "> 0")
        _check(self.count_noise > 0, "privacy.count_noise", self.count_noise, "> 0")


@dataclass(frozen=True)
class SiteConfig:
    """A hospital's own privacy policy and state. In a deployment it comes from the
    site's node config and nothing the server sends can raise it; in a simulation this
    section is every simulated site's policy (`budgets` gives per-site budgets)."""
    epsilon_budget: float = field(
        default=8.0, metadata={"help": "Lifetime ε the site allows on one dataset."})
    budgets: tuple[float, ...] = field(
        default=(), metadata={"help": "Simulation: per-site budgets, overriding epsilon_budget."})
    min_noise_multiplier: float = field(
        default=0.0, metadata={"help": "Never train with less noise than this."})
    max_noise_multiplier: float = field(
        default=20.0, metadata={"help": "Refuse rather than send an update drowned in noise."})
    state_dir: str = field(
        default="", metadata={"help": "Simulated sites' keys, ledgers and cached features; "
                                      "'' = <run dir>/site_state (fresh sites every run)."})
    min_val_records: int = field(
        default=10, metadata={"help": "A site refuses a validation split smaller than this."})
    release_evaluation: bool = field(
        default=True, metadata={"help": "Simulated sites release noisy validation counts "
                                        "each round (charged to their ε); false = they "
                                        "evaluate nothing, and train with that ε."})
    privacy_unit: Literal["record", "patient"] = field(
        default="record",
        metadata={"help": "Whom ε protects at the simulated sites: one record, or one "
                          "patient with all of their records (needs data.patients or "
                          "data.patient_column)."})
    max_records_per_patient: int = field(
        default=4, metadata={"help": "privacy_unit patient: the most records a sampled "
                                     "patient brings to one step (k)."})

    def __post_init__(self) -> None:
        _check(self.epsilon_budget > 0, "site.epsilon_budget", self.epsilon_budget, "> 0")
        _check(all(b > 0 for b in self.budgets), "site.budgets", self.budgets,
               "a list of numbers > 0")
        _check(self.min_noise_multiplier >= 0, "site.min_noise_multiplier",
               self.min_noise_multiplier, ">= 0")
        _check(self.max_noise_multiplier > self.min_noise_multiplier,
               "site.max_noise_multiplier", self.max_noise_multiplier,
               f"> site.min_noise_multiplier ({self.min_noise_multiplier})")

        _check(self.min_val_records >= 1, "site.min_val_records", self.min_val_records, ">= 1")
        _check(self.max_records_per_patient >= 1, "site.max_records_per_patient",
               self.max_records_per_patient, ">= 1")

    def budget_of(self, index: int) -> float:
        return self.budgets[index] if index < len(self.budgets) else self.epsilon_budget


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = field(default=256, metadata={"help": "Expected (Poisson) batch size."})
    local_steps: int = field(default=4, metadata={"help": "Optimizer steps per site per round."})
    learning_rate: float = field(default=3e-2, metadata={"help": "Adam step size."})
    head_rounds: int = field(
        default=4,
        metadata={"help": "The first N rounds train only the classification head, on "
                          "features the frozen encoder computes once per site (same DP-SGD "
                          "mechanism, a fraction of the cost); later rounds train LoRA + head."})
    head_steps: int = field(default=100, metadata={"help": "Optimizer steps per head round."})
    head_batch_size: int = field(
        default=512, metadata={"help": "Expected (Poisson) batch size of a head round."})
    head_learning_rate: float = field(
        default=1e-2, metadata={"help": "Adam step size of a head round."})
    chunk_size: int = field(
        default=64, metadata={"help": "Rows per forward pass; a batch is split into chunks."}
    )
    personalize_steps: int = field(
        default=0, metadata={"help": "After federation, DP steps each site spends on its "
                                     "own copy of the global adapter; 0 = off."})
    patient_gradient: Literal["sum", "mean"] = field(
        default="mean",
        metadata={"help": "Patient-level DP: a sampled patient's gradient is the sum or "
                          "the mean of their records' gradients, clipped jointly to "
                          "privacy.max_grad_norm (either way a patient moves a step by at "
                          "most the clipping norm)."})
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = leave as is."})

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, ">= 1")
        _check(self.local_steps >= 1, "train.local_steps", self.local_steps, ">= 1")
        _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "> 0")
        _check(self.head_rounds >= 0, "train.head_rounds", self.head_rounds, ">= 0")
        _check(self.head_steps >= 1, "train.head_steps", self.head_steps, ">= 1")
        _check(self.head_batch_size >= 1, "train.head_batch_size", self.head_batch_size, ">= 1")
        _check(self.head_learning_rate > 0, "train.head_learning_rate",
               self.head_learning_rate, "> 0")
        _check(self.chunk_size >= 1, "train.chunk_size", self.chunk_size, ">= 1")
        _check(self.threads >= 0, "train.threads", self.threads, ">= 0")
        _check(self.personalize_steps >= 0, "train.personalize_steps",
               self.personalize_steps, ">= 0")


@dataclass(frozen=True)
class FederationConfig:
    num_rounds: int = 4
    fraction_train: float = field(default=1.0, metadata={"help": "Share of sites per round."})
    min_sites: int = field(default=2, metadata={"help": "Sites needed to start a round."})
    evaluate_test_every: int = field(
        default=0, metadata={"help": "Global test evaluation every N rounds; 0 = last only."}
    )
    secure_aggregation: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={"help": "SecAgg+: the server only sees the sum. auto = on with >= 3 sites."})
    secagg_threshold: float = field(
        default=0.67, metadata={"help": "Share of sites needed to unmask the sum."})
    secagg_clipping_range: float = field(
        default=8.0, metadata={"help": "Update values must lie in +-this to be quantised."})
    secagg_max_weight: float = field(
        default=10_000.0, metadata={"help": "Example counts above this are capped in SecAgg+."})
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam"] = field(
        default="fedavg",
        metadata={"help": "How the server applies the round's average to the global adapter "
                          "(Flower's FedAvg, FedAvgM or FedAdam); it acts on the aggregate, "
                          "so it works under secure aggregation."})
    server_learning_rate: float = field(
        default=1.0, metadata={"help": "Server step size (fedavgm, fedadam); 1 with fedavg."})
    server_momentum: float = field(
        default=0.9, metadata={"help": "fedavgm: momentum; fedadam: beta_1."})
    aggregation: Literal["mean", "trimmed_mean", "median", "krum"] = field(
        default="mean",
        metadata={"help": "How the round's updates are combined: the weighted mean, or a "
                          "rule robust to a few faulty sites (Flower's FedTrimmedAvg, "
                          "FedMedian, Krum); those need every update in the clear "
                          "(secure_aggregation off) and the fedavg server optimiser."})
    faulty_share: float = field(
        default=0.2, metadata={"help": "trimmed_mean: share cut at each end; krum: share "
                                       "of sites assumed faulty."})
    update_norm_bound: float = field(
        default=0.0, metadata={"help": "Plain rounds: a site's update (its adapter minus "
                                       "the global one) longer than this L2 norm is scaled "
                                       "down to it; 0 = no bound."})
    max_site_examples: int = field(
        default=100_000, metadata={"help": "The largest FedAvg weight one site may claim; "
                                           "a larger claim counts as this many."})
    round_timeout: float = field(
        default=3600.0, metadata={"help": "Seconds a round waits for its sites; a site "
                                          "that has not answered by then counts as failed."})
    first_round_timeout: float = field(
        default=0.0, metadata={"help": "Seconds the first round waits instead (it includes "
                                       "each site's start-up: model, features); "
                                       "0 = round_timeout."})
    min_completion: float = field(
        default=0.5, metadata={"help": "Share of a round's sites whose update must be "
                                       "accepted (and at least min_sites) for the round "
                                       "to be aggregated; else the round is skipped."})
    max_failed_rounds: float = field(
        default=0.5, metadata={"help": "The run fails (exit non-zero) when more than this "
                                       "share of its rounds were skipped."})
    resume: bool = field(
        default=False, metadata={"help": "Go on from the run directory's checkpoint (a "
                                         "restarted server: same simulation.run_name)."})

    def timeout(self, round_no: int) -> float:
        """Seconds round `round_no` waits for its sites."""
        return (self.first_round_timeout or self.round_timeout) if round_no <= 1 \
            else self.round_timeout

    def __post_init__(self) -> None:
        _check(self.num_rounds >= 1, "federation.num_rounds", self.num_rounds, ">= 1")
        _check(0 < self.fraction_train <= 1, "federation.fraction_train",
               self.fraction_train, "in (0, 1]")
        _check(self.min_sites >= 1, "federation.min_sites", self.min_sites, ">= 1")
        _check(self.evaluate_test_every >= 0, "federation.evaluate_test_every",
               self.evaluate_test_every, ">= 0")
        _check(0.5 <= self.secagg_threshold <= 1, "federation.secagg_threshold",
               self.secagg_threshold, "in [0.5, 1] (below half, two groups could each unmask)")
        _check(self.secagg_clipping_range > 0, "federation.secagg_clipping_range",
               self.secagg_clipping_range, "> 0")
        _check(self.secagg_max_weight >= 1, "federation.secagg_max_weight",
               self.secagg_max_weight, ">= 1")
        _check(self.server_learning_rate > 0, "federation.server_learning_rate",
               self.server_learning_rate, "> 0")
        _check(0 <= self.server_momentum < 1, "federation.server_momentum",
               self.server_momentum, "in [0, 1)")
        _check(0 <= self.faulty_share < 0.5, "federation.faulty_share",
               self.faulty_share, "in [0, 0.5)")
        _check(self.update_norm_bound >= 0, "federation.update_norm_bound",
               self.update_norm_bound, ">= 0")
        _check(self.max_site_examples >= 1, "federation.max_site_examples",
               self.max_site_examples, ">= 1")
        _check(self.round_timeout > 0, "federation.round_timeout", self.round_timeout, "> 0")
        _check(self.first_round_timeout >= 0, "federation.first_round_timeout",
               self.first_round_timeout, ">= 0")
        _check(0 < self.min_completion <= 1, "federation.min_completion",
               self.min_completion, "in (0, 1]")
        _check(0 <= self.max_failed_rounds < 1, "federation.max_failed_rounds",
               self.max_failed_rounds, "in [0, 1)")
        if self.aggregation != "mean":
            _check(self.secure_aggregation == "off", "federation.secure_aggregation",
                   self.secure_aggregation,
                   f"'off' with aggregation {self.aggregation!r} (a robust rule needs "
                   "every update; SecAgg+ shows only the sum)")
            _check(self.server_optimizer == "fedavg", "federation.server_optimizer",
                   self.server_optimizer, f"'fedavg' with aggregation {self.aggregation!r}")


@dataclass(frozen=True)
class SimulationConfig:
    num_sites: int = 4
    cpus_per_site: float = field(default=1.0, metadata={"help": "Ray CPUs per site actor."})
    gpus_per_site: float = field(
        default=0.0, metadata={"help": "Where sites train on a GPU (train.device cuda, or "
                                       "auto with CUDA): the share of it each site actor "
                                       "reserves, in [0, 1]; 0.3 lets three sites train at "
                                       "once on one GPU, 1 one at a time. 0 = an even share "
                                       "(1/num_sites). Ignored on the CPU."})
    output_dir: str = field(default="runs", metadata={"help": "Where run directories go."})
    run_name: str = field(default="", metadata={"help": "Run directory name; '' = timestamp."})
    feature_cache_dir: str = field(
        default="", metadata={"help": "A folder where each simulated site keeps its pooled "
                                      "features (<dir>/<site>/) across runs, so later runs "
                                      "over the same records and model skip the encoder "
                                      "pass; '' = in the site's state folder, for one run. "
                                      "The bench sets it. A hospital's site never reads it."})
    canaries: str = field(
        default="", metadata={"help": "Set by `fedcare audit empirical`: a folder of canary "
                                      "records the simulated sites add to their training "
                                      "data. A hospital's site never reads it."})

    def __post_init__(self) -> None:
        _check(self.num_sites >= 1, "simulation.num_sites", self.num_sites, ">= 1")
        _check(self.cpus_per_site > 0, "simulation.cpus_per_site", self.cpus_per_site, "> 0")
        _check(0.0 <= self.gpus_per_site <= 1.0, "simulation.gpus_per_site",
               self.gpus_per_site, "in [0, 1] (a share of one GPU; 0 = 1/num_sites)")
        if self.run_name:  # it names the run's folder, and the sites' folders under it
            try:
                check_name("simulation.run_name", self.run_name)
            except ValueError as err:
                raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class NodeConfig:
    """A site's own settings: a SuperNode's `--node-config` (keys with '-'), parsed
    through the same coercion as the run config. A hospital's node config names its data
    and holds everything that defines its data and its exposure; the run config, which
    the server sends, can lower a privacy setting here, never raise it. A simulated
    node carries only Flower's `partition-id` / `num-partitions` (and may name its site
    and state folder)."""
    site: str = ""
    state_dir: str = field(default="", metadata={"help": "The site's key, ledger and caches."})
    data_file: str = field(default="", metadata={"help": "The site's CSV/JSONL records."})
    dataset: str = field(
        default="main", metadata={"help": "The budget's identity: every version of this "
                                          "data spends from one lifetime budget."})
    epsilon_budget: float = field(default=0.0, metadata={"help": "Lifetime ε of the dataset."})
    delta: float = field(default=0.0, metadata={"help": "δ; at most 1/(10·records)."})
    run_epsilon_cap: float = field(
        default=0.0, metadata={"help": "Most ε one run may spend; 0 = the run's target."})
    text_column: str = "text"
    label_column: str = "label"
    patient_column: str = field(
        default="", metadata={"help": "The column naming each record's patient; with it "
                                      "the privacy unit defaults to the patient."})
    privacy_unit: Literal["", "record", "patient"] = field(
        default="", metadata={"help": "Whom ε protects: a record, or a patient with all "
                                      "their records; '' = patient when patient-column is "
                                      "set, else record."})
    max_records_per_patient: int = field(
        default=4, metadata={"help": "Patient unit: the most records a sampled patient "
                                     "brings to one DP-SGD step (k)."})
    labels: tuple[str, ...] = field(
        default=(), metadata={"help": "The site's label names (any order, distinct, no "
                                      "','); the run's must be the same set. () = the "
                                      "run's names."})
    val_fraction: float = 0.1
    split_seed: int = 0
    min_val_records: int = 10
    min_noise_multiplier: float = 0.0
    max_noise_multiplier: float = 20.0
    count_noise: float = field(default=5.0, metadata={"help": "Noise multiplier on released "
                                                                "counts (the larger of this "
                                                                "and the run's)."})
    private: bool = True
    require_secure_aggregation: bool = field(
        default=False, metadata={"help": "Refuse every round not under SecAgg+."})
    release_evaluation: bool = field(
        default=False, metadata={"help": "Send DP evaluation metrics (a noisy confusion "
                                         "matrix, charged to ε)."})
    require_approved_app: bool = field(
        default=True, metadata={"help": "Run only an app this site approved (`fedcare site "
                                        "approve`), started by `fedcare site clientapp`."})
    partition_id: int = -1   # set by Flower in a simulation
    num_partitions: int = 0

    def __post_init__(self) -> None:
        if self.data_file:
            missing = [k for k in ("site", "state_dir") if not getattr(self, k)]
            missing += [k for k in ("epsilon_budget", "delta") if not getattr(self, k)]
            if missing:
                raise ConfigError(
                    "a hospital's node config must set " + ", ".join(
                        m.replace("_", "-") for m in missing) + " (its name, where its keys "
                    "and ledger live, its ε budget and δ: the server's run config never "
                    "sets a hospital's policy)")
        elif self.partition_id < 0:
            raise ConfigError("node config needs 'data-file' (a hospital) or 'partition-id' "
                              "(a simulated site); known keys: " + ", ".join(NODE_KEYS))
        _check(self.epsilon_budget >= 0, "node config epsilon-budget", self.epsilon_budget,
               "> 0")
        _check(0 <= self.delta < 1, "node config delta", self.delta, "in (0, 1)")
        _check(self.run_epsilon_cap >= 0, "node config run-epsilon-cap",
               self.run_epsilon_cap, ">= 0")
        _check(0 < self.val_fraction < 1, "node config val-fraction", self.val_fraction,
               "in (0, 1)")
        _check(self.min_val_records >= 1, "node config min-val-records",
               self.min_val_records, ">= 1")
        _check(self.max_noise_multiplier > self.min_noise_multiplier >= 0,
               "node config max-noise-multiplier", self.max_noise_multiplier,
               "> min-noise-multiplier >= 0")
        _check(self.count_noise > 0, "node config count-noise", self.count_noise, "> 0")
        _check(self.max_records_per_patient >= 1, "node config max-records-per-patient",
               self.max_records_per_patient, ">= 1")
        _check(not (self.privacy_unit == "patient" and self.data_file
                    and not self.patient_column),
               "node config privacy-unit", self.privacy_unit,
               "'record' unless patient-column names the column of each record's patient")
        _check_labels("node config labels", self.labels)

    @property
    def unit(self) -> str:
        """The site's privacy unit: as set, else the patient where a column names them."""
        return self.privacy_unit or ("patient" if self.patient_column else "record")


NODE_KEYS = tuple(f.name.replace("_", "-") for f in dataclasses.fields(NodeConfig))


def from_node_config(node_config: Mapping[str, Any]) -> NodeConfig:
    """A SuperNode's node config (`key-name = value`) as a NodeConfig; unknown keys and
    bad values are refused by name."""
    values: dict[str, Any] = {}
    given: dict[str, Any] = {}
    for key, value in dict(node_config).items():
        name = str(key).replace("-", "_")
        if name in values:
            raise ConfigError(f"node config keys {given[name]!r} and {key!r} name the same "
                              "setting; give it once")
        values[name], given[name] = value, key
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(NodeConfig)})
    if unknown:
        raise ConfigError(f"node config key {unknown[0].replace('_', '-')!r} is not known; "
                          f"allowed: {', '.join(NODE_KEYS)}")
    hints = typing.get_type_hints(NodeConfig)
    return NodeConfig(**{k: _coerce(f"node config key {k.replace('_', '-')!r}", v, hints[k])
                         for k, v in values.items()})


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def __post_init__(self) -> None:
        if self.site.privacy_unit == "patient" and not (
                self.data.patients or self.data.patient_column):
            raise ConfigError(
                "site.privacy_unit is 'patient', but the data names no patients: set "
                "data.patients: true (the embedded task's synthetic patients) or "
                "data.patient_column (files)")
        if (self.data.source == "files" and self.data.site_files
                and self.simulation.num_sites != len(self.data.site_files)):
            raise ConfigError(
                f"simulation.num_sites must equal the number of data.site_files "
                f"({len(self.data.site_files)}) (got {self.simulation.num_sites})"
            )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for f in dataclasses.fields(self):
            section = dataclasses.asdict(getattr(self, f.name))
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        return out

    def to_run_config(self) -> dict[str, Any]:
        """Flat ``section.key`` form, as Flower's run config holds it."""
        flat = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                flat[f"{section}.{key}"] = (",".join(str(v) for v in value)
                                            if isinstance(value, list) else value)
        return flat


def check_simulation(cfg: Config) -> Config:
    """`cfg` if a simulation of `simulation.num_sites` sites can run it, else ConfigError.
    A deployment has as many sites as connect, so these checks hold for simulations only."""
    fed, sim = cfg.federation, cfg.simulation
    if fed.min_sites > sim.num_sites:
        raise ConfigError(f"federation.min_sites ({fed.min_sites}) must be <= "
                          f"simulation.num_sites ({sim.num_sites}): a round waits for "
                          "min_sites sites, and the simulation never has that many")
    check_aggregation(cfg)
    if fed.aggregation == "krum":  # as Flower picks a round's sites (num_fit_clients)
        n = max(int(sim.num_sites * fed.fraction_train), fed.min_sites)
        f = math.floor(fed.faulty_share * n + 1e-9)
        if n <= 2 * f + 2 or f == 0:
            why = (f"assumes f = {f} faulty of the {n} sites of a round, and Krum needs more "
                   f"than 2f + 2 = {2 * f + 2}; it would take the median every round"
                   if n <= 2 * f + 2 else
                   f"assumes no faulty site among the {n} sites of a round (faulty_share "
                   f"{fed.faulty_share:g} of {n} is less than one), so it would average them "
                   "all")
            raise ConfigError(
                f"federation.aggregation 'krum' with simulation.num_sites {sim.num_sites} "
                f"{why}: simulate more sites, change federation.faulty_share, or use "
                "aggregation 'median'")
    return cfg


def check_aggregation(cfg: Config) -> Config:
    """`cfg` unless its aggregation rule is known not to hold with its privacy setting.
    Checked by every door (`check_simulation`, and the server before its first round)."""
    if cfg.federation.aggregation == "trimmed_mean" and cfg.privacy.enabled:
        raise ConfigError(
            "federation.aggregation 'trimmed_mean' does not hold with privacy.enabled: "
            "DP noise spreads the honest updates, and cutting each coordinate's extremes "
            "keeps the honest values nearest a poisoning site (one poisoned site of five "
            "cost 11.7 macro-F1 points; docs/benchmarks.md, robustness). Use aggregation "
            "'krum' (1.0 point in the same test), or the trimmed mean only without DP")
    return cfg


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {allowed} (got {_show(value)})")


def _check_labels(key: str, labels: tuple[str, ...]) -> None:
    """Label names are matched by name in data files and travel in Flower's run config,
    where a list is one comma-joined string: each must be distinct and comma-free."""
    for name in labels:
        _check(isinstance(name, str) and name.strip() == name != "" and "," not in name,
               key, name, "label names without ',' or surrounding spaces")
    duplicates = sorted({name for name in labels if labels.count(name) > 1})
    _check(not duplicates, key, labels, f"distinct label names ({duplicates[:1]} repeats)")


def _show(value: Any, limit: int = 120) -> str:
    """repr(value) short enough for a one-line error."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return "a very long integer"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _name(key: Any) -> str:
    """A key as an error names it: a plain string as it is, anything else as its repr."""
    return key if isinstance(key, str) and len(key) <= 120 else _show(key)


def _float(key: str, value: Any, what: str = "a number") -> float:
    """A finite float from a number or a numeric string (YAML reads 1e-9 as a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key} must be {what} (got {_show(value)})")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{key} must be {what} (got {_show(value)})") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number (got {_show(value)})")
    return number


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a YAML / run-config value into the field's declared type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)} (got {_show(value)})")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, str):  # Flower's run config has no lists: "a,b,c"
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list (got {_show(value)})")
        if item is float:
            return tuple(_float(key, v, "a list of numbers") for v in value)
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings (got {_show(value)})")
        for v in value:  # what the run config would split apart or strip
            if "," in v or v.strip() != v or not v:
                raise ConfigError(f"{key} items must be non-empty, without ',' or surrounding "
                                  "spaces (Flower's run config carries a list as one "
                                  f"comma-joined string; got {_show(v)})")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (got {_show(value)})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer (got {_show(value)})")
        return value
    if hint is float:
        return _float(key, value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (got {_show(value)})")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _section(name: str, values: Any) -> Mapping[str, Any]:
    """A section's settings; an empty or non-mapping section is refused by name (write
    `name: {}`, or leave the section out, for its defaults)."""
    if not isinstance(values, Mapping):
        what = "empty" if values is None else f"not a mapping of settings (got {_show(values)})"
        raise ConfigError(f"section {name} is {what}: give it as 'setting: value' lines "
                          f"under {name}:, or leave it out (or write {name}: {{}}) for "
                          "its defaults")
    return values


def _build_section(cls: type, name: str, values: Any) -> Any:
    values = _section(name, values)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        raise ConfigError(f"{name}.{_name(unknown[0])} is not a known setting; "
                          f"allowed: {sorted(known)}")
    kwargs = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
}


def from_mapping(data: Mapping[str, Any] | None) -> Config:
    """Build a Config from nested ``{section: {key: value}}`` data; missing = default."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"the configuration must be a mapping of sections (got "
                          f"{_show(data)})")
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        raise ConfigError(f"{_name(unknown[0])} is not a known section; "
                          f"allowed: {sorted(SECTIONS)}")
    return Config(**{
        name: _build_section(cls, name, data[name] if name in data else {})
        for name, cls in SECTIONS.items()
    })


def from_run_config(run_config: Mapping[str, Any]) -> Config:
    """Build a Config from Flower's flat run config (``section.key = value``)."""
    nested: dict[str, dict[str, Any]] = {}
    for flat_key, value in run_config.items():
        section, _, key = flat_key.partition(".")
        if not key:
            raise ConfigError(f"{flat_key} is not a known setting; use 'section.key'")
        nested.setdefault(section, {})[key] = value
    return from_mapping(nested)


def load_yaml(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read a YAML config (safe_load); ``overrides`` are flat ``section.key`` values."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}:{_yaml_line(err, text)}: not valid YAML: "
                          f"{_yaml_problem(err)}") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer of 5,000 digits
        raise ConfigError(f"{path}: a value cannot be read ({_show(str(err))})") from None
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the file must hold a mapping of sections such as "
                          f"'privacy:' (got {type(data).__name__} {_show(data)})")
    data = dict(data)
    for flat_key, value in (overrides or {}).items():
        section, _, key = str(flat_key).partition(".")
        if section in data:
            try:
                _section(section, data[section])
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from None
        data[section] = {**data.get(section, {}), key: value}
    try:
        return from_mapping(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _yaml_line(err: yaml.YAMLError, text: str) -> int:
    """The 1-based line a YAML error points at (1 when it points nowhere)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if mark is not None:
        return mark.line + 1
    position = getattr(err, "position", None)  # a character the reader refuses
    return text[:position].count("\n") + 1 if isinstance(position, int) else 1


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What PyYAML says is wrong, on one line."""
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    said = ", ".join(p for p in parts if p) or str(err).splitlines()[0]
    return " ".join(said.split())


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
