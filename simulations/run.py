"""`fedcare simulate`: N hospitals on Flower's simulation engine, in this process."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from common.config import Config, SimulationConfig, check_simulation


def prepare(cfg: Config, run_dir: Path) -> Config:
    """Each site actor gets as many torch threads as Ray CPUs (no oversubscription);
    simulated sites keep their keys and ledgers in the run directory unless the
    config names a lasting site state folder."""
    if cfg.train.threads == 0:
        threads = max(1, int(cfg.simulation.cpus_per_site))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=threads))
    if not cfg.site.state_dir:
        state = str(run_dir / "site_state")
        cfg = dataclasses.replace(cfg, site=dataclasses.replace(cfg.site, state_dir=state))
    return cfg


def site_resources(sim: SimulationConfig, device: str, cuda: bool) -> dict[str, float]:
    """What Ray reserves for each site actor: simulation.cpus_per_site CPUs and, where
    the sites train on a GPU (`device` not cpu and `cuda` available), their share of
    it, simulation.gpus_per_site or else 1/num_sites. The shares decide how many sites
    Ray lets train on the GPU at once; each site's memory is its own to fit."""
    gpus = 0.0
    if device != "cpu" and cuda:
        gpus = sim.gpus_per_site or 1.0 / sim.num_sites
    return {"num_cpus": sim.cpus_per_site, "num_gpus": gpus}


def quiet_libraries() -> None:
    """What a user cannot act on stays out of the demo's output: library deprecation
    notices, Ray's accelerator tip, weight-loading progress bars. The variables are
    inherited by Ray's site processes; the filters hold in this one."""
    import warnings

    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, _RunSimulationNotice) for f in flower.filters):
        flower.addFilter(_RunSimulationNotice())


class _RunSimulationNotice(logging.Filter):
    """Drops Flower's "DEPRECATED FEATURE: run_simulation" notice, which a user cannot
    act on. fedcare stays on `run_simulation` with flwr pinned (==1.42.0 in
    pyproject.toml): it runs the ServerApp in this process, where `simulate` hands it
    the run directory, extra site mods and the audit's view of the updates, none of
    which `flwr run` (a SuperLink and an app subprocess) can take. Moving off it is a
    change of its own, due before a Flower release removes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("DEPRECATED FEATURE")
                    and "run_simulation" in str(record.args))


class _ContainedSiteFailures(logging.Filter):
    """Drops the simulation engine's report of a site failure that the site contained
    (a code and a reference, with Ray's traceback around it: dozens of lines per
    site and round); `simulate` names each failed site and its cause after the run,
    from the site's own log. Other failures keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (record.levelno >= logging.ERROR and (
            "site failure '" in text
            or text.startswith("An exception was raised when processing a message")))


# Flower's simulation engine hands a site its message on a fixed 0.1 s tick
# (vce_api.add_messages_to_queue scans the link state for every site, then waits): each
# of a round's five exchanges waited ~0.05 s for nothing, ~0.25 s of a 3 s round at 4
# sites. A scan looks at every stored message for every site, so the tick grows with
# the sites: 10 ms up to 8, 80 ms at 64, as much scanning a second as Flower's at 64.
ENGINE_TICK_SECONDS = 0.01


def engine_tick(sites: int) -> float:
    return min(0.1, ENGINE_TICK_SECONDS * max(1.0, sites / 8))


class _Ticking:
    """The engine's stop event as its message scan sees it: a wait ends after
    `engine_tick` at most; whether the engine stopped is the event's own."""

    def __init__(self, event, tick: float) -> None:
        self.event, self.tick = event, tick

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(self.tick if timeout is None else min(timeout, self.tick))


def quicker_engine() -> None:
    """Flower's simulation engine scans for messages every `engine_tick` instead of
    0.1 s. Refuses (RuntimeError) if the engine's scan is not the function of the
    Flower fedcare checked this against (flwr 1.42), like common.shamir.install."""
    import functools
    import inspect

    from flwr.server.superlink.fleet.vce import vce_api

    scan = vce_api.add_messages_to_queue
    if getattr(scan, "fedcare_tick", False):
        return
    if scan.__module__ != vce_api.__name__ or list(inspect.signature(scan).parameters) != [
            "state", "queue", "nodes_mapping", "f_stop"]:
        raise RuntimeError("flwr's vce_api.add_messages_to_queue is not the one fedcare's "
                           "simulation engine tick was checked against (flwr 1.42)")

    @functools.wraps(scan)
    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        return scan(state, queue, nodes_mapping, _Ticking(f_stop, engine_tick(len(nodes_mapping))))

    add_messages_to_queue.fedcare_tick = True
    vce_api.add_messages_to_queue = add_messages_to_queue


def _held(run_dir: Path) -> str:
    """What `run_dir` holds besides what a start killed before its first whole file
    leaves: the empty folder, and `.partial` files (each written whole, then renamed;
    config.yaml is a run's first). '' when nothing else."""
    if not run_dir.is_dir():
        return ""
    return ", ".join(sorted(p.name for p in run_dir.iterdir() if p.suffix != ".partial"))


def simulate(cfg: Config, run_dir: Path | None = None, verbose: bool = False,
             client_mods=(), resume: bool = False, observe=None) -> Path:
    """Run the federation described by `cfg`; returns the run directory.
    `client_mods` are extra Flower mods for every site (see client.app.build_app);
    `observe` sees every update the server receives (SiteAwareStrategy.observe).
    `resume`: go on with the run in `run_dir` after its last checkpointed round."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    quiet_libraries()
    import torch
    from flwr.simulation import run_simulation

    from client.app import build_app as build_client_app
    from server.app import ERROR_FILE, SITES_ANSWERED, build_app as build_server_app, run_dir_for
    from simulations.site_logs import explain

    check_simulation(cfg)
    run_dir = Path(run_dir).resolve() if run_dir else run_dir_for(cfg, "sim")
    if resume:
        if (run_dir / "summary.json").is_file():
            raise RuntimeError(f"the run in {run_dir} has finished: nothing to resume")
    elif held := _held(run_dir):  # its summary would pass for this run's
        raise RuntimeError(f"{run_dir} already holds a run ({held}), and a run directory "
                           "holds one run: choose another simulation.run_name or --run-dir")
    cfg = prepare(cfg, run_dir)
    sim = cfg.simulation
    resources = site_resources(sim, cfg.train.device, torch.cuda.is_available())
    if sim.gpus_per_site and not resources["num_gpus"]:
        why = "train.device is cpu" if cfg.train.device == "cpu" else "no CUDA device here"
        print(f"note: simulation.gpus_per_site ({sim.gpus_per_site:g}) is ignored: {why}",
              flush=True)
    flower, contained = logging.getLogger("flwr"), _ContainedSiteFailures()
    if not verbose:
        flower.setLevel(logging.WARNING)
        flower.addFilter(contained)  # the sites' own logs say why, after the run
    quicker_engine()
    try:
        run_simulation(
            server_app=build_server_app(cfg, run_dir, resume=resume, observe=observe),
            client_app=build_client_app(cfg, client_mods),
            num_supernodes=sim.num_sites,
            backend_config={
                "client_resources": resources,
                "init_args": {"num_cpus": max(os.cpu_count() or 1, int(sim.cpus_per_site)),
                              "include_dashboard": False, "logging_level": "error",
                              "log_to_driver": verbose},
            },
            verbose_logging=verbose,
        )
    except Exception:  # noqa: BLE001 - the ServerApp's own error; its reason is in ERROR_FILE
        if not (run_dir / ERROR_FILE).is_file():
            raise
    finally:
        flower.removeFilter(contained)
    error, summary = run_dir / ERROR_FILE, run_dir / "summary.json"
    sites = explain(run_dir, Path(cfg.site.state_dir))  # the researcher owns every site's log
    if error.is_file() or not summary.is_file():
        why = error.read_text().strip() if error.is_file() else "see the log above"
        if sites:  # the sites by name, with their causes, instead of the server's view
            why = why.split(SITES_ANSWERED)[0] + "; what each site's own log says:\n" + \
                "\n".join(f"  {line}" for line in sites)
        raise RuntimeError(f"the run in {run_dir} failed: {why}")
    if sites:
        print("sites that sent nothing usable in some round, as their own logs say:\n"
              + "\n".join(f"  {line}" for line in sites), flush=True)
    if json.loads(summary.read_text()).get("run_id") != run_dir.name:
        raise RuntimeError(f"{summary} is not this run's summary")
    return run_dir


def resume(run_dir: Path, verbose: bool = False, client_mods=()) -> Path:
    """Go on with a simulated run that was stopped (killed, or failed) after its last
    checkpointed round, with the configuration it was started with."""
    from common.config import load_yaml

    run_dir = Path(run_dir).resolve()
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise RuntimeError(f"{run_dir} holds no run to resume (no config.yaml; a run writes "
                           "it before it sends anything, so start this one afresh)")
    return simulate(load_yaml(config, {}), run_dir, verbose, client_mods, resume=True)
