"""A generated corpus of hostile replies at the wire (hypothesis, derandomised), through
the real strategy and the real run log: random metric dicts, serialised tensors (dtypes,
shapes, sizes up to the cap and past it, NaN/inf, object arrays, bytes that are no
array, headers that lie), ledger payloads and FedAvg weights.

Each generated reply carries one defect, or is a valid edge (subnormal values, integer
tensors, a weight above the cap). Beside two honest sites it must never crash the
server, a defect must never reach the aggregate and must be rejected with its named
reason, and nothing else of a rejected reply is kept; an edge is accepted and averaged.
The counts by defect are printed at the end (`pytest -s tests/test_bad_replies.py`).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Parameters, Status, parameters_to_ndarrays
from hypothesis import assume, given
from hypothesis import strategies as st

from common.config import Config
from common.message_keys import Keys
from common.metrics import weighted_mean
from common.names import NAME
from server.inputs import SITE_METRICS
from server.optimizer import build_strategy
from server.run_log import RunRecorder
from server.strategy import SiteAwareStrategy
from tests.test_bad_input import corpus

SHAPES = [(3, 4), (4,)]
HOSTILE, HONEST = "site-x", ("site-h1", "site-h2")
HONEST_WEIGHT, CAP = 10, 1000  # each honest site's weight; the strategy's weight cap
SEEN: Counter = Counter()  # generated replies by family, for the closing count
RUNS = itertools.count()


def npy(array: np.ndarray) -> bytes:
    """`array` as Flower serialises a tensor (pickle allowed here only so that an
    object array can be written at all: the server must refuse to read it back)."""
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def honest_tensors(value: float = 1.0, dtype=np.float32) -> list[bytes]:
    return [npy(np.full(s, value, dtype=dtype)) for s in SHAPES]


# --- defects: each strategy gives (family, tensors, weight, metrics, reason pattern) ----
TRAIN_CHECKS = {k: v for k, v in SITE_METRICS["train"].items()
                if k not in (Keys.SITE, Keys.LEDGER, Keys.LEDGER_HEAD)}
ANY_VALUE = st.one_of(
    st.text(max_size=20), st.binary(max_size=20), st.booleans(), st.none(),
    st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True,
                                                              allow_infinity=True),
    st.lists(st.floats(allow_nan=True), max_size=3), st.lists(st.integers(), max_size=3))


def reply(family: str, why: str, tensors=None, weight=HONEST_WEIGHT, **metrics):
    return family, why, honest_tensors() if tensors is None else tensors, weight, metrics


@st.composite
def unknown_metric(draw):
    key = draw(st.text(min_size=1, max_size=30))
    assume(key not in SITE_METRICS["train"])
    return reply("metric: unknown key", r"metric .* is not one a site sends",
                 **{key: draw(ANY_VALUE)})


@st.composite
def metric_out_of_range(draw):
    key = draw(st.sampled_from(sorted(TRAIN_CHECKS)))
    value = draw(ANY_VALUE)
    assume(not TRAIN_CHECKS[key](value))
    return reply("metric: value out of type or range",
                 rf"metric '{key}' has a \w+ out of type or range", **{key: value})


@st.composite
def bad_site_name(draw):
    name = draw(st.one_of(st.text(max_size=140), st.sampled_from(
        ["../../etc", "a/b", "", ".hidden", "x" * 129, "a..b", "name\0"])))
    assume(not (NAME.fullmatch(name) and ".." not in name))
    return reply("site name not a plain name", r"site name .* is not a plain name",
                 **{Keys.SITE: name})


@st.composite
def weight(draw):
    value = draw(st.one_of(st.integers(max_value=0), st.booleans(), st.floats(),
                           st.text(max_size=5), st.none()))
    return reply("weight: not a positive count", r"num_examples .* is not a positive count",
                 weight=value)


@st.composite
def tensor_dtype(draw):
    dtype = draw(st.sampled_from(["complex64", "bool", "<U3", "S4", "datetime64[s]",
                                  "timedelta64[ms]", "V4", [("a", "<f4")]]))
    i = draw(st.integers(0, 1))
    tensors = honest_tensors()
    tensors[i] = npy(np.zeros(SHAPES[i], dtype=dtype))
    return reply("tensor: not a number type", rf"tensor {i} has dtype", tensors)


@st.composite
def tensor_object(draw):
    i = draw(st.integers(0, 1))
    tensors = honest_tensors()
    tensors[i] = npy(np.full(SHAPES[i], draw(st.sampled_from([None, "1.0", 1.0])),
                             dtype=object))
    return reply("tensor: object array (pickle)", rf"tensor {i} is an object array", tensors)


@st.composite
def tensor_not_npy(draw):
    i = draw(st.integers(0, 1))
    tensors = honest_tensors()
    good = tensors[i]
    tensors[i] = draw(st.one_of(
        st.binary(max_size=200),  # noise
        st.integers(0, len(good) - 1).map(lambda n: good[:n]),  # cut short
        st.just(good + b"\0" * draw(st.integers(1, 16))),  # trailing bytes
        st.just(good.replace(b"(3, 4)" if i == 0 else b"(4,)", b"(99999999999, 4)")),
        st.just(good.replace(b"<f4", b"|O")),  # a header that says object
    ))
    assume(tensors[i] != good)
    return reply("tensor: bytes that are no plain .npy",
                 rf"tensor {i} (is not an \.npy array|claims shape|is an object array)", tensors)


@st.composite
def tensor_shape(draw):
    i = draw(st.integers(0, 1))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
    assume(shape != SHAPES[i])
    tensors = honest_tensors()
    tensors[i] = npy(np.ones(shape, dtype=np.float32))
    return reply("tensor: wrong shape", rf"tensor {i} has shape", tensors)


@st.composite
def tensor_count(draw):
    n = draw(st.integers(0, 5))
    assume(n != len(SHAPES))
    tensors = [npy(np.ones(SHAPES[i % 2], np.float32)) for i in range(n)]
    return reply("tensor: wrong count", rf"{n} tensors, expected {len(SHAPES)}", tensors)


@st.composite
def tensor_not_finite(draw):
    i = draw(st.integers(0, 1))
    dtype = draw(st.sampled_from(["float16", "float32", "float64"]))
    bad = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e39, -1e300]))
    array = np.ones(SHAPES[i], dtype=dtype)
    with np.errstate(over="ignore"):
        array.flat[draw(st.integers(0, array.size - 1))] = bad
    tensors = honest_tensors()
    tensors[i] = npy(array)
    return reply("tensor: NaN, inf or overflow in float32", rf"tensor {i} has NaN or infinite",
                 tensors)


@st.composite
def tensor_oversize(draw):
    tensors = honest_tensors(dtype=np.float64)  # 8 bytes a value: what the cap allows
    tensors[draw(st.integers(0, 1))] += b"\0" * draw(st.integers(3300, 2**20))
    return reply("tensor: past the size cap", r"the update is \d+ bytes, above", tensors)


def _ledger_line(seq: int, digest: str) -> str:
    return json.dumps({"seq": seq, "hash": digest, "kind": "train", "epsilon": 1.0}) + "\n"


@st.composite
def ledger(draw):
    digest = draw(st.text("0123456789abcdef", min_size=64, max_size=64))
    text, head = draw(st.one_of(
        st.tuples(st.text(max_size=300), st.text(max_size=80)),  # anything at all
        st.tuples(st.just(_ledger_line(1, digest) + "not json\n"), st.just(f"1:{digest}")),
        st.tuples(st.just(json.dumps([1, 2]) + "\n"), st.just(f"1:{digest}")),  # no object
        st.tuples(st.just(_ledger_line(1, digest).rstrip("\n")), st.just(f"1:{digest}")),
        st.tuples(st.just(_ledger_line(1, digest)),  # a head that is not its last entry
                  st.integers(0, 9).map(lambda s: f"{s}:{'f' * 64}")),
        st.tuples(st.just(_ledger_line(2, digest)), st.just(f"1:{digest}")),
        st.tuples(st.just(json.dumps({"seq": "1"}) + "\n"), st.just(f"1:{digest}")),
        st.tuples(st.just(_ledger_line(1, digest)), st.none()),  # a ledger without its head
        st.tuples(st.none(), st.just(f"1:{digest}")),
        st.tuples(st.just('{"a": ' * 5000 + "\n"), st.just(f"1:{digest}")),  # deep nesting
    ))
    assume(not (text == "" and head == ""))  # an empty ledger and no head: a new site's
    metrics = {k: v for k, v in ((Keys.LEDGER, text), (Keys.LEDGER_HEAD, head)) if v is not None}
    return reply("ledger: unreadable, or its head is not its last entry", r"ledger", **metrics)


DEFECTS = st.one_of(unknown_metric(), metric_out_of_range(), bad_site_name(), weight(),
                    tensor_dtype(), tensor_object(), tensor_not_npy(), tensor_shape(),
                    tensor_count(), tensor_not_finite(), tensor_oversize(), ledger())


@st.composite
def edge(draw):
    """Unusual but valid: it must be accepted, and averaged as sent."""
    kind = draw(st.sampled_from(["subnormal", "integer", "weight above the cap"]))
    if kind == "subnormal":
        # subnormal in float32 once kept, or in float64 as sent (then 0 once kept)
        value = draw(st.sampled_from([1e-40, -1e-45, 1e-310]))
        return f"edge: {kind}", value, [npy(np.full(s, value, np.float64)) for s in SHAPES], 10
    if kind == "integer":
        value = draw(st.integers(-3, 3))
        return f"edge: {kind}", value, [npy(np.full(s, value, np.int64)) for s in SHAPES], 10
    return f"edge: {kind}", 2.0, honest_tensors(2.0), draw(st.integers(CAP + 1, 2**62))


# --- the real strategy and run log around one hostile reply ----------------------------
def _server(tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "bad-replies" / f"run-{next(RUNS)}"
    recorder = RunRecorder(folder, Config(), out=open("/dev/null", "w"))
    initial = Parameters(tensors=honest_tensors(0.0), tensor_type="numpy.ndarray")
    inner = build_strategy("fedavg", 1.0, 0.0, initial_parameters=initial,
                           evaluate_metrics_aggregation_fn=weighted_mean)
    strategy = SiteAwareStrategy(inner, SHAPES, recorder.record, max_weight=CAP)
    strategy.initialize_parameters(client_manager=None)
    return strategy, recorder, folder


def _fit(node: str, site: str, tensors: list[bytes], weight, metrics=None):
    return SimpleNamespace(cid=node), FitRes(
        Status(Code.OK, ""), Parameters(tensors=tensors, tensor_type="numpy.ndarray"),
        weight, {Keys.SITE: site, Keys.REFUSED: "", **(metrics or {})})


def _honest() -> list:
    return [_fit(str(i + 1), name, honest_tensors(), HONEST_WEIGHT)
            for i, name in enumerate(HONEST)]


def _statuses(folder) -> dict[str, str]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r[Keys.SITE]: r.get("status", "") for r in rows if r.get("phase") == "train"}


@corpus(400)
@given(DEFECTS)
def test_no_hostile_reply_crashes_the_server_or_reaches_the_aggregate(tmp_path_factory,
                                                                      case):
    family, why, tensors, weight, metrics = case
    SEEN[family] += 1
    strategy, recorder, folder = _server(tmp_path_factory)
    name = metrics.get(Keys.SITE, HOSTILE)
    params, _ = strategy.aggregate_fit(1, _honest() + [_fit("3", HOSTILE, tensors, weight,
                                                            metrics)], [])
    assert all(np.array_equal(a, np.full(s, 1.0, np.float32))  # the honest mean, alone
               for a, s in zip(parameters_to_ndarrays(params), SHAPES))
    statuses = _statuses(folder)
    filed = name if family != "site name not a plain name" else "node-3"
    status = statuses.pop(filed)
    assert status.startswith("rejected: ") and re.search(why, status), (family, status)
    assert statuses == {site: "accepted" for site in HONEST}  # both honest sites, untouched
    if filed == name:  # nothing else of a rejected reply is kept: no ledger, no head
        assert not list((folder / "ledgers").glob(f"{name}.*"))
    recorder.summary({}, {})  # the run's summary is written from these rows


@corpus(60)
@given(edge())
def test_valid_edges_are_accepted_and_averaged_as_sent(tmp_path_factory, case):
    family, value, tensors, weight = case
    SEEN[family] += 1
    strategy, _, folder = _server(tmp_path_factory)
    params, _ = strategy.aggregate_fit(1, _honest() + [_fit("3", HOSTILE, tensors, weight)], [])
    assert _statuses(folder)[HOSTILE] == "accepted"
    counted = min(weight, CAP)
    mean = (2 * HONEST_WEIGHT * 1.0 + counted * value) / (2 * HONEST_WEIGHT + counted)
    for a in parameters_to_ndarrays(params):
        assert a.dtype == np.float32 and np.allclose(a, mean, rtol=1e-6, atol=0)


EVALUATE_CHECKS = {k: v for k, v in SITE_METRICS["evaluate"].items()
                   if k not in (Keys.SITE, Keys.LEDGER, Keys.LEDGER_HEAD)}


@st.composite
def evaluate_defect(draw):
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(EVALUATE_CHECKS)))
        value = draw(ANY_VALUE)
        assume(not EVALUATE_CHECKS[key](value))
        return "evaluate: metric out of type or range", rf"metric '{key}'", {key: value}, 5
    count = draw(st.one_of(st.integers(max_value=-1), st.integers(CAP + 1), st.floats(),
                           st.booleans(), st.text(max_size=4)))
    assume(not isinstance(count, int) or isinstance(count, bool) or count < 0 or count > CAP)
    return "evaluate: weight not a count", r"num_examples .* is not a count", {}, count


@corpus(120)
@given(evaluate_defect(), ANY_VALUE)
def test_no_hostile_evaluation_crashes_the_server_or_reaches_its_mean(tmp_path_factory, case,
                                                                      loss):
    """Evaluation replies too: a bad one is rejected by name; the loss field (a site
    sends none) is never used, whatever it holds."""
    family, why, metrics, count = case
    SEEN[family] += 1
    strategy, _, folder = _server(tmp_path_factory)
    honest = [(SimpleNamespace(cid=str(i + 1)), EvaluateRes(
        Status(Code.OK, ""), loss, HONEST_WEIGHT, {Keys.SITE: name, "accuracy": 0.5}))
        for i, name in enumerate(HONEST)]
    hostile = (SimpleNamespace(cid="3"), EvaluateRes(
        Status(Code.OK, ""), loss, count, {Keys.SITE: HOSTILE, "accuracy": 1.0, **metrics}))
    _, means = strategy.aggregate_evaluate(1, honest + [hostile], [])
    assert means.get("accuracy") == pytest.approx(0.5)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    status = {r[Keys.SITE]: r.get("status") for r in rows if r.get(Keys.SITE)}[HOSTILE]
    assert status.startswith("rejected: ") and re.search(why, status), (family, status)


def test_zz_the_corpus_covered_every_family_and_its_counts_are_printed():
    """Runs last (file order): every family was generated, and the counts are printed."""
    families = {"metric: unknown key", "metric: value out of type or range",
                "site name not a plain name", "weight: not a positive count",
                "tensor: not a number type", "tensor: object array (pickle)",
                "tensor: bytes that are no plain .npy", "tensor: wrong shape",
                "tensor: wrong count", "tensor: NaN, inf or overflow in float32",
                "tensor: past the size cap",
                "ledger: unreadable, or its head is not its last entry",
                "evaluate: metric out of type or range", "evaluate: weight not a count",
                "edge: subnormal", "edge: integer", "edge: weight above the cap"}
    if not SEEN:
        pytest.skip("run with the corpus tests above (the whole file)")
    assert families <= set(SEEN), families - set(SEEN)
    defects = sum(n for f, n in SEEN.items() if not f.startswith("edge"))
    print(f"\nhostile replies: {defects} defects, each rejected by name, 0 crashes, "
          f"0 reaching the aggregate; {sum(SEEN.values()) - defects} valid edges accepted")
    for family, n in sorted(SEEN.items()):
        print(f"  {n:4d}  {family}")
