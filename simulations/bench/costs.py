"""What privacy and federation cost a site: the DP-SGD step against a plain step, and
the bytes of an update against the whole model."""

from __future__ import annotations

import json
import statistics

from simulations.bench import targets
from simulations.bench.runner import Bench, run_child
from simulations.bench.worker import FIXED_ROWS, FIXED_TOKENS, SHAPES

HEAD_STEP_FACTOR = 20


def dp_cost(bench: Bench) -> dict:
    """Time per step and peak memory of train_private (Opacus, a PrivateStep) vs
    train_plain on the same model, data and batch. Each measurement is a fresh
    process (warm-up steps, then timed steps); DP and plain alternate, and which goes
    first alternates too, so drift in the machine's load falls on both."""
    reps, warmup, steps = (2, 1, 3) if bench.quick else (3, 2, 5)
    shapes = []
    for shape in SHAPES:
        # a head step takes milliseconds: more of them, so the timer's noise is small
        factor = HEAD_STEP_FACTOR if shape == "head" else 1
        measured: dict[str, list[dict]] = {"dp": [], "plain": []}
        for rep in range(reps):
            for mode in (("dp", "plain") if rep % 2 == 0 else ("plain", "dp")):
                result = bench.out / "dp_cost" / f"{shape}-{mode}-{rep}.json"
                result.parent.mkdir(parents=True, exist_ok=True)
                child = run_child(["step", "--config", str(bench.config()), "--shape", shape,
                                   "--mode", mode, "--device", bench.device,
                                   "--warmup", str(warmup * factor),
                                   "--steps", str(steps * factor),
                                   "--seed", str(rep), "--result", str(result)], bench.log)
                if child.returncode != 0 or not result.is_file():
                    raise RuntimeError(f"DP-cost child {shape}/{mode} failed: {child.tail(5)}")
                measured[mode].append(json.loads(result.read_text()))
                bench.echo(f"  {shape} {mode} #{rep}: "
                           f"{statistics.fmean(measured[mode][-1]['step_seconds']):.4f} s/step")
        shapes.append(summarize_shape(shape, measured))
    return {"device": bench.device, "repetitions": reps, "warmup_steps": warmup,
            "timed_steps": steps, "limit_ratio": targets.DP_COST_LIMIT, "shapes": shapes}


def summarize_shape(shape: str, measured: dict[str, list[dict]]) -> dict:
    """Per mode: step seconds (mean ± sd over processes of each process's mean), the
    seconds per step scaled to the nominal batch (Poisson batches vary in size), rows
    per step and peak memory; then DP / plain ratios judged against the target."""
    out: dict = {"shape": shape}
    for mode, results in measured.items():
        first = results[0]
        per_process = [statistics.fmean(r["step_seconds"]) for r in results]
        per_batch = [statistics.fmean(r["step_seconds"]) / r["rows_per_step"] * r["batch"]
                     for r in results]
        cuda = [r["peak_cuda_bytes"] for r in results if r.get("peak_cuda_bytes") is not None]
        out[mode] = {
            "step_seconds": targets.mean_sd(per_process),
            "seconds_per_nominal_batch": targets.mean_sd(per_batch),
            "rows_per_step": statistics.fmean(r["rows_per_step"] for r in results),
            "peak_rss_bytes": targets.mean_sd(r["peak_rss_bytes"] for r in results),
            "peak_cuda_bytes": targets.mean_sd(cuda) if cuda else None,
        }
        out.update({"batch": first["batch"], "chunk": first["chunk"],
                    "records": first["records"], "tokens_max": first["tokens_max"],
                    "threads": first["threads"], "device": first["device"]})
    out["label"] = {
        "demo": f"LoRA round: one site's ICD texts, Poisson batch {out['batch']} in chunks "
                f"of {out['chunk']}",
        "head": f"head round: one site's pooled features, Poisson batch {out['batch']} in "
                f"chunks of {out['chunk']}",
    }.get(shape, f"LoRA: batch {FIXED_ROWS} × {FIXED_TOKENS} tokens")
    dp, plain = out["dp"], out["plain"]
    memory = "peak_cuda_bytes" if dp["peak_cuda_bytes"] and plain["peak_cuda_bytes"] \
        else "peak_rss_bytes"
    out["memory_measure"] = memory
    out["time_ratio"] = _ratio(dp["seconds_per_nominal_batch"], plain["seconds_per_nominal_batch"])
    out["memory_ratio"] = _ratio(dp[memory], plain[memory])
    out["time_status"] = targets.judge_at_most(out["time_ratio"], targets.DP_COST_LIMIT)
    out["memory_status"] = targets.judge_at_most(out["memory_ratio"], targets.DP_COST_LIMIT)
    return out


def _ratio(a: dict, b: dict) -> float | None:
    if not a or not b or a.get("mean") is None or not b.get("mean"):
        return None
    return a["mean"] / b["mean"]


def update_bytes(bench: Bench) -> dict:
    """Bytes of what a site sends against the full model in fp32 (every encoder and head
    parameter, LoRA's own tensors left out): a LoRA round sends LoRA A/B and the head
    (common.model.get_adapter_arrays), a head round the head alone; and the bytes the
    bench's simulations recorded as sent, per site and round."""
    from common.config import load_yaml
    from common.data import ICD10_CHAPTERS
    from common.model import build_model, get_adapter_arrays, trainable_names

    cfg = load_yaml(bench.config())
    model = build_model(cfg.model.base_model, ICD10_CHAPTERS, cfg.lora, cfg.model.pooling)
    arrays = get_adapter_arrays(model)
    head = [a for a, name in zip(arrays, trainable_names(model)) if "lora_" not in name]
    base = sum(p.numel() for n, p in model.named_parameters()
               if "lora_" not in n and "modules_to_save" not in n)

    def judged(kind: str, params: int, nbytes: float) -> dict:
        percent = 100.0 * nbytes / (base * 4)
        return {"kind": kind, "params": params, "bytes": nbytes, "percent": percent,
                "status": targets.judge_at_most(percent, targets.BYTES_LIMIT_PERCENT)}

    updates = [judged("LoRA round (LoRA A/B + head)", sum(a.size for a in arrays),
                      sum(a.nbytes for a in arrays)),
               judged("head round (head only)", sum(a.size for a in head),
                      sum(a.nbytes for a in head))]
    recorded = []
    for run in bench.runs():
        per_site = (run.summary or {}).get("bytes_sent_per_site_per_round") or {}
        values = [b for rounds in per_site.values() for b in rounds.values() if b]
        if values:
            recorded.append({"run": run.run_dir.name, **judged(
                "as sent (largest site-round)", 0, max(values)),
                "mean_bytes": statistics.fmean(values)})
    return {"model_params": base, "model_bytes": base * 4,
            "limit_percent": targets.BYTES_LIMIT_PERCENT, "updates": updates,
            "recorded": recorded,
            "lora": {"r": cfg.lora.r, "target_modules": list(cfg.lora.target_modules)},
            "head_rounds": cfg.train.head_rounds, "num_rounds": cfg.federation.num_rounds}
