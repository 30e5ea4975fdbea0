"""The bench's working state and its child processes.

Every simulation and every step timing runs in a fresh Python process, so one
measurement never inherits another's caches, threads or Ray cluster; the parent
samples the child's whole process tree (the driver, Ray's raylet and its workers)
for peak memory.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0",
       "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0"}


class TreeSampler(threading.Thread):
    """Peak resident memory (sum of RSS) and process count of a process and all its
    descendants, sampled every `interval` seconds. RSS counts shared pages (torch's
    libraries mapped in every Ray worker) once per process, so it is an upper figure."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss, self.peak_processes = 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_rss = max(self.peak_rss, total)
            self.peak_processes = max(self.peak_processes, len(procs))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


@dataclass
class ChildResult:
    returncode: int
    seconds: float
    peak_tree_rss: int
    peak_processes: int
    log: Path

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])


def run_child(args: list[str], log: Path, timeout: float | None = None) -> ChildResult:
    """`python -m simulations.bench.worker ARGS` in a fresh process, output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **ENV}
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "simulations.bench.worker", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).resolve().parents[2])
        sampler = TreeSampler(proc.pid)
        sampler.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        finally:
            sampler.stop()
    return ChildResult(code, time.perf_counter() - start, sampler.peak_rss,
                       sampler.peak_processes, log)


@dataclass
class SimRun:
    """One simulation the bench ran: where it lives and what it cost."""
    key: str
    run_dir: Path
    seconds: float
    peak_tree_rss: int
    peak_processes: int
    error: str | None
    summary: dict = field(default_factory=dict)

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def feature_seconds(self) -> float:
        """Seconds the run's sites spent computing pooled features (0: all reused)."""
        from simulations.site_logs import read_logs

        return sum(log.feature_seconds for log in read_logs(self.run_dir / "site_state").values())

    def record(self) -> dict:
        """What results.json keeps of the run."""
        test = self.summary.get("test") or {}
        eps = self.summary.get("epsilon_per_site") or {}
        return {"run_dir": str(self.run_dir), "process_seconds": round(self.seconds, 2),
                "site_feature_seconds": round(self.feature_seconds(), 2),
                "wall_seconds": self.summary.get("wall_seconds"),
                "peak_tree_rss_bytes": self.peak_tree_rss,
                "accuracy": test.get("accuracy"), "macro_f1": test.get("macro_f1"),
                "epsilon_max": max((v for v in eps.values() if v is not None), default=None),
                "error": self.error}


class Bench:
    """Where results go, which device, how big, and the simulations already run (a
    section that needs a run another section made reuses it)."""

    def __init__(self, out: Path, device: str, quick: bool, seeds: tuple[int, ...],
                 ray_address: str | None = None, echo=print, resume: bool = False) -> None:
        self.out, self.device, self.quick, self.seeds = Path(out), device, quick, seeds
        self.ray_address, self.echo, self.resume = ray_address, echo, resume
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "bench.log"
        self._runs: dict[str, SimRun] = {}
        self._pinned: dict[Path, Path] = {}
        self.feature_cache = self.out / "feature_cache"

    def config(self, path: Path = DEFAULT_CONFIG) -> Path:
        """The config at `path` resolved once per bench (every default written out) into
        the bench folder: every run of one bench starts from the same settings, even if
        the shipped defaults are edited while it runs."""
        path = Path(path).resolve()
        if path not in self._pinned:
            from common.config import dump_yaml, load_yaml

            pinned = self.out / "config" / path.name
            pinned.parent.mkdir(parents=True, exist_ok=True)
            if not (self.resume and pinned.is_file()):  # resumed: the first start's settings
                pinned.write_text(f"# {path} as resolved when the bench started\n"
                                  + dump_yaml(load_yaml(path)))
            self._pinned[path] = pinned
        return self._pinned[path]

    def simulate(self, name: str, overrides: dict[str, Any],
                 config: Path = DEFAULT_CONFIG, attack: dict | None = None) -> SimRun:
        """simulations.run.simulate(load_yaml(config, overrides)) in a child process,
        on the bench's device, from the bench's pinned copy of `config`; the same
        (config, overrides, attack) runs once per bench. `attack`: one site's updates
        poisoned ({"site": partition id, "factor": f}, see robustness.PoisonSite)."""
        # each site's pooled features, kept in its own folder across the bench's runs
        overrides = {"train.device": self.device,
                     "simulation.feature_cache_dir": str(self.feature_cache), **overrides}
        config = self.config(config)
        key = json.dumps([str(config), overrides] + ([attack] if attack else []),
                         sort_keys=True)
        if key in self._runs:
            return self._runs[key]
        run_dir = self.out / "runs" / name
        if self.resume and (done := _finished(run_dir, key)):
            self.echo(f"  run {name}: finished in an earlier start of this bench, kept")
            self._runs[key] = done
            return done
        if run_dir.exists():  # a folder left by an earlier, interrupted attempt
            shutil.rmtree(run_dir)
        args = ["simulate", "--config", str(config), "--overrides", json.dumps(overrides),
                "--run-dir", str(run_dir)]
        if self.ray_address:
            args += ["--ray-address", self.ray_address]
        if attack:
            args += ["--attack", json.dumps(attack)]
        self.echo(f"  run {name} ...")
        child = run_child(args, self.log)
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        error = None if child.returncode == 0 and summary else (
            f"exit {child.returncode}: {child.tail(5)}")
        run = SimRun(key, run_dir, child.seconds, child.peak_tree_rss, child.peak_processes,
                     error, summary)
        _drop_feature_caches(run_dir)
        if not error:  # what a resumed bench needs to keep this run instead of redoing it
            (run_dir / BENCH_RUN).write_text(json.dumps(
                {"key": key, "seconds": child.seconds, "peak_tree_rss": child.peak_tree_rss,
                 "peak_processes": child.peak_processes}))
        test = summary.get("test") or {}
        self.echo(f"  run {name}: {child.seconds:.0f} s, "
                  + (f"accuracy {test.get('accuracy', float('nan')):.3f}, "
                     f"macro-F1 {test.get('macro_f1', float('nan')):.3f}"
                     if not error else f"FAILED ({error.splitlines()[0]})"))
        self._runs[key] = run
        return run

    def runs(self) -> list[SimRun]:
        """Every simulation this bench has run so far, in order."""
        return list(self._runs.values())

    def find_run(self, name_prefix: str) -> SimRun | None:
        """A finished run made in this bench whose folder name starts with the prefix."""
        for run in self.runs():
            if run.run_dir.name.startswith(name_prefix) and not run.error:
                return run
        return None


BENCH_RUN = "bench_run.json"


def _finished(run_dir: Path, key: str) -> SimRun | None:
    """A run an earlier start of this bench finished with the very same config,
    overrides and attack; None if it did not, or with other settings."""
    try:
        facts = json.loads((run_dir / BENCH_RUN).read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if facts.get("key") != key:
        return None
    return SimRun(key, run_dir, facts["seconds"], facts["peak_tree_rss"],
                  facts["peak_processes"], None, summary)


def _drop_feature_caches(run_dir: Path) -> None:
    """Pooled-feature caches of the simulated sites are megabytes per run and only a
    speed-up for a site's next round; the bench folder keeps everything else."""
    for folder in run_dir.glob("site_state/*/features"):
        shutil.rmtree(folder, ignore_errors=True)


def machine_info(device: str) -> dict:
    """What the header of results.md names: CPU, cores, memory, threads, device."""
    import psutil
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    resolved = "cuda" if device == "auto" and torch.cuda.is_available() else (
        "cpu" if device == "auto" else device)
    info = {
        "cpu": model, "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_bytes": psutil.virtual_memory().total,
        "torch_threads": torch.get_num_threads(),
        "device": resolved,
        "device_name": torch.cuda.get_device_name(0) if resolved == "cuda" else model,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": _versions("torch", "flwr", "opacus", "peft", "transformers",
                              "dp-accounting", "ray"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    return info


def _versions(*names: str) -> dict:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
