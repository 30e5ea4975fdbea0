"""`python -m simulations.bench`: run the sections, write the folder.

    make bench          every section, 3 seeds (about 2.5 hours on 2 CPU cores)
    make bench-quick    utility (DP ε=8 and federated non-private, 1 seed), DP cost,
                        bytes, accounting, orchestration (minutes)

results.json, results.md and the plots are rewritten after every section, so an
interrupted bench keeps what it measured. default.yaml and strong_skew.yaml are
resolved once at the start into <out>/config/: one bench, one set of defaults.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from pathlib import Path

from simulations.bench import report
from simulations.bench.runner import DEFAULT_CONFIG, ENV, Bench, machine_info


def _sections() -> dict:
    from simulations.bench.accountants import accounting
    from simulations.bench.costs import dp_cost, update_bytes
    from simulations.bench.lora import lora
    from simulations.bench.orchestration import orchestration
    from simulations.bench.patients import patients
    from simulations.bench.personalization import personalization
    from simulations.bench.robustness import robustness
    from simulations.bench.scaling import scaling
    from simulations.bench.utility import utility

    # utility first: bytes, accounting and orchestration read the runs it made
    return {"utility": utility, "dp-cost": dp_cost, "bytes": update_bytes,
            "accounting": accounting, "orchestration": orchestration,
            "scaling": scaling, "personalization": personalization, "robustness": robustness,
            "patients": patients, "lora": lora}


SECTIONS = ("utility", "dp-cost", "bytes", "accounting", "orchestration", "scaling",
            "personalization", "robustness", "patients", "lora")
QUICK_SECTIONS = SECTIONS[:5]


def parse_only(text: str | None, quick: bool) -> list[str]:
    """The sections to run, in bench order; errors name the unknown ones."""
    if not text:
        return list(QUICK_SECTIONS if quick else SECTIONS)
    names = [n.strip().replace("_", "-") for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"--only: unknown section {unknown[0]!r}; "
                         f"choose from {', '.join(SECTIONS)}")
    return [n for n in SECTIONS if n in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulations.bench",
                                description="fedcare's benchmark (docs/benchmarks.md)")
    p.add_argument("--quick", action="store_true",
                   help="minutes instead of hours: fewer runs, seeds and repetitions")
    p.add_argument("--only", metavar="A,B",
                   help=f"run only these sections: {', '.join(SECTIONS)}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where training runs (simulations and DP-cost steps)")
    p.add_argument("--out", metavar="DIR",
                   help="result folder (default runs/bench-<timestamp>)")
    p.add_argument("--seeds", metavar="0,1,2",
                   help="data.seed values (default 0,1,2; quick: 0)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="run the simulations on an existing Ray cluster (ray.init(address))")
    p.add_argument("--resume", action="store_true",
                   help="continue the bench in --out: keep its pinned configs, every run it "
                        "finished with the same settings and the sections not named by "
                        "--only; each section says the commit it ran on")
    return p


def _earlier_results(out: Path) -> dict:
    path = out / "results.json"
    if not path.is_file():
        return {}
    import json

    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    import os

    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    only = parse_only(args.only, args.quick)
    seeds = (tuple(int(s) for s in args.seeds.split(",")) if args.seeds
             else (0,) if args.quick else (0, 1, 2))
    out = Path(args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here")
    if args.resume and not args.out:
        raise SystemExit("--resume: name the bench folder to continue with --out")
    earlier = _earlier_results(out) if args.resume else {}
    if earlier and earlier.get("mode") != ("quick" if args.quick else "full"):
        raise SystemExit(f"--resume: {out} holds a {earlier.get('mode')} bench; resume it "
                         "in the same mode")
    bench = Bench(out, args.device, args.quick, seeds, args.ray_address, resume=args.resume)
    from simulations.bench.lora import LORA
    from simulations.bench.patients import PATIENTS
    from simulations.bench.personalization import STRONG_SKEW

    pinned = {p.name: str(bench.config(p))
              for p in (DEFAULT_CONFIG, STRONG_SKEW, PATIENTS, LORA)}
    started = time.perf_counter()
    results = {"mode": "quick" if args.quick else "full",
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "command": " ".join(["python -m simulations.bench",
                                    *map(shlex.quote, argv if argv is not None
                                         else sys.argv[1:])]),
               "machine": machine_info(args.device), "configs": pinned,
               "sections": {}, "errors": {}}
    if earlier:  # the sections this start does not run stay as they were measured
        results["started"] = earlier.get("started", results["started"])
        results["resumed"] = [*earlier.get("resumed", []), time.strftime("%Y-%m-%d %H:%M:%S %Z")]
        results["sections"] = {k: v for k, v in earlier.get("sections", {}).items()
                               if k not in only}
        results["errors"] = {k: v for k, v in earlier.get("errors", {}).items()
                             if k not in only}
    bench.device = results["machine"]["device"]  # auto resolved once, for every child
    funcs = _sections()
    print(f"fedcare bench ({results['mode']}): {', '.join(only)} -> {out}", flush=True)
    for name in only:
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        try:
            results["sections"][name] = funcs[name](bench)
            results["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
            results["sections"][name]["commit"] = results["machine"].get("git_commit")
            results["errors"].pop(name, None)
        except Exception:  # one broken section must not lose the others' figures
            results["errors"][name] = traceback.format_exc()
            print(f"[{name}] FAILED:\n{results['errors'][name]}", file=sys.stderr, flush=True)
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        report.write(results, out)
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"results: {out / 'results.md'} ({results['wall_seconds']:.0f} s)", flush=True)
    return 1 if results["errors"] else 0
