"""A real deployment on loopback: one SuperLink with TLS and SuperNode authentication,
three hospitals as real `flower-supernode` processes, the app submitted with
`flwr run`, and the auditor's checks on what comes back.

Also two intruders that must not get in: a SuperNode whose key was never
registered, and one that does not trust the federation's CA.

Every process runs in its own process group, logs to a file under tmp, is bounded
by a timeout and is stopped by PID in `finally`; on failure the last lines of every
log are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.certs import init_certs
from common.privacy.keys import PUBLIC_KEY_FILE, load_or_create_site_key
from common.privacy.verify import verify_path
from tests.conftest import LABELS, write_records, write_tiny_model

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: flower-superexec is found by name
CONNECTION = "fedcare"
# site -> its own ε budget; site-c allows less than the run's target of 8
BUDGETS = {"site-a": 8.0, "site-b": 8.0, "site-c": 5.0}
INTRUDER = "site-x"  # has a key pair, but the operator never registers it
RUN_TIMEOUT = 360  # seconds for `flwr run --stream`; it took 150-225 s on 2 busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Started processes, each in its own group with its log file; all stopped by PID."""

    def __init__(self, logs: Path, env: dict) -> None:
        self.logs, self.env = logs, env
        self.started: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen:
        with self.log(name).open("wb") as out:
            proc = subprocess.Popen(args, cwd=cwd, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.started[name] = proc
        return proc

    def run(self, name: str, args: list[str], cwd: Path, timeout: float) -> int:
        """Run to completion (bounded); the exit status."""
        proc = self.start(name, args, cwd)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(name)
            raise AssertionError(f"{name} did not finish within {timeout} s") from None

    def stop(self, name: str) -> None:
        """SIGTERM to the process group (the SuperExec and app processes go with it),
        SIGKILL after 15 s."""
        proc = self.started[name]
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)  # group id == pid: start_new_session
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                # children of the group may outlive the leader: kill what is left
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):
            self.stop(name)

    def tails(self, lines: int = 50) -> str:
        out = []
        for name in self.started:
            text = self.log(name).read_text(errors="replace").splitlines()
            out.append(f"----- {name} (last {lines} of {len(text)} lines) -----")
            out.extend(text[-lines:])
        return "\n".join(out)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def toml_string(value: str | Path) -> str:
    """A TOML literal string (no escapes needed for paths)."""
    value = str(value)
    assert "'" not in value and "\n" not in value, value
    return f"'{value}'"


def write_run_config(path: Path, model: Path, test_file: Path, out_dir: Path) -> Path:
    """The operator's run config (`flwr run --run-config FILE`): TOML sections are
    flattened by Flower to the `section.key` names declared in pyproject.toml. Values
    from tests/conftest.py `tiny_config`, so that two rounds take seconds of training."""
    path.write_text(f"""\
[model]
base_model = {toml_string(model)}   # the same folder must exist at every hospital
max_length = 16
[lora]
r = 2
alpha = 4
[data]
source = "files"                     # each hospital names its file in its node config
test_file = {toml_string(test_file)} # read by the ServerApp only
text_column = "note"
label_column = "diagnosis"
labels = "{",".join(LABELS)}"
[train]
batch_size = 16
local_steps = 2
learning_rate = 0.05
chunk_size = 8
threads = 1
[federation]
num_rounds = 2
min_sites = 3                        # wait for all three; SecAgg+ is on from 3 sites
[simulation]
output_dir = {toml_string(out_dir)}  # absolute: else relative to the SuperLink's cwd
""")
    return path


def test_three_hospitals_train_over_tls_and_intruders_are_kept_out(tmp_path):
    from peft import PeftModel
    from common.model import build_base

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    # --- the operator's and the hospitals' files -------------------------------------
    certs = init_certs(tmp_path / "certs", sites=[*BUDGETS, INTRUDER])
    keys = {s.name: s for s in certs.sites}
    model = write_tiny_model(tmp_path / "tiny-bert")
    (tmp_path / "server").mkdir()
    test_file = write_records(tmp_path / "server" / "test.csv", 80, seed=99)
    hospitals = tmp_path / "hospitals"
    trusted = tmp_path / "trusted-keys"  # the auditor's: handed over by the hospitals
    trusted.mkdir()
    node_configs = {}
    for i, (site, budget) in enumerate(BUDGETS.items()):
        home = hospitals / site
        home.mkdir(parents=True)
        if site != "site-c":  # ledger key made before the run; site-c's at its first round
            load_or_create_site_key(home / "state")
            shutil.copy(home / "state" / PUBLIC_KEY_FILE, trusted / f"{site}.pub.pem")
        data = write_records(home / "notes.csv", 120, seed=i, skew=LABELS[i])
        node_configs[site] = {"site": site, "data-file": data, "state-dir": home / "state",
                              "epsilon-budget": budget, "delta": 1e-5,
                              "text-column": "note", "label-column": "diagnosis"}
    out_dir = tmp_path / "runs"

    port = free_port()
    address = f"127.0.0.1:{port}"
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f"root-certificates = {toml_string(certs.ca_cert)}\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the app must come from the FAB, not this checkout
    procs = Processes(tmp_path / "logs", env)
    superlink_cwd = tmp_path / "superlink"
    superlink_cwd.mkdir()
    timings["files"] = time.monotonic() - t0

    try:
        # --- SuperLink: TLS, SuperNode authentication, no runtime installs ----------
        procs.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs.ca_cert),
            "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--database", str(superlink_cwd / "superlink.db"),
            "--host", "127.0.0.1", "--port", str(port)], cwd=superlink_cwd)
        wait_until(lambda: "Uvicorn running on https://" in
                   procs.log("superlink").read_text(errors="replace")
                   or procs.started["superlink"].poll() is not None,
                   60, "the SuperLink to listen")
        assert procs.started["superlink"].poll() is None, "the SuperLink exited"
        timings["superlink_up"] = time.monotonic() - t0

        # --- SuperNodes: the hospitals', and two intruders that must be turned away -
        def supernode(name: str, key: Path, ca: Path | None, node_config: str,
                      *extra: str) -> subprocess.Popen:
            args = [str(BIN / "flower-supernode"), "--superlink", address,
                    "--auth-supernode-private-key", str(key),
                    "--node-config", node_config, "--port", str(free_port()), *extra]
            if ca is not None:
                args += ["--root-certificates", str(ca)]
            return procs.start(name, args, cwd=hospitals)

        # intruders first, so that their rejection overlaps the registrations
        bad_config = (f"site='{INTRUDER}' data-file={toml_string(tmp_path / 'x.csv')} "
                      f"state-dir={toml_string(tmp_path / 'x-state')} epsilon-budget=100.0")
        bounded = ("--max-retries", "2", "--max-wait-time", "20")
        intruders = {
            # a well-formed key the operator never registered
            "intruder-unregistered": (supernode("intruder-unregistered",
                                                keys[INTRUDER].private_key, certs.ca_cert,
                                                bad_config, *bounded),
                                      "Failed to activate SuperNode"),
            # a registered key, but no CA: the SuperLink's certificate is not trusted
            "intruder-no-ca": (supernode("intruder-no-ca", keys["site-a"].private_key, None,
                                         bad_config, *bounded),
                               "CERTIFICATE_VERIFY_FAILED"),
        }
        intruders_started = time.monotonic()

        for site in BUDGETS:  # the operator registers the hospitals' public keys
            rc = procs.run(f"register-{site}", [
                str(BIN / "flwr"), "supernode", "register", str(keys[site].public_key),
                CONNECTION], cwd=tmp_path, timeout=60)
            assert rc == 0, f"registering {site} failed (rc {rc})"
            assert "registered successfully" in procs.log(f"register-{site}").read_text()
        timings["registered"] = time.monotonic() - t0

        for i, (site, values) in enumerate(node_configs.items()):
            pairs = [f"{k} = {toml_string(v) if isinstance(v, (str, Path)) else v}"
                     for k, v in values.items()]
            if i == 0:  # a TOML file, as a hospital would keep it
                config_file = hospitals / site / "node-config.toml"
                config_file.write_text("\n".join(pairs) + "\n")
                node_config = str(config_file)
            else:  # the inline form
                node_config = " ".join(p.replace(" = ", "=") for p in pairs)
            supernode(site, keys[site].private_key, certs.ca_cert, node_config)

        for name, (proc, reason) in intruders.items():
            left = 60 - (time.monotonic() - intruders_started)
            try:
                rc = proc.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} was still running 60 s after it started") from None
            assert rc != 0, f"{name} exited 0"
            assert reason in procs.log(name).read_text(errors="replace"), name
        timings["intruders_rejected"] = time.monotonic() - t0

        # --- the operator submits the app ---------------------------------------------
        run_config = write_run_config(tmp_path / "run-config.toml", model, test_file, out_dir)
        rc = procs.run("flwr-run", [str(BIN / "flwr"), "run", str(APP_DIR), CONNECTION,
                                    "--run-config", str(run_config), "--stream"],
                       cwd=tmp_path, timeout=RUN_TIMEOUT)
        timings["run_done"] = time.monotonic() - t0
        assert rc == 0, f"flwr run exited {rc}"
        runs = sorted(out_dir.glob("*/summary.json")) if out_dir.is_dir() else []
        errors = [p.read_text() for p in out_dir.glob("*/error.txt")] if out_dir.is_dir() else []
        assert len(runs) == 1, (f"no run directory with summary.json in {out_dir} {errors}; "
                                "`flwr run` exits 0 even when the ServerApp fails: see the "
                                "flwr-run log below")
        run_dir = runs[0].parent

        # --- what the server kept -------------------------------------------------------
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["private"] is True and summary["rounds"] == 2
        assert summary["sites"] == sorted(BUDGETS)  # the intruders never joined
        for site, budget in BUDGETS.items():
            assert 0 < summary["epsilon_per_site"][site] <= budget + 1e-9, site
        assert summary["secure_aggregation"]["rounds"] == {"1": True, "2": True}
        assert summary["audit"]["verified"] is True
        assert 0.0 <= summary["test"]["accuracy"] <= 1.0

        base = build_base(str(model), len(LABELS))
        PeftModel.from_pretrained(base, str(run_dir / "adapter"))

        # --- the auditor: ledgers in the run directory and at each hospital -----------
        shutil.copy(hospitals / "site-c" / "state" / PUBLIC_KEY_FILE, trusted / "site-c.pub.pem")
        for site, budget in BUDGETS.items():
            state = hospitals / site / "state"
            own = verify_path(state / "ledger.jsonl", trusted)
            assert own.ok and own.sites[0].keys_pinned, [p.message for p in own.problems]
            entries = [json.loads(line) for line in
                       (state / "ledger.jsonl").read_text().splitlines()]
            # the noisy size (in the clear), then two updates masked by SecAgg+, under
            # the node config's budget and δ; no evaluation (off by default at a hospital)
            assert [(e["kind"], e["round"], e["secure_aggregation"], e["epsilon_budget"],
                     e["delta"]) for e in entries] == [("size", 1, False, budget, 1e-5),
                                                       ("train", 1, True, budget, 1e-5),
                                                       ("train", 2, True, budget, 1e-5)]
            # the hospital's own SuperNode log says what it released, line by line
            released = [line for line in procs.log(site).read_text(errors="replace")
                        .splitlines() if f"fedcare site {site}: release " in line]
            assert all("ε spent" in line for line in released)
            assert {line.rsplit("ledger seq ", 1)[1][0] for line in released} == {"0", "1", "2"}
            assert (run_dir / "ledgers" / f"{site}.jsonl").read_text() == \
                (state / "ledger.jsonl").read_text()
        report = verify_path(run_dir)
        assert report.ok, [p.message for p in report.problems]
        pinned = verify_path(run_dir, trusted)
        assert pinned.ok, [p.message for p in pinned.problems]
        assert sorted(s.site for s in pinned.sites) == sorted(BUDGETS)
        assert all(s.keys_pinned for s in pinned.sites)
        # pinning means something: swap two sites' keys and the ledgers no longer verify
        swapped = tmp_path / "swapped-keys"
        shutil.copytree(trusted, swapped)
        shutil.copy(trusted / "site-a.pub.pem", swapped / "site-b.pub.pem")
        assert not verify_path(run_dir, swapped).ok
        timings["checked"] = time.monotonic() - t0
    except BaseException:
        print(procs.tails(), file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        print("timings (s since start): "
              + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()), file=sys.stderr)
