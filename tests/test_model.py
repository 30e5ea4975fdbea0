"""Only adapter + head travel; the saved adapter is plain PEFT and reloads exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import LoraConfig
from common.model import (ModelError, build_base, build_model, get_adapter_arrays, load_adapter,
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

    rng = np.random.default_rng(0)
    set_adapter_arrays(model, [rng.normal(0, 0.5, a.shape).astype(np.float32)
                               for a in get_adapter_arrays(model)])
    out = save_adapter(model, tmp_path / "adapter", LABELS, str(tiny_model), 16)
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))

    tok = load_tokenizer(str(tiny_model))
    batch = tok(["fever cough", "rash skin itch femur"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    plain = PeftModel.from_pretrained(build_base(str(tiny_model), 3), str(out)).eval()
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


def _batch(tiny_model, texts):
    return load_tokenizer(str(tiny_model))(texts, padding=True, return_tensors="pt")


def test_mean_pooling_is_the_attention_masked_mean_of_the_encoder(tiny_model):
    from common.model import classifier_of

    model = build_model(str(tiny_model), 3, LoraConfig(r=2)).eval()
    batch = _batch(tiny_model, ["fever", "rash skin itch femur cough"])  # row 0 is padded
    inner = classifier_of(model)
    with torch.no_grad():
        hidden = inner.encoder(**batch).last_hidden_state  # (B, T, H)
        pooled = inner.features(batch["input_ids"], batch["attention_mask"])
        mask = batch["attention_mask"]
        for row in range(2):
            length = int(mask[row].sum())
            torch.testing.assert_close(pooled[row], hidden[row, :length].mean(0))
        # padding never changes a record's prediction
        alone = model(**_batch(tiny_model, ["fever"])).logits
        torch.testing.assert_close(model(**batch).logits[0], alone[0], atol=1e-5, rtol=1e-4)


def test_cls_pooling_reads_the_encoder_pooler(tiny_model):
    from common.model import classifier_of

    model = build_model(str(tiny_model), 3, LoraConfig(r=2), pooling="cls").eval()
    batch = _batch(tiny_model, ["fever cough", "rash"])
    inner = classifier_of(model)
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        torch.testing.assert_close(inner.features(ids, mask),
                                   inner.encoder(input_ids=ids, attention_mask=mask).pooler_output)
    with pytest.raises(ModelError, match="model.pooling"):
        build_model(str(tiny_model), 3, LoraConfig(r=2), pooling="max")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_adapter_folder_records_what_rebuilds_the_classifier(tiny_model, tmp_path, pooling):
    import json

    model = build_model(str(tiny_model), 3, LoraConfig(r=2), pooling=pooling)
    rng = np.random.default_rng(1)
    set_adapter_arrays(model, [rng.normal(0, 0.5, a.shape).astype(np.float32)
                               for a in get_adapter_arrays(model)])
    out = save_adapter(model, tmp_path / "a", LABELS, str(tiny_model), 16)
    meta = json.loads((out / "labels.json").read_text())
    assert meta == {"labels": list(LABELS), "base_model": str(tiny_model),
                    "pooling": pooling, "max_length": 16}
    batch = _batch(tiny_model, ["fever cough", "rash"])
    model.eval()
    reloaded, _, _ = load_adapter(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
