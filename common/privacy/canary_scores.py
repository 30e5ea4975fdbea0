"""How the empirical audit scores its canaries (common/privacy/canaries.py).

Input canaries: minus the final global model's loss on each (a canary patient's: the
mean over its notes). Gradient canaries: from
the updates the server saw (`UpdateLog`), less what the operator can predict of the real
records' pull on each canary's coordinate without knowing the canaries. Nothing here
sees which canaries were included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.config import Config
from common.privacy import canaries


class UpdateLog:
    """What the server saw of the head's weight (labels x features) in each site's update,
    per round, and the operator's scores of the gradient canaries from it.

    A canary's coordinate also moves with the real gradients (the pull of every record on
    that class and feature), which is the same whether the canary is in or out and hides
    it. The score removes what the operator can predict of that pull without knowing the
    canaries: (1) the part of each row in the span of the encoder's features, estimated
    from public records (real gradients of a linear head lie in that span; a canary's
    single coordinate mostly does not); (2) per row, what the other sites' moves predict,
    fitted on the coordinates that hold no canary. What is left at a canary's coordinate,
    summed over rounds and weighted by 1 / the round's spread, is its score."""

    def __init__(self, head_index: int, shape: tuple[int, int],
                 coordinates: dict[str, np.ndarray], basis: np.ndarray | None = None) -> None:
        self.head_index, self.shape = head_index, shape
        self.coordinates = coordinates
        self.basis = basis  # (features, k): orthonormal, the public features' main span
        self.moves: dict[int, dict[str, np.ndarray]] = {}  # round -> site -> (labels, features)

    def __call__(self, round_no: int, site: str, sent: list, update: list) -> None:
        if not sent or len(update) <= self.head_index:
            return
        move = (np.asarray(update[self.head_index], dtype=np.float64)
                - np.asarray(sent[self.head_index], dtype=np.float64))
        if move.shape == self.shape:
            if self.basis is not None:
                move = move - move @ self.basis @ self.basis.T
            self.moves.setdefault(round_no, {})[site] = move

    def scores(self, site: str) -> np.ndarray:
        """One score per canary of `site`, in its coordinates' order; 0 where the site
        sent nothing."""
        at = self.coordinates[site]
        free = np.ones(self.shape[0] * self.shape[1], dtype=bool)
        for coordinates in self.coordinates.values():
            free[coordinates] = False
        free = free.reshape(self.shape)
        total = np.zeros(len(at))
        for moves in self.moves.values():
            if site not in moves:
                continue
            own = moves[site]
            others = [m for s, m in moves.items() if s != site]
            if others:
                own = own - _predicted(own, np.mean(others, axis=0), free)
            moved = -own.reshape(-1)[at]  # a step goes against the gradient
            spread = float(moved.var())
            if spread > 0:
                total += moved / spread
        return total


def _predicted(own: np.ndarray, others: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Per row, a + b · others, least squares over the row's coordinates without canaries."""
    out = np.zeros_like(own)
    for row in range(own.shape[0]):
        x, y = others[row][free[row]], own[row][free[row]]
        if len(x) < 3:
            continue
        (b, a), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], axis=1), y, rcond=None)
        out[row] = a + b * others[row]
    return out


def feature_basis(cfg: Config, model, texts: list, rank: int = 32) -> np.ndarray | None:
    """An orthonormal (features, k) basis of where real gradients of the head's rows
    live: the top `rank` directions of the pooled features (initial encoder) of each
    group of `texts` (the public held-out records; the input canaries, whose random
    labels pull hardest), together. None when the features are too few to leave a
    canary's coordinate room outside."""
    import torch

    from common.evaluation import encode, pooled_features
    from common.model import classifier_of, load_tokenizer

    tokenizer = load_tokenizer(cfg.model.base_model)
    parts = []
    for group in texts:
        data = encode(group, tokenizer, cfg.model.max_length)
        x = pooled_features(classifier_of(model), data, torch.device("cpu")).x.double()
        parts.append(np.linalg.svd(x.numpy(), full_matrices=False)[2][:rank])
    stacked = np.concatenate(parts)
    if stacked.shape[1] <= 2 * len(stacked):
        return None
    q, _ = np.linalg.qr(stacked.T)
    return q


def input_scores(run_dir: Path, inputs) -> np.ndarray:
    """Minus the final global model's cross-entropy on each input canary, averaged over
    the canary's notes (a patient's mean loss: the same order as the summed loss)."""
    import torch

    from common.evaluation import encode, pooled_features, predict_probs
    from common.model import classifier_of, load_adapter, trainable_head

    model, tokenizer, labels = load_adapter(run_dir / "adapter")
    ds = canaries.as_dataset(inputs, labels)
    device = torch.device("cpu")
    data = encode(ds, tokenizer, tokenizer.model_max_length)  # as the adapter was trained
    probs = predict_probs(trainable_head(model), pooled_features(classifier_of(model), data,
                                                                 device), device)
    picked = probs[np.arange(len(ds)), np.asarray(ds.labels)]
    owner = canaries.owners(inputs)
    total = np.bincount(owner, np.log(np.clip(picked, 1e-30, None)), minlength=len(inputs))
    return total / np.bincount(owner, minlength=len(inputs))
