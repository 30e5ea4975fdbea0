"""ServerApp main: config -> strategy -> workflow -> run directory.

One path for every mode: Flower's legacy `DefaultWorkflow` with a FedAvg, FedAvgM or
FedAdam (server/optimizer.py) wrapped by `SiteAwareStrategy`. Secure aggregation swaps
only the fit workflow.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common import shamir
from common.config import Config, FederationConfig, check_aggregation, from_run_config
from common.data import held_out
from common.evaluation import encode, evaluate
from common.message_keys import Keys
from common.metrics import weighted_mean
from common.model import (
    build_model, encoder_arrays, get_adapter_arrays, load_tokenizer, pick_device, save_adapter,
    set_adapter_arrays,
)
from server import checkpoint
from server.optimizer import build_strategy, describe
from server.rounds import PlainFit, Rounds, site_evaluate
from server.run_log import RunRecorder, format_metric
from server.strategy import SiteAwareStrategy


ERROR_FILE = "error.txt"
SITES_ANSWERED = "; what the sites answered: "  # the server's view of the sites, in its error

shamir.install("server")  # SecAgg+'s unmasking: each seed from cached Lagrange coefficients

# A simulation's grid looks for the sites' replies in memory every `pull_interval`
# (Flower's default 0.1 s): each of a round's five message exchanges (four SecAgg+
# stages, the evaluation) waited ~0.05 s on average for nothing. A look costs
# microseconds; a deployed grid keeps its own pace.
SIMULATION_PULL_SECONDS = 0.01


class FitWorkflow:
    """The fit step of a round: SecAgg+ or plain, by setting and by sites taking part.

    'on' refuses to aggregate in the clear: with fewer than 3 sites in a round the run
    stops with a reason. 'auto' uses SecAgg+ whenever 3 or more sites take part. Both
    wait at most federation.round_timeout for the sites.
    """

    MIN_SITES = 3

    def __init__(self, fed: FederationConfig, strategy: FedAvg) -> None:
        self.mode, self.strategy = fed.secure_aggregation, strategy
        self.secagg = SecAggPlusWorkflow(
            num_shares=1.0, reconstruction_threshold=fed.secagg_threshold,
            max_weight=fed.secagg_max_weight, clipping_range=fed.secagg_clipping_range,
            timeout=fed.round_timeout)
        self.timeout = fed.timeout
        self.plain = PlainFit(fed.timeout)
        self.rounds: dict[int, bool] = {}

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        sites, _ = self.strategy.num_fit_clients(context.client_manager.num_available())
        secure = self.mode == "on" or (self.mode == "auto" and sites >= self.MIN_SITES)
        if secure and sites < self.MIN_SITES:
            raise RuntimeError(
                f"federation.secure_aggregation is 'on' but only {sites} site(s) take part; "
                f"SecAgg+ needs at least {self.MIN_SITES}, and fedcare will not aggregate "
                "in the clear instead")
        round_no = context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]
        self.rounds[round_no] = secure
        self.secagg.timeout = self.timeout(round_no)
        (self.secagg if secure else self.plain)(grid, context)


def run_dir_for(cfg: Config, run_id: int | str) -> Path:
    name = cfg.simulation.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{run_id}"
    return Path(cfg.simulation.output_dir).resolve() / name


def run_server(grid: Grid, context: Context, cfg: Config, run_dir: Path,
               resume: bool = False, deployed: bool = False, observe=None) -> dict:
    """Run the rounds into `run_dir`; with `resume`, go on after the round its
    checkpoint holds (the same run: same directory, same run id). `observe`: see
    SiteAwareStrategy.observe (an empirical audit's view of the updates)."""
    check_aggregation(cfg)  # a deployed run's config reaches no other check of it
    saved = None  # a run stopped before its first checkpoint resumes from round 1
    if resume and (run_dir / checkpoint.CHECKPOINT_FILE).exists():
        saved = checkpoint.load(run_dir)
    if resume:
        (run_dir / ERROR_FILE).unlink(missing_ok=True)  # the reason the last attempt stopped
    recorder = RunRecorder(run_dir, cfg, resume_after=(saved.round if saved else 0)
                           if resume else None, deployed=deployed)
    run_id = run_dir.name
    _, test = held_out(cfg.data)
    device = pick_device(cfg.train.device)
    model = build_model(cfg.model.base_model, len(test.label_names), cfg.lora,
                        cfg.model.pooling).to(device)
    tokenizer = load_tokenizer(cfg.model.base_model)
    initial = saved.adapter if saved else get_adapter_arrays(model)
    test_data = encode(test, tokenizer, cfg.model.max_length)
    fed = cfg.federation
    final: dict = {}

    def evaluate_test(server_round, arrays, _config):
        due = server_round == fed.num_rounds or (
            fed.evaluate_test_every and server_round % fed.evaluate_test_every == 0)
        if server_round == 0 or not due:
            return None
        set_adapter_arrays(model, arrays)
        metrics = evaluate(model, test_data, len(test.label_names), device)
        recorder.record("test", server_round, [{Keys.SITE: "global", **metrics}])
        final.update(metrics)
        return metrics["loss"], {k: v for k, v in metrics.items() if k != "loss"}

    def round_config(server_round: int) -> dict:
        return {Keys.ROUND: server_round, Keys.NUM_ROUNDS: fed.num_rounds, Keys.RUN_ID: run_id}

    inner = build_strategy(
        fed.server_optimizer, fed.server_learning_rate, fed.server_momentum,
        aggregation=fed.aggregation, faulty_share=fed.faulty_share,
        fraction_fit=fed.fraction_train, fraction_evaluate=1.0,
        min_fit_clients=fed.min_sites, min_evaluate_clients=fed.min_sites,
        min_available_clients=fed.min_sites,
        initial_parameters=ndarrays_to_parameters(initial),
        on_fit_config_fn=round_config, on_evaluate_config_fn=round_config,
        evaluate_fn=evaluate_test,
        fit_metrics_aggregation_fn=weighted_mean,
        evaluate_metrics_aggregation_fn=weighted_mean,
    )
    fit_workflow = FitWorkflow(fed, inner)
    frozen = encoder_arrays(model)  # a head round sends them empty; the server keeps its own
    strategy = SiteAwareStrategy(
        inner, [a.shape for a in initial], recorder.record, max_weight=fed.max_site_examples,
        frozen=lambda r: frozen if r <= cfg.train.head_rounds else (),
        norm_bound=fed.update_norm_bound, min_sites=fed.min_sites,
        min_completion=fed.min_completion, secure=lambda r: fit_workflow.rounds.get(r, False))
    strategy.observe = observe
    if saved:
        if saved.run_id != run_id:
            raise RuntimeError(f"{run_dir / checkpoint.CHECKPOINT_FILE} belongs to run "
                               f"{saved.run_id!r}, not {run_id!r}")
        checkpoint.restore(saved, strategy)
    if resume:
        recorder.say(f"resuming after round {saved.round if saved else 0} of "
                     f"{fed.num_rounds} (checkpoint: {run_dir / checkpoint.CHECKPOINT_FILE})")

    def after_round(round_no: int, ctx: LegacyContext) -> None:
        adapter = ctx.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
        strategy.outcomes.setdefault(round_no, "skipped: no site was asked to train")
        checkpoint.save(run_dir, checkpoint.capture(round_no, run_id, adapter, strategy))

    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=fed.num_rounds),
                           strategy=strategy)
    Rounds(fit_workflow, site_evaluate(fed.timeout), first=saved.round + 1 if saved else 1,
           last=fed.num_rounds, after_round=after_round,
           initial=ndarrays_to_parameters(saved.adapter) if saved else None)(grid, legacy)

    if not final:  # resumed after the last round: its test evaluation, kept or made again
        kept = [r for r in recorder.rows if (r["phase"], r["round"]) == ("test", fed.num_rounds)]
        if kept:
            final.update({k: v for k, v in kept[-1].items()
                          if k not in ("phase", "round", "wall_seconds", "private", Keys.SITE)})
        elif strategy.steps:
            evaluate_test(fed.num_rounds,
                          legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays(), {})
    skipped = {r: why for r, why in sorted(strategy.outcomes.items()) if why != "aggregated"}
    rounds = {"rounds_aggregated": strategy.steps,
              "rounds_skipped": {str(r): why for r, why in skipped.items()}}
    if strategy.steps == 0:  # an untrained adapter must not pass for this run's result
        recorder.summary(final, rounds, {f"node-{n}": name for n, name in strategy.names.items()})
        raise RuntimeError("no round aggregated any update, so no adapter is saved"
                           f"{SITES_ANSWERED}{recorder.site_problems(3) or 'nothing'} "
                           "(metrics.jsonl)")
    set_adapter_arrays(model, legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays())
    save_adapter(model, run_dir / "adapter", test.label_names, cfg.model.base_model,
                 cfg.model.max_length)
    audit = None
    if cfg.privacy.enabled and (run_dir / "ledgers").is_dir():
        from common.privacy.report import write_report

        report = write_report(run_dir, run_dir / "audit_report.html", run_dir / "audit_report.json")
        audit = {"report": "audit_report.html", "verified": report["ok"],
                 "problems": sum(len(site["problems"]) for site in report["sites"])}
    clock = strategy.clock
    split = {"start_up": (clock.started or recorder.start) - recorder.start, **clock.seconds}
    split = {k: round(v, 1) for k, v in split.items()}
    recorder.say("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f}s" for k, v in split.items())
                 + " (the first fit includes the sites' start-up: model, tokens, features)")
    summary = recorder.summary(final, {"time_split_seconds": split, "audit": audit, **rounds,
                                       "secure_aggregation": {
        "setting": fed.secure_aggregation,
        "rounds": {str(r): on for r, on in fit_workflow.rounds.items()}},
        "server_optimizer": describe(inner)},
        aliases={f"node-{node}": name for node, name in strategy.names.items()})
    for site, facts in sorted((summary.get("personalization") or {}).items()):
        g, p = facts["global"], facts["personalized"]
        recorder.say(f"{site}: own validation records — global model accuracy "
                     f"{format_metric(g['accuracy'])} / macro-F1 {format_metric(g['macro_f1'])}, personalised "
                     f"{format_metric(p['accuracy'])} / {format_metric(p['macro_f1'])}"
                     + (f" ({facts['refused']})" if facts.get("refused") else ""))
    recorder.say(f"test accuracy {final.get('accuracy', float('nan')):.3f}, "
                 f"macro-F1 {final.get('macro_f1', float('nan')):.3f}; run directory {run_dir}")
    if len(skipped) > fed.max_failed_rounds * fed.num_rounds:
        raise RuntimeError(
            f"{len(skipped)} of {fed.num_rounds} rounds were skipped, more than "
            f"federation.max_failed_rounds={fed.max_failed_rounds:g} allows: "
            + "; ".join(f"round {r}: {why}" for r, why in list(skipped.items())[:3])
            + " (the adapter is saved, but this run did not do what it was asked)")
    return summary


def build_app(cfg: Config | None = None, run_dir: Path | None = None,
              resume: bool = False, observe=None) -> ServerApp:
    """`cfg` given: in-process simulation; None: read Flower's run config. `resume`
    (or federation.resume in the run config): go on from the run directory's checkpoint."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = cfg if cfg is not None else from_run_config(context.run_config)
        if isinstance(grid, InMemoryGrid):
            grid.pull_interval = min(grid.pull_interval, SIMULATION_PULL_SECONDS)
        # train.threads is the sites' setting: the server evaluates the global model
        # while the sites wait, so it keeps torch's default of every core
        target = run_dir or run_dir_for(config, context.run_id)
        try:
            run_server(grid, context, config, target, resume=resume or config.federation.resume,
                       deployed=cfg is None, observe=observe)
        except Exception as err:  # keep the reason where the operator looks for the run
            target.mkdir(parents=True, exist_ok=True)
            (target / ERROR_FILE).write_text(f"{type(err).__name__}: {err}\n")
            raise

    return app


app = build_app()
