"""ClientApp glue: message in -> SiteClient (client/site.py) -> message out.

Built on Flower's NumPyClient so that SecAgg+ (which in Flower 1.42 runs only on
this path) is a mod in front of the same client, switched on by the server.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.client import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.releases import ContainErrors, release_filter
from common.config import Config, from_run_config
from common.keys import Keys


FIT_CONFIG = "fitins.config"  # where Flower's legacy messages keep the FitIns config


def secure_aggregation_mod(msg, context, call_next):
    """SecAgg+ when the server runs its SecAgg+ workflow, plain otherwise. The site
    learns that its update goes out masked from the protocol itself, never from a claim
    in the config the server sends: the flag is set here, whatever the config said."""
    secure = RECORD_KEY_CONFIGS in msg.content.config_records
    if FIT_CONFIG in msg.content.config_records:
        msg.content.config_records[FIT_CONFIG][Keys.SECURE_AGGREGATION] = secure
    return secaggplus_mod(msg, context, call_next) if secure else call_next(msg, context)


def build_app(cfg: Config | None = None, mods=()) -> ClientApp:
    """`cfg` given: in-process simulation; None: read Flower's run config.
    Around the site, outermost first: failures leave as a code and a reference; SecAgg+
    (or plain); only declared releases leave. `mods` run innermost: they see plain,
    unmasked messages."""

    def client_fn(context: Context):
        # torch, transformers and opacus load here, not at import: a deployed SuperNode
        # starts a fresh ClientApp process per message, and SecAgg+'s key-exchange
        # stages never reach the client
        from client.site import SiteClient, SiteTrainer, site_from_context

        config = cfg if cfg is not None else from_run_config(context.run_config)
        site = site_from_context(config, context)
        return SiteClient(SiteTrainer(config, site)).to_client()

    def log_file(context: Context):
        from client.node import log_file as site_log_file
        return site_log_file(cfg, context)

    return ClientApp(client_fn=client_fn, mods=[ContainErrors(log_file), secure_aggregation_mod,
                                                release_filter, *mods])


app = build_app()
