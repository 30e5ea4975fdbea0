"""`fedcare predict`: the clinician's command, over common/assist/predict.py (and
explain.py for `--explain`).

    fedcare predict RUN_DIR --text "fever and cough for three days"
    fedcare predict RUN_DIR --input notes.csv --text-column note --output out.csv --explain
    fedcare predict --adapter STATE_DIR/personalized/RUN --base-model /models/minilm ...

Exit codes: 0 once predictions are written (even if some records had errors), 2 on
unusable input (no adapter, unsupported or missing file, no text).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common.assist.predict import (
    DEFAULT_HTML, OUTPUT_SUFFIXES, REMINDER, Progress, format_table, predict_records,
    read_texts, write_predictions,
)
from common.data import DataError
from common.model import ModelError, load_adapter, pick_device


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `predict` command to a CLI's subparsers; it sets func(args) -> int."""
    cmd = subparsers.add_parser(
        "predict", help="suggest diagnosis categories for new notes with a trained adapter",
        description="Top-k diagnosis categories per note, with an UNSURE marker under "
                    "--threshold and optional word-level explanations. Decision support, "
                    "not a diagnosis.")
    cmd.add_argument("run_dir", nargs="?", type=Path, default=None, metavar="RUN_DIR",
                     help="a run directory from `fedcare simulate` (uses RUN_DIR/adapter)")
    cmd.add_argument("--adapter", type=Path, default=None, metavar="DIR",
                     help="adapter folder to use instead, e.g. a site's STATE_DIR/personalized/RUN")
    cmd.add_argument("--base-model", default=None, metavar="DIR",
                     help="base model folder on this machine (default: the one recorded "
                          "in the adapter's labels.json)")
    source = cmd.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", default=None,
                        help="a note to classify; repeat for several")
    source.add_argument("--input", type=Path, default=None, metavar="FILE",
                        help="a .csv or .jsonl file of notes, one record per row / line")
    cmd.add_argument("--text-column", default="text",
                     help="column (CSV) or key (JSONL) holding the note (default: text)")
    cmd.add_argument("--top-k", type=_positive_int, default=3,
                     help="labels shown per record (default 3)")
    cmd.add_argument("--threshold", type=_probability, default=0.5,
                     help="below this top probability a record is marked UNSURE (default 0.5)")
    cmd.add_argument("--output", type=Path, default=None, metavar="FILE",
                     help="also write one row per record to FILE.jsonl or FILE.csv")
    cmd.add_argument("--explain", action="store_true",
                     help="show the words that drove each prediction, and write an HTML page")
    cmd.add_argument("--explain-html", type=Path, default=None, metavar="FILE",
                     help=f"HTML page for --explain (default: {DEFAULT_HTML} next to "
                          "--output, else in the current folder)")
    cmd.add_argument("--batch-size", type=_positive_int, default=64,
                     help="records per forward pass (default 64)")
    cmd.add_argument("--no-color", action="store_true", help="plain text, no ANSI colours")
    cmd.set_defaults(func=run_predict)
    return cmd


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 (got {value!r})") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 (got {value!r})")
    return number


def _probability(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1] (got {value!r})")
    return number


def _fail(message: str) -> int:
    print(f"fedcare predict: error: {message}", file=sys.stderr)
    return 2


def adapter_folder(run_dir: Path | None, adapter: Path | None) -> Path:
    """--adapter if given, else RUN_DIR/adapter (or RUN_DIR itself if it is an adapter)."""
    if adapter is not None:
        return adapter
    if run_dir is None:
        raise ModelError("give a run directory (RUN_DIR) or --adapter DIR")
    if (run_dir / "adapter_config.json").is_file():
        return run_dir
    if not (run_dir / "adapter").is_dir():
        raise ModelError(f"{run_dir} is neither a run directory (no adapter/ folder) nor "
                         "an adapter folder (no adapter_config.json)")
    return run_dir / "adapter"


def _loaded(run_dir: Path | None, adapter: Path | None, base_model: str | None):
    folder = adapter_folder(run_dir, adapter)
    try:
        model, tokenizer, labels = load_adapter(folder, base_model)
    except ModelError as err:
        if base_model is None and "base_model" in str(err):  # recorded path not on this machine
            raise ModelError(f"{err}; pass --base-model DIR to use the base model folder on "
                             "this machine") from None
        raise
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ModelError(f"cannot load the adapter in {folder}: {err}") from None
    return folder, model, tokenizer, labels


def run_predict(args: argparse.Namespace) -> int:
    output = args.output
    if output is not None and output.suffix.lower() not in OUTPUT_SUFFIXES:
        return _fail(f"--output {output}: unsupported file type {output.suffix!r}; "
                     "use .jsonl or .csv")
    html_path = None
    if args.explain or args.explain_html is not None:
        html_path = args.explain_html or (output.parent if output else Path()) / DEFAULT_HTML
    try:
        if args.input is not None:
            if output is not None and output.resolve() == args.input.resolve():
                return _fail(f"--output {output} would overwrite the input file")
            records = read_texts(args.input, args.text_column)
            if not records:
                return _fail(f"{args.input}: no records (the file is empty)")
        else:
            records = [(None, t, "") for t in args.text if t.strip()]
            if not records:
                return _fail("no text given: --text is empty")
        folder, model, tokenizer, labels = _loaded(args.run_dir, args.adapter, args.base_model)
    except (ModelError, DataError, OSError) as err:
        return _fail(str(err))

    model.to(pick_device("auto"))
    print(f"adapter: {folder} ({len(labels)} labels)", file=sys.stderr)
    # a simulation keeps each site's personalised adapter in its site state
    personal = sorted(folder.parent.glob("site_state/*/personalized/*/adapter_config.json"))
    if args.adapter is None and personal:
        sites = ", ".join(p.parent.parent.parent.name for p in personal)
        print(f"note: this run also has personalized adapters ({sites}); use --adapter "
              f"{personal[0].parent} (for example) for one site's", file=sys.stderr)
    with _progress_bar(len(records)) as progress:
        predictions = predict_records(model, tokenizer, labels, records, top_k=args.top_k,
                                      threshold=args.threshold, batch_size=args.batch_size,
                                      progress=progress)
    print(format_table(predictions, args.threshold))
    color = not args.no_color and "NO_COLOR" not in os.environ and sys.stdout.isatty()
    try:
        if output is not None:
            write_predictions(predictions, output, args.top_k)
            print(f"predictions: {output}")
        if html_path is not None:
            _explain(model, tokenizer, labels, predictions, html_path, color)
    except OSError as err:
        return _fail(f"cannot write: {err}")
    print(REMINDER)
    return 0


def _explain(model, tokenizer, labels, predictions, html_path: Path, color: bool) -> None:
    from common.assist.explain import attribute_texts
    from common.assist.render import render_html, render_terminal

    todo = [(n, p) for n, p in enumerate(predictions, start=1) if not p.error]
    explained = []
    step = 8
    with _progress_bar(len(todo), "explaining") as progress:
        for lo in range(0, len(todo), step):
            part = todo[lo: lo + step]
            explained += attribute_texts(model, tokenizer, [p.text for _, p in part],
                                         [labels.index(p.label) for _, p in part])
            if progress is not None:
                progress(min(lo + step, len(todo)), len(todo))
    print()
    pages = []
    skipped = len(predictions) - len(todo)
    for section, ((n, p), expl) in enumerate(zip(todo, explained), start=1):
        where = [] if p.line is None else [f"line {p.line}"]
        if skipped:  # the page numbers only the records it shows
            where.append(f"Record {section} on the page")
        flag = " UNSURE, a clinician must decide" if p.unsure else ""
        print(f"record {n}" + (f" ({'; '.join(where)})" if where else "") + f"{flag}: "
              + render_terminal(expl, p.label, color=color))
        pages.append((expl, p.label))
    title = "Which words drove each prediction"
    if skipped:
        title += f" ({skipped} record(s) with errors are left out)"
    html_path.write_text(render_html(pages, title), encoding="utf-8")
    print(f"explanations: {html_path}")


class _progress_bar:
    """A tqdm counter on stderr for large inputs (and only on a terminal); else nothing."""

    def __init__(self, total: int, desc: str = "predicting", minimum: int = 256) -> None:
        self.total, self.desc, self.minimum, self.bar = total, desc, minimum, None

    def __enter__(self) -> Progress | None:
        if self.total < self.minimum or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, unit="record", file=sys.stderr)
        return self._update

    def _update(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
