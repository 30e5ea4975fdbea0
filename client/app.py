"""ClientApp glue: message in -> SiteClient -> SiteTrainer (client/site.py) -> message out.

Built on Flower's NumPyClient so that SecAgg+ (which in Flower 1.42 runs only on
this path) is a mod in front of the same client, switched on by the server.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.releases import ContainErrors, release_filter
from client.replies import ReplyStore
from common import shamir
from common.config import Config, from_run_config
from common.message_keys import Keys
from common.names import check_name


FIT_CONFIG = "fitins.config"  # where Flower's legacy messages keep the FitIns config

shamir.install("site")  # SecAgg+'s shares of the mask seed and key, split in O(n·t) ints


def secure_aggregation_mod(msg, context, call_next):
    """SecAgg+ when the server runs its SecAgg+ workflow, plain otherwise. The site
    learns that its update goes out masked from the protocol itself, never from a claim
    in the config the server sends: the flag is set here, whatever the config said."""
    secure = RECORD_KEY_CONFIGS in msg.content.config_records
    if FIT_CONFIG in msg.content.config_records:
        msg.content.config_records[FIT_CONFIG][Keys.SECURE_AGGREGATION] = secure
    return secaggplus_mod(msg, context, call_next) if secure else call_next(msg, context)


class _NoStore:
    def put(self, *_args) -> None:
        pass


class SiteClient(NumPyClient):
    """Flower's view of a site (client/site.py `SiteTrainer`): arrays in, declared
    releases out, and a reply already released sent again rather than recomputed."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def get_parameters(self, config):
        raise PermissionError("a site sends its adapter only as a round's DP update")

    def _bind(self, config) -> str:
        """The run id, checked before it names anything; a simulated site's state
        folder under the run's directory."""
        run_id = check_name("run id", str(config.get(Keys.RUN_ID, "")))
        self.trainer.bind(run_id)
        return run_id

    def _kept(self, phase: str, run_id: str, round_no: int, secure: bool):
        """The store of replies, and the reply already sent for this round, if any (a
        resumed server asks again; the same bytes release nothing new)."""
        if self.trainer.site.state_dir is None:  # nowhere to keep it: answer afresh
            return _NoStore(), None
        replies = ReplyStore(self.trainer.site.state_dir, run_id)
        kept = replies.get(phase, round_no, secure)
        if kept is not None:
            self.trainer.say(f"round {round_no}: asked again for its {phase} (the server "
                             "resumed); sending the reply already released")
        return replies, kept

    def fit(self, parameters, config):
        run_id = self._bind(config)
        round_no = int(config[Keys.ROUND])
        secure = bool(config.get(Keys.SECURE_AGGREGATION, False))
        replies, out = self._kept("fit", run_id, round_no, secure)
        if out is None:
            self.trainer.receive(parameters)
            out = self.trainer.fit(round_no, int(config[Keys.NUM_ROUNDS]), run_id, secure)
            replies.put("fit", round_no, secure, out)
        return out["arrays"], out["num_examples"], out["metrics"]

    def evaluate(self, parameters, config):
        run_id = self._bind(config)
        round_no = int(config.get(Keys.ROUND, 0))
        replies, out = self._kept("evaluate", run_id, round_no, False)
        if out is None:
            self.trainer.receive(parameters)
            loss, total, metrics = self.trainer.evaluate(
                round_no, int(config.get(Keys.NUM_ROUNDS, 0)), run_id)
            out = {"loss": loss, "num_examples": total, "metrics": metrics}
            replies.put("evaluate", round_no, False, out)
        return out["loss"], out["num_examples"], out["metrics"]


def build_app(cfg: Config | None = None, mods=()) -> ClientApp:
    """`cfg` given: in-process simulation; None: read Flower's run config.
    Around the site, outermost first: failures leave as a code and a reference; SecAgg+
    (or plain); only declared releases leave. `mods` run innermost: they see plain,
    unmasked messages."""

    def client_fn(context: Context):
        # torch, transformers and opacus load here, not at import: a deployed SuperNode
        # starts a fresh ClientApp process per message, and SecAgg+'s key-exchange
        # stages never reach the client
        from client.site import SiteTrainer, site_from_context

        config = cfg if cfg is not None else from_run_config(context.run_config)
        site = site_from_context(config, context)
        return SiteClient(SiteTrainer(config, site)).to_client()

    def log_file(context: Context):
        from client.node import log_file as site_log_file
        return site_log_file(cfg, context)

    return ClientApp(client_fn=client_fn, mods=[ContainErrors(log_file), secure_aggregation_mod,
                                                release_filter, *mods])


app = build_app()
