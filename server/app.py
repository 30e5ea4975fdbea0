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
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

from common.config import Config, FederationConfig, from_run_config
from common.data import held_out
from common.evaluation import encode, evaluate
from common.keys import Keys
from common.metrics import weighted_mean
from common.model import (build_model, get_adapter_arrays, load_tokenizer, pick_device,
                          save_adapter, set_adapter_arrays, encoder_arrays)
from server.optimizer import build_strategy, describe
from server.run_log import RunRecorder, format_metric
from server.strategy import SiteAwareStrategy


ERROR_FILE = "error.txt"


class FitWorkflow:
    """The fit step of a round: SecAgg+ or plain, by setting and by sites taking part.

    'on' refuses to aggregate in the clear: with fewer than 3 sites in a round the run
    stops with a reason. 'auto' uses SecAgg+ whenever 3 or more sites take part.
    """

    MIN_SITES = 3

    def __init__(self, fed: FederationConfig, strategy: FedAvg) -> None:
        self.mode, self.strategy = fed.secure_aggregation, strategy
        self.secagg = SecAggPlusWorkflow(
            num_shares=1.0, reconstruction_threshold=fed.secagg_threshold,
            max_weight=fed.secagg_max_weight, clipping_range=fed.secagg_clipping_range)
        self.rounds: dict[int, bool] = {}

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        sites, _ = self.strategy.num_fit_clients(context.client_manager.num_available())
        secure = self.mode == "on" or (self.mode == "auto" and sites >= self.MIN_SITES)
        if secure and sites < self.MIN_SITES:
            raise RuntimeError(
                f"federation.secure_aggregation is 'on' but only {sites} site(s) take part; "
                f"SecAgg+ needs at least {self.MIN_SITES}, and fedcare will not aggregate "
                "in the clear instead")
        self.rounds[len(self.rounds) + 1] = secure
        (self.secagg if secure else default_fit_workflow)(grid, context)


def run_dir_for(cfg: Config, run_id: int | str) -> Path:
    name = cfg.simulation.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{run_id}"
    return Path(cfg.simulation.output_dir).resolve() / name


def run_server(grid: Grid, context: Context, cfg: Config, run_dir: Path) -> dict:
    recorder = RunRecorder(run_dir, cfg)
    run_id = run_dir.name
    _, test = held_out(cfg.data)
    device = pick_device(cfg.train.device)
    model = build_model(cfg.model.base_model, len(test.label_names), cfg.lora,
                        cfg.model.pooling).to(device)
    tokenizer = load_tokenizer(cfg.model.base_model)
    initial = get_adapter_arrays(model)
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
    frozen = encoder_arrays(model)  # a head round sends them empty; the server keeps its own
    strategy = SiteAwareStrategy(
        inner, [a.shape for a in initial], recorder.record,
        frozen=lambda r: frozen if r <= cfg.train.head_rounds else ())
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=fed.num_rounds),
                           strategy=strategy)
    fit_workflow = FitWorkflow(fed, inner)
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)

    if strategy.steps == 0:  # an untrained adapter must not pass for this run's result
        failed = sorted({f"{r.get(Keys.SITE)}: {r.get(Keys.REFUSED) or r.get('status')}"
                         for r in recorder.rows if r["phase"] == "train"})
        recorder.summary(final, {"rounds_aggregated": 0})
        raise RuntimeError("no round aggregated any update, so no adapter is saved; what "
                           f"the sites answered: {failed[:3] or 'nothing'} (metrics.jsonl)")
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
    summary = recorder.summary(final, {"time_split_seconds": split, "audit": audit,
                                       "rounds_aggregated": strategy.steps,
                                       "secure_aggregation": {
        "setting": fed.secure_aggregation,
        "rounds": {str(r): on for r, on in fit_workflow.rounds.items()}},
        "server_optimizer": describe(inner)})
    for site, facts in sorted((summary.get("personalization") or {}).items()):
        g, p = facts["global"], facts["personalized"]
        recorder.say(f"{site}: own validation records — global model accuracy "
                     f"{format_metric(g['accuracy'])} / macro-F1 {format_metric(g['macro_f1'])}, personalised "
                     f"{format_metric(p['accuracy'])} / {format_metric(p['macro_f1'])}"
                     + (f" ({facts['refused']})" if facts.get("refused") else ""))
    recorder.say(f"test accuracy {final.get('accuracy', float('nan')):.3f}, "
                 f"macro-F1 {final.get('macro_f1', float('nan')):.3f}; run directory {run_dir}")
    return summary


def build_app(cfg: Config | None = None, run_dir: Path | None = None) -> ServerApp:
    """`cfg` given: in-process simulation; None: read Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = cfg if cfg is not None else from_run_config(context.run_config)
        # train.threads is the sites' setting: the server evaluates the global model
        # while the sites wait, so it keeps torch's default of every core
        target = run_dir or run_dir_for(config, context.run_id)
        try:
            run_server(grid, context, config, target)
        except Exception as err:  # keep the reason where the operator looks for the run
            target.mkdir(parents=True, exist_ok=True)
            (target / ERROR_FILE).write_text(f"{type(err).__name__}: {err}\n")
            raise

    return app


app = build_app()
