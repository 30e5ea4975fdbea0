"""Which words drove a prediction: Integrated Gradients on word embeddings, merged to words.

A clinician reviewing an assisted-diagnosis suggestion needs to see *which words of the
note* pushed the classifier towards (or away from) the suggested label. This module:

1. runs Integrated Gradients (captum's ``LayerIntegratedGradients``) on the output of the
   model's word-embedding layer, for the predicted label (or a given one);
2. sums the attribution over the embedding dimension, giving one score per sub-token;
3. merges sub-tokens back to whole words with the fast tokenizer's ``word_ids()`` and
   offsets (a word's score is the sum of its sub-tokens' scores) and keeps each word's
   original spelling, ``text[start:end]``;
4. hands the result to common/assist/render.py, for a terminal (ANSI colours or plain
   markers) or one self-contained HTML page.

Scores are in units of the label's *probability*: by the completeness property of IG,
the word scores sum to ``p(label | text) - p(label | baseline)`` up to
``convergence_delta``, the numerical error of the path integral. Texts whose error is
large are recomputed with more integration steps (see ``attribute_texts``), and the
renderers flag any that stay approximate. Positive scores support the label, negative
scores oppose it.

Works for any Hugging Face sequence-classification model, bare or wrapped by
``peft.PeftModel``, on whatever device the model lives on. Attribution is an aid to
review, not a proof of clinical reasoning.

Size: the attribution with its batching, word merging and retries, which only make
sense together; showing it is common/assist/render.py.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from captum.attr import LayerIntegratedGradients

from common.assist import model_max_length


@dataclass(frozen=True)
class WordAttribution:
    """One word of the input text and how much it moved the label's probability."""

    word: str  # exactly as written in the input: Explanation.text[start:end]
    start: int  # character offset of the word's first character in Explanation.text
    end: int  # character offset one past the word's last character
    score: float  # sum of the word's sub-token attributions; > 0 supports the label


@dataclass(frozen=True)
class Explanation:
    """Word attributions for one text and one label."""

    text: str
    label_index: int  # the explained label: the predicted one unless a target was given
    probability: float  # the model's probability for label_index on this text
    words: tuple[WordAttribution, ...]  # in reading order; special tokens dropped
    convergence_delta: float  # sum(scores) - (p(text) - p(baseline)); ideally ~0
    truncated: bool = False  # True if the text was cut to the model's maximum length
    n_steps: int = 0  # IG integration steps actually used (after any refinement)

    def top(self, k: int = 3) -> tuple[WordAttribution, ...]:
        """The k words with the largest |score|, strongest first (ties: reading order)."""
        ranked = sorted(range(len(self.words)), key=lambda i: (-abs(self.words[i].score), i))
        return tuple(self.words[i] for i in ranked[:k])

    @property
    def approximation_error(self) -> float:
        """|convergence_delta| relative to the probability change the scores explain.

        The change is ``p(text) - p(baseline) = sum(scores) - convergence_delta``; it is
        floored at 0.05 so that texts whose words barely move the probability are not
        flagged for errors too small to matter.
        """
        change = sum(w.score for w in self.words) - self.convergence_delta
        return abs(self.convergence_delta) / max(abs(change), CHANGE_FLOOR)


# --------------------------------------------------------------------------- attribution

# Midpoint Riemann sum for the path integral. captum's default Gauss-Legendre rule is
# exact for smooth integrands but spends few nodes mid-path; a confident fine-tuned
# model often switches its decision within a narrow stretch of the path (attention
# snapping onto the decisive word once it outweighs the position embedding after
# LayerNorm), where evenly spaced midpoints converge much faster.
_IG_METHOD = "riemann_middle"
CHANGE_FLOOR = 0.05  # probability units; see Explanation.approximation_error


def attribute_words(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    target: int | None = None,
    n_steps: int = 32,
    *,
    max_steps: int = 512,
    tolerance: float | None = 0.05,
) -> Explanation:
    """Explain one prediction: IG attribution per word of ``text`` for ``target``.

    ``target`` defaults to the predicted label. ``tokenizer`` must be a fast
    (Rust-backed) Hugging Face tokenizer, since word boundaries and offsets come from it.
    See ``attribute_texts`` for ``n_steps``, ``max_steps`` and ``tolerance``.
    """
    _check_target("target", target, model)
    targets = None if target is None else [target]
    return attribute_texts(
        model, tokenizer, [text], targets, n_steps, max_steps=max_steps, tolerance=tolerance
    )[0]


def attribute_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    targets: Sequence[int | None] | None = None,
    n_steps: int = 32,
    *,
    max_steps: int = 512,
    tolerance: float | None = 0.05,
    batch_size: int = 8,
) -> list[Explanation]:
    """Explain many predictions, ``batch_size`` texts per IG pass; results in input order.

    IG starts with ``n_steps`` integration steps. A text whose approximation error
    (``Explanation.approximation_error``) exceeds ``tolerance`` is recomputed with
    twice the steps, up to ``max_steps``; whatever remains is reported in
    ``convergence_delta`` and flagged by the renderers. ``tolerance=None`` disables the
    refinement. Memory is bounded by ``batch_size * n_steps`` interpolated inputs per
    forward pass whatever the step count (captum's internal batching); lower
    ``batch_size`` for long notes on CPU. Padding does not change the scores (padded
    positions are masked and identical in input and baseline: zero attribution).
    """
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str (got {type(text).__name__})")
    targets = [None] * len(texts) if targets is None else list(targets)
    if len(targets) != len(texts):
        raise ValueError(
            f"targets must have one entry per text (got {len(targets)} targets "
            f"for {len(texts)} texts); pass None to explain the predicted labels"
        )
    sizes = (("n_steps", n_steps), ("max_steps", max_steps), ("batch_size", batch_size))
    for name, value in sizes:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
    if tolerance is not None and not tolerance > 0:
        raise ValueError(
            f"tolerance must be > 0, or None to disable refinement (got {tolerance!r})"
        )
    for i, target in enumerate(targets):
        _check_target(f"targets[{i}]", target, model)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "tokenizer must be a fast Hugging Face tokenizer (tokenizer.is_fast is False): "
            "word boundaries and character offsets come from its word_ids() and "
            "offset_mapping; load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    embeddings = model.get_input_embeddings()  # PeftModel forwards this to the base model
    if embeddings is None:
        raise TypeError(
            f"{type(model).__name__}.get_input_embeddings() returned None; "
            "attribution needs the word-embedding layer"
        )
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.unk_token_id
    if pad_id is None:
        raise ValueError(
            "tokenizer has neither a pad token nor an unk token to build the IG baseline "
            "from; set tokenizer.pad_token"
        )

    def run(idx: list[int], tgts: list[int | None], steps: int) -> list[Explanation]:
        return _attribute_batch(
            model,
            tokenizer,
            embeddings,
            pad_id,
            [texts[i] for i in idx],
            tgts,
            steps,
            internal_batch_size=batch_size * n_steps,
        )

    results: list[Explanation] = [None] * len(texts)  # type: ignore[list-item]
    # Similar lengths in one batch waste less compute on padding.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    was_training = model.training
    model.eval()  # dropout off: attributions must be deterministic
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            steps = n_steps
            for i, expl in zip(idx, run(idx, [targets[i] for i in idx], steps)):
                results[i] = expl
            while tolerance is not None and steps * 2 <= max_steps:
                idx = [i for i in idx if results[i].approximation_error > tolerance]
                if not idx:
                    break
                steps *= 2
                for i, expl in zip(idx, run(idx, [results[i].label_index for i in idx], steps)):
                    results[i] = expl
    finally:
        model.train(was_training)
    return results


def _check_target(name: str, target, model: torch.nn.Module) -> None:
    """Reject a target that is not None or a label index the model has, before any work."""
    if target is None:
        return
    index = _as_index(target)
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if index is None or index < 0 or (num_labels is not None and index >= num_labels):
        allowed = f"[0, {num_labels - 1}]" if num_labels else "an integer >= 0"
        raise ValueError(
            f"{name} must be a label index in {allowed} for this model (got {target!r}), "
            "or None for the predicted label"
        )


def _attribute_batch(
    model: torch.nn.Module,
    tokenizer,
    embeddings: torch.nn.Module,
    pad_id: int,
    texts: list[str],
    targets: list[int | None],
    n_steps: int,
    internal_batch_size: int,
) -> list[Explanation]:
    device = next(model.parameters()).device
    max_length = model_max_length(model, tokenizer)
    enc = tokenizer(
        texts,
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    offsets = enc["offset_mapping"].tolist()  # [B][L] of (start, end)
    word_ids = [enc.word_ids(b) for b in range(len(texts))]  # [B][L], None = special/pad
    truncated = [bool(e.overflowing) for e in enc.encodings]

    input_ids = enc["input_ids"].to(device)  # [B, L]
    extra_names = [n for n in ("attention_mask", "token_type_ids") if n in enc]
    extra = tuple(enc[n].to(device) for n in extra_names)  # each [B, L]

    # Baseline: every word token replaced by [PAD]; [CLS]/[SEP] (and padding) kept.
    # [PAD] is the model's own "no word here" token (BERT pins its embedding row at zero
    # through padding_idx, so on word positions this is also the classic zero baseline).
    # Position and segment embeddings are added after the word embedding, so they are
    # the same at both ends of the path, and so are the special tokens and the attention
    # mask: the baseline stays a well-formed input of the same length, and the path from
    # baseline to input changes *only* the words. Special tokens thus get exactly zero
    # attribution ((x - x') = 0; they are no evidence a clinician can act on), and the
    # word scores alone carry p(text) - p(baseline). Blanking [CLS]/[SEP] as well would
    # spread attribution onto them and push the baseline off the inputs the model knows.
    is_word = torch.tensor(
        [[w is not None for w in row] for row in word_ids], dtype=torch.bool, device=device
    )
    baseline_ids = torch.where(is_word, torch.full_like(input_ids, pad_id), input_ids)

    def forward(ids: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(extra_names, args))
        return model(input_ids=ids, **kwargs).logits.softmax(dim=-1)  # [B, C]

    with torch.no_grad():
        probs = forward(input_ids, *extra)  # [B, C]
    num_labels = probs.shape[-1]
    resolved: list[int] = []
    for text_i, target in enumerate(targets):
        if target is None:
            resolved.append(int(probs[text_i].argmax()))
        elif (index := _as_index(target)) is not None and 0 <= index < num_labels:
            resolved.append(index)
        else:
            raise ValueError(
                f"target must be a label index in [0, {num_labels - 1}] for this model "
                f"(got {target!r})"
            )

    lig = LayerIntegratedGradients(forward, embeddings)
    with torch.enable_grad():  # IG needs gradients even if the caller is in no_grad()
        attributions, deltas = lig.attribute(
            input_ids,
            baselines=baseline_ids,
            target=resolved,
            additional_forward_args=extra,
            n_steps=n_steps,
            method=_IG_METHOD,
            internal_batch_size=max(internal_batch_size, 2 * len(texts)),
            return_convergence_delta=True,
        )  # attributions: [B, L, H] on the embedding output; deltas: [B]
    token_scores = attributions.sum(dim=-1).detach().float().cpu()  # [B, L]

    out = []
    for b, text in enumerate(texts):
        words = _merge_words(text, word_ids[b], offsets[b], token_scores[b].tolist())
        out.append(
            Explanation(
                text=text,
                label_index=resolved[b],
                probability=float(probs[b, resolved[b]]),
                words=words,
                convergence_delta=float(deltas[b]),
                truncated=truncated[b],
                n_steps=n_steps,
            )
        )
    return out


def _as_index(value) -> int | None:
    """``value`` as a Python int if it is integer-like (int, numpy / 0-d torch int)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _merge_words(
    text: str,
    word_ids: list[int | None],
    offsets: list[tuple[int, int]],
    scores: list[float],
) -> tuple[WordAttribution, ...]:
    """Sum sub-token scores per word; span = first sub-token start .. last sub-token end."""
    spans: dict[int, list] = {}  # word id -> [start, end, score]; dicts keep reading order
    for wid, (start, end), score in zip(word_ids, offsets, scores):
        if wid is None:  # [CLS], [SEP], padding
            continue
        if wid not in spans:
            spans[wid] = [start, end, 0.0]
        span = spans[wid]
        span[0], span[1] = min(span[0], start), max(span[1], end)
        span[2] += score
    words = []
    for start, end, score in spans.values():
        # Some tokenizers (byte-level BPE, sentencepiece) include the leading space.
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start < end:
            words.append(WordAttribution(text[start:end], start, end, score))
    return tuple(words)
