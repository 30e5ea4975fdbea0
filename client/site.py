"""One hospital site: its data, its privacy state, and what it does in a round.

The model and tokenizer are built once per process (Ray actors and SuperNodes
serve many rounds); the privacy history lives in the site's Flower
`Context.state`, so it carries from round to round whichever process serves it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context

from client.training import PrivateStep, train_plain, train_private
from common.config import Config, PrivacyConfig
from common.data import SiteData, federated_data
from common.evaluation import Encoded, encode, evaluate
from common.keys import Keys
from common.model import build_model, get_adapter_arrays, load_tokenizer, pick_device
from common.privacy import accounting

_PROCESS_CACHE: dict = {}


def _cached(key, make):
    if key not in _PROCESS_CACHE:
        _PROCESS_CACHE[key] = make()
    return _PROCESS_CACHE[key]


@dataclass(frozen=True)
class Site:
    name: str
    data: SiteData
    label_names: tuple[str, ...]
    privacy: PrivacyConfig  # the site's own policy


def site_from_context(cfg: Config, context: Context) -> Site:
    """Simulation: the node's `partition-id` picks its share of the federated data."""
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("node config has no 'partition-id'; a deployed site must name "
                         "its data file in its node config")
    pid, num = int(node["partition-id"]), int(node["num-partitions"])
    sites, test = federated_data(cfg.data, num)
    return Site(f"site{pid}", sites[pid], test.label_names, cfg.privacy)


class SiteTrainer:
    """The work of a round at one site; privacy state read from and written to `state`."""

    def __init__(self, cfg: Config, site: Site, state) -> None:
        self.cfg, self.site, self.state = cfg, site, state
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device)
        self.model = _cached(("model", cfg.model, cfg.lora, len(site.label_names), str(self.device)),
                             lambda: build_model(cfg.model.base_model, len(site.label_names),
                                                 cfg.lora).to(self.device))
        tokenizer = _cached(("tokenizer", cfg.model.base_model),
                            lambda: load_tokenizer(cfg.model.base_model))
        self.train_data: Encoded = _cached(
            ("train", site.data.fingerprint, cfg.model),
            lambda: encode(site.data.train, tokenizer, cfg.model.max_length))
        self.val_data: Encoded = _cached(
            ("val", site.data.fingerprint, cfg.model),
            lambda: encode(site.data.val, tokenizer, cfg.model.max_length))

    # -- privacy state -------------------------------------------------------------
    def history(self) -> accounting.History:
        rec = self.state.config_records.get(Keys.STATE_PRIVACY)
        if rec is None:
            return []
        return list(zip(rec["sigma"], rec["q"], rec["steps"]))

    def _save_history(self, history: accounting.History, sigma: float, run_id: str) -> None:
        self.state.config_records[Keys.STATE_PRIVACY] = ConfigRecord({
            "sigma": [float(s) for s, _, _ in history] or [0.0],
            "q": [float(q) for _, q, _ in history] or [0.0],
            "steps": [int(n) for _, _, n in history] or [0],
            "planned_sigma": float(sigma), "run_id": run_id,
        })

    def plan(self, run_id: str, rounds_left: int) -> PrivateStep:
        """This round's mechanism: σ is fixed once per run so that every planned round
        fits in the site's target; it never goes below the site's minimum."""
        p, t = self.site.privacy, self.cfg.train
        q = accounting.sample_rate(t.batch_size, len(self.train_data))
        rec = self.state.config_records.get(Keys.STATE_PRIVACY)
        if rec is not None and rec["run_id"] == run_id:
            sigma = float(rec["planned_sigma"])
        else:
            sigma = accounting.calibrate_noise(
                self.history(), q, rounds_left * t.local_steps, p.target_epsilon, p.delta,
                p.min_noise_multiplier)
        return PrivateStep(sigma, q, t.local_steps, p.max_grad_norm)

    # -- rounds ----------------------------------------------------------------------
    def fit(self, round_no: int, num_rounds: int, run_id: str) -> dict:
        t, p = self.cfg.train, self.site.privacy
        gen = torch.Generator().manual_seed(secrets.randbits(63))
        start = time.perf_counter()
        metrics: dict = {Keys.SITE: self.site.name, Keys.PRIVATE: p.enabled, Keys.REFUSED: ""}
        if p.enabled:
            step = self.plan(run_id, num_rounds - round_no + 1)
            accountant = accounting.make_accountant(self.history())
            stats = train_private(self.model, self.train_data, step, t.learning_rate,
                                  t.chunk_size, self.device, accountant, gen)
            self._save_history(accountant.history, step.noise_multiplier, run_id)
            metrics.update({
                Keys.EPSILON: accounting.epsilon(accountant.history, p.delta),
                Keys.DELTA: p.delta, Keys.NOISE_MULTIPLIER: step.noise_multiplier,
                Keys.SAMPLE_RATE: step.sample_rate, Keys.MAX_GRAD_NORM: step.max_grad_norm,
            })
        else:
            stats = train_plain(self.model, self.train_data, t.batch_size, t.local_steps,
                                t.learning_rate, t.chunk_size, self.device, gen)
        arrays = get_adapter_arrays(self.model)
        metrics.update({
            Keys.TRAIN_LOSS: stats.loss, Keys.STEPS: stats.steps,
            Keys.BYTES_SENT: int(sum(a.nbytes for a in arrays)),
            Keys.TRAIN_SECONDS: time.perf_counter() - start,
        })
        return {"arrays": arrays, "num_examples": len(self.train_data), "metrics": metrics}

    def evaluate(self) -> tuple[float, int, dict]:
        m = evaluate(self.model, self.val_data, len(self.site.label_names), self.device)
        loss = m.pop("loss")
        m = {k: v for k, v in m.items() if np.isfinite(v)}
        return loss, len(self.val_data), {Keys.SITE: self.site.name, **m}
