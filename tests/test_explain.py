"""Word attributions on a case where the answer is known.

A tiny BERT is trained on synthetic notes whose label is 1 iff "fever" or "pneumonia"
appears (anywhere) among random filler words. The vocabulary has no "pneumonia": the
WordPiece tokenizer splits it into "pneu" + "##monia", which exercises the merge back to
whole words. Integrated Gradients must then put the decisive word on top.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from common.assist.explain import (
    Explanation, WordAttribution, attribute_texts, attribute_words,
)
from common.assist.render import render_html, render_terminal

FILLER = (
    "patient reports mild pain since yesterday denies nausea history of asthma "
    "taking ibuprofen daily feels tired and dizzy slept poorly appetite normal "
    "walked clinic today"
).split()
DECISIVE = ("fever", "pneumonia")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "fever", "pneu", "##monia"]
VOCAB += FILLER


def _sentence(rng: random.Random, decisive: str | None) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
    if decisive is not None:
        words.insert(rng.randint(0, len(words)), decisive)
    return " ".join(words)


def _dataset(rng: random.Random, n: int) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for i in range(n):
        decisive = None if i % 2 == 0 else DECISIVE[(i // 2) % 2]
        texts.append(_sentence(rng, decisive))
        labels.append(int(decisive is not None))
    return texts, labels


def _held_out(model, tokenizer, texts, labels) -> tuple[float, float]:
    """(accuracy, lowest probability given to the true label) on held-out texts."""
    model.eval()
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        probs = model(**enc).logits.softmax(-1)  # [N, 2]
    truth = torch.tensor(labels)
    accuracy = (probs.argmax(-1) == truth).float().mean().item()
    return accuracy, probs[torch.arange(len(labels)), truth].min().item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads; spares shared CPUs
    vocab_file = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    # transformers 5: the vocabulary is the `vocab` argument (a path or a dict);
    # `vocab_file=` is silently ignored and would leave every word [UNK].
    tokenizer = BertTokenizerFast(vocab=str(vocab_file))
    assert tokenizer.tokenize("Pneumonia") == ["pneu", "##monia"]

    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    rng = random.Random(0)
    train_x, train_y = _dataset(rng, 512)
    test_x, test_y = _dataset(rng, 200)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Train until every held-out note is right with p > 0.9 (about 4 epochs): a
    # confident model, whose decision flips within a narrow stretch of the IG path.
    for _epoch in range(20):
        model.train()
        order = list(range(len(train_x)))
        rng.shuffle(order)
        for lo in range(0, len(order), 32):
            batch = order[lo : lo + 32]
            enc = tokenizer([train_x[i] for i in batch], padding=True, return_tensors="pt")
            labels = torch.tensor([train_y[i] for i in batch])
            loss = model(**enc, labels=labels).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        accuracy, min_confidence = _held_out(model, tokenizer, test_x, test_y)
        if accuracy == 1.0 and min_confidence > 0.9:
            break
    model.eval()
    yield model, tokenizer, (accuracy, min_confidence)
    torch.set_num_threads(threads)


def test_tiny_model_learns_the_decisive_word(trained):
    _model, _tokenizer, (accuracy, min_confidence) = trained
    assert accuracy == 1.0 and min_confidence > 0.9


@pytest.mark.parametrize(
    "text",
    [
        "patient reports mild pain fever since yesterday",
        "fever patient denies nausea history of asthma",
        "taking ibuprofen daily feels tired and dizzy fever",
    ],
)
def test_decisive_word_gets_the_highest_attribution(trained, text):
    model, tokenizer, _ = trained
    expl = attribute_words(model, tokenizer, text)
    assert expl.label_index == 1 and expl.probability > 0.9
    best = max(expl.words, key=lambda w: w.score)
    assert best.word == "fever"
    others = [abs(w.score) for w in expl.words if w is not best]
    assert best.score > 10 * max(others)  # not a near tie: the filler carries ~nothing
    assert [w.word for w in expl.words] == text.split()  # special tokens dropped
    assert expl.approximation_error <= 0.05


def test_subword_split_word_is_merged_with_original_spelling_and_offsets(trained):
    model, tokenizer, _ = trained
    text = "Walked clinic today,  PNEUMONIA. appetite normal"
    assert tokenizer.tokenize("PNEUMONIA") == ["pneu", "##monia"]
    expl = attribute_words(model, tokenizer, text)
    assert expl.label_index == 1
    assert [w.word for w in expl.words] == [
        "Walked", "clinic", "today", ",", "PNEUMONIA", ".", "appetite", "normal",
    ]
    for w in expl.words:
        assert text[w.start : w.end] == w.word
    best = max(expl.words, key=lambda w: w.score)
    assert (best.word, best.start, best.end) == ("PNEUMONIA", 22, 31)


def test_scores_sum_to_probability_change_from_pad_baseline(trained):
    """Completeness: no sub-token is lost in the merge and specials carry nothing."""
    model, tokenizer, _ = trained
    text = "pneumonia feels tired pneumonia"
    expl = attribute_words(model, tokenizer, text)
    enc = tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"]
    baseline = ids.clone()
    baseline[0, 1:-1] = tokenizer.pad_token_id  # keep [CLS] ... [SEP]
    with torch.no_grad():
        p_text = model(**enc).logits.softmax(-1)[0, expl.label_index].item()
        p_base = model(input_ids=baseline).logits.softmax(-1)[0, expl.label_index].item()
    total = sum(w.score for w in expl.words)
    assert total - expl.convergence_delta == pytest.approx(p_text - p_base, abs=1e-4)
    assert abs(expl.convergence_delta) < 0.05 * abs(p_text - p_base)
    assert expl.probability == pytest.approx(p_text, abs=1e-6)


def test_coarse_integration_is_refined_until_completeness_holds(trained):
    """This confident model flips its decision within a narrow stretch of the IG path:
    32 steps miss most of it, so the text is recomputed with more steps."""
    model, tokenizer, _ = trained
    text = "patient reports mild pain fever since yesterday"
    coarse = attribute_words(model, tokenizer, text, n_steps=32, tolerance=None)
    refined = attribute_words(model, tokenizer, text, n_steps=32, tolerance=0.05)
    assert coarse.n_steps == 32 and coarse.approximation_error > 0.05
    assert 32 < refined.n_steps <= 512 and refined.approximation_error <= 0.05
    assert "scores approximate" in render_terminal(coarse, "x", color=False)
    assert "scores approximate" not in render_terminal(refined, "x", color=False)


def test_explicit_target_flips_the_sign_of_the_evidence(trained):
    model, tokenizer, _ = trained
    expl = attribute_words(model, tokenizer, "slept poorly fever appetite normal", target=0)
    assert expl.label_index == 0 and expl.probability < 0.1
    worst = min(expl.words, key=lambda w: w.score)
    assert worst.word == "fever" and worst.score < 0


def test_out_of_range_target_is_rejected_with_the_allowed_range(trained):
    model, tokenizer, _ = trained
    with pytest.raises(ValueError, match=r"target must be a label index in \[0, 1\]"):
        attribute_words(model, tokenizer, "fever", target=2)
    with pytest.raises(ValueError, match=r"targets\[1\] must be a label index"):
        attribute_texts(model, tokenizer, ["fever", "pain"], targets=[0, -1])


def test_slow_tokenizer_is_rejected_with_the_fix(trained):
    model, _tokenizer, _ = trained

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(TypeError, match="fast Hugging Face tokenizer"):
        attribute_words(model, SlowTokenizer(), "fever")


def test_works_under_no_grad_and_restores_training_mode(trained):
    model, tokenizer, _ = trained
    reference = attribute_words(model, tokenizer, "mild fever")
    model.train()
    try:
        with torch.no_grad():
            expl = attribute_words(model, tokenizer, "mild fever")
        assert model.training  # the caller's mode is given back
    finally:
        model.eval()
    assert [w.score for w in expl.words] == pytest.approx([w.score for w in reference.words])


def test_batched_attribution_matches_one_at_a_time(trained):
    model, tokenizer, _ = trained
    texts = [
        "fever",
        "patient reports mild pain since yesterday denies nausea",
        "history of pneumonia",
    ]
    batched = attribute_texts(model, tokenizer, texts, batch_size=8)
    for text, expl in zip(texts, batched):
        single = attribute_words(model, tokenizer, text)
        assert expl.text == text and expl.label_index == single.label_index
        assert [w.word for w in expl.words] == [w.word for w in single.words]
        for a, b in zip(expl.words, single.words):
            assert a.score == pytest.approx(b.score, abs=1e-4)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_wrapped_model_is_explained_through_its_adapters(trained):
    from peft import LoraConfig, TaskType, get_peft_model

    model, tokenizer, _ = trained
    text = "dizzy and tired, fever since yesterday"
    bare = attribute_words(model, tokenizer, text)
    # A copy: PEFT wraps in place, and unload() would keep a modified classifier head.
    lora = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]),
    )
    lora.eval()
    # LoRA's B matrices start at zero: the wrapped model computes the same function.
    at_init = attribute_words(lora, tokenizer, text)
    with torch.no_grad():  # now make the adapters matter
        generator = torch.Generator().manual_seed(1)
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
            if name.endswith("modules_to_save.default.bias"):  # the adapter's own head
                param.add_(torch.tensor([0.0, -2.0]))
        enc = tokenizer(text, return_tensors="pt")
        p_adapted = lora(**enc).logits.softmax(-1)[0, 1].item()
    adapted = attribute_words(lora, tokenizer, text)
    assert at_init.label_index == bare.label_index == 1
    assert [w.score for w in at_init.words] == pytest.approx(
        [w.score for w in bare.words], abs=1e-5
    )
    # The explanation follows the adapted model, not the base model underneath.
    assert abs(p_adapted - bare.probability) > 0.1
    assert adapted.probability == pytest.approx(p_adapted, abs=1e-6)
    assert adapted.approximation_error <= 0.05
    assert max(adapted.words, key=lambda w: w.score).word == "fever"


# Rendering: hand-built explanations, no model needed.


def _hand_made(text: str = "cough <script>alert(1)</script> fever") -> Explanation:
    words = []
    scores = {"cough": -0.10, "fever": 0.70}
    pos = 0
    for token in text.split(" "):
        start = text.index(token, pos)
        pos = start + len(token)
        words.append(WordAttribution(token, start, pos, scores.get(token, 0.01)))
    return Explanation(text, 1, 0.93, tuple(words), 0.001)


def test_render_html_escapes_input_and_is_self_contained():
    quiet = Explanation("no acute distress", 0, 0.97, (WordAttribution("no", 0, 2, 0.01),), 0.0)
    page = render_html(
        [(_hand_made(), "Febrile <b>illness</b>"), (quiet, "Well")], title="Review & sign"
    )
    assert page.count('<section class="record">') == 2
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;illness&lt;/b&gt;" in page
    assert "Review &amp; sign" in page
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "src=" not in page and "@import" not in page
    assert 'rgba(22, 163, 74, 0.850)" title="score +0.7000: supports Febrile' in page
    assert "rgba(220, 38, 38, 0.121)" in page  # cough: 0.85 * 0.10 / 0.70, red
    # A word that moves p by 0.01 is not painted as decisive: scale floored at 0.05.
    assert "rgba(22, 163, 74, 0.170)" in page  # 0.85 * 0.01 / 0.05


def test_render_terminal_plain_marks_the_top_words_by_sign():
    out = render_terminal(_hand_made("cough and fever"), "Febrile illness", color=False)
    first, summary = out.split("\n")
    assert first == "{{cough}} and [[fever]]"  # "and" is top 3 but under 1/10 of fever
    assert "\x1b" not in out
    assert summary.startswith(
        "label: Febrile illness (p=0.930) | top words: fever +0.700, cough -0.100, and +0.010"
    )
    assert "scores approximate" not in summary  # |delta| 0.001 of a 0.61 change


def test_render_terminal_does_not_highlight_words_that_barely_matter():
    words = (WordAttribution("slept", 0, 5, 0.002), WordAttribution("well", 6, 10, -0.001))
    expl = Explanation("slept well", 0, 0.95, words, 0.0)
    assert render_terminal(expl, "Well", color=False).split("\n")[0] == "slept well"
    assert "\x1b" not in render_terminal(expl, "Well").split("\n")[0]


def test_render_terminal_colour_bolds_top_word_and_neutralises_escapes():
    expl = _hand_made("fever \x1b[2Jcleared")
    out = render_terminal(expl, "Febrile illness")
    assert "\x1b[1;32mfever\x1b[0m" in out
    assert "\x1b[2J" not in out  # an escape sequence inside the note is not passed through
