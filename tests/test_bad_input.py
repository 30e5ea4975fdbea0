"""A bad-input corpus: generated YAML configs, `--set` values, node configs, data files
and ledgers. Each case either loads or ends in one FedcareError that names the file and
line, or the key; any other exception fails the test. Examples are derandomised, so a
run is the same on every machine.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from common.config import (
    NODE_KEYS, SECTIONS, Config, ConfigError, NodeConfig, check_simulation, from_mapping,
    from_node_config, from_run_config, load_yaml,
)
from common.data import DataError, TextDataset, read_records
from common.errors import FedcareError, RunError, run_command
from common.privacy.entries import LedgerError, LedgerFormatError, canonical_json
from common.privacy.ledger import read_entries
from common.privacy.signing import load_or_create_site_key, public_key_pem
from common.privacy.verify import verify_path
from simulations.cli import _overrides
from tests.test_ledger import build_ledger

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("flu", "fracture", "rash")


def corpus(examples: int):
    """Hypothesis settings of this corpus: fixed examples, no deadline on a shared CPU."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


@pytest.fixture(scope="module", autouse=True)
def command(tmp_path_factory):
    """`fedcare simulate` on a config that is a list, started before this file's first
    test (the command imports torch, seconds on a shared CPU) and read by the last."""
    bad = tmp_path_factory.mktemp("cli") / "bad.yaml"
    bad.write_text("- privacy\n- federation\n")
    process = subprocess.Popen([sys.executable, "-m", "common.cli", "simulate", str(bad)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    yield process, bad
    if process.poll() is None:
        process.kill()
    process.communicate()


# ------------------------------------------------------------------------ the family

def test_every_boundary_error_is_one_family_and_stays_a_value_error():
    assert issubclass(ConfigError, FedcareError) and issubclass(ConfigError, ValueError)
    assert issubclass(DataError, FedcareError) and issubclass(DataError, ValueError)
    assert issubclass(LedgerError, FedcareError) and issubclass(RunError, RuntimeError)
    err = DataError("unknown label 'x'", path="a.csv", line=3)
    assert (str(err), err.path, err.line) == ("a.csv:3: unknown label 'x'", "a.csv", 3)


def test_run_command_prints_the_family_as_one_line_and_lets_bugs_through(capsys):
    def bad(_):
        raise ConfigError("privacy.delta must be in (0, 1) (got 2)")

    assert run_command(bad, None) == 2
    assert capsys.readouterr().err == "error: privacy.delta must be in (0, 1) (got 2)\n"
    with pytest.raises(KeyError):
        run_command(lambda _: {}["bug"], None)


# ------------------------------------------------------------- known bad configs

@pytest.mark.parametrize("text, message", [
    ("- privacy\n- train\n", "must hold a mapping of sections"),
    ("3\n", "must hold a mapping of sections"),
    ("privacy: false\n", "section privacy is not a mapping"),
    ("privacy:\n", "section privacy is empty"),
    ("federation: 3\n", "section federation is not a mapping"),
    ("data:\n  source: files\n  labels: [flu, flu]\n", "data.labels must be distinct"),
    ("data:\n  source: files\n  labels: ['flu,cold', rash]\n", "without ','"),
    ("privacy:\n  target_epsilon: .inf\n", "privacy.target_epsilon must be a finite number"),
    ("train: [1, 2\n", ":2: not valid YAML: while parsing a flow sequence"),
    ("privacy: {}\n\x1f\n", ":2: not valid YAML: unacceptable character #x001f"),
    ("privacy:\n  delta: " + "9" * 5000 + "\n", "a value cannot be read"),
])
def test_bad_yaml_names_the_file_and_the_section(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_yaml(path)
    assert str(path) in str(err.value)


def test_an_empty_mapping_section_means_its_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("privacy: {}\n")
    assert load_yaml(path) == Config()


def test_yaml_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("privacy:\n  delta: 1.0e-5\n# Zürich\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml:3: not UTF-8"):
        load_yaml(path)
    path.write_bytes("privacy: {}\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml:1: not UTF-8"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_yaml(tmp_path)


def test_set_into_a_section_that_is_not_a_mapping_names_the_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federation: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: section federation is not a mapping"):
        load_yaml(path, _overrides(["federation.min_sites=1"]))
    path.write_text("privacy:\n")
    with pytest.raises(ConfigError, match="section privacy is empty"):
        load_yaml(path, {"privacy.delta": 1e-6})


def test_set_reads_scientific_notation_into_float_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("privacy: {}\n")
    overrides = _overrides(["privacy.delta=1e-9", "site.budgets=[1e-1, 2]"])
    assert overrides["privacy.delta"] == "1e-9"  # what YAML makes of it
    cfg = load_yaml(path, overrides)
    assert cfg.privacy.delta == 1e-9 and cfg.site.budgets == (0.1, 2.0)
    with pytest.raises(ConfigError, match=r"privacy\.delta must be a number \(got 'tiny'\)"):
        load_yaml(path, _overrides(["privacy.delta=tiny"]))
    with pytest.raises(ConfigError, match="--set train.device"):
        _overrides(["train.device=[cpu"])


def test_min_sites_above_the_simulated_sites_is_refused_naming_both_keys():
    cfg = from_mapping({"federation": {"min_sites": 5}, "simulation": {"num_sites": 4}})
    with pytest.raises(ConfigError, match=r"federation\.min_sites \(5\) must be <= "
                                          r"simulation\.num_sites \(4\)"):
        check_simulation(cfg)
    assert check_simulation(from_mapping({"federation": {"min_sites": 4}})).federation.min_sites == 4


def test_node_config_values_are_typed_by_key():
    hospital = {"site": "a", "state-dir": "/s", "data-file": "/d.csv", "delta": 1e-6}
    assert from_node_config({**hospital, "epsilon-budget": "1e-1"}).epsilon_budget == 0.1
    with pytest.raises(ConfigError, match="node config key 'epsilon-budget' must be a number"):
        from_node_config({**hospital, "epsilon-budget": "eight"})
    with pytest.raises(ConfigError, match="node config labels must be distinct"):
        from_node_config({**hospital, "epsilon-budget": 8, "labels": "flu,rash,flu"})
    with pytest.raises(ConfigError, match="'epsilon-budget' and 'epsilon_budget'"):
        from_node_config({**hospital, "epsilon-budget": 8, "epsilon_budget": 9})


# -------------------------------------------------------------- known bad data files

def _read(path: Path) -> TextDataset:
    return read_records(path, "note", "dx", LABELS)


@pytest.mark.parametrize("name, content, where, message", [
    ("latin1.csv", "note,dx\nfever,flu\nna\u00efve,flu\n".encode("latin-1"), 3, "not UTF-8"),
    ("utf16.csv", "note,dx\nfever,flu\n".encode("utf-16"), 1, "(UTF-16?)"),
    ("utf16le.jsonl", '{"note": "fever", "dx": "flu"}\n'.encode("utf-16-le"), 1, "NUL byte"),
    ("empty.csv", b"", 1, "no records (the file is empty)"),
    ("blank.jsonl", b"\n \n", 1, "no records (the file is empty)"),
    ("header.csv", b"note,dx\n", 2, "no records after the header"),
    ("short.csv", b"note,dx\nfever,flu\nrash\n", 3, "expected 2 fields, found 1"),
    ("long.csv", b"note,dx\nfever,flu,extra\n", 2, "expected 2 fields, found 3"),
    ("quote.csv", b'note,dx\n"fever,flu\nrash,rash\n', 3, "is a quote left open?"),
    ("twice.csv", b"note,note,dx\nfever,cough,flu\n", 1, "column 'note' more than once"),
    ("missing.jsonl", b'{"note": "fever"}\n', 1, "missing column 'dx'"),
    ("emptytext.jsonl", b'{"note": " ", "dx": "flu"}\n', 1, "empty or non-text value"),
    ("number.jsonl", b'{"note": 3, "dx": "flu"}\n', 1, "empty or non-text value"),
    ("unknown.csv", b"note,dx\nfever,flu\nitch,dermatitis\n", 3, "unknown label 'dermatitis'"),
    ("nolabel.jsonl", b'{"note": "x", "dx": null}\n', 1, "non-text value in 'dx'"),
    ("comma.csv", b'note,dx\nfever,"flu,rash"\n', 2, "unknown label 'flu,rash'"),
    ("deep.jsonl", b"[" * 100_000 + b"\n", 1, "unreadable JSON"),
    ("hugeint.jsonl", b'{"note": "x", "dx": ' + b"9" * 5000 + b"}\n", 1, "unreadable JSON"),
    ("surrogate.jsonl", b'{"note": "\\ud800", "dx": "flu"}\n', 1, "unpaired surrogate"),
])
def test_bad_data_files_name_the_file_and_line(tmp_path, name, content, where, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        _read(path)
    assert (err.value.path, err.value.line) == (str(path), where)
    assert str(err.value).startswith(f"{path}:{where}: ") and message in str(err.value)


def test_a_csv_field_past_the_readers_limit_names_its_line(tmp_path):
    path = tmp_path / "long_field.csv"
    path.write_text("note,dx\nfever,flu\n" + "x" * 131_073 + ",flu\n")
    with pytest.raises(DataError, match=r"long_field\.csv:3: unreadable CSV .*field limit"):
        _read(path)


def test_repeated_label_names_are_refused(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("note,dx\nfever,flu\n")
    with pytest.raises(DataError, match="'flu' more than once"):
        read_records(path, "note", "dx", ("flu", "rash", "flu"))
    with pytest.raises(ConfigError, match="data.labels must be distinct"):
        from_mapping({"data": {"source": "files", "labels": ["flu", "rash", "flu"]}})


def test_a_huge_file_reads_and_its_last_bad_line_is_named(tmp_path):
    path = tmp_path / "huge.csv"
    row = "patient reports fever and a dry cough for three days and no travel,flu\n"
    rows = 4_000_000 // len(row)
    path.write_text("note,dx\n" + row * rows)
    assert len(_read(path)) == rows
    with path.open("a") as handle:
        handle.write("itch,dermatitis\n")
    with pytest.raises(DataError) as err:
        _read(path)
    assert err.value.line == rows + 2 and "unknown label 'dermatitis'" in str(err.value)


# ------------------------------------------------------------- generated: configs

FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.text(max_size=12),
    st.sampled_from(["1e-9", "8", "-1", "nan", "inf", "", " ", "a,b", "auto", "off", "mean",
                     "krum", "files", "icd10", "prv", "cpu", "0.5", "dirichlet"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=4)


@st.composite
def configs(draw):
    """Mostly real sections and settings with plausible or hostile values; sometimes a
    list, a scalar, an unknown section or a section that is not a mapping."""
    if draw(st.integers(0, 9)) == 0:
        return draw(VALUES)
    data = {}
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(list(SECTIONS)) | st.text(max_size=6) | st.integers())
        if name in FIELDS and draw(st.integers(0, 5)):
            keys = st.sampled_from(FIELDS[name]) | st.text(max_size=6)
            data[name] = draw(st.dictionaries(keys, VALUES, max_size=4))
        else:
            data[name] = draw(VALUES)
    return data


def _keys(value) -> set[str]:
    """Every key in nested data, as text."""
    if isinstance(value, dict):
        return {str(k) for k in value} | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def _mentions(message: str, name: str) -> bool:
    """`name` is in `message` as it is or as repr shows it."""
    return bool(name) and (name in message or repr(name)[1:-1] in message)


def _names_a_key(message: str, data) -> bool:
    return any(_mentions(message, name) for name in [*SECTIONS, *_keys(data)])


@corpus(200)
@given(data=configs(), damage=st.sampled_from(["none"] * 6 + ["cut", "insert", "latin-1"]),
       where=st.integers(0, 10_000), extra=st.text(min_size=1, max_size=3))
def test_generated_yaml_loads_or_names_the_file_and_key(folder, data, damage, where, extra):
    text = yaml.safe_dump(data, allow_unicode=True)
    at = where % (len(text) + 1)
    text = {"none": text, "cut": text[:at], "insert": text[:at] + extra + text[at:],
            "latin-1": text + "# Zürich\n"}[damage]
    path = folder / "generated.yaml"
    path.write_bytes(text.encode("latin-1" if damage == "latin-1" else "utf-8",
                                 errors="replace"))
    try:
        assert isinstance(load_yaml(path), Config)
    except ConfigError as err:
        message = str(err)
        assert str(path) in message
        assert re.search(r"line \d+|:\d+:", message) or _names_a_key(message, data), message


@corpus(80)
@given(base=configs(),
       pairs=st.lists(st.tuples(
           st.sampled_from([f"{s}.{k}" for s, keys in FIELDS.items() for k in keys])
           | st.text(max_size=8),
           st.sampled_from(["1e-9", "3", "-1", "[a, b]", "[", "{x: 1}", "", "true", "8.5",
                           "'quoted'", "a,b", "null", ".inf"]) | st.text(max_size=6)),
           max_size=3))
def test_generated_set_values_load_or_name_the_key(folder, base, pairs):
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(base, allow_unicode=True))
    try:
        assert isinstance(load_yaml(path, _overrides([f"{k}={v}" for k, v in pairs])), Config)
    except ConfigError as err:
        message = str(err)
        assert _names_a_key(message, base) or any(
            _mentions(message, f"{k}={v}".partition("=")[0].strip())
            or _mentions(message, f"{k}={v}") for k, v in pairs), message


@corpus(120)
@given(data=configs())
def test_generated_mappings_build_or_name_the_key(data):
    try:
        cfg = from_mapping(data)
    except ConfigError as err:
        assert _names_a_key(str(err), data) or "mapping of sections" in str(err), str(err)
    else:  # whatever loads survives Flower's run config unchanged
        assert from_run_config(cfg.to_run_config()) == cfg


# Text without NUL: NUL bytes come from UTF-16 encodings and damaged bytes.
CHARACTERS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
LABEL = st.sampled_from(["flu", "rash", "flu ", " rash", "flu,rash", "", "Flu"]) \
    | st.text(CHARACTERS, max_size=5)


@corpus(100)
@given(labels=st.lists(LABEL, min_size=2, max_size=5))
def test_label_names_are_distinct_and_survive_the_run_config(labels):
    fine = (len(set(labels)) == len(labels)
            and all(n and n == n.strip() and "," not in n for n in labels))
    try:
        cfg = from_mapping({"data": {"source": "files", "labels": labels}})
    except ConfigError as err:
        assert not fine and "data.labels" in str(err), str(err)
    else:
        assert fine and from_run_config(cfg.to_run_config()).data.labels == tuple(labels)


# ------------------------------------------------------------ generated: node configs

NODE_VALUES = st.one_of(
    st.text(max_size=10), st.integers(-5, 10**6), st.floats(), st.booleans(),
    st.sampled_from(["1e-9", "8", "a,b", "flu,flu", "0.1", "/tmp/x.csv", "", "main"]))


@st.composite
def node_configs(draw):
    base = draw(st.sampled_from([
        {}, {"partition-id": 0, "num-partitions": 2},
        {"site": "a", "state-dir": "/s", "data-file": "/d.csv", "epsilon-budget": 8,
         "delta": 1e-6}]))
    keys = st.sampled_from(NODE_KEYS) | st.sampled_from([k.replace("-", "_") for k in NODE_KEYS]) \
        | st.text(max_size=8)
    return {**base, **draw(st.dictionaries(keys, NODE_VALUES, max_size=4))}


@corpus(250)
@given(node=node_configs())
def test_generated_node_configs_parse_or_name_the_key(node):
    try:
        assert isinstance(from_node_config(node), NodeConfig)
    except ConfigError as err:
        message = str(err)
        assert any(_mentions(message, k) for k in [*NODE_KEYS, *map(str, node)]), message


# -------------------------------------------------------------- generated: data files

WORDS = st.text(CHARACTERS, min_size=1, max_size=30)
TEXTS = st.one_of(WORDS, WORDS, WORDS, st.sampled_from(  # a quarter of them hostile
    ["fever, cough", 'said "ouch"', "line\nbreak", " ", "", "x" * 131_073]))
CELL = st.one_of(TEXTS, TEXTS, TEXTS, st.integers(), st.none(), st.floats(),
                 st.lists(st.integers(), max_size=2))


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    """A CSV or JSONL file of records with hostile text, labels, columns and encodings."""
    suffix = draw(st.sampled_from([".csv", ".jsonl"]))
    columns = draw(st.sampled_from([("note", "dx")] * 4 + [("text", "dx"), ("note", "note", "dx"),
                                                           ("dx", "note", "extra")]))
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        width = len(columns) + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))  # ragged at times
        cells = draw(st.lists(CELL if suffix == ".jsonl" else TEXTS,
                              min_size=width, max_size=width))
        rows.append([draw(st.sampled_from(LABELS * 3) | LABEL) if column == "dx" else cell
                     for column, cell in zip(columns + ("more",), cells)])
    if suffix == ".csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows(rows)
        text = out.getvalue()
    else:
        lines = [json.dumps(dict(zip(columns, cells))) for cells in rows]
        lines += draw(st.lists(st.text(CHARACTERS, max_size=12) | st.sampled_from(["[1]", "{"]),
                               max_size=1))
        text = "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n"]))
    encoding = draw(st.sampled_from(["utf-8"] * 5 + ["utf-8-sig", "latin-1", "utf-16",
                                                     "cp1252"]))
    raw = text.encode(encoding, errors="replace")
    if draw(st.integers(0, 4)) == 0:  # a few damaged bytes
        at = draw(st.integers(0, len(raw)))
        junk = st.sampled_from([b"\xff", b"\xc3", b"\x00", b'"', b"\r", b"\n,", b"\xe2\x80"])
        raw = raw[:at] + draw(junk | st.binary(min_size=1, max_size=3)) + raw[at:]
    return suffix, raw


def _check_data(path: Path, raw: bytes) -> None:
    try:
        ds = read_records(path, "note", "dx", LABELS)
    except DataError as err:
        assert err.path == str(path) and err.line is not None, str(err)
        assert 1 <= err.line <= raw.count(b"\n") + raw.count(b"\r") + 2, str(err)
        assert str(err).startswith(f"{path}:{err.line}: "), str(err)
    else:
        assert len(ds) > 0 and set(ds.labels) <= set(range(len(LABELS)))


@corpus(150)
@given(file=data_files())
def test_generated_data_files_read_or_name_the_line(folder, file):
    suffix, raw = file
    path = folder / f"generated{suffix}"
    path.write_bytes(raw)
    _check_data(path, raw)


@corpus(100)
@given(suffix=st.sampled_from([".csv", ".jsonl"]), raw=st.binary(max_size=300))
def test_random_bytes_read_or_name_the_line(folder, suffix, raw):
    path = folder / f"bytes{suffix}"
    path.write_bytes(raw)
    _check_data(path, raw)


# ----------------------------------------------------------------- generated: ledgers

@pytest.fixture(scope="module")
def ledger(tmp_path_factory) -> tuple[Path, bytes]:
    """A clean signed ledger, its public key beside it."""
    root = tmp_path_factory.mktemp("ledger")
    key = load_or_create_site_key(root / "keys")
    path = root / "hospital_a.jsonl"
    build_ledger(path, key)
    (root / "hospital_a.pub.pem").write_text(public_key_pem(key.public_key()))
    return path, path.read_bytes()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                    | st.floats(allow_nan=False, allow_infinity=False),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=5)
ENTRY_FIELDS = ["kind", "site", "seq", "prev_hash", "hash", "signature", "epsilon", "delta",
                "epsilon_budget", "accountant", "mechanism", "dataset", "data_fingerprint",
                "noise_multiplier", "sample_rate", "steps", "round", "key_fingerprint"]
# The verifier's PLD grows with steps and 1/σ: σ = 1e-6 asks numpy for petabytes, 10⁹ steps
# run for hours. Re-derivation is fed values it can finish; the reader gets any value.
MECHANISM_VALUES = st.sampled_from([None, True, "1", [], {}, -1, 0, 0.0, 0.5, 1, 1.0, 2.5, 30])


@st.composite
def changes(draw, any_number: bool = True) -> tuple:
    """One change to a five-entry ledger: (how, line, field, value, junk bytes, offset)."""
    how = draw(st.sampled_from(["field", "field", "field", "drop", "line", "bytes", "cut",
                                "swap", "copy"]))
    name = draw(st.sampled_from(ENTRY_FIELDS))
    value = draw(MECHANISM_VALUES if not any_number and name in
                 ("noise_multiplier", "sample_rate", "steps") else JSON)
    return (how, draw(st.integers(0, 4)), name, value, draw(st.binary(max_size=40)),
            draw(st.integers(0, 10**6)))


def _mangle(clean: bytes, change: tuple) -> tuple[bytes, bool]:
    """(the changed ledger, whether a verifier must notice the change)."""
    how, line, name, value, junk, at = change
    if how in ("bytes", "cut"):
        at %= len(clean)
        return clean[:at] + (junk + clean[at:] if how == "bytes" else b""), False
    lines = clean.decode().splitlines(keepends=True)
    if how == "field":
        entry = json.loads(lines[line])
        detectable = name not in entry or canonical_json(entry[name]) != canonical_json(value)
        entry[name] = value
        lines[line] = canonical_json(entry) + "\n"
    elif how == "drop":
        detectable = line < len(lines) - 1  # without the server's heads a cut tail is a ledger
        del lines[line]
    elif how == "line":
        detectable = True
        lines[line] = junk.decode("latin-1") + "\n"
    elif how == "swap":
        detectable = True
        lines[line], lines[line - 1] = lines[line - 1], lines[line]
    else:
        detectable = True
        lines.insert(line, lines[line])
    return "".join(lines).encode("latin-1" if how == "line" else "utf-8"), detectable


@corpus(150)
@given(change=changes())
def test_mangled_ledgers_read_or_name_the_file_and_line(ledger, change):
    path, clean = ledger
    data, _ = _mangle(clean, change)
    mangled = path.with_name("read.jsonl")
    mangled.write_bytes(data)
    try:
        entries = read_entries(mangled)
    except LedgerFormatError as err:
        assert str(mangled) in str(err) and re.search(r"Line \d+ ", str(err)), str(err)
    else:
        assert all(isinstance(e, dict) for e in entries)


@corpus(30)
@given(change=changes(any_number=False))
def test_mangled_ledgers_never_break_the_verifier_and_changes_are_found(ledger, change):
    path, clean = ledger
    data, detectable = _mangle(clean, change)
    assume(data != clean)
    mangled = path.with_name("hospital_b.jsonl")
    if not mangled.with_suffix(".pub.pem").exists():
        mangled.with_suffix(".pub.pem").write_bytes(path.with_suffix(".pub.pem").read_bytes())
    mangled.write_bytes(data)
    report = verify_path(mangled)
    assert len(report.sites) == 1
    if detectable:
        assert not report.ok


@pytest.mark.parametrize("field, value", [("noise_multiplier", 1e-6), ("steps", 10**9)])
def test_a_ledger_claiming_a_tiny_noise_multiplier_is_a_problem_not_a_crash(ledger, field,
                                                                            value):
    """σ=1e-6 would need a PLD of ~5e14 points; 10^9 steps, hours of composition."""
    path, clean = ledger
    lines = clean.decode().splitlines(keepends=True)
    entry = json.loads(lines[0])
    entry[field] = value
    mangled = path.with_name("hospital_c.jsonl")
    mangled.write_text(canonical_json(entry) + "\n" + "".join(lines[1:]))
    assert not verify_path(mangled).ok


# ----------------------------------------------------------------- the command line

def test_the_command_line_prints_one_line_without_a_traceback(command):
    process, bad = command
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    assert stderr.startswith("error:") and "Traceback" not in stderr
    assert str(bad) in stderr and len(stderr.strip().splitlines()) == 1
