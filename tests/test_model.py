"""Only adapter + head travel; the saved adapter is plain PEFT and reloads exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import LoraConfig
from common.model import (ModelError, build_model, get_adapter_arrays, load_adapter,
                          load_tokenizer, save_adapter, set_adapter_arrays, trainable_names)

LABELS = ("a", "b", "c")


@pytest.fixture()
def model(tiny_model):
    return build_model(str(tiny_model), len(LABELS), LoraConfig(r=2, alpha=4))


def test_only_lora_and_head_are_trainable_and_travel(model):
    names = trainable_names(model)
    assert names and all(("lora_A" in n or "lora_B" in n or "classifier" in n) for n in names)
    assert any("classifier" in n for n in names)
    arrays = get_adapter_arrays(model)
    assert len(arrays) == len(names)
    total = sum(p.numel() for p in model.parameters())
    sent = sum(a.size for a in arrays)
    assert sent < 0.2 * total


def test_head_initialisation_is_the_same_on_every_site(tiny_model):
    a = get_adapter_arrays(build_model(str(tiny_model), 3, LoraConfig(r=2)))
    b = get_adapter_arrays(build_model(str(tiny_model), 3, LoraConfig(r=2)))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_bad_updates_are_rejected_whole(model):
    before = get_adapter_arrays(model)
    bad_shape = [a.copy() for a in before]
    bad_shape[-1] = np.zeros((7,), dtype=np.float32)
    bad_value = [a + 1 for a in before]
    bad_value[-1][0] = np.nan
    for update, message in [(bad_shape, "shape"), (bad_value, "NaN"), (before[:-1], "tensors")]:
        with pytest.raises(ModelError, match=message):
            set_adapter_arrays(model, update)
        assert all(np.array_equal(x, y) for x, y in zip(before, get_adapter_arrays(model)))


def test_saved_adapter_reloads_with_plain_peft_and_gives_identical_logits(model, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    rng = np.random.default_rng(0)
    set_adapter_arrays(model, [rng.normal(0, 0.5, a.shape).astype(np.float32)
                               for a in get_adapter_arrays(model)])
    out = save_adapter(model, tmp_path / "adapter", LABELS, str(tiny_model))
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))

    tok = load_tokenizer(str(tiny_model))
    batch = tok(["fever cough", "rash skin itch femur"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=3)
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        got = plain(**batch).logits
    torch.testing.assert_close(got, expected)
    ours, _, labels = load_adapter(out)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, expected)
    assert labels == LABELS


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not a local Hugging Face model folder"):
        build_model(str(tmp_path), 2, LoraConfig())
