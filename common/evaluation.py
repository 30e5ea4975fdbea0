"""Token batches and the one evaluation loop, shared by sites, server and predict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from common.data import TextDataset
from common.metrics import classification_metrics


@dataclass(frozen=True)
class Encoded:
    """Token ids of a dataset, unpadded; padding happens per chunk."""
    ids: tuple[tuple[int, ...], ...]
    labels: torch.Tensor  # (N,) int64
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def pieces(self, rows: Sequence[int], size: int) -> list[list[int]]:
        return chunks(self, rows, size)

    def logits(self, model, rows: Sequence[int], device: torch.device) -> torch.Tensor:
        """(B, K) from the whole classifier: token ids in, logits out."""
        ids, mask, _ = collate(self, rows, device)
        return model(input_ids=ids, attention_mask=mask).logits


@dataclass(frozen=True)
class Features:
    """Pooled encoder outputs of a dataset, computed once while the encoder is frozen:
    a round that trains only the head reads these instead of running the encoder."""
    x: torch.Tensor       # (N, H) float32
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def pieces(self, rows: Sequence[int], size: int) -> list[list[int]]:
        rows = list(rows)
        return [rows[k: k + size] for k in range(0, len(rows), size)]

    def logits(self, head, rows: Sequence[int], device: torch.device) -> torch.Tensor:
        """(B, K) from the head alone."""
        return head(self.x[list(rows)].to(device))


@torch.no_grad()
def _per_row(model, data: "Encoded | Features", batch_size: int, compute) -> torch.Tensor:
    """(N, D): `compute(rows)` -> (B, D) for every record, in data order, with `model`
    in eval mode (no dropout); token rows come length-sorted from `data.pieces`."""
    was_training = model.training
    model.eval()
    out = torch.empty((len(data), 0))
    try:
        for rows in data.pieces(range(len(data)), batch_size):
            values = compute(rows).float().cpu()
            if out.shape[1] == 0:
                out = torch.empty((len(data), values.shape[1]))
            out[rows] = values
    finally:
        model.train(was_training)
    return out


def pooled_features(classifier, data: Encoded, device: torch.device,
                    batch_size: int = 256) -> Features:
    """`classifier.features` of every record, in data order."""
    def compute(rows):
        ids, mask, _ = collate(data, rows, device)
        return classifier.features(ids, mask)  # (B, H)
    return Features(_per_row(classifier, data, batch_size, compute), data.labels)


def encode(ds: TextDataset, tokenizer, max_length: int) -> Encoded:
    out = tokenizer(list(ds.texts), truncation=True, max_length=max_length)
    return Encoded(tuple(tuple(x) for x in out["input_ids"]),
                   torch.tensor(ds.labels, dtype=torch.long), tokenizer.pad_token_id or 0)


def collate(data: Encoded, rows: Sequence[int], device: torch.device):
    """(input_ids, attention_mask, labels) padded to the longest row: (B, T), (B, T), (B,)."""
    longest = max(len(data.ids[i]) for i in rows)
    ids = torch.full((len(rows), longest), data.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for j, i in enumerate(rows):
        ids[j, : len(data.ids[i])] = torch.tensor(data.ids[i])
        mask[j, : len(data.ids[i])] = 1
    return ids.to(device), mask.to(device), data.labels[list(rows)].to(device)


def chunks(data: Encoded, rows: Sequence[int], size: int) -> list[list[int]]:
    """Rows sorted by length and cut into pieces of at most `size` (less padding)."""
    ordered = sorted(rows, key=lambda i: len(data.ids[i]))
    return [ordered[k: k + size] for k in range(0, len(ordered), size)]


def predict_probs(model, data: Encoded | Features, device: torch.device,
                  batch_size: int = 256) -> np.ndarray:
    """(N, C) softmax probabilities, in the order of `data` (`model` is the whole
    classifier for token ids, the head for features)."""
    return _per_row(model, data, batch_size, lambda rows: torch.softmax(
        data.logits(model, rows, device).float(), -1)).numpy()


def evaluate(model, data: Encoded | Features, num_classes: int, device: torch.device) -> dict[str, float]:
    probs = predict_probs(model, data, device)
    labels = data.labels.numpy()
    metrics = classification_metrics(probs, labels, num_classes)
    metrics["loss"] = float(-np.log(np.clip(probs[np.arange(len(labels)), labels],
                                            1e-12, None)).mean())
    return metrics
