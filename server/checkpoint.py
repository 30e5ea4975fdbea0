"""The server's checkpoint: what a killed run needs to go on where it stopped.

After every round the server writes RUN/checkpoint.safetensors, one file replaced
atomically: the global adapter, the server optimiser's arrays (FedAvgM's momentum,
FedAdam's moments) and, as JSON in its metadata, the round, the server's step count,
the site-name bindings and each round's outcome. Never pickle: a checkpoint is data.

What the sites spent is not here: each site's ledger is its own, and a site asked
again for a round it already answered re-sends that answer (client/replies.py), so a
resumed round costs no site any more ε than the first attempt did.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from safetensors.numpy import load_file, save_file

from common.errors import FedcareError

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedcare-checkpoint-1"
# the inner strategies' state, by attribute: lists of arrays (None until first used)
OPTIMIZER_STATE = ("momentum_vector", "current_weights", "m_t", "v_t")


@dataclass
class Checkpoint:
    round: int                     # the last round completed
    run_id: str
    adapter: list[np.ndarray]      # the global adapter after that round
    steps: int = 0
    owners: dict[str, str] = field(default_factory=dict)
    outcomes: dict[int, str] = field(default_factory=dict)
    optimizer: dict[str, list[np.ndarray]] = field(default_factory=dict)


def capture(round_no: int, run_id: str, adapter: list[np.ndarray], strategy) -> Checkpoint:
    """The state of `strategy` (a SiteAwareStrategy) after `round_no`."""
    inner = strategy.inner
    optimizer = {name: [np.asarray(a) for a in getattr(inner, name)]
                 for name in OPTIMIZER_STATE if getattr(inner, name, None) is not None}
    if getattr(inner, "server_momentum", None) is not None and inner.initial_parameters:
        optimizer["initial_parameters"] = parameters_to_ndarrays(inner.initial_parameters)
    return Checkpoint(round_no, run_id, adapter, strategy.steps, dict(strategy.owners),
                      dict(strategy.outcomes), optimizer)


def restore(checkpoint: Checkpoint, strategy) -> None:
    """Put a checkpoint's state back into a freshly built SiteAwareStrategy."""
    strategy.steps = checkpoint.steps
    strategy.owners = dict(checkpoint.owners)
    strategy.names = {node: name for name, node in checkpoint.owners.items()}
    strategy.restored = True  # nodes no longer connected free their names at the next round
    strategy.outcomes = dict(checkpoint.outcomes)
    strategy.dtypes = [a.dtype for a in checkpoint.adapter]
    for name, arrays in checkpoint.optimizer.items():
        if name == "initial_parameters":
            strategy.inner.initial_parameters = ndarrays_to_parameters(arrays)
        else:
            setattr(strategy.inner, name, [a.copy() for a in arrays])


def save(run_dir: Path, checkpoint: Checkpoint) -> Path:
    tensors = {f"adapter.{i}": a for i, a in enumerate(checkpoint.adapter)}
    for name, arrays in checkpoint.optimizer.items():
        tensors.update({f"{name}.{i}": a for i, a in enumerate(arrays)})
    meta = {"format": FORMAT, "round": checkpoint.round, "run_id": checkpoint.run_id,
            "steps": checkpoint.steps, "owners": checkpoint.owners,
            "outcomes": {str(k): v for k, v in checkpoint.outcomes.items()},
            "optimizer": {name: len(arrays) for name, arrays in checkpoint.optimizer.items()},
            "adapter": len(checkpoint.adapter)}
    path = Path(run_dir) / CHECKPOINT_FILE
    partial = path.with_suffix(".partial")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(partial),
              metadata={"fedcare": json.dumps(meta)})
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    partial.replace(path)  # whole or absent: a kill leaves the previous round's
    return path


class CheckpointError(FedcareError, RuntimeError):
    """There is no checkpoint to resume from, or it is not one this code wrote."""


def load(run_dir: Path) -> Checkpoint:
    from safetensors import safe_open

    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the run stopped before its first "
                              "round ended, so there is nothing to resume; start it again")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = json.loads((handle.metadata() or {})["fedcare"])
        tensors = load_file(str(path))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        adapter = [tensors[f"adapter.{i}"] for i in range(int(meta["adapter"]))]
        optimizer = {name: [tensors[f"{name}.{i}"] for i in range(int(count))]
                     for name, count in meta["optimizer"].items()}
        return Checkpoint(int(meta["round"]), str(meta["run_id"]), adapter,
                          int(meta["steps"]), {str(k): str(v) for k, v in meta["owners"].items()},
                          {int(k): str(v) for k, v in meta["outcomes"].items()}, optimizer)
    except (KeyError, ValueError, TypeError, OSError) as err:
        raise CheckpointError(f"{path} is not a checkpoint this version can resume "
                              f"from ({type(err).__name__}: {err})") from None
