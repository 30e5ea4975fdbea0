"""Site datasets: the embedded ICD-10-CM task, CSV/JSONL files, splits and partitions.

A `TextDataset` is parallel tuples (text, label index, group, and patient where the
records name patients). The group is what must never straddle a split: for ICD-10 it
is the 3-character category, so near-copies of one code (laterality, encounter) stay
on one side; a file's records with patients are split by patient.

Size: every way records enter fedcare (the embedded task, files, splits, partitions),
with the one reader of CSV and JSONL records.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.config import DataConfig
from common.errors import DataError
from common.patients import check_patient_ids, shared_patients, synthetic_patients

ICD10_CHAPTERS = 18  # chapters 1-18 are diagnoses; 19-22 are injuries, causes, factors


@dataclass(frozen=True)
class TextDataset:
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    groups: tuple[str, ...]
    label_names: tuple[str, ...]
    patients: tuple[str, ...] = ()  # each record's patient; () = the records name none

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "TextDataset":
        return TextDataset(
            texts=tuple(self.texts[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            groups=tuple(self.groups[i] for i in indices),
            label_names=self.label_names,
            patients=tuple(self.patients[i] for i in indices) if self.patients else (),
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
                 label_names: Sequence[str], group_column: str = "",
                 patient_column: str = "", held_out: TextDataset | None = None,
                 held_out_path: str | Path = "") -> TextDataset:
    """Read a CSV or JSONL file of (text, label) records; labels are given by name.
    With `patient_column`, every record must name its patient, and none of them may
    have records in `held_out` (the test set, read from `held_out_path`).

    The file must be UTF-8 (a spreadsheet's byte-order mark is allowed). Every problem
    is a DataError with the file and line number (1-based); no row is dropped.
    """
    path = Path(path)
    repeated = sorted({n for n in label_names if list(label_names).count(n) > 1})
    if repeated:
        raise DataError(f"the declared labels name {repeated[0]!r} more than once; label "
                        "names must be distinct", path=path)
    index = {name: i for i, name in enumerate(label_names)}
    texts, labels, groups, patients, lines = [], [], [], [], []
    for line_no, row, _ in file_rows(path):
        for column in (text_column, label_column, *([patient_column] * bool(patient_column))):
            if column not in row:
                raise DataError(f"missing column {column!r} (columns: "
                                f"{_short(sorted(map(str, row)))})", path=path, line=line_no)
        text, label = row[text_column], _as_text(row[label_column])
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"empty or non-text value in {text_column!r}",
                            path=path, line=line_no)
        if not _encodable(text):
            raise DataError(f"the value in {text_column!r} holds an unpaired surrogate "
                            "escape (such as \\ud800), which is not text",
                            path=path, line=line_no)
        if label is None:
            raise DataError(f"non-text value in {label_column!r}", path=path, line=line_no)
        if label not in index:
            raise DataError(f"unknown label {_short(label)}; declared labels: "
                            f"{_short(list(label_names))}", path=path, line=line_no)
        texts.append(text.strip())
        labels.append(index[label])
        groups.append((_as_text(row.get(group_column, "")) or "") if group_column
                      else f"{path.name}:{line_no}")
        if patient_column:
            patients.append(_as_text(row[patient_column]) or "")
            lines.append(line_no)
    if patient_column:
        check_patient_ids(patients, lines, path, patient_column)
        if held_out is not None:
            shared_patients(patients, lines, held_out.patients, path, held_out_path)
    return TextDataset(tuple(texts), tuple(labels), tuple(groups), tuple(label_names),
                       tuple(patients))


INPUT_SUFFIXES = (".csv", ".jsonl", ".ndjson")


def file_rows(path: str | Path, *, collect_errors: bool = False):
    """(line, row, error) per record of a CSV or JSONL file; lines count from 1.

    Strict (the default; training data must be whole): the first bad record is a
    DataError naming the file and line, and so is a file with no record. With
    `collect_errors` (notes to predict): a bad record comes back as (line, None, why)
    and the others are still read. Either way a file that cannot be read as records at
    all (missing, another type, not UTF-8 text, a header naming a column twice, a quote
    left open to the end) is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise DataError(f"unsupported file type {suffix!r}; use .csv or .jsonl", path=path)
    raw = path.read_bytes()
    if b"\x00" in raw:  # UTF-16 or a binary file: valid UTF-8 byte by byte, but not text
        line = raw[:raw.index(b"\x00")].count(b"\n") + 1
        raise DataError("holds a NUL byte: not a text file (UTF-16?); save it as UTF-8",
                        path=path, line=line)
    try:
        content = raw.decode("utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError("not UTF-8 text; save the file as UTF-8", path=path, line=line) from None
    records = _csv_rows(path, content) if suffix == ".csv" else _jsonl_rows(content)
    found = False
    for line_no, row, error in records:
        found = True
        if error and not collect_errors:
            raise DataError(error, path=path, line=line_no)
        yield line_no, row, error
    if not found and not collect_errors:
        if not content.strip():
            raise DataError("no records (the file is empty)", path=path, line=1)
        raise DataError("no records after the header", path=path,
                        line=content.count("\n") + (not content.endswith("\n")) + 1)


def _csv_rows(path: Path, content: str):
    reader = csv.DictReader(io.StringIO(content, newline=""))
    done = 0  # the last line of the last record read
    try:
        header = reader.fieldnames or []
        if header == [] and content.strip():
            raise DataError("the first line is empty; it must name the columns",
                            path=path, line=1)
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            raise DataError(f"the header names column {_short(repeated[0])} more than once",
                            path=path, line=1)
        done = reader.line_num
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                found = sum(v is not None for k, v in row.items() if k is not None)
                found += len(row.get(None) or ())
                spans = (f" (this record runs from line {done + 1}: is a quote left open?)"
                         if reader.line_num > done + 1 else "")
                yield (reader.line_num, None,
                       f"expected {len(header)} fields, found {found}{spans}")
            else:
                yield reader.line_num, row, ""
            done = reader.line_num
    except csv.Error as err:  # a field over the reader's limit, often an unclosed quote
        raise DataError(f"unreadable CSV in the record after line {done} ({err}; a quote "
                        "left open makes the rest of the file one field)",
                        path=path, line=done + 1) from None


def _jsonl_rows(content: str):
    for line_no, line in enumerate(io.StringIO(content, newline=""), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield line_no, None, f"invalid JSON ({err.msg})"
            continue
        except (ValueError, RecursionError) as err:  # huge integers, deep nesting
            yield line_no, None, f"unreadable JSON ({_short(str(err))})"
            continue
        if isinstance(row, dict):
            yield line_no, row, ""
        else:
            yield line_no, None, "expected a JSON object per line"


def _as_text(value) -> str | None:
    """A label or group as text: strings stripped, numbers as written; else None."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)):
        try:
            return str(value)
        except ValueError:  # an integer too long to print
            return None
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(value, limit: int = 120) -> str:
    """repr(value) short enough for a one-line error."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def split_by_group(ds: TextDataset, fraction: float, seed: int,
                   by: Sequence[str] = ()) -> tuple[TextDataset, TextDataset]:
    """(rest, held_out): about `fraction` of records held out, whole groups at a time
    (`by`: each record's group; default its `groups`)."""
    by = tuple(by) or ds.groups
    groups = sorted(set(by))
    random.Random(seed).shuffle(groups)
    target = fraction * len(ds)
    sizes: dict[str, int] = {}
    for g in by:
        sizes[g] = sizes.get(g, 0) + 1
    held, count = set(), 0
    for g in groups:
        if count >= target:
            break
        held.add(g)
        count += sizes[g]
    rest = [i for i, g in enumerate(by) if g not in held]
    out = [i for i, g in enumerate(by) if g in held]
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
    # (training row, head-weight coordinate) of the gradient canaries an empirical audit
    # added (common/privacy/canaries.py); empty everywhere else
    gradient_canaries: tuple[tuple[int, int], ...] = ()


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
    """(train, val) by group, or by patient where the records name patients. A
    validation split smaller than `min_val_records` is refused: a handful of records
    chosen by a seed is one crafted query from exposure."""
    train, val = split_by_group(ds, val_fraction, seed, ds.patients or ds.groups)
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
        return None, read_records(cfg.test_file, cfg.text_column, cfg.label_column,
                                  cfg.labels, patient_column=cfg.patient_column)
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
            parts = [read_site_file(cfg, path, test) for path in cfg.site_files]
        sites = [with_patients(site_split(part, cfg.val_fraction, cfg.seed + i,
                                          min_val_records), cfg, i)
                 for i, part in enumerate(parts)]
        return sites, test
    return process_cached(("federated", cfg, num_sites, min_val_records), make)


def read_site_file(cfg: DataConfig, path: str, test: TextDataset) -> TextDataset:
    """A simulated site's file, its patients checked against the test file's."""
    return read_records(path, cfg.text_column, cfg.label_column, cfg.labels,
                        patient_column=cfg.patient_column, held_out=test,
                        held_out_path=cfg.test_file)


def with_patients(data: SiteData, cfg: DataConfig, site: int) -> SiteData:
    """`data` with synthetic patients (`data.patients`, the embedded task), made
    separately on each side of the split so that none has notes on both; then, with
    `data.max_notes_per_patient`, each patient's training notes cut to that many."""
    def side(ds: TextDataset, name: str, offset: int) -> TextDataset:
        ids = synthetic_patients(ds.labels, cfg.notes_per_patient, cfg.notes_spread,
                                 cfg.comorbidity, cfg.seed * 1000 + 2 * site + offset,
                                 f"site{site}-{name}-p")
        return dataclasses.replace(ds, patients=ids)
    if cfg.patients:
        data = dataclasses.replace(data, train=side(data.train, "train", 0),
                                   val=side(data.val, "val", 1))
    if cfg.max_notes_per_patient:
        data = dataclasses.replace(data, train=at_most(data.train, cfg.max_notes_per_patient,
                                                       cfg.seed + site))
    return data


def at_most(ds: TextDataset, notes: int, seed: int) -> TextDataset:
    """`ds` with at most `notes` records of each patient, chosen at random by `seed`."""
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    kept, taken = [], {}
    for i in order:
        patient = ds.patients[i]
        if taken.get(patient, 0) < notes:
            taken[patient] = taken.get(patient, 0) + 1
            kept.append(i)
    return ds.subset(sorted(kept))
