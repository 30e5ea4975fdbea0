"""What the server accepts from a site, checked before anything uses it.

A site may lie, or be broken. Every reply is checked here first: its metrics against
the keys a site may send (client/releases.py declares them on the site's side; the
types and ranges the server accepts are written here), its update tensor by tensor
(dtype before any cast, shape, finite values in the dtype the adapter keeps), and its
FedAvg weight against the declared cap. A reply that fails a check is not used at all;
the run log names the site and the reason.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Sequence

import numpy as np

from common.message_keys import Keys
from common.privacy.ledger import format_head, parse_head, parse_ledger_bytes

Check = Callable[[Any], bool]


def number(low: float, high: float) -> Check:
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                      and math.isfinite(v) and low <= v <= high)


def integer(low: int, high: int) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def text(limit: int) -> Check:
    return lambda v: isinstance(v, str) and len(v) <= limit


def flag(v: Any) -> bool:
    return isinstance(v, bool)


SHARE, BIG = number(0.0, 1.0), 1e6  # BIG: far above any ε, σ or clipping norm in use
LEDGER_LIMIT = 64 * 2**20  # characters of a ledger's JSONL text (years of rounds)

_COMMON: dict[str, Check] = {
    Keys.SITE: text(128), Keys.REFUSED: text(64), Keys.EPSILON: number(0.0, BIG),
    Keys.LEDGER: text(LEDGER_LIMIT), Keys.LEDGER_HEAD: text(256),
    Keys.SITE_PUBLIC_KEY: text(4096),
}
SITE_METRICS: dict[str, dict[str, Check]] = {
    "train": {
        **_COMMON, Keys.PRIVATE: flag, Keys.SECURE_AGGREGATION: flag,
        Keys.DELTA: SHARE, Keys.NOISE_MULTIPLIER: number(0.0, BIG), Keys.SAMPLE_RATE: SHARE,
        Keys.STEPS: integer(0, 10**7), Keys.MAX_GRAD_NORM: number(0.0, BIG),
        Keys.BYTES_SENT: integer(0, 2**40)},
    "evaluate": {
        **_COMMON, Keys.EVALUATED: flag, Keys.PERSONALIZED_ADAPTER: flag,
        Keys.PERSONALIZED_REFUSED: text(64), Keys.ERROR: text(64), Keys.ERROR_REF: text(64),
        **{f"{prefix}{name}": SHARE for prefix in ("", "personalized_")
           for name in ("accuracy", "macro_recall", "macro_f1")}},
}


def check_metrics(phase: str, metrics: dict) -> str:
    """'' if every key is one a site may send in `phase` and its value has the right
    type and range; else what is wrong (the first problem, without the value)."""
    allowed = SITE_METRICS[phase]
    for key, value in metrics.items():
        check = allowed.get(key)
        if check is None:
            return f"metric {str(key)[:40]!r} is not one a site sends"
        if not check(value):
            return f"metric {key!r} has a {type(value).__name__} out of type or range"
    return ""


def check_ledger(ledger: Any, head: Any) -> str:
    """'' if a reply's ledger is what a site keeps (JSON lines, each an object, the last
    with a seq and hash) and its head names that last entry; else what is wrong. Its
    signatures and ε are the auditor's to verify (`fedcare audit verify`); a ledger the
    server cannot even read back is not kept, and its reply is not used."""
    if ledger is None and head is None:
        return ""
    if not isinstance(ledger, str) or not isinstance(head, str):
        return "a ledger comes with its head, both as text"
    if not ledger:
        return "" if not head else f"ledger head {head[:20]!r} names an entry of an empty ledger"
    good, bad = parse_ledger_bytes(ledger.encode("utf-8", "surrogatepass"))
    if bad:
        return f"ledger: {bad[0][1]}"
    last = good[-1][1]
    try:
        claimed, kept = parse_head(head), format_head(last["seq"], last["hash"])
    except (KeyError, TypeError, ValueError):
        return "ledger: its last entry has no seq and hash, or its head is not 'seq:hash'"
    if format_head(*claimed) != kept:
        return f"ledger head {head[:20]!r}... is not its last entry's ({kept[:20]!r}...)"
    return ""


def check_weight(num_examples: Any, cap: int) -> tuple[int, str]:
    """(the FedAvg weight to use, '' or why the reply is rejected). A claim above the
    cap counts as the cap: one site cannot outweigh the others by saying so."""
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples <= 0:
        return 0, f"num_examples {num_examples!r} is not a positive count"
    return min(num_examples, cap), ""


def decode_arrays(tensors: Any, shapes: Sequence[tuple[int, ...]],
                  slack: int = 8) -> tuple[list[np.ndarray] | None, str]:
    """(the update's arrays, '') or (None, why not): at most `slack` bytes per expected
    element (float64 is 8) plus a header each, counted before anything is read, then each
    tensor read as an .npy without pickle (an object array, or bytes that are no .npy,
    is named, not raised)."""
    if not isinstance(tensors, (list, tuple)) or not all(
            isinstance(t, (bytes, bytearray)) for t in tensors):
        return None, "the update is not a list of serialised tensors"
    cap = slack * sum(math.prod(s) for s in shapes) + 1024 * (len(shapes) + 1)
    size = sum(len(t) for t in tensors)
    if size > cap:
        return None, f"the update is {size} bytes, above the {cap} an adapter takes"
    arrays = []
    for i, tensor in enumerate(tensors):
        array, problem = _read_npy(bytes(tensor))
        if problem:
            return None, f"tensor {i} {problem}"
        arrays.append(array)
    return arrays, ""


def _read_npy(data: bytes) -> tuple[np.ndarray | None, str]:
    """One .npy array from `data`, its header checked before numpy allocates what the
    header claims (a header may claim terabytes): a plain dtype, and exactly the bytes
    its shape needs."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(fp)
    except (ValueError, OSError, EOFError, TypeError, SyntaxError) as err:
        return None, f"is not an .npy array ({str(err)[:60]})"
    if dtype.hasobject:
        return None, "is an object array (it would need pickle to read)"
    need = math.prod(shape) * dtype.itemsize
    if need != len(data) - fp.tell():
        return None, f"claims shape {shape} of {dtype}, {need} bytes; it holds " \
                     f"{len(data) - fp.tell()}"
    return np.load(io.BytesIO(data), allow_pickle=False), ""


def check_arrays(arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]],
                 dtypes: Sequence[np.dtype] | None, frozen: set[int]) -> str:
    """'' if the update may be averaged, else why not: tensor count, numeric dtype
    (checked before any cast), shape (empty for a frozen tensor), finite values both as
    sent and in the dtype the adapter keeps (1e300 in float64 is finite, inf in float32)."""
    if len(arrays) != len(shapes):
        return f"{len(arrays)} tensors, expected {len(shapes)}"
    for i, (a, shape) in enumerate(zip(arrays, shapes)):
        if a.dtype.kind not in "fiu":
            return f"tensor {i} has dtype {a.dtype}, not a number type"
        expected = (0,) if i in frozen else tuple(shape)
        if a.shape != expected:
            return f"tensor {i} has shape {a.shape}, expected {expected}"
        with np.errstate(over="ignore", invalid="ignore"):
            kept = a if dtypes is None else a.astype(dtypes[i])  # as it would be kept
        if not np.isfinite(a).all() or not np.isfinite(kept).all():
            return f"tensor {i} has NaN or infinite values (or overflows {kept.dtype})"
    return ""


def bound_norm(arrays: list[np.ndarray], sent: list[np.ndarray],
               bound: float) -> tuple[list[np.ndarray], float]:
    """The update with its change from the global adapter it started from (`sent`)
    scaled down to L2 norm `bound` when longer (norm bounding; 0 = no bound), and the
    norm of the change as it came."""
    delta = [a.astype(np.float64) - s.astype(np.float64) for a, s in zip(arrays, sent)]
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta))
    if bound <= 0 or norm <= bound:
        return arrays, norm
    scale = bound / norm
    return [(s.astype(np.float64) + scale * d).astype(a.dtype)
            for a, s, d in zip(arrays, sent, delta)], norm
