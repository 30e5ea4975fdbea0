"""A tiny BERT and small labelled CSV files, written on the spot: what the tests and
`python -m simulations.gpu_check` train on, so that neither downloads anything nor
waits on a real encoder. Each label has cue words, so a few steps learn something."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

WORDS = ("fever cough chest pain fracture femur rash skin itch anxiety depression "
         "insomnia diabetes thyroid kidney stone pregnancy nausea headache migraine").split()
LABELS = ("respiratory", "injury", "skin", "mental")
# each label has cue words; every record mixes cues of its label with noise words
CUES = {"respiratory": ("fever", "cough", "chest"), "injury": ("fracture", "femur", "pain"),
        "skin": ("rash", "skin", "itch"), "mental": ("anxiety", "depression", "insomnia")}


def write_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (hidden size 32) and its tokenizer over WORDS, saved as a
    local Hugging Face model folder, like the embedded MiniLM."""
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


def write_records(path: Path, n: int, seed: int, skew: str | None = None) -> Path:
    """CSV (note, diagnosis) of n records; `skew` makes one label three times as common."""
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
