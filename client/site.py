"""One hospital site: its data, its policy, and what it does in a round.

The model and tokenizer are built once per process (Ray actors and SuperNodes
serve many rounds). The privacy history lives in the site's ledger on disk, keyed
by its data fingerprint, so it carries from round to round and run to run,
whichever process serves the site.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient

from client.budget import Policy, SiteGuard
from client.training import PrivateStep, train_plain, train_private
from common.config import Config
from common.data import SiteData, federated_data, process_cached, read_records, site_split
from common.evaluation import Encoded, Features, encode, evaluate, pooled_features
from common.keys import Keys
from common.model import (build_model, classifier_of, encoder_arrays, get_adapter_arrays,
                          load_tokenizer, pick_device, save_adapter, set_adapter_arrays,
                          trainable_head)
from common.privacy import accounting

class UpdateRangeError(ValueError):
    """The update cannot be sent as it is under the chosen aggregation."""


@dataclass(frozen=True)
class Site:
    name: str
    data: SiteData
    label_names: tuple[str, ...]
    policy: Policy      # the site's own budget: nothing the server sends can raise it
    state_dir: Path | None  # the site's keys and ledger; None: under the run's directory
    private: bool = True  # a deployed site trains without DP only if its node config says so


NODE_KEYS = ("site", "data-file", "text-column", "label-column", "state-dir", "epsilon-budget",
             "delta", "min-noise-multiplier", "max-noise-multiplier", "private")


def site_from_context(cfg: Config, context: Context) -> Site:
    """The site this node is. A hospital's node config names its data file and holds
    its privacy policy (`epsilon-budget` is then required: the run config, which the
    server sends, never sets a deployed site's budget). A simulated node only has a
    `partition-id`: its share of the federated data, its policy from the config."""
    node = dict(context.node_config)
    if "data-file" in node:
        return _deployed_site(cfg, node)
    if "partition-id" not in node:
        raise ValueError("node config needs 'data-file' (a hospital) or 'partition-id' "
                         f"(a simulated site); known keys: {', '.join(NODE_KEYS)}")
    pid, num = int(node["partition-id"]), int(node["num-partitions"])
    sites, test = federated_data(cfg.data, num)
    name = str(node.get("site", f"site{pid}"))
    policy = _policy(node, Policy(cfg.site.budget_of(pid), cfg.privacy.delta,
                                  cfg.site.min_noise_multiplier, cfg.site.max_noise_multiplier))
    state = (Path(node["state-dir"]) if "state-dir" in node
             else Path(cfg.site.state_dir) / name if cfg.site.state_dir else None)
    return Site(name, sites[pid], test.label_names, policy, state, cfg.privacy.enabled)


def _policy(node: dict, default: Policy) -> Policy:
    """The node's own policy values where given, else `default`."""
    return Policy(
        epsilon_budget=float(node.get("epsilon-budget", default.epsilon_budget)),
        delta=float(node.get("delta", default.delta)),
        min_noise_multiplier=float(node.get("min-noise-multiplier",
                                            default.min_noise_multiplier)),
        max_noise_multiplier=float(node.get("max-noise-multiplier",
                                            default.max_noise_multiplier)))


def _deployed_site(cfg: Config, node: dict) -> Site:
    missing = [k for k in ("site", "state-dir", "epsilon-budget", "delta") if k not in node]
    if missing:
        raise ValueError(f"a hospital's node config must set {', '.join(missing)} "
                         "(its name, where its keys and ledger live, its ε budget and δ: "
                         "the server's run config never sets a hospital's policy)")
    if not cfg.data.labels:
        raise ValueError("data.labels must list the label names in the run config when "
                         "hospitals bring their own files")
    name = str(node["site"])
    records = process_cached(("records", node["data-file"]), lambda: read_records(
        node["data-file"], str(node.get("text-column", cfg.data.text_column)),
        str(node.get("label-column", cfg.data.label_column)), cfg.data.labels))
    policy = _policy(node, Policy(0.0, cfg.privacy.delta, cfg.site.min_noise_multiplier,
                                  cfg.site.max_noise_multiplier))
    private = node.get("private", True)
    if not isinstance(private, bool):
        raise ValueError(f"node config 'private' must be true or false (got {private!r})")
    return Site(name, site_split(records, cfg.data.val_fraction, cfg.data.seed),
                cfg.data.labels, policy, Path(str(node["state-dir"])), private)


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def simulated_state_dir(cfg: Config, run_id: str, site: str) -> Path:
    """Where a simulated site without `site.state_dir` keeps its keys, ledger and
    cached features: in the run's directory, as `fedcare simulate` does, so every run
    (through either door) starts with fresh simulated sites. The run id names a folder,
    so it must be one plain name."""
    if not RUN_ID.fullmatch(run_id) or run_id in (".", ".."):
        raise ValueError(f"run id {run_id!r} cannot name a folder (letters, digits, '.', "
                         "'_' and '-' only, at most 128)")
    return Path(cfg.simulation.output_dir).resolve() / run_id / "site_state" / site


@dataclass(frozen=True)
class Phase:
    """What a round trains and how: the head on cached features, or LoRA + head."""
    name: Literal["head", "lora"]
    batch_size: int
    steps: int
    learning_rate: float


class SiteTrainer:
    """The work of a round at one site."""

    def __init__(self, cfg: Config, site: Site) -> None:
        self.cfg, self.site = cfg, site
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device)
        self.model = process_cached(
            ("model", cfg.model, cfg.lora, len(site.label_names), str(self.device)),
            lambda: build_model(cfg.model.base_model, len(site.label_names), cfg.lora,
                                cfg.model.pooling).to(self.device))
        tokenizer = process_cached(("tokenizer", cfg.model.base_model),
                                   lambda: load_tokenizer(cfg.model.base_model))
        self.train_data: Encoded = process_cached(
            ("train", site.data.fingerprint, cfg.model),
            lambda: encode(site.data.train, tokenizer, cfg.model.max_length))
        self.val_data: Encoded = process_cached(
            ("val", site.data.fingerprint, cfg.model),
            lambda: encode(site.data.val, tokenizer, cfg.model.max_length))

    def guard(self) -> SiteGuard:
        return SiteGuard(self.site.name, self.site.state_dir, self.site.data.fingerprint,
                         self.site.policy, accountant=self.cfg.privacy.accountant)

    def phase(self, round_no: int) -> Phase:
        """Rounds 1..train.head_rounds train the head only; later rounds LoRA + head."""
        t = self.cfg.train
        if round_no <= t.head_rounds:
            return Phase("head", t.head_batch_size, t.head_steps, t.head_learning_rate)
        return Phase("lora", t.batch_size, t.local_steps, t.learning_rate)

    def features(self, data: Encoded) -> Features:
        """Pooled features of `data` under the current encoder (base + LoRA), computed
        once per encoder state and kept in the site's state folder, which only the site
        reads: Flower may serve a site from a different process every round."""
        classifier = classifier_of(self.model)
        key = hashlib.sha256()
        for part in (repr((self.cfg.model, len(data))), *map(repr, data.ids)):
            key.update(part.encode())
        for name, param in self.model.named_parameters():
            if param.requires_grad and "lora_" in name:  # the encoder's trainable state
                key.update(param.detach().cpu().numpy().tobytes())
        path = self.site.state_dir / "features" / f"{key.hexdigest()[:32]}.safetensors"
        return process_cached(("features", str(path)), lambda: _load_or_make_features(
            path, data, lambda: pooled_features(classifier, data, self.device)))

    def _rows_and_module(self, phase: Phase):
        if phase.name == "head":
            return self.features(self.train_data), trainable_head(self.model)
        return self.train_data, self.model

    # -- rounds ----------------------------------------------------------------------
    def fit(self, round_no: int, num_rounds: int, run_id: str, secure: bool = False) -> dict:
        """Train one round; returns the update, its example count and the metrics.
        A private site that cannot stay within its budget refuses: no update (under
        secure aggregation, a zero update of weight 0, so the masked sum still adds up)."""
        t = self.cfg.train
        phase = self.phase(round_no)
        gen = torch.Generator().manual_seed(secrets.randbits(63))
        start = time.perf_counter()
        metrics: dict = {Keys.SITE: self.site.name, Keys.PRIVATE: self.site.private,
                         Keys.REFUSED: "",
                         Keys.SECURE_AGGREGATION: secure}
        if not self.site.private:
            data, module = self._rows_and_module(phase)
            stats = train_plain(module, data, phase.batch_size, phase.steps,
                                phase.learning_rate, t.chunk_size, self.device, gen)
            arrays = self.update(phase)
            self._check_range(arrays, secure)
        else:
            guard = self.guard()
            metrics[Keys.SITE_PUBLIC_KEY] = guard.public_key()
            try:
                step = self._plan(guard, run_id, round_no, num_rounds, phase)
                data, module = self._rows_and_module(phase)
                accountant = accounting.make_accountant(guard.history(), guard.accountant)
                stats = train_private(module, data, step, phase.learning_rate,
                                      t.chunk_size, self.device, accountant, gen)
                arrays = self.update(phase)
                self._check_range(arrays, secure)
            except (accounting.BudgetError, UpdateRangeError) as err:
                return self._refuse(guard, run_id, round_no, str(err), secure, metrics, phase)
            eps = guard.record_release(  # fsync first; the claim, never below what was spent
                run_id, round_no, step, accounting.epsilon(
                    accountant.history, guard.policy.delta, guard.accountant),
                arrays, secure)["epsilon"]
            metrics.update({
                Keys.EPSILON: eps, Keys.DELTA: guard.policy.delta,
                Keys.NOISE_MULTIPLIER: step.noise_multiplier,
                Keys.SAMPLE_RATE: step.sample_rate, Keys.MAX_GRAD_NORM: step.max_grad_norm,
                Keys.LEDGER: guard.ledger_text(),
            })
        metrics.update({
            Keys.TRAIN_LOSS: stats.loss, Keys.STEPS: stats.steps,
            Keys.BYTES_SENT: int(sum(a.nbytes for a in arrays)),
            Keys.TRAIN_SECONDS: time.perf_counter() - start,
        })
        return {"arrays": arrays, "num_examples": len(self.train_data), "metrics": metrics}

    def _check_range(self, arrays, secure: bool) -> None:
        """SecAgg+ clips values to ±clipping_range: an update beyond it would arrive
        silently changed, so it is not sent at all."""
        limit = self.cfg.federation.secagg_clipping_range
        largest = max(float(np.abs(a).max()) for a in arrays if a.size)
        if secure and largest > limit:
            raise UpdateRangeError(
                f"an adapter value reaches {largest:.3g}, outside the secure aggregation "
                f"range ±{limit:g}; raise federation.secagg_clipping_range")

    def update(self, phase: Phase) -> list[np.ndarray]:
        """The arrays this round sends: all of them, except that a head round sends
        each LoRA tensor as an empty array (it did not change; the server keeps its
        own copy), so a head round's update is the head alone."""
        arrays = get_adapter_arrays(self.model)
        if phase.name == "head":
            for i in encoder_arrays(self.model):
                arrays[i] = np.zeros((0,), dtype=arrays[i].dtype)
        return arrays

    def _refuse(self, guard: SiteGuard, run_id: str, round_no: int, why: str, secure: bool,
                metrics: dict, phase: Phase) -> dict:
        reason = f"{self.site.name} refuses round {round_no}: {why}"
        guard.record_refusal(run_id, round_no, reason, secure)
        metrics.update({Keys.REFUSED: reason, Keys.EPSILON: guard.spent(),
                        Keys.LEDGER: guard.ledger_text()})
        arrays = [np.zeros_like(a) for a in self.update(phase)] if secure else []
        return {"arrays": arrays, "num_examples": 0, "metrics": metrics}

    def schedule(self, round_no: int, num_rounds: int) -> accounting.Schedule:
        """(sample rate, steps) of everything this run will still release from
        `round_no` on: its head rounds, its LoRA rounds and the personalisation."""
        t, n = self.cfg.train, len(self.train_data)
        rounds = [self.phase(r) for r in range(round_no, num_rounds + 1)]
        last = self.phase(num_rounds)
        plan: dict[float, int] = {}
        for p in [*rounds, dataclasses.replace(last, steps=t.personalize_steps)]:
            q = accounting.sample_rate(p.batch_size, n)
            plan[q] = plan.get(q, 0) + p.steps
        return [(q, steps) for q, steps in plan.items() if steps > 0]

    def _plan(self, guard: SiteGuard, run_id: str, round_no: int, num_rounds: int,
              phase: Phase) -> PrivateStep:
        """This release's mechanism, refused (BudgetError) if it would pass the budget."""
        p = self.cfg.privacy
        sigma = guard.plan(run_id, p.target_epsilon, self.schedule(round_no, num_rounds))
        step = PrivateStep(sigma, accounting.sample_rate(phase.batch_size, len(self.train_data)),
                           phase.steps, p.max_grad_norm)
        projected = guard.projected(step)
        if projected > guard.policy.epsilon_budget:
            raise accounting.BudgetError(
                f"this release would bring ε to {projected:.4g}, above the site's "
                f"budget of {guard.policy.epsilon_budget:g}")
        return step

    def evaluate(self, round_no: int = 0, num_rounds: int = 0,
                 run_id: str = "") -> tuple[float, int, dict]:
        """The global model on the site's validation records; after the last round,
        also the site's personalised copy (when train.personalize_steps > 0)."""
        m = self._metrics()
        loss = m.pop("loss")
        out = {Keys.SITE: self.site.name, **m}
        if self.cfg.train.personalize_steps and round_no and round_no == num_rounds:
            out.update(self.personalize(run_id, round_no, num_rounds))
        return loss, len(self.val_data), out

    def _metrics(self) -> dict:
        m = evaluate(trainable_head(self.model), self.features(self.val_data),
                     len(self.site.label_names), self.device)
        return {k: v for k, v in m.items() if np.isfinite(v)}

    def personalize(self, run_id: str, round_no: int, num_rounds: int) -> dict:
        """Fine-tune a copy of the global adapter on this site's data, with DP charged
        to the same budget and ledger; save it at the site; report its metrics. It
        trains like the run's last round (head only, or LoRA + head)."""
        t = self.cfg.train
        phase = dataclasses.replace(self.phase(num_rounds), steps=t.personalize_steps)
        global_arrays = get_adapter_arrays(self.model)
        gen = torch.Generator().manual_seed(secrets.randbits(63))
        out: dict = {}
        try:
            if self.site.private:
                guard = self.guard()
                try:
                    step = self._plan(guard, run_id, num_rounds + 1, num_rounds, phase)
                except accounting.BudgetError as err:
                    reason = f"{self.site.name} does not personalise: {err}"
                    guard.record_refusal(run_id, round_no, reason, False)
                    return {Keys.PERSONALIZED_REFUSED: reason, Keys.LEDGER: guard.ledger_text()}
                data, module = self._rows_and_module(phase)
                accountant = accounting.make_accountant(guard.history(), guard.accountant)
                train_private(module, data, step, phase.learning_rate,
                              t.chunk_size, self.device, accountant, gen)
                arrays = get_adapter_arrays(self.model)
                eps = guard.record_release(run_id, round_no, step, accounting.epsilon(
                    accountant.history, guard.policy.delta, guard.accountant),
                    arrays, False, "personalize")["epsilon"]
                out.update({Keys.EPSILON: eps, Keys.LEDGER: guard.ledger_text(),
                            Keys.SITE_PUBLIC_KEY: guard.public_key()})
            else:
                data, module = self._rows_and_module(phase)
                train_plain(module, data, phase.batch_size, phase.steps,
                            phase.learning_rate, t.chunk_size, self.device, gen)
            folder = self.site.state_dir / "personalized" / run_id
            save_adapter(self.model, folder, self.site.label_names, self.cfg.model.base_model,
                         self.cfg.model.max_length)
            out.update({f"personalized_{k}": v for k, v in self._metrics().items()
                        if k != "loss"})
            out[Keys.PERSONALIZED_ADAPTER] = str(folder)
        finally:
            set_adapter_arrays(self.model, global_arrays)  # the global model stays global
        return out


def _load_or_make_features(path: Path, data: Encoded, make) -> Features:
    from safetensors.torch import load_file, save_file

    if path.is_file():
        x = load_file(str(path))["x"]
        if x.shape[0] == len(data):
            return Features(x, data.labels)
    feats = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({"x": feats.x.contiguous()}, str(partial))
    partial.replace(path)  # whole or absent: never a half-written file
    return feats


class SiteClient(NumPyClient):
    """Flower's view of a site: arrays in, arrays and metrics out."""

    def __init__(self, trainer: SiteTrainer) -> None:
        self.trainer = trainer

    def get_parameters(self, config):
        return get_adapter_arrays(self.trainer.model)

    def _bind(self, config) -> None:
        site = self.trainer.site
        if site.state_dir is None:
            self.trainer.site = dataclasses.replace(site, state_dir=simulated_state_dir(
                self.trainer.cfg, str(config.get(Keys.RUN_ID, "")), site.name))

    def fit(self, parameters, config):
        self._bind(config)
        set_adapter_arrays(self.trainer.model, parameters)
        out = self.trainer.fit(int(config[Keys.ROUND]), int(config[Keys.NUM_ROUNDS]),
                               str(config[Keys.RUN_ID]),
                               secure=bool(config.get(Keys.SECURE_AGGREGATION, False)))
        return out["arrays"], out["num_examples"], out["metrics"]

    def evaluate(self, parameters, config):
        self._bind(config)
        set_adapter_arrays(self.trainer.model, parameters)
        return self.trainer.evaluate(int(config.get(Keys.ROUND, 0)),
                                     int(config.get(Keys.NUM_ROUNDS, 0)),
                                     str(config.get(Keys.RUN_ID, "")))
