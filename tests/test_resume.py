"""A server killed with SIGKILL at random points resumes with nothing lost.

The whole simulation (server, Ray, the sites' actors) is killed as one process group
at a random moment, then resumed from the run directory, again and again until the
run finishes; then a new run is killed the same way, until the kills are spent. After
every kill no site's ledger has lost an entry; at the end of each run every round was
aggregated once, no site released any round twice (a site asked again re-sends its
reply, or refuses if the reply was lost), no site passed its budget, and the audit
verifies.

Every kill costs a whole start-up (Ray, torch, the sites' models: 15-45 s on 2 cores),
so `make test` kills 4 times and `.ci/run` adds a soak of 20. FEDCARE_KILLS sets the
number of kills (e.g. FEDCARE_KILLS=300 for a long soak), FEDCARE_KILL_SEED the seed
of the kill times, FEDCARE_KILL_WINDOW the latest kill, in seconds after a start (30;
it grows by a quarter after a start that ended no round, so every run progresses, and
shrinks by a fifth after a start that finished its run, so kills land in its life).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import dump_yaml
from common.privacy.ledger import LEDGER_FILE
from common.privacy.verify import verify_path
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("FEDCARE_KILLS", "4"))
SEED = int(os.environ.get("FEDCARE_KILL_SEED", "0"))
WINDOW = float(os.environ.get("FEDCARE_KILL_WINDOW", "30"))
ROUNDS = 3
ROOT = Path(__file__).resolve().parents[1]

RUN = """
import sys
from pathlib import Path
from common.config import load_yaml
from simulations.run import resume, simulate
config, run = Path(sys.argv[1]), Path(sys.argv[2])
if (run / "config.yaml").is_file():
    resume(run)
else:
    simulate(load_yaml(config), run)
"""


def _start(config: Path, run: Path, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, str(config), str(run)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(pid: int) -> set[int]:
    """`pid` and every process it started, at any depth (Ray starts its head processes
    in sessions of their own, so the process group alone does not hold them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        found.add(todo[-1])
        todo += [c for c in children.get(todo.pop(), []) if c not in found]
    return found


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the simulation and everything it started: frozen first (SIGSTOP), so
    that nothing starts a process between finding the tree and killing it."""
    tree: set[int] = set()
    while (found := _descendants(process.pid)) != tree:
        _signal(found - tree, signal.SIGSTOP)
        tree = found
    _signal(tree, signal.SIGKILL)
    process.wait()


def _checkpointed(run: Path) -> int:
    """The last round the run's checkpoint holds (0: none yet)."""
    from server.checkpoint import CHECKPOINT_FILE, load

    return load(run).round if (run / CHECKPOINT_FILE).is_file() else 0


def _ledgers(run: Path) -> dict[str, list[str]]:
    return {p.parent.name: p.read_text(encoding="utf-8").splitlines()
            for p in (run / "site_state").glob(f"*/{LEDGER_FILE}")}


def _releases(lines: list[str]) -> list[tuple[str, int]]:
    entries = [json.loads(line) for line in lines]
    return [(e["kind"], e["round"]) for e in entries if e["kind"] in ("train", "evaluate")]


def _check_finished(run: Path, budgets: dict[str, float]) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_aggregated"] == ROUNDS and summary["audit"]["verified"] is True
    assert verify_path(run).ok
    for site, lines in _ledgers(run).items():
        released = _releases(lines)
        assert sorted(released) == sorted({*released}), f"{site} released a round twice"
        trained = sorted(r for kind, r in released if kind == "train")
        refused = {json.loads(line)["round"] for line in lines
                   if json.loads(line)["kind"] == "refusal"}
        assert sorted({*trained, *refused}) == list(range(1, ROUNDS + 1))
        assert summary["epsilon_per_site"][site] <= budgets[site] + 1e-9
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [(r["round"], r["site"]) for r in rows if r["phase"] == "train"]
    assert sorted(train) == sorted({*train}) and len(train) == 2 * ROUNDS  # each round once
    assert len([r for r in rows if r["phase"] == "test"]) == 1


def test_random_kills_lose_nothing_and_release_nothing_twice(tiny_model, site_files, tmp_path):
    cfg = tiny_config(tiny_model, site_files, federation={"num_rounds": ROUNDS},
                      train={"head_rounds": ROUNDS})
    config = tmp_path / "config.yaml"
    config.write_text(dump_yaml(cfg))
    budgets = {f"site{i}": cfg.site.budget_of(i) for i in range(2)}
    rng, kills, runs, window = random.Random(SEED), 0, 0, WINDOW
    with open(tmp_path / "runs.log", "w") as log:
        while kills < KILLS:
            run, seen, runs = tmp_path / f"run{runs}", {}, runs + 1
            while not (run / "summary.json").is_file():
                process, before = _start(config, run, log), _checkpointed(run)
                try:  # a random moment of the process's life (it may finish first)
                    code = process.wait(timeout=rng.uniform(0.5, window) if kills < KILLS
                                        else 900)
                    assert code == 0, (tmp_path / "runs.log").read_text()[-3000:] + \
                        f"\n{run} held: {sorted(p.name for p in run.glob('*'))}"
                    window = max(2.0, 0.8 * window)  # the machine is faster than the window
                except subprocess.TimeoutExpired:
                    _kill(process)
                    kills += 1
                if _checkpointed(run) == before:  # killed before a round ended: the
                    window *= 1.25                  # machine is slower than the window
                ledgers = _ledgers(run)
                for site, lines in seen.items():  # a ledger only grows: no entry is lost
                    assert ledgers[site][:len(lines)] == lines
                seen = ledgers
            _check_finished(run, budgets)
