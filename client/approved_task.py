"""One ClientApp task at a hospital, run only if the hospital approved the run's app.

Started by `fedcare site clientapp` (client/approval.py) as a fresh interpreter,
`python -I client/approved_task.py`, with the task's token and the approved app hashes
on stdin as JSON. It does what Flower's `flwr-clientapp` does (flwr 1.42,
flwr/supernode/runtime/run_clientapp.py), with one step added: it hashes the FAB it
pulled and compares the hash with the approvals *before* installing or importing
anything from it. A FAB that is not approved is answered with an error naming its hash,
and nothing else: no file of the app is written, no code of it runs, no data is read.

This file imports only the standard library and Flower, never fedcare's own packages:
the approved app brings its `client` and `common` in its FAB, and Python would reuse
any module of the same name already imported (`-I` also keeps this folder and the user's
site-packages off `sys.path`).
"""

import hashlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

# what the app is told (common/privacy/approvals.py: APPROVED_APP_ENV, APPROVALS_LEDGER_ENV)
APP_ENV, LEDGER_ENV = "FEDCARE_APPROVED_APP", "FEDCARE_APPROVALS_LEDGER"


def say(line: str) -> None:
    print(f"fedcare site clientapp: {line}", file=sys.stderr, flush=True)


def main() -> int:
    job = json.load(sys.stdin)
    approved = set(job["approved"])

    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input, push_message, push_task_output,
    )

    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=job["runtime_api"], insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(job["token"])],
        retry_invoker=retry)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details, code = SubStatus.FAILED, "the task failed before it started", 1
    try:
        message, context, run, fab = pull_task_input(client)
        digest = hashlib.sha256(fab.content).hexdigest()
        if digest != fab.hash_str or digest not in approved:
            why = ("its content does not match the hash the SuperNode states"
                   if digest != fab.hash_str else "this site has not approved it")
            details = f"refused: app {digest} is not approved at this site"
            say(f"run {run.run_id}: {details} ({why}); nothing of it was installed or run")
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details),
                            reply_to=message)
            code = 3
        else:
            os.environ[LEDGER_ENV] = job["ledger"]
            reply = _run_approved(message, context, run, fab, digest)
            status, details, code = SubStatus.COMPLETED, "", 0
    except Exception as exc:  # noqa: BLE001 - reported to the SuperNode like flwr-clientapp
        say(f"the task failed: {exc}\n{traceback.format_exc()}")
        details = f"{type(exc).__name__}: {exc}"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
    finally:
        retry.max_tries = 1
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)  # before the task's end, or it waits
        finally:
            push_task_output(client, context, status, details)
            heartbeat.stop()
            client.close()
    return code


def _run_approved(message, context, run, fab, digest: str):
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    # an editable install of fedcare maps `client`/`common` to its own folders: only
    # the approved FAB's code may answer those names here
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, "__module__", "").startswith("__editable__")]
    with tempfile.TemporaryDirectory(prefix="fedcare-app-") as tmp:
        app_dir = install_from_fab(fab.content, install_dir=Path(tmp) / "app",
                                   skip_prompt=True)
        os.environ[APP_ENV] = digest
        load = get_load_client_app_fn(default_app_ref="", app_path=str(app_dir),
                                      multi_app=True)
        app = load(run.fab_id, run.fab_version, fab.hash_str)
        say(f"run {run.run_id}: app {digest} is approved; running it")
        return app(message=message, context=context)


if __name__ == "__main__":
    sys.exit(main())
