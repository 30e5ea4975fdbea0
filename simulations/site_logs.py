"""Why a simulated site sent nothing usable, read from the site's own log.

At a hospital the server learns only a failure's code and reference, and a refusal's
code (client/releases.py): the details stay in the site's `site.log`. In a simulation
the researcher is every site and owns every log, so after the run `fedcare simulate`
reads each site's log (`<site.state_dir>/<site>/site.log`) and says, per site by name,
what went wrong: the failure's message (file, line, what was wrong), the refusal's
reason, or the last thing a site that timed out had logged.

A site's log lines, as the site writes them:

    error <ref> (<code>): <message>        then its traceback (client/releases.py)
    node <id>                              the Flower node this site answers as
    <time> release refusal run=<run> round=<n> ... refused: <reason>; ε per <unit> spent ...
    <time> round <n>: trained <phase>, ... in <seconds> s (kept here)
    <time> pooled features of <n> records computed in <seconds> s (kept in <folder>)

The last is the site's own time for a round's fit (training, accounting, its ledger):
the bench's orchestration section reads it, since the server is never told.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from client.node import LOG_FILE

ERROR = re.compile(r"^error ([0-9a-f]+) \(([a-z-]+)\): (.*)$")
NODE = re.compile(r"^node (\d+)$")
REFUSAL = re.compile(r"release refusal run=(\S+) round=(\d+) .*?refused: (.*); ε per \w+ spent ")
REFERENCE = re.compile(r"reference ([0-9a-f]+)")
# how a site words a refusal in its ledger (client/site.py): a round's training, or not
# evaluating (personalising) it; the reason follows, the same from round to round
PREFIX = re.compile(r"^\S+ (refuses|does not \w+) round \d+: (.*)$")
TRAINED = re.compile(r"round (\d+): trained \w+, .* in ([0-9.]+) s \(kept here\)$")
FEATURES = re.compile(r"pooled features of \d+ records computed in ([0-9.]+) s")
MAX_CAUSES = 3  # per site line; the rest are in the site's log


@dataclass
class SiteLog:
    name: str
    path: Path
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)  # ref -> (code, message)
    nodes: set[str] = field(default_factory=set)
    refusals: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    last: str = ""  # the last line the site logged that is not a traceback's
    fit_seconds: dict[int, float] = field(default_factory=dict)  # round -> its fit's seconds
    feature_seconds: float = 0.0  # computing pooled features (none when all were cached)


def read_log(name: str, path: Path) -> SiteLog:
    site = SiteLog(name, path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return site
    for line in lines:
        if not line or line[0].isspace() or line.startswith("Traceback "):
            continue  # a traceback's lines, under its error line
        if found := ERROR.match(line):
            site.errors[found.group(1)] = (found.group(2), found.group(3))
        elif found := NODE.match(line):
            site.nodes.add(found.group(1))
            continue
        elif found := REFUSAL.search(line):
            key = (found.group(1), int(found.group(2)))
            site.refusals.setdefault(key, []).append(found.group(3))
        elif found := TRAINED.search(line):
            site.fit_seconds[int(found.group(1))] = float(found.group(2))
        elif found := FEATURES.search(line):
            site.feature_seconds += float(found.group(1))
        site.last = line
    return site


def read_logs(state_dir: Path) -> dict[str, SiteLog]:
    """Every site's log under the simulation's site state folder, by site name."""
    return {log.parent.name: read_log(log.parent.name, log)
            for log in sorted(Path(state_dir).glob(f"*/{LOG_FILE}"))}


def _problem_rows(run_dir: Path) -> list[dict]:
    """The run log's rows of replies not accepted: refused, rejected, failed."""
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if (isinstance(row, dict) and row.get("phase") in ("train", "evaluate")
                and row.get("site") != "all"
                and (row.get("status", "accepted") != "accepted" or row.get("refused"))):
            rows.append(row)
    return rows


def _site_of(row: dict, logs: dict[str, SiteLog]) -> SiteLog | None:
    """The site a row is about: by name, by the failure's reference, or by the node id
    the site logged (a site that failed before its first answer is a node to the server)."""
    name = str(row.get("site", ""))
    if name in logs:
        return logs[name]
    ref = REFERENCE.search(str(row.get("status", "")))
    node = name.removeprefix("node-") if name.startswith("node-") else None
    for log in logs.values():
        if (ref and ref.group(1) in log.errors) or (node and node in log.nodes):
            return log
    return None


def _cause(row: dict, log: SiteLog | None, run_id: str) -> str:
    """What the site's log says about one reply the server did not accept."""
    status, when = str(row.get("status", "")), f"round {row.get('round')} {row.get('phase')}"
    ref = REFERENCE.search(status)
    if ref and log and ref.group(1) in log.errors:
        code, message = log.errors[ref.group(1)]
        return f"{code}: {message}"
    if row.get("refused"):
        found = log.refusals.get((run_id, int(row.get("round", 0))), []) if log else []
        said = [PREFIX.match(r) for r in found]  # "<site> refuses round 2: <reason>"
        ours = [m.group(2) for m in said if m and (m.group(1) == "refuses") ==
                (row.get("phase") == "train")] or found
        return f"{row['refused']}: " + ("; ".join(dict.fromkeys(ours)) or
                                        f"refused {when} (its log holds no reason)")
    if "no answer within" in status:
        last = f"; the last line it logged: {log.last}" if log and log.last else ""
        return f"timeout: {status.removeprefix('failed: ')} in {when}{last}"
    return status  # rejected by the server: the server's own reason


def explain(run_dir: Path, state_dir: Path) -> list[str]:
    """One line per site that sent nothing usable in some round, by name, with the
    causes its own log gives (the first MAX_CAUSES distinct ones)."""
    run_dir = Path(run_dir)
    logs = read_logs(state_dir)
    causes: dict[str, dict[str, list[str]]] = {}
    for row in _problem_rows(run_dir):
        log = _site_of(row, logs)
        name = log.name if log else str(row.get("site", "?"))
        when = f"round {row.get('round')} {row.get('phase')}"
        causes.setdefault(name, {}).setdefault(_cause(row, log, run_dir.name), []).append(when)
    lines = []
    for name, found in sorted(causes.items()):
        parts = [f"{cause} ({', '.join(whens)})" for cause, whens in found.items()]
        more = len(parts) - MAX_CAUSES
        lines.append(f"{name}: " + "; ".join(parts[:MAX_CAUSES])
                     + (f"; and {more} more in {logs[name].path}" if more > 0 and name in logs
                        else ""))
    return lines
