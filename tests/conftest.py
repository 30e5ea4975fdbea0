"""Shared fixtures: a tiny BERT written to disk as a local model folder, and small
labelled CSV files. Nothing downloads."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

WORDS = ("fever cough chest pain fracture femur rash skin itch anxiety depression "
         "insomnia diabetes thyroid kidney stone pregnancy nausea headache migraine").split()
LABELS = ("respiratory", "injury", "skin", "mental")
# each label has cue words; every record mixes cues of its label with noise words
CUES = {"respiratory": ("fever", "cough", "chest"), "injury": ("fracture", "femur", "pain"),
        "skin": ("rash", "skin", "itch"), "mental": ("anxiety", "depression", "insomnia")}


def write_tiny_model(directory: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(directory / "vocab.txt")).save_pretrained(str(directory))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # deterministic gradients
    BertModel(config).save_pretrained(str(directory))  # an encoder, like the embedded MiniLM
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


def write_records(path: Path, n: int, seed: int, skew: str | None = None) -> Path:
    """CSV of n records; `skew` makes one label three times as common."""
    rng = random.Random(seed)
    weights = [3 if label == skew else 1 for label in LABELS]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["note", "diagnosis"])
        for _ in range(n):
            label = rng.choices(LABELS, weights)[0]
            words = [rng.choice(CUES[label]) for _ in range(2)] + rng.sample(WORDS, 2)
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return path


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
