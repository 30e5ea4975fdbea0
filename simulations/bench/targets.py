"""The project's targets and the arithmetic that judges a measurement against them.

Pure functions over numbers: no model, no I/O, so the tests can pin them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Mapping

MET, MISSED, NOT_RUN = "met", "missed", "not run"


@dataclass(frozen=True)
class GapTarget:
    """`other` may trail `reference` by at most `limit_points` macro-F1 points."""
    name: str
    reference: str      # utility configuration names (see utility.CONFIGS)
    other: str
    limit_points: float


GAP_TARGETS = (
    GapTarget("DP ε=8 vs federated non-private", "fed_nonprivate", "dp_eps8", 3.0),
    GapTarget("DP ε=3 vs federated non-private", "fed_nonprivate", "dp_eps3", 5.0),
    GapTarget("federated non-private vs pooled non-private (same batch)", "pooled",
              "fed_nonprivate", 2.0),
    GapTarget("federated non-private vs pooled non-private (batch × sites)",
              "pooled_allbatch", "fed_nonprivate", 2.0),
)
DP_COST_LIMIT = 1.10       # a DP step may cost at most 1.10x a plain one, in time and memory
BYTES_LIMIT_PERCENT = 0.35  # an update may be at most 0.35% of the full fp32 model
ACCOUNTING_LIMIT = 0.01    # the claimed ε within 1% of dp-accounting's PLD


def mean_sd(values: Iterable[float | None]) -> dict:
    """{"mean", "sd", "n"} of the finite values (sd 0 for one value; None for none)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def paired_gap_points(reference: Mapping[int, float], other: Mapping[int, float]) -> dict:
    """Macro-F1 points by which `other` trails `reference`, paired by seed:
    100 * (reference - other) for each seed both have; positive = `other` is worse."""
    seeds = sorted(set(reference) & set(other))
    gaps = [100.0 * (reference[s] - other[s]) for s in seeds
            if reference[s] is not None and other[s] is not None]
    return {**mean_sd(gaps), "seeds": seeds}


def judge_at_most(value: float | None, limit: float) -> str:
    """met when `value` <= `limit` (a gap, a ratio, a share); not run when unmeasured.
    Floating-point noise at the limit (4.000000000000001 points) does not miss."""
    if value is None or not math.isfinite(value):
        return NOT_RUN
    return MET if value <= limit + 1e-9 * max(1.0, abs(limit)) else MISSED


def judge_gap(gap: Mapping, target: GapTarget) -> str:
    return judge_at_most(gap.get("mean"), target.limit_points)


def judge_relative(value: float | None, reference: float | None, limit: float) -> str:
    """met when |value / reference - 1| <= limit."""
    if value is None or reference is None or not reference:
        return NOT_RUN
    return judge_at_most(abs(value / reference - 1.0), limit)


def judge_at_least(value: float | None, limit: float) -> str:
    """met when `value` >= `limit` (a lead in points); not run when unmeasured."""
    if value is None or not math.isfinite(value):
        return NOT_RUN
    return MET if value >= limit - 1e-9 * max(1.0, abs(limit)) else MISSED
