"""What the bench runs in a fresh process (see runner.run_child):

    simulate  one Flower simulation: simulations.run.simulate(load_yaml(config, overrides)),
              optionally with one site's updates poisoned (--attack)
    step      one timing of training steps: DP-SGD (train_private) or plain (train_plain)
              on the embedded MiniLM with the default LoRA config; writes a JSON result
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import time
from pathlib import Path

# The DP-cost shapes. "demo": one site's ICD texts through the whole classifier as a
# LoRA round trains them (the config's Poisson batch and chunk size); "head": a head
# round, the head alone on the site's pooled features (what the default's first rounds
# train); "b32x128": 32 records of exactly 128 tokens through the whole classifier.
SHAPES = ("demo", "head", "b32x128")
FIXED_ROWS, FIXED_TOKENS = 32, 128


def cmd_simulate(args) -> int:
    from common.config import load_yaml
    from simulations.run import simulate

    cfg = load_yaml(args.config, json.loads(args.overrides))
    if args.ray_address:  # Flower's Ray backend reuses a connection that already exists
        import ray

        ray.init(address=args.ray_address, log_to_driver=False, logging_level="error")
    mods = []
    if args.attack:  # the robustness section: one site's updates poisoned
        from simulations.bench.robustness import PoisonSite

        mods.append(PoisonSite(**json.loads(args.attack)))
    simulate(cfg, Path(args.run_dir), client_mods=mods)
    return 0


def fixed_length(data, rows: int, tokens: int):
    """`rows` records of exactly `tokens` ids: each record's body ([CLS] ... [SEP]
    stripped) repeated to fill the length, between its own [CLS] and [SEP]."""
    from common.evaluation import Encoded

    ids = []
    for record in data.ids[:rows]:
        body = record[1:-1] or record
        ids.append((record[0], *itertools.islice(itertools.cycle(body), tokens - 2), record[-1]))
    return Encoded(tuple(ids), data.labels[:rows].clone(), data.pad_id)


def cmd_step(args) -> int:
    import torch

    from client.training import PrivateStep, train_plain, train_private
    from common.config import load_yaml
    from common.data import federated_data
    from common.evaluation import encode, pooled_features
    from common.model import (build_model, classifier_of, load_tokenizer, pick_device,
                              trainable_head)
    from common.privacy import accounting

    cfg = load_yaml(args.config)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sites, test = federated_data(cfg.data, cfg.simulation.num_sites)
    tokenizer = load_tokenizer(cfg.model.base_model)
    data = encode(sites[0].train, tokenizer, cfg.model.max_length)
    model = build_model(cfg.model.base_model, len(test.label_names), cfg.lora,
                        cfg.model.pooling).to(device)
    module, chunk, lr = model, cfg.train.chunk_size, cfg.train.learning_rate
    if args.shape == "demo":
        batch = cfg.train.batch_size
        rate = accounting.sample_rate(batch, len(data))
    elif args.shape == "head":  # a head round: the head alone on pooled features
        data = pooled_features(classifier_of(model), data, device)
        module, batch, lr = trainable_head(model), cfg.train.head_batch_size, \
            cfg.train.head_learning_rate
        rate = accounting.sample_rate(batch, len(data))
    else:  # q = 1: every step takes all 32 records, in one chunk (b32x128)
        data = fixed_length(data, FIXED_ROWS, FIXED_TOKENS)
        batch, chunk, rate = FIXED_ROWS, max(cfg.train.chunk_size, FIXED_ROWS), 1.0
    gen = torch.Generator().manual_seed(args.seed)
    total = args.warmup + args.steps

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    stamps = [time.perf_counter()]
    if args.mode == "dp":
        step = PrivateStep(noise_multiplier=1.0, sample_rate=rate, steps=total,
                           max_grad_norm=cfg.privacy.max_grad_norm)

        def progress(_k: int, _loss: float) -> None:
            sync()
            stamps.append(time.perf_counter())

        stats = train_private(module, data, step, lr, chunk, device,
                              accounting.make_accountant([], cfg.privacy.accountant), gen,
                              progress=progress)
        examples, taken = stats.examples, stats.steps - stats.empty_batches
    else:
        examples = taken = 0
        for _ in range(total):
            stats = train_plain(module, data, batch, 1, lr, chunk, device, gen,
                                cfg.privacy.max_grad_norm)
            sync()
            stamps.append(time.perf_counter())
            examples, taken = examples + stats.examples, taken + 1
    seconds = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
    result = {
        "shape": args.shape, "mode": args.mode, "device": str(device),
        "threads": torch.get_num_threads(), "batch": batch, "chunk": chunk,
        "sample_rate": rate, "records": len(data),
        "tokens_max": max(len(r) for r in data.ids) if hasattr(data, "ids") else None,
        "rows_per_step": examples / max(taken, 1),
        "step_seconds": seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_cuda_bytes": (torch.cuda.max_memory_allocated(device)
                            if device.type == "cuda" else None),
    }
    Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench.worker")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate")
    sim.add_argument("--config", required=True)
    sim.add_argument("--overrides", default="{}", help="JSON object of section.key values")
    sim.add_argument("--run-dir", required=True)
    sim.add_argument("--ray-address", default=None)
    sim.add_argument("--attack", default=None,
                     help='JSON {"site": partition id, "factor": f}: that site sends '
                          "global + f x its update (robustness section)")
    sim.set_defaults(func=cmd_simulate)
    step = sub.add_parser("step")
    step.add_argument("--config", required=True)
    step.add_argument("--shape", choices=SHAPES, required=True)
    step.add_argument("--mode", choices=("dp", "plain"), required=True)
    step.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    step.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's own")
    step.add_argument("--warmup", type=int, default=1)
    step.add_argument("--steps", type=int, default=3)
    step.add_argument("--seed", type=int, default=0)
    step.add_argument("--result", required=True)
    step.set_defaults(func=cmd_step)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
