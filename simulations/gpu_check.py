"""`make gpu-check`: every device path of fedcare, run as is on a machine with CUDA
in under 5 minutes. One line per check with its figures, then `N passed, N failed`;
the exit status is 1 if any check failed.

    python -m simulations.gpu_check [--work-dir DIR]

  device choice      train.device auto / cuda resolve as a site and the server resolve them
  dp step            client.training.train_private on the embedded MiniLM and ICD-10
                     texts, for a LoRA round (LoRA + head on token ids), a head round
                     (the head on cached pooled features) and a patient-level head round:
                     a finite loss; the noise drawn on the parameters' device from a
                     generator seeded by the round's CPU generator (one seed, one noise);
                     Opacus per-sample gradients equal to a one-record-at-a-time loop;
                     DP/plain time per record and peak memory
  simulation         3 tiny-BERT sites, SecAgg+, simulations/configs/default.yaml's recipe
                     (a head round, then a LoRA round, then personalisation) on the device
  audit verify       every ledger of that run
  predict --explain  `fedcare predict --explain` on that run's adapter, on the device
  shared GPU         the same 3 sites on one GPU with simulation.gpus_per_site 0.3

Without CUDA it says so and runs the same checks on the CPU, shortened; the shared-GPU
check is skipped (reported, not counted). --work-dir keeps the runs and their logs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import resource
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from simulations.run import quiet_libraries

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
ATOL = 1e-5          # per-sample gradients vs the one-record loop
REPEATS = 3          # timings of each mode; the fastest counts
SHARED_GPU = 0.3     # simulation.gpus_per_site of the shared-GPU check: 3 sites fit one GPU
SITES = 3
MB = 2 ** 20


class Failed(Exception):
    """A check ran, and its figures are wrong: the message holds them."""


class Skipped(Exception):
    """A check that cannot run on this machine: reported with its reason, not counted."""


def expect(ok: bool, figures: str) -> None:
    if not ok:
        raise Failed(figures)


@dataclass(frozen=True)
class Check:
    name: str                 # what its line says, e.g. "dp step (lora shape, cuda)"
    run: Callable[[], str]    # the figures of a pass; raises when the check fails


def run_checks(checks: Sequence[Check], say: Callable[[str], None] = print) -> tuple[int, int]:
    """Run every check, whatever the ones before did; one line each, then the counts.
    Any exception fails its check: a device path that crashes is what this looks for."""
    passed = failed = 0
    for check in checks:
        try:
            figures = check.run()
        except Skipped as why:
            say(f"SKIP  {check.name}: {why}")
            continue
        except Exception as err:  # noqa: BLE001 - reported as this check's failure
            what = "" if isinstance(err, Failed) else f"{type(err).__name__}: "
            say(f"FAIL  {check.name}: {what}{' '.join(str(err).split())}")
            failed += 1
            continue
        say(f"PASS  {check.name}: {figures}")
        passed += 1
    say(f"{passed} passed, {failed} failed")
    return passed, failed


@dataclass(frozen=True)
class Sizes:
    """How big the step checks are: the defaults' batches on a GPU, small ones on a CPU."""
    records: int      # ICD-10 texts the steps sample from
    batch: int        # expected Poisson batch of a LoRA step (train.batch_size)
    head_batch: int   # ... of a head step (train.head_batch_size)
    chunk: int        # rows per forward pass (train.chunk_size)
    steps: int        # timed steps per mode


SIZES = {"cuda": Sizes(2048, 256, 512, 64, 5), "cpu": Sizes(384, 32, 128, 32, 2)}


@dataclass
class Machine:
    """What the checks share: the device, a work folder, the embedded model once loaded,
    and the simulation's run directory once it ran."""
    device: torch.device
    work: Path
    encoder: tuple | None = None          # (model, Encoded) of the step checks
    runs: dict[str, Path] = field(default_factory=dict)

    @property
    def sizes(self) -> Sizes:
        return SIZES[self.device.type]

    def icd_model(self):
        """The embedded MiniLM with LoRA, on the device, and ICD-10 texts every k-th
        code (so every chapter) as token ids: the shapes a site trains."""
        if self.encoder is None:
            from common.config import EMBEDDED_MODEL, LoraConfig, ModelConfig
            from common.data import load_icd10
            from common.evaluation import encode
            from common.model import build_model, load_tokenizer

            ds = load_icd10()
            ds = ds.subset(range(0, len(ds), len(ds) // self.sizes.records)[: self.sizes.records])
            data = encode(ds, load_tokenizer(EMBEDDED_MODEL), ModelConfig().max_length)
            model = build_model(EMBEDDED_MODEL, len(ds.label_names), LoraConfig())
            self.encoder = (model.to(self.device), data)
        return self.encoder

    def release(self) -> None:
        """Free the step checks' model, so a simulation's sites have the GPU."""
        self.encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- device choice

def device_choice(machine: Machine) -> str:
    from common.model import ModelError, pick_device

    auto = pick_device("auto")
    expect(auto.type == machine.device.type, f"train.device auto chose {auto}")
    if machine.device.type == "cuda":
        expect(pick_device("cuda").type == "cuda", "train.device cuda did not give cuda")
        return f"auto -> cuda ({torch.cuda.get_device_name()}), cuda -> cuda"
    try:
        pick_device("cuda")
    except ModelError as err:
        return f"auto -> cpu; train.device cuda refused: {err}"
    raise Failed("train.device cuda was accepted on a machine without CUDA")


# ---------------------------------------------------------------- DP-SGD steps

class NoiseProbe:
    """An accountant (the one a site uses) that also notes, at every step, the device of
    the generator the DP optimizer draws its noise from and of the parameters it noises."""

    def __init__(self) -> None:
        from common.privacy import accounting

        self.accountant = accounting.make_accountant([])
        self.devices: set[tuple[str, str]] = set()

    def get_optimizer_hook_fn(self, sample_rate: float):
        account = self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate)

        def hook(optimizer) -> None:
            self.devices.add((str(optimizer.generator.device), str(optimizer.params[0].device)))
            account(optimizer)
        return hook


def _trainable(module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _snapshot(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in _trainable(module)]


def _restore(module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(_trainable(module), saved):
            p.copy_(s)


def _private(module, rows, rate: float, steps: int, lr: float, machine: Machine,
             accountant, seed: int, patients=None):
    from client.training import PrivateStep, train_private

    step = PrivateStep(noise_multiplier=1.0, sample_rate=rate, steps=steps, max_grad_norm=1.0)
    return train_private(module, rows, step, lr, machine.sizes.chunk, machine.device,
                         accountant, torch.Generator().manual_seed(seed), patients=patients)


def noise_is_seeded(module, rows, lr: float, machine: Machine) -> bool:
    """Noise-only steps (every Poisson batch empty) move the weights alike from one CPU
    seed, drawn as a site draws its round's, and otherwise from another seed."""
    from common.privacy import accounting

    start, seed = _snapshot(module), secrets.randbits(63)

    def moved(s: int) -> list[torch.Tensor]:
        _restore(module, start)
        _private(module, rows, 1e-9, 2, lr, machine, accounting.make_accountant([]), s)
        return _snapshot(module)

    first, again, other = moved(seed), moved(seed), moved(seed ^ 1)
    _restore(module, start)
    return (all(torch.equal(a, b) for a, b in zip(first, again))
            and not any(torch.equal(a, c) for a, c in zip(first, other)))


@contextlib.contextmanager
def dropout_off(module):
    """Dropout draws a new mask per forward, so a batch and its records one by one would
    differ by it. Opacus records activations only in train mode, and BERT's attention
    reads its dropout layer's p whenever it trains, so p goes to 0, not the mode."""
    layers = [(m, m.p) for m in module.modules() if isinstance(m, torch.nn.Dropout)]
    for m, _ in layers:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in layers:
            m.p = p


def per_sample_gap(module, rows, picked: list[int], device: torch.device) -> float:
    """Largest |Opacus per-sample gradient - the gradient of that record alone|."""
    from opacus import GradSampleModule

    params, labels = _trainable(module), rows.labels
    with dropout_off(module):
        gsm = GradSampleModule(module, loss_reduction="sum")
        try:
            F.cross_entropy(rows.logits(gsm, picked, device), labels[picked].to(device),
                            reduction="sum").backward()
            per_sample = [p.grad_sample.detach().clone() for p in params]
        finally:
            gsm._close()
        gap = 0.0
        for k, row in enumerate(picked):
            module.zero_grad(set_to_none=True)
            F.cross_entropy(rows.logits(module, [row], device),
                            labels[[row]].to(device)).backward()
            gap = max(gap, *((g[k] - p.grad).abs().max().item()
                             for g, p in zip(per_sample, params)))
    module.zero_grad(set_to_none=True)
    return gap


def _measured(device: torch.device, run: Callable[[], object]) -> tuple[float, int | None]:
    """(seconds per record, peak CUDA bytes or None) of `run()`, which returns TrainStats."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    stats = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return (time.perf_counter() - start) / max(stats.examples, 1), peak


def cost(module, rows, batch: int, lr: float, machine: Machine) -> str:
    """DP/plain time per record, and peak memory, after a warm-up step of each (CUDA
    kernels, Opacus hooks). DP and plain alternate, REPEATS times; the fastest of each
    counts, since other work on the machine only ever adds time."""
    from client.training import train_plain
    from common.privacy import accounting

    sizes, device = machine.sizes, machine.device
    rate = accounting.sample_rate(batch, len(rows))

    def dp(steps: int):
        return _private(module, rows, rate, steps, lr, machine, accounting.make_accountant([]),
                        secrets.randbits(63))

    def plain(steps: int):
        return train_plain(module, rows, batch, steps, lr, sizes.chunk, device,
                           torch.Generator().manual_seed(secrets.randbits(63)))

    dp(1), plain(1)
    dp_runs, plain_runs = zip(*[(_measured(device, partial(dp, sizes.steps)),
                                 _measured(device, partial(plain, sizes.steps)))
                                for _ in range(REPEATS)])
    ratio = min(t for t, _ in dp_runs) / min(t for t, _ in plain_runs)
    text = (f"dp/plain time per record {ratio:.2f}x (fastest of {REPEATS} x {sizes.steps} "
            f"steps of ~{batch})")
    if device.type == "cuda":
        dp_peak, plain_peak = max(b for _, b in dp_runs), max(b for _, b in plain_runs)
        return text + f"; peak memory dp/plain {dp_peak / plain_peak:.2f}x " \
                      f"({dp_peak / MB:.0f} / {plain_peak / MB:.0f} MB)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return text + f"; peak memory dp/plain n/a on cpu (process peak RSS {rss:.0f} MB)"


def mechanism(module, rows, batch: int, lr: float, machine: Machine, patients=None) -> str:
    """One real DP-SGD round on `module`: its loss, where its noise came from, and
    whether one CPU seed fixes the noise."""
    from common.privacy import accounting

    units = len(patients) if patients is not None else len(rows)
    probe = NoiseProbe()
    stats = _private(module, rows, accounting.sample_rate(batch, units), 2, lr, machine,
                     probe, secrets.randbits(63), patients)
    param = str(_trainable(module)[0].device)
    expect(math.isfinite(stats.loss), f"loss {stats.loss}")
    expect(probe.devices == {(param, param)},
           f"noise generator and parameters on {sorted(probe.devices)}, expected {param}")
    expect(probe.accountant.history == [(1.0, accounting.sample_rate(batch, units), 2)],
           f"accounted {probe.accountant.history}")
    expect(noise_is_seeded(module, rows, lr, machine),
           f"noise on {param} is not fixed by the round's CPU seed alone")
    return (f"loss {stats.loss:.2f} finite; noise generator on {param} = params' device, "
            "one CPU seed one noise")


def _dp_step(module, data, batch: int, lr: float, rows: int, machine: Machine) -> str:
    """The mechanism's figures, per-sample gradients against the batch-1 loop on the
    first `rows` records, and the DP/plain cost, for one shape."""
    said = mechanism(module, data, batch, lr, machine)
    gap = per_sample_gap(module, data, list(range(rows)), machine.device)
    expect(gap <= ATOL, f"{said}; per-sample grads differ from the batch-1 loop by {gap:.1e}")
    return (f"{said}; per-sample grads = batch-1 loop, max |diff| {gap:.1e}; "
            + cost(module, data, batch, lr, machine))


def dp_step_lora(machine: Machine) -> str:
    from common.config import TrainConfig

    model, data = machine.icd_model()
    return _dp_step(model, data, machine.sizes.batch, TrainConfig().learning_rate, 8, machine)


def _head(machine: Machine):
    from common.evaluation import pooled_features
    from common.model import classifier_of, trainable_head

    model, data = machine.icd_model()
    return trainable_head(model), pooled_features(classifier_of(model), data, machine.device)


def dp_step_head(machine: Machine) -> str:
    from common.config import TrainConfig

    head, feats = _head(machine)
    return _dp_step(head, feats, machine.sizes.head_batch, TrainConfig().head_learning_rate,
                    32, machine)


def dp_step_patients(machine: Machine) -> str:
    """A patient-level round groups per-record gradients into per-patient ones on the
    device (client.training.group_by_patient) before clipping."""
    from client.training import Patients
    from common.config import TrainConfig
    from common.patients import rows_by_patient

    head, feats = _head(machine)
    owners = [f"p{i // 3}" for i in range(len(feats))]  # 3 notes each, 2 taken per step
    patients = Patients(rows_by_patient(owners), max_rows=2, reduction="mean")
    said = mechanism(head, feats, machine.sizes.head_batch // 3, TrainConfig().head_learning_rate,
                     machine, patients)
    return f"{said}; {len(patients)} patients of 3 notes"


# ---------------------------------------------------------------- simulations

class SiteProcesses:
    """A site mod: after each message, the process that served it notes the sites it
    served, what Ray reserved for it and its peak CUDA memory (a Ray actor may serve
    any site in any round, so the figures are per process)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, msg, context, call_next):
        import ray

        reply = call_next(msg, context)
        path = self.folder / f"{os.getpid()}.json"
        seen = json.loads(path.read_text()) if path.is_file() else {"sites": []}
        seen["sites"] = sorted({*seen["sites"], int(context.node_config["partition-id"])})
        seen["resources"] = ray.get_runtime_context().get_assigned_resources()
        seen["cuda_peak_bytes"] = (torch.cuda.max_memory_allocated()
                                   if torch.cuda.is_available() else None)
        path.write_text(json.dumps(seen))
        return reply


def federation(work: Path, device: str, gpus_per_site: float):
    """simulations/configs/default.yaml for 3 sites holding tiny-BERT records, SecAgg+
    on, shortened to its recipe's two kinds of round (one head round on cached features,
    one LoRA round) and a 2-step personalisation, on `device`."""
    from common.config import load_yaml
    from simulations.tiny import LABELS, write_records, write_tiny_model

    model = work / "tiny-bert"
    if not model.is_dir():
        write_tiny_model(model)
    files = [str(write_records(work / f"site{i}.csv", 120, seed=i, skew=LABELS[i]))
             for i in range(SITES)]
    test = write_records(work / "test.csv", 80, seed=99)
    return load_yaml(DEFAULT_CONFIG, {
        "model.base_model": str(model), "model.max_length": 16,
        "data.source": "files", "data.site_files": files, "data.test_file": str(test),
        "data.text_column": "note", "data.label_column": "diagnosis", "data.labels": list(LABELS),
        "site.min_val_records": 5,  # a tiny site holds about 12 validation records
        "train.device": device, "train.head_rounds": 1, "train.personalize_steps": 2,
        "federation.num_rounds": 2, "federation.secure_aggregation": "on",
        "simulation.num_sites": SITES, "simulation.gpus_per_site": gpus_per_site,
        "simulation.output_dir": str(work)})


def simulation(machine: Machine, name: str, gpus_per_site: float = 0.0) -> str:
    """A 3-site run on the device; every site trains every round under SecAgg+, and
    every site process (on CUDA) holds its share of the GPU and used it."""
    from simulations.run import simulate

    machine.release()
    folder = machine.work / f"{name}-processes"
    folder.mkdir()
    cfg = federation(machine.work, machine.device.type, gpus_per_site)
    log = machine.work / f"{name}.log"
    with log.open("w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        start = time.perf_counter()
        run = simulate(cfg, machine.work / name, client_mods=[SiteProcesses(folder)])
        wall = time.perf_counter() - start
    machine.runs[name] = run
    summary = json.loads((run / "summary.json").read_text())
    rounds = cfg.federation.num_rounds
    secure = summary["secure_aggregation"]["rounds"]
    expect(secure == {str(r): True for r in range(1, rounds + 1)}, f"SecAgg+ rounds {secure}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = {(r["round"], r["site"]) for r in rows
               if r["phase"] == "train" and r["status"] == "accepted"}
    expect(len(trained) == SITES * rounds,
           f"{len(trained)} of {SITES * rounds} site rounds trained: {sorted(trained)}")
    personalised = len(summary.get("personalization", {}))
    expect(personalised == SITES, f"{personalised} of {SITES} sites personalised")
    said = (f"{wall:.0f} s; {rounds} rounds (head, LoRA) + personalisation, all under "
            f"SecAgg+, {SITES}/{SITES} sites trained every round; test accuracy "
            f"{summary['test']['accuracy']:.2f}")
    return said + "; " + site_processes(folder, machine, cfg.simulation)


def site_processes(folder: Path, machine: Machine, sim) -> str:
    """What each site process reserved from Ray and, on CUDA, used of the GPU."""
    from simulations.run import site_resources

    seen = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    expect(bool(seen), "no site process reported")
    served = sorted({s for p in seen for s in p["sites"]})
    expect(served == list(range(SITES)), f"site processes served sites {served}")
    share = site_resources(sim, machine.device.type, machine.device.type == "cuda")["num_gpus"]
    got = sorted({round(p["resources"].get("GPU", 0.0), 4) for p in seen})
    expect(got == [round(share, 4)], f"site processes reserved GPU {got}, expected {share:g}")
    if machine.device.type != "cuda":
        return f"{len(seen)} site processes, no GPU reserved"
    peaks = [p["cuda_peak_bytes"] or 0 for p in seen]
    expect(all(peaks), f"a site process allocated no CUDA memory ({peaks})")
    return (f"{len(seen)} site processes, Ray share {share:.2f} GPU each, peak GPU memory "
            + " / ".join(f"{b / MB:.0f}" for b in peaks) + " MB")


def shared_gpu(machine: Machine) -> str:
    if machine.device.type != "cuda":
        raise Skipped("no CUDA device: sites sharing one GPU need one")
    return simulation(machine, "shared-gpu", SHARED_GPU)


def _run_dir(machine: Machine) -> Path:
    if "simulation" not in machine.runs:
        raise Failed("no run directory: the simulation check did not finish")
    return machine.runs["simulation"]


def audit_verify(machine: Machine) -> str:
    from common.privacy.verify import verify_path

    report = verify_path(_run_dir(machine))
    entries = sum(len(site.entries) for site in report.sites)
    expect(report.ok and len(report.sites) == SITES,
           f"{len(report.sites)} ledgers, problems: "
           + "; ".join(p.message for p in report.problems[:3]))
    return f"{len(report.sites)} ledgers verified, {entries} entries, 0 problems"


def predict_explain(machine: Machine) -> str:
    """`fedcare predict --explain` as a clinician runs it; it puts the model on CUDA
    when there is one (the peak above what was in use shows it did)."""
    from common.cli import main
    from simulations.tiny import CUES

    html = machine.work / "explanations.html"
    texts = [" ".join(words) for words in CUES.values()]
    args = ["predict", str(_run_dir(machine)), "--explain", "--explain-html", str(html),
            "--no-color", *(a for t in texts for a in ("--text", t))]
    cuda = machine.device.type == "cuda"
    if cuda:
        in_use = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(args)
    said = out.getvalue()
    explained = sum(f"record {n}" in said for n in range(1, len(texts) + 1))
    expect(code == 0 and html.is_file() and explained == len(texts),
           f"exit {code}, {explained} of {len(texts)} records explained: {said[-300:]}")
    where = "on cpu"
    if cuda:
        extra = torch.cuda.max_memory_allocated() - in_use
        expect(extra > 0, "the model did not go to the GPU")
        where = f"on cuda (peak {extra / MB:.0f} MB above what was in use)"
    return f"{len(texts)} notes predicted and explained {where}, page {html.name} written"


# ---------------------------------------------------------------- the run

def checks(machine: Machine) -> list[Check]:
    d = machine.device.type
    return [
        Check(f"device choice ({d})", partial(device_choice, machine)),
        Check(f"dp step (lora shape, {d})", partial(dp_step_lora, machine)),
        Check(f"dp step (head shape, {d})", partial(dp_step_head, machine)),
        Check(f"dp step (patient level, head shape, {d})", partial(dp_step_patients, machine)),
        Check(f"simulation (3 sites, SecAgg+, default recipe, {d})",
              partial(simulation, machine, "simulation")),
        Check(f"audit verify (the {d} run)", partial(audit_verify, machine)),
        Check(f"predict --explain ({d})", partial(predict_explain, machine)),
        Check(f"shared GPU (3 sites, gpus_per_site {SHARED_GPU})", partial(shared_gpu, machine)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the runs and logs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.work_dir is not None and args.work_dir.is_dir() and any(args.work_dir.iterdir()):
        parser.error(f"--work-dir {args.work_dir} holds files already: name a new or empty "
                     "folder (a run directory holds one run)")
    quiet_libraries()
    if torch.cuda.is_available():
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        print(f"CUDA device: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB; "
              f"torch {torch.__version__}", flush=True)
    else:
        device = torch.device("cpu")
        print("no CUDA device: running the CPU parts only (checks marked cpu)", flush=True)
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fedcare-gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        _, failed = run_checks(checks(Machine(device, work.resolve())),
                               lambda line: print(line, flush=True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
