"""What a hospital site does in a round: train, evaluate, personalise.

The model and tokenizer are built once per process (Ray actors and SuperNodes
serve many rounds). The privacy history lives in the site's ledger on disk, keyed
by its dataset, so it carries from round to round and run to run, whichever process
serves the site. Everything a round returns is declared in client/releases.py: the
DP update, noisy counts, and what the ledger already says; the training loss, the
time taken and the exact sizes stay in the site's own log.

Size: one class, a site's round; its phases (fit, evaluate, personalise) share the
model, the guard and the refusals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from logging import INFO
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from flwr.common.logger import log

from client.budget import SiteGuard, UnitError
from client.node import LOG_FILE, Site, simulated_state_dir, site_from_context
from client.training import (
    GradientCanaries, Patients, PrivateStep, train_plain, train_private,
)
from common.config import Config
from common.data import DataError, process_cached
from common.evaluation import Encoded, Features, encode, pooled_features, predict_probs
from common.message_keys import Keys
from common.metrics import class_counts, count_metrics
from common.model import (
    build_model, classifier_of, encoder_arrays, get_adapter_arrays, load_tokenizer,
    pick_device, save_adapter, set_adapter_arrays, trainable_head,
)
from common.names import check_name
from common.patients import rows_by_patient
from common.privacy import accounting

__all__ = ["Site", "SiteTrainer", "simulated_state_dir", "site_from_context"]


class Refusal(Exception):
    """The site will not release this round: `code` goes to the server, `reason` to
    the ledger and the site's log (neither holds a record value)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason

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
            ("train", site.data.train, cfg.model),
            lambda: encode(site.data.train, tokenizer, cfg.model.max_length))
        self.val_data: Encoded = process_cached(
            ("val", site.data.val, cfg.model),
            lambda: encode(site.data.val, tokenizer, cfg.model.max_length))
        self.patients = self._patients() if site.private else None

    def _patients(self) -> Patients | None:
        """The training rows of each patient, where the site's unit is the patient."""
        policy, train = self.site.policy, self.site.data.train
        if policy.unit != "patient":
            return None
        if not train.patients:
            raise DataError(f"site {self.site.name} protects patients, but its records "
                            "name none: give the patient column (patient-column, or "
                            "data.patient_column / data.patients in a simulation)")
        return Patients(rows_by_patient(train.patients), policy.max_records_per_patient,
                        self.cfg.train.patient_gradient)

    @property
    def units(self) -> int:
        """The exact number of training units (records, or patients): never sent."""
        return len(self.patients) if self.patients is not None else len(self.train_data)

    def bind(self, run_id: str) -> None:
        """Once the run is known: a simulated site's state folder, under the run's
        directory (a hospital's is its node config's)."""
        if self.site.state_dir is None:
            self.site = dataclasses.replace(self.site, state_dir=simulated_state_dir(
                self.cfg, run_id, self.site.name))

    def receive(self, arrays) -> None:
        """The adapter the server sent, into the site's model."""
        set_adapter_arrays(self.model, arrays)

    def say(self, line: str) -> None:
        """One line of the site's own log (the SuperNode's output, and site.log in its
        state folder); never sent."""
        log(INFO, "fedcare site %s: %s", self.site.name, line)
        if self.site.state_dir is not None:
            self.site.state_dir.mkdir(parents=True, exist_ok=True)
            with open(self.site.state_dir / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} "
                             f"{line}\n")

    def guard(self) -> SiteGuard:
        return SiteGuard(self.site.name, self.site.state_dir, self.site.data.fingerprint,
                         self.site.policy, accountant=self.cfg.privacy.accountant,
                         log=self.say)

    def phase(self, round_no: int) -> Phase:
        """Rounds 1..train.head_rounds train the head only; later rounds LoRA + head."""
        t = self.cfg.train
        if round_no <= t.head_rounds:
            return Phase("head", t.head_batch_size, t.head_steps, t.head_learning_rate)
        return Phase("lora", t.batch_size, t.local_steps, t.learning_rate)

    def features(self, data: Encoded) -> Features:
        """Pooled features of `data` under the current encoder (base + LoRA), computed
        once per encoder state and kept in the site's own folder (its state folder, or a
        simulated site's `simulation.feature_cache_dir`/<site>), which only the site
        reads: Flower may serve a site from a different process every round. The key is
        the model config, the device, every record's token ids and the LoRA weights."""
        classifier = classifier_of(self.model)
        key = hashlib.sha256()
        for part in (repr((self.cfg.model, len(data), str(self.device))), *map(repr, data.ids)):
            key.update(part.encode())
        for name, param in self.model.named_parameters():
            if param.requires_grad and "lora_" in name:  # the encoder's trainable state
                key.update(param.detach().cpu().numpy().tobytes())
        folder = self.site.feature_dir or self.site.state_dir / "features"
        path = folder / f"{key.hexdigest()[:32]}.safetensors"

        def make() -> Features:
            begun = time.perf_counter()
            feats = pooled_features(classifier, data, self.device)
            self.say(f"pooled features of {len(data)} records computed in "
                     f"{time.perf_counter() - begun:.2f} s (kept in {folder})")
            return feats
        return process_cached(("features", str(path)),
                              lambda: _load_or_make_features(path, data, make))

    def _rows_and_module(self, phase: Phase):
        if phase.name == "head":
            return self.features(self.train_data), trainable_head(self.model)
        return self.train_data, self.model

    def canaries(self) -> GradientCanaries | None:
        """The gradient canaries an empirical audit added to this simulated site."""
        rows = self.site.data.gradient_canaries
        return GradientCanaries(trainable_head(self.model).weight, dict(rows)) if rows else None

    def count_sigma(self, guard: SiteGuard) -> float:
        return guard.count_sigma(self.cfg.privacy.count_noise)

    # -- rounds ----------------------------------------------------------------------
    def fit(self, round_no: int, num_rounds: int, run_id: str, secure: bool = False) -> dict:
        """Train one round; returns the update, its FedAvg weight and what the site
        states about it. A private site that will not release refuses: no update (under
        secure aggregation, a zero update of weight 0, so the masked sum still adds up)."""
        begun = time.perf_counter()
        t, phase = self.cfg.train, self.phase(round_no)
        gen = torch.Generator().manual_seed(secrets.randbits(63))
        metrics: dict = {Keys.SITE: self.site.name, Keys.PRIVATE: self.site.private,
                         Keys.REFUSED: "", Keys.SECURE_AGGREGATION: secure}
        if not self.site.private:
            data, module = self._rows_and_module(phase)
            stats = train_plain(module, data, phase.batch_size, phase.steps,
                                phase.learning_rate, t.chunk_size, self.device, gen)
            arrays, weight = self._in_range(self.update(phase), secure), len(self.train_data)
            if arrays is None:
                return self._refusal(None, "non-finite", "the update held NaN or infinite "
                                     "values", secure, metrics, phase)
        else:
            guard = self.guard()
            metrics[Keys.SITE_PUBLIC_KEY] = guard.public_key()
            try:
                if self.site.policy.require_secure_aggregation and not secure:
                    raise Refusal("plain-round", "the site requires secure aggregation and "
                                                 "this round is not under SecAgg+")
                self._check_unit(guard)
                if guard.released(run_id, round_no, "train"):
                    raise Refusal("repeat", f"round {round_no} of this run was released "
                                            "already and its reply was lost; releasing it "
                                            "again would charge it twice")
                weight = self.public_size(guard, run_id, round_no)
                try:  # on the stated (noisy) count, never the exact one
                    self.site.policy.check_delta(weight)
                except accounting.BudgetError as err:  # not the budget: δ, which n bounds
                    raise Refusal("delta", str(err)) from None
                step = self._plan(guard, run_id, round_no, num_rounds, phase, weight)
                data, module = self._rows_and_module(phase)
                accountant = accounting.make_accountant(guard.history(), guard.accountant)
                stats = train_private(module, data, step, phase.learning_rate, t.chunk_size,
                                      self.device, accountant, gen, public_size=weight,
                                      canaries=self.canaries(), patients=self.patients)
            except accounting.BudgetError as err:
                return self._refusal(guard, "budget", str(err), secure, metrics, phase,
                                     run_id, round_no)
            except Refusal as err:
                return self._refusal(guard, err.code, err.reason, secure, metrics, phase,
                                     run_id, round_no)
            arrays = self._in_range(self.update(phase), secure)
            eps = accounting.epsilon(accountant.history, guard.policy.delta, guard.accountant)
            if arrays is None:  # trained, so charged; but nothing usable leaves
                guard.record_release(run_id, round_no, step, eps, None, secure,
                                     withheld="the update held NaN or infinite values")
                return self._refusal(guard, "non-finite", "", secure, metrics, phase)
            entry = guard.record_release(run_id, round_no, step, eps, arrays, secure)
            metrics.update({
                Keys.EPSILON: entry["epsilon"], Keys.DELTA: guard.policy.delta,
                Keys.NOISE_MULTIPLIER: step.noise_multiplier,
                Keys.SAMPLE_RATE: step.sample_rate, Keys.MAX_GRAD_NORM: step.max_grad_norm,
                Keys.LEDGER: guard.ledger_text(), Keys.LEDGER_HEAD: guard.head(),
            })
        self.say(f"round {round_no}: trained {phase.name}, {stats.steps} steps over "
                 f"{stats.examples} sampled records of {self.units} training "
                 f"{self.site.policy.unit}s, loss {stats.loss:.4f}, in "
                 f"{time.perf_counter() - begun:.2f} s (kept here)")
        metrics.update({Keys.STEPS: phase.steps,
                        Keys.BYTES_SENT: int(sum(a.nbytes for a in arrays))})
        return {"arrays": arrays, "num_examples": self._capped(weight, secure),
                "metrics": metrics}

    def _capped(self, weight: int, secure: bool) -> int:
        """The FedAvg weight as sent: at most federation.max_site_examples (the server
        caps it too, where it sees it) and, under SecAgg+, secagg_max_weight, which the
        server cannot check inside the masked sum."""
        fed = self.cfg.federation
        cap = min(fed.max_site_examples, int(fed.secagg_max_weight)) if secure \
            else fed.max_site_examples
        return min(int(weight), cap)

    def public_size(self, guard: SiteGuard, run_id: str, round_no: int) -> int:
        return guard.public_size(self.units, self.count_sigma(guard), run_id, round_no)

    @staticmethod
    def _check_unit(guard: SiteGuard) -> None:
        try:
            guard.check_unit()
        except UnitError as err:
            raise Refusal("unit", str(err)) from None

    def _in_range(self, arrays: list[np.ndarray], secure: bool) -> list[np.ndarray] | None:
        """The update as it may leave: None if any value is NaN or infinite; under
        SecAgg+ clipped into its range ±federation.secagg_clipping_range, which would
        otherwise change it in transit (clipping DP output is post-processing: free)."""
        if not all(np.isfinite(a).all() for a in arrays):
            return None
        limit = self.cfg.federation.secagg_clipping_range
        return [np.clip(a, -limit, limit) for a in arrays] if secure else arrays

    def update(self, phase: Phase) -> list[np.ndarray]:
        """The arrays this round sends: all of them, except that a head round sends
        each LoRA tensor as an empty array (it did not change; the server keeps its
        own copy), so a head round's update is the head alone."""
        arrays = get_adapter_arrays(self.model)
        if phase.name == "head":
            for i in encoder_arrays(self.model):
                arrays[i] = np.zeros((0,), dtype=arrays[i].dtype)
        return arrays

    def _refusal(self, guard: SiteGuard | None, code: str, reason: str, secure: bool,
                 metrics: dict, phase: Phase, run_id: str = "", round_no: int = 0) -> dict:
        """The reply of a site that sends no update. With `reason`, the refusal is
        written to the ledger first (nothing released, nothing charged)."""
        if guard is not None:
            if reason:
                guard.record_refusal(run_id, round_no, f"{self.site.name} refuses round "
                                                       f"{round_no}: {reason}", secure)
            metrics.update({Keys.EPSILON: guard.spent(), Keys.LEDGER: guard.ledger_text(),
                            Keys.LEDGER_HEAD: guard.head()})
        metrics[Keys.REFUSED] = code
        arrays = [np.zeros_like(a) for a in self.update(phase)] if secure else []
        return {"arrays": arrays, "num_examples": 0, "metrics": metrics}

    def schedule(self, round_no: int, num_rounds: int, records: int) -> accounting.Schedule:
        """(sample rate, steps) of everything this run will still release from
        `round_no` on, over `records` (the size the site states): its head rounds, its
        LoRA rounds and the personalisation."""
        t = self.cfg.train
        rounds = [self.phase(r) for r in range(round_no, num_rounds + 1)]
        last = self.phase(num_rounds)
        plan: dict[float, int] = {}
        for p in [*rounds, dataclasses.replace(last, steps=t.personalize_steps)]:
            q = accounting.sample_rate(p.batch_size, records)
            plan[q] = plan.get(q, 0) + p.steps
        return [(q, steps) for q, steps in plan.items() if steps > 0]

    def _plan(self, guard: SiteGuard, run_id: str, round_no: int, num_rounds: int,
              phase: Phase, records: int) -> PrivateStep:
        """This release's mechanism, refused (BudgetError) if it would pass the budget.
        σ leaves room for the run's evaluations (noisy per-class counts once a round,
        and one of the personalised model) when the site releases them."""
        p = self.cfg.privacy
        evaluations = 0
        if self.site.policy.release_evaluation:
            evaluations = num_rounds - round_no + 1 + bool(self.cfg.train.personalize_steps)
        counts = [(self.count_sigma(guard), 1.0, 1)] * evaluations
        sigma = guard.plan(run_id, p.target_epsilon, self.schedule(round_no, num_rounds,
                                                                   records), counts)
        step = PrivateStep(sigma, accounting.sample_rate(phase.batch_size, records),
                           phase.steps, p.max_grad_norm)
        projected = guard.projected(step)
        if projected > guard.policy.epsilon_budget:
            raise accounting.BudgetError(
                f"this release would bring ε to {projected:.4g}, above the site's "
                f"budget of {guard.policy.epsilon_budget:g}")
        return step

    def evaluate(self, round_no: int, num_rounds: int, run_id: str) -> tuple[float, int, dict]:
        """The global model on the site's validation records, released as noisy
        per-class counts (charged) and the metrics computed from them, if the site
        releases evaluation at all; after the last round, also the site's personalised
        copy (when train.personalize_steps > 0). No loss is sent."""
        out: dict = {Keys.SITE: self.site.name, Keys.EVALUATED: False}
        if not self.site.policy.release_evaluation:
            return math.nan, 0, out
        guard = self.guard() if self.site.private else None
        if guard is not None and guard.released(run_id, round_no, "evaluate"):
            out[Keys.REFUSED] = "repeat"  # released before, reply lost: not charged twice
            return math.nan, 0, out
        try:
            if guard is not None:
                self._check_unit(guard)
        except Refusal as err:
            guard.record_refusal(run_id, round_no, f"{self.site.name} does not evaluate "
                                                   f"round {round_no}: {err.reason}", False)
            out[Keys.REFUSED] = err.code
            return math.nan, 0, out
        try:
            counts = self._release_counts(guard, run_id, round_no)
        except accounting.BudgetError as err:
            guard.record_refusal(run_id, round_no, f"{self.site.name} does not evaluate "
                                                   f"round {round_no}: {err}", False)
            out[Keys.REFUSED] = "budget"
        else:
            out.update(count_metrics(counts), **{Keys.EVALUATED: True})
        if self.cfg.train.personalize_steps and round_no and round_no == num_rounds:
            out.update(self.personalize(guard, run_id, round_no, num_rounds))
        if guard is not None:
            out.update({Keys.EPSILON: guard.spent(), Keys.LEDGER: guard.ledger_text(),
                        Keys.LEDGER_HEAD: guard.head(),
                        Keys.SITE_PUBLIC_KEY: guard.public_key()})
        total = int(max(1, round(float(counts[1].sum())))) if out[Keys.EVALUATED] else 0
        return math.nan, total, out

    def _release_counts(self, guard: SiteGuard | None, run_id: str,
                        round_no: int) -> np.ndarray:
        """Per class (true positives, records, predictions) on the validation records
        under the current adapter: exact at a non-private site, else with Gaussian noise
        (multiplier count_noise at sensitivity √3), charged. Where the unit is the
        patient, each of a patient's m validation records counts 1/m: a patient moves
        the counts as one record did (√3 at most), and the metrics weigh patients alike."""
        probs = predict_probs(trainable_head(self.model), self.features(self.val_data),
                              self.device)
        patient = self.site.policy.unit == "patient" and guard is not None
        weights = _per_patient(self.site.data.val.patients) if patient else None
        counts = class_counts(probs.argmax(axis=1), np.asarray(self.val_data.labels),
                              len(self.site.label_names), weights)
        if guard is None:
            return counts
        what = "patient-weighted records" if patient else "records"
        return guard.release_count(
            "evaluate", run_id, round_no, counts, self.count_sigma(guard),
            sensitivity=math.sqrt(3),
            statistic=f"per class: true positives, {what}, predictions (validation)")

    def personalize(self, guard: SiteGuard | None, run_id: str, round_no: int,
                    num_rounds: int) -> dict:
        """Fine-tune a copy of the global adapter on this site's data, with DP charged
        to the same budget and ledger; save it at the site; release its noisy
        validation metrics. It trains like the run's last round (head only, or LoRA +
        head)."""
        t = self.cfg.train
        phase = dataclasses.replace(self.phase(num_rounds), steps=t.personalize_steps)
        global_arrays = get_adapter_arrays(self.model)
        gen = torch.Generator().manual_seed(secrets.randbits(63))
        out: dict = {}
        try:
            data, module = self._rows_and_module(phase)
            if guard is not None:
                try:
                    records = self.public_size(guard, run_id, round_no)
                    step = self._plan(guard, run_id, num_rounds + 1, num_rounds, phase,
                                      records)
                    accountant = accounting.make_accountant(guard.history(), guard.accountant)
                    train_private(module, data, step, phase.learning_rate, t.chunk_size,
                                  self.device, accountant, gen, public_size=records,
                                  canaries=self.canaries(), patients=self.patients)
                    guard.record_release(run_id, round_no, step, accounting.epsilon(
                        accountant.history, guard.policy.delta, guard.accountant),
                        get_adapter_arrays(self.model), False, "personalize")
                    counts = self._release_counts(guard, run_id, round_no)
                except accounting.BudgetError as err:
                    guard.record_refusal(run_id, round_no, f"{self.site.name} does not "
                                                           f"personalise: {err}", False)
                    return {Keys.PERSONALIZED_REFUSED: "budget"}
            else:
                train_plain(module, data, phase.batch_size, phase.steps,
                            phase.learning_rate, t.chunk_size, self.device, gen)
                counts = self._release_counts(None, run_id, round_no)
            folder = self.site.state_dir / "personalized" / check_name("run id", run_id)
            save_adapter(self.model, folder, self.site.label_names, self.cfg.model.base_model,
                         self.cfg.model.max_length)
            self.say(f"personalised adapter saved in {folder}")
            out.update({f"personalized_{k}": v for k, v in count_metrics(counts).items()})
            out[Keys.PERSONALIZED_ADAPTER] = True
        finally:
            set_adapter_arrays(self.model, global_arrays)  # the global model stays global
        return out


def _per_patient(patients: tuple[str, ...]) -> np.ndarray:
    """Each record's weight 1/m, m the number of its patient's records."""
    if not patients:
        raise DataError("the validation records name no patients, so they cannot be "
                        "counted per patient")
    sizes: dict[str, int] = {}
    for p in patients:
        sizes[p] = sizes.get(p, 0) + 1
    return np.asarray([1.0 / sizes[p] for p in patients])


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
