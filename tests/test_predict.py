"""`fedcare predict`: a tiny adapter trained on cue words, then predicted on new notes.

The adapter is trained for a second or two with a plain torch loop on the conftest
records (each label has three cue words), saved as RUN/adapter, and used by the
library functions and by the command exactly as a run directory from `simulate` is.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from common.assist.cli import register
from common.assist.predict import (
    Prediction, predict_records, predict_texts, read_texts, write_predictions,
)
from common.config import LoraConfig
from common.data import DataError, read_records
from common.evaluation import collate, encode
from common.model import build_model, load_adapter, load_tokenizer, save_adapter
from tests.conftest import CUES, LABELS, write_records

OBVIOUS = {label: " ".join(words) for label, words in CUES.items()}  # "fever cough chest"...


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    """RUN/adapter of a model that has learnt the cue words (probability > 0.8 on each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads; spares shared CPUs
    try:
        root = tmp_path_factory.mktemp("predict")
        ds = read_records(write_records(root / "train.csv", 200, seed=3), "note", "diagnosis",
                          LABELS)
        data = encode(ds, load_tokenizer(str(tiny_model)), 16)
        torch.manual_seed(0)
        model = build_model(str(tiny_model), len(LABELS), LoraConfig(r=4, alpha=8))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                     lr=0.05)
        order = torch.Generator().manual_seed(0)
        for _ in range(80):
            rows = torch.randperm(len(data), generator=order)[:32].tolist()
            ids, mask, labels = collate(data, rows, torch.device("cpu"))
            loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        save_adapter(model, root / "run" / "adapter", LABELS, str(tiny_model), 16)
        (root / "run" / "summary.json").write_text("{}")
        yield root / "run"
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_adapter(run_dir / "adapter")


def _predict(loaded, texts, **options):
    model, tokenizer, labels = loaded
    return predict_texts(model, tokenizer, labels, texts, **options)


# ------------------------------------------------------------------------------ library
def test_notes_are_read_as_far_as_training_read_them(loaded):
    _, tokenizer, _ = loaded
    assert tokenizer.model_max_length == 16  # recorded in labels.json; the model takes 64
    long, short = " ".join(["fever"] * 20), "fever cough"  # 22 and 4 tokens with specials
    got = _predict(loaded, [long, short])
    assert got[0].truncated and not got[1].truncated


def test_obvious_records_get_their_cue_label_in_input_order(loaded):
    texts = [OBVIOUS[label] for label in ("skin", "respiratory", "mental", "injury")]
    predictions = _predict(loaded, texts)
    assert [p.text for p in predictions] == texts
    assert [p.label for p in predictions] == ["skin", "respiratory", "mental", "injury"]
    respiratory = predictions[1]
    assert respiratory.probability > 0.5 and not respiratory.unsure
    for p in predictions:
        assert p.line is None and p.error == "" and not p.truncated
        assert len(p.top) == 3 and {label for label, _ in p.top} <= set(LABELS)
        probs = [prob for _, prob in p.top]
        assert probs == sorted(probs, reverse=True)
        assert all(0.0 <= prob <= 1.0 for prob in probs) and sum(probs) <= 1.0 + 1e-6


def test_top_k_is_clamped_to_the_labels_and_then_sums_to_one(loaded):
    assert [len(p.top) for p in _predict(loaded, ["rash itch", "femur"], top_k=1)] == [1, 1]
    (full,) = _predict(loaded, ["rash itch"], top_k=10)
    assert sorted(label for label, _ in full.top) == sorted(LABELS)
    assert sum(prob for _, prob in full.top) == pytest.approx(1.0, abs=1e-5)


def test_unsure_flag_flips_at_the_threshold(loaded):
    (p,) = _predict(loaded, ["fever nausea"])
    top = p.probability
    assert not _predict(loaded, ["fever nausea"], threshold=top)[0].unsure  # not under it
    assert _predict(loaded, ["fever nausea"], threshold=min(1.0, top + 1e-4))[0].unsure
    with pytest.raises(ValueError, match="threshold"):
        _predict(loaded, ["fever"], threshold=1.5)


def test_batches_report_progress_and_do_not_change_the_result(loaded):
    texts = ["fever", "rash skin itch femur", "anxiety", "cough chest pain", "kidney stone"]
    calls = []
    small = _predict(loaded, texts, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    whole = _predict(loaded, texts, batch_size=64)
    assert calls == [(2, 5), (4, 5), (5, 5)]
    for a, b in zip(small, whole):
        assert a.text == b.text and a.label == b.label
        assert a.probability == pytest.approx(b.probability, abs=1e-5)


def test_a_blank_text_is_an_error_row_and_the_others_are_predicted(loaded):
    predictions = _predict(loaded, ["fever cough", "   ", "rash"])
    assert predictions[1].error and predictions[1].top == () and not predictions[1].unsure
    assert predictions[0].label == "respiratory" and predictions[2].label == "skin"


def _notes_csv(path):
    path.write_text("id,note\n"
                    "1,fever cough chest\n"
                    "2,\n"            # line 3: empty text
                    "3\n"             # line 4: one field, the note column is missing
                    '4,"rash skin\nitch"\n'  # lines 5-6: a quoted note over two lines
                    "5,anxiety insomnia\n")
    return path


def test_csv_bad_rows_are_reported_with_their_lines_and_the_rest_run(loaded, tmp_path):
    records = read_texts(_notes_csv(tmp_path / "notes.csv"), "note")
    assert [line for line, _, _ in records] == [2, 3, 4, 6, 7]
    assert records[1] == (3, None, "empty text in column 'note'")
    assert records[2][1] is None and "expected 2 fields" in records[2][2]
    model, tokenizer, labels = loaded
    predictions = predict_records(model, tokenizer, labels, records)
    assert [(p.line, bool(p.error)) for p in predictions] == [
        (2, False), (3, True), (4, True), (6, False), (7, False)]
    assert [p.label for p in predictions] == ["respiratory", "", "", "skin", "mental"]


def test_jsonl_bad_lines_are_reported_and_file_problems_raise(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"text": "fever"}\n\n{"note": "rash"}\n{"text": 3}\nnot json\n[1]\n'
                    '{"text": " femur "}\n')
    records = read_texts(path)
    assert records[0] == (1, "fever", "")
    assert records[1][0] == 3 and "missing column 'text'" in records[1][2]
    assert records[2][0] == 4 and "not text" in records[2][2]
    assert records[3][0] == 5 and "invalid JSON" in records[3][2]
    assert records[4][0] == 6 and "JSON object" in records[4][2]
    assert records[5] == (7, "femur", "")
    (tmp_path / "notes.txt").write_text("fever\n")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_texts(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="file not found"):
        read_texts(tmp_path / "missing.csv")
    (tmp_path / "latin1.csv").write_bytes(b"text\nfever\nna\xefve\n")
    with pytest.raises(DataError, match=r"latin1.csv:3: not UTF-8"):
        read_texts(tmp_path / "latin1.csv")


def test_outputs_have_one_row_per_record(tmp_path):
    predictions = [Prediction("fever", 2, (("respiratory", 0.9), ("skin", 0.05)), False),
                   Prediction("", 3, (), False, "empty text in column 'note'"),
                   Prediction("rash", 4, (("skin", 0.4), ("mental", 0.3)), True)]
    rows = [json.loads(s) for s in
            write_predictions(predictions, tmp_path / "p.jsonl", 2).read_text().splitlines()]
    assert [r["line"] for r in rows] == [2, 3, 4]
    assert rows[0]["top"] == [{"label": "respiratory", "probability": 0.9},
                              {"label": "skin", "probability": 0.05}]
    assert rows[1]["error"] and rows[1]["label"] is None and rows[2]["unsure"] is True
    with (write_predictions(predictions, tmp_path / "p.csv", 2)).open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["line"] for r in table] == ["2", "3", "4"]
    assert table[0]["label_1"] == "respiratory" and float(table[0]["probability_2"]) == 0.05
    assert table[1]["label_1"] == "" and table[1]["error"] and table[2]["unsure"] == "True"
    with pytest.raises(ValueError, match="use .jsonl or .csv"):
        write_predictions(predictions, tmp_path / "p.xlsx", 2)


# ---------------------------------------------------------------------------------- CLI

def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedcare")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predict", *map(str, argv)])
    return args.func(args)


def test_cli_predicts_a_file_writes_both_formats_and_marks_unsure(run_dir, tmp_path, capsys):
    notes = _notes_csv(tmp_path / "notes.csv")
    for name in ("out.jsonl", "out.csv"):
        assert _cli(run_dir, "--input", notes, "--text-column", "note", "--threshold", "1.0",
                    "--output", tmp_path / name) == 0
    out = capsys.readouterr().out
    assert "UNSURE" in out and "the model is unsure and a clinician must decide" in out
    assert "expected 2 fields" in out and "not a diagnosis" in out
    jsonl = [json.loads(s) for s in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["line"] for r in jsonl] == [2, 3, 4, 6, 7]
    assert [bool(r["error"]) for r in jsonl] == [False, True, True, False, False]
    with (tmp_path / "out.csv").open(newline="") as handle:
        assert [r["line"] for r in csv.DictReader(handle)] == ["2", "3", "4", "6", "7"]


def test_cli_explain_writes_a_self_contained_html_page(run_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert _cli(run_dir, "--text", "fever cough chest", "--text", "rash itch",
                "--explain", "--no-color", "--output", out_dir / "p.jsonl") == 0
    page = (out_dir / "predictions_explained.html").read_text()
    for word in ("fever", "cough", "chest", "rash", "itch", "respiratory"):
        assert word in page
    assert "http://" not in page and "https://" not in page
    out = capsys.readouterr().out
    assert "record 1: " in out and "top words:" in out and "label: respiratory" in out


def test_cli_uses_the_adapter_and_base_model_given(run_dir, tiny_model, tmp_path, capsys):
    moved = tmp_path / "elsewhere"
    shutil.copytree(run_dir / "adapter", moved)
    meta = json.loads((moved / "labels.json").read_text())
    (moved / "labels.json").write_text(json.dumps({**meta, "base_model": "/no/such/model"}))
    assert _cli("--adapter", moved, "--text", "fever") == 2
    assert "--base-model" in capsys.readouterr().err
    assert _cli("--adapter", moved, "--base-model", tiny_model, "--text", "femur") == 0
    assert "injury" in capsys.readouterr().out
    run = tmp_path / "run"  # RUN_DIR/adapter is used, and the per-site adapters are named
    shutil.copytree(run_dir / "adapter", run / "adapter")
    shutil.copytree(run_dir / "adapter", run / "site_state" / "site-a" / "personalized" / "r1")
    assert _cli(run, "--text", "femur") == 0
    err = capsys.readouterr().err
    assert f"adapter: {run / 'adapter'}" in err and "personalized adapters (site-a)" in err


def test_cli_unusable_input_exits_2_with_a_clear_message(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(empty, "--text", "fever") == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert _cli("--adapter", empty, "--text", "fever") == 2
    assert "not a fedcare adapter folder" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("fever\n")
    assert _cli(run_dir, "--input", tmp_path / "notes.txt") == 2
    assert "unsupported file type '.txt'" in capsys.readouterr().err
    assert _cli(run_dir, "--text", "fever", "--output", tmp_path / "p.xlsx") == 2
    assert "use .jsonl or .csv" in capsys.readouterr().err
    assert _cli(run_dir, "--text", "  ") == 2
    assert "no text given" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # neither --text nor --input
        _cli(run_dir)
    assert exit_info.value.code == 2
