"""Shared fixtures: a tiny BERT written to disk as a local model folder, and small
labelled CSV files (simulations/tiny.py, which the device check shares). Nothing
downloads."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from simulations.tiny import CUES, LABELS, WORDS, write_records, write_tiny_model

__all__ = ["CUES", "LABELS", "WORDS", "tiny_config", "write_patient_records", "write_records",
           "write_tiny_model"]  # the tests import these from here


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


def write_patient_records(path: Path, patients: int, seed: int, prefix: str = "p",
                          blank_at: int | None = None) -> Path:
    """CSV (note, diagnosis, patient): each patient 1-12 notes, mostly of one label."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["note", "diagnosis", "patient"])
        line = 1
        for p in range(patients):
            own = rng.choice(LABELS)
            for _ in range(rng.randint(1, 12)):
                label = own if rng.random() < 0.8 else rng.choice(LABELS)
                words = [rng.choice(CUES[label]) for _ in range(2)] + rng.sample(WORDS, 2)
                line += 1
                writer.writerow([" ".join(words), label,
                                 "" if line == blank_at else f"{prefix}{p}"])
    return path


@pytest.fixture(scope="session")
def site_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sites")
    return {
        "sites": [write_records(root / f"site{i}.csv", 120, seed=i, skew=LABELS[i])
                  for i in range(2)],
        "test": write_records(root / "test.csv", 80, seed=99),
    }


def tiny_config(model_dir: Path, files: dict, **sections):
    from common.config import from_mapping

    data = {"model": {"base_model": str(model_dir), "max_length": 16},
            "lora": {"r": 2, "alpha": 4},
            "data": {"source": "files", "site_files": [str(p) for p in files["sites"]],
                     "test_file": str(files["test"]), "text_column": "note",
                     "label_column": "diagnosis", "labels": list(LABELS)},
            "train": {"batch_size": 16, "local_steps": 2, "learning_rate": 0.05,
                      "chunk_size": 8, "threads": 1, "head_rounds": 0,  # LoRA rounds
                      "head_steps": 4, "head_batch_size": 32},
            "federation": {"num_rounds": 2, "min_sites": 2},
            "site": {"min_val_records": 5},  # the tiny files' sites hold 6-12 val records
            "simulation": {"num_sites": 2, "cpus_per_site": 1}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return from_mapping(data)
