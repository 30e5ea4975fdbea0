"""Site datasets: the embedded ICD-10-CM task, CSV/JSONL files, splits and partitions.

A `TextDataset` is three parallel tuples (text, label index, group). The group is
what must never straddle a split: for ICD-10 it is the 3-character category, so
near-copies of one code (laterality, encounter) stay on one side.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.config import DataConfig

ICD10_CHAPTERS = 18  # chapters 1-18 are diagnoses; 19-22 are injuries, causes, factors


class DataError(ValueError):
    """A data file or a data setting cannot be used; the message says where and why."""


@dataclass(frozen=True)
class TextDataset:
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    groups: tuple[str, ...]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "TextDataset":
        return TextDataset(
            texts=tuple(self.texts[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            groups=tuple(self.groups[i] for i in indices),
            label_names=self.label_names,
        )

    def label_counts(self) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64),
                           minlength=len(self.label_names)).tolist()


def load_icd10() -> TextDataset:
    """ICD-10-CM leaf-code descriptions labelled with their chapter (1-18)."""
    with warnings.catch_warnings():  # the package reads its data with a deprecated API
        warnings.simplefilter("ignore", DeprecationWarning)
        import simple_icd_10_cm as cm

    chapters = [str(i) for i in range(1, ICD10_CHAPTERS + 1)]
    names = tuple(cm.get_description(c).rsplit(" (", 1)[0] for c in chapters)
    index = {c: i for i, c in enumerate(chapters)}
    texts, labels, groups = [], [], []
    for code in cm.get_all_codes(False):
        if not cm.is_leaf(code):
            continue
        chapter = cm.get_ancestors(code)[-1]
        if chapter not in index:
            continue
        texts.append(cm.get_description(code))
        labels.append(index[chapter])
        groups.append(code[:3])
    return TextDataset(tuple(texts), tuple(labels), tuple(groups), names)


def read_records(path: str | Path, text_column: str, label_column: str,
                 label_names: Sequence[str], group_column: str = "") -> TextDataset:
    """Read a CSV or JSONL file of (text, label) records; labels are given by name.

    Every problem is reported with the file and line number; no row is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    index = {name: i for i, name in enumerate(label_names)}
    texts, labels, groups = [], [], []
    for line_no, row in _rows(path):
        for column in (text_column, label_column):
            if column not in row:
                raise DataError(f"{path}:{line_no}: missing column {column!r} "
                                f"(columns: {sorted(row)})")
        text, label = row[text_column], str(row[label_column]).strip()
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{line_no}: empty or non-text value in {text_column!r}")
        if label not in index:
            raise DataError(f"{path}:{line_no}: unknown label {label!r}; "
                            f"declared labels: {list(label_names)}")
        texts.append(text.strip())
        labels.append(index[label])
        groups.append(str(row.get(group_column, "")) if group_column else f"{path.name}:{line_no}")
    if not texts:
        raise DataError(f"{path}: no records (the file is empty)")
    return TextDataset(tuple(texts), tuple(labels), tuple(groups), tuple(label_names))


def _rows(path: Path):
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: spreadsheet exports
        if suffix == ".csv":
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                return
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise DataError(f"{path}:{reader.line_num}: expected "
                                    f"{len(reader.fieldnames)} fields, found a different number")
                yield reader.line_num, row
        elif suffix in (".jsonl", ".ndjson"):
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object per line")
                yield line_no, row
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv or .jsonl")


def split_by_group(ds: TextDataset, fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """(rest, held_out): about `fraction` of records held out, whole groups at a time."""
    groups = sorted(set(ds.groups))
    random.Random(seed).shuffle(groups)
    target = fraction * len(ds)
    sizes: dict[str, int] = {}
    for g in ds.groups:
        sizes[g] = sizes.get(g, 0) + 1
    held, count = set(), 0
    for g in groups:
        if count >= target:
            break
        held.add(g)
        count += sizes[g]
    rest = [i for i, g in enumerate(ds.groups) if g not in held]
    out = [i for i, g in enumerate(ds.groups) if g in held]
    if not rest or not out:
        raise DataError(f"cannot split {len(ds)} records into two non-empty parts "
                        f"by group with fraction {fraction}")
    return ds.subset(rest), ds.subset(out)


def partition(ds: TextDataset, num_sites: int, cfg: DataConfig) -> list[list[int]]:
    """Indices of each site's records: label skew by Dirichlet(alpha), optional size skew."""
    from datasets import Dataset
    from flwr_datasets.partitioner import InnerDirichletPartitioner

    if num_sites > len(ds):
        raise DataError(f"cannot give {num_sites} sites data from {len(ds)} records")
    rng = np.random.default_rng(cfg.seed)
    weights = (rng.lognormal(0.0, cfg.quantity_skew, num_sites)
               if cfg.quantity_skew > 0 else np.ones(num_sites))
    sizes = np.floor(weights / weights.sum() * len(ds)).astype(int)
    sizes[-1] = len(ds) - sizes[:-1].sum()
    if cfg.partition == "iid":
        order = rng.permutation(len(ds))
        bounds = np.cumsum(sizes)[:-1]
        return [sorted(part.tolist()) for part in np.split(order, bounds)]
    table = Dataset.from_dict({"label": list(ds.labels), "row": list(range(len(ds)))})
    partitioner = InnerDirichletPartitioner(
        partition_sizes=sizes.tolist(), partition_by="label", alpha=cfg.alpha, seed=cfg.seed
    )
    partitioner.dataset = table
    return [sorted(partitioner.load_partition(i)["row"]) for i in range(num_sites)]


@dataclass(frozen=True)
class SiteData:
    train: TextDataset
    val: TextDataset
    fingerprint: str  # identifies the records a privacy budget is spent on


def fingerprint(ds: TextDataset) -> str:
    """A digest of the records as a set of (text, label name): the same records give
    the same digest whatever their order in the file and whatever the order of the
    run's label list. It stays at the site (a digest of the data must not be sent: a
    party that knows every record but one could test guesses of the last against it);
    what a ledger records is a keyed digest of it (client/budget.py)."""
    digest = hashlib.sha256()
    for line in sorted(f"{ds.label_names[label]}\t{text}\n"
                       for text, label in zip(ds.texts, ds.labels)):
        digest.update(line.encode())
    return "sha256:" + digest.hexdigest()


def site_split(ds: TextDataset, val_fraction: float, seed: int,
               min_val_records: int = 1) -> SiteData:
    """(train, val) by group. A validation split smaller than `min_val_records` is
    refused: a handful of records chosen by a seed is one crafted query from exposure."""
    train, val = split_by_group(ds, val_fraction, seed)
    if len(val) < min_val_records:
        raise DataError(f"the validation split has {len(val)} record(s), fewer than the "
                        f"site's minimum of {min_val_records}; raise the validation "
                        "fraction or lower min-val-records")
    return SiteData(train=train, val=val, fingerprint=fingerprint(ds))


_CACHE: dict = {}


def process_cached(key, make):
    """make() once per process for `key` (Ray actors and SuperNodes serve many rounds)."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def held_out(cfg: DataConfig) -> tuple[TextDataset | None, TextDataset]:
    """(pool the sites share out, held-out test set). For source=files there is no pool."""
    def make():
        if cfg.source == "icd10":
            return split_by_group(load_icd10(), cfg.test_fraction, cfg.seed)
        if not cfg.test_file:
            raise DataError("data.test_file is required when data.source is 'files'")
        return None, read_records(cfg.test_file, cfg.text_column, cfg.label_column, cfg.labels)
    return process_cached(("held_out", cfg), make)


def federated_data(cfg: DataConfig, num_sites: int,
                   min_val_records: int = 1) -> tuple[list[SiteData], TextDataset]:
    """Every site's (train, val) and the held-out test set, for a simulation.

    Deterministic under `cfg.seed`; cached per process because Ray actors serve many
    rounds.
    """
    def make():
        pool, test = held_out(cfg)
        if pool is not None:
            parts = [pool.subset(p) for p in partition(pool, num_sites, cfg)]
        elif len(cfg.site_files) != num_sites:
            raise DataError(f"data.site_files must list one file per simulated site "
                            f"({num_sites}); it lists {len(cfg.site_files)}")
        else:
            parts = [read_records(p, cfg.text_column, cfg.label_column, cfg.labels)
                     for p in cfg.site_files]
        sites = [site_split(part, cfg.val_fraction, cfg.seed + i, min_val_records)
                 for i, part in enumerate(parts)]
        return sites, test
    return process_cached(("federated", cfg, num_sites, min_val_records), make)
