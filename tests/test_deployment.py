"""A real deployment on loopback, as docs/run_across_hospitals.md tells it: one
SuperLink with TLS and SuperNode authentication, three hospitals as real
`flower-supernode` processes in process isolation, each beside the hospital's own
ClientApp process (`fedcare site clientapp`) that runs only the app the hospital
approved, the app submitted with `flwr run`, and the auditor's checks on what comes
back. Then the same run from a copy of the app with one line changed in `client/`:
every hospital refuses it, runs none of it and releases nothing.

The operator's and the hospitals' commands are taken from the guide itself and run
through bash (`guide_command`), with only the address and ports changed for
loopback, so a guide command that no longer works fails this test; the operator and
each hospital have their own folder (`FEDCARE_DIR`), and the commands run from a
folder that is neither, as the guide promises. Also two intruders that must not get
in: a SuperNode whose key was never registered, and one that does not trust the
federation's CA.

Every process runs in its own process group, logs to a file under tmp, is bounded
by a timeout and is stopped by PID in `finally`; on failure the last lines of every
log are printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.privacy import accounting
from common.privacy.approvals import bundle_sha256
from common.privacy.ledger import LEDGER_FILE
from common.privacy.signing import PUBLIC_KEY_FILE, load_or_create_site_key
from common.privacy.verify import verify_path
from server.certs import add_site
from tests.conftest import LABELS, write_patient_records, write_records, write_tiny_model

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).resolve().parents[1]
GUIDE = APP_DIR / "docs" / "run_across_hospitals.md"
BIN = Path(sys.executable).parent  # the venv's bin: flower-superexec is found by name
GUIDE_ADDRESS = "fl.example.org:8000"  # the guide's SuperLink address, made loopback here
# site -> its lifetime ε budget and its run cap (0: the run's target of 8). site-a is
# the guide's hospital (24, at most 8 a run); site-c allows less than the target
BUDGETS = {"site-a": 24.0, "site-b": 8.0, "site-c": 5.0}
RUN_CAPS = {"site-a": 8.0, "site-b": 0.0, "site-c": 0.0}
TARGET_EPSILON = 8.0  # privacy.target_epsilon's default
PATIENT_SITE = "site-b"  # protects patients (its node config names its patient column)
INTRUDER = "site-x"  # has a key pair, but the operator never registers it
RUN_TIMEOUT = 360  # seconds for `flwr run --stream`; it took 150-225 s on 2 busy cores


def guide_command(first_line: str) -> str:
    """The guide's command that starts with `first_line` (its first occurrence), whole:
    with its backslash continuations, its here-document up to EOF, or its loop up to
    `done`; indented as a list item's block, it is dedented."""
    lines = GUIDE.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith(first_line)]
    assert starts, f"{GUIDE.name} no longer shows a command starting {first_line!r}"
    i = starts[0]
    indent = len(lines[i]) - len(lines[i].lstrip())
    command = [lines[i][indent:]]
    end = "EOF" if "<<EOF" in command[0] else "done" if command[0].startswith("for ") else None
    while command[-1].endswith("\\") or (end and command[-1] != end):
        i += 1
        command.append(lines[i][indent:])
    return "\n".join(command) + "\n"


def fedcare_env(fedcare_dir: Path) -> dict:
    """Step 0 of the guide for one machine (operator or hospital)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FEDCARE_APP": str(APP_DIR), "FEDCARE_DIR": str(fedcare_dir),
           "FLWR_HOME": str(fedcare_dir / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the app must come from the FAB, not this checkout
    fedcare_dir.mkdir(parents=True, exist_ok=True)
    return env


def release_copy(destination: Path) -> Path:
    """The app's source as a release holds it: the files git tracks, or would (not the
    ignored ones such as .venv or runs/), copied to `destination`."""
    listed = subprocess.run(["git", "-C", str(APP_DIR), "ls-files", "-z", "--cached",
                             "--others", "--exclude-standard"], check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (APP_DIR / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(APP_DIR / name, destination / name)
    return destination


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Started processes, each in its own group with its log file; all stopped by PID."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str, args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
        with self.log(name).open("wb") as out:
            proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.started[name] = proc
        return proc

    def run(self, name: str, args: list[str], cwd: Path, env: dict, timeout: float) -> int:
        """Run to completion (bounded); the exit status."""
        proc = self.start(name, args, cwd, env)
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


def write_run_config(path: Path, model: Path, test_file: Path, out_dir: Path,
                     rounds: int = 2, run_name: str = "") -> Path:
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
num_rounds = {rounds}
min_sites = 3                        # wait for all three; SecAgg+ is on from 3 sites
[simulation]
output_dir = {toml_string(out_dir)}  # absolute: else relative to the SuperLink's cwd
""" + (f"run_name = {toml_string(run_name)}\n" if run_name else ""))
    return path


class Deployment:
    """The operator, the hospitals and their processes on loopback, brought up as the
    guide tells it (steps 1 to 4): certificates, the SuperLink, the hospitals' keys
    registered, each hospital's files, approval, SuperNode and ClientApp process."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.operator = tmp_path / "operator"  # the operator's FEDCARE_DIR
        self.hospitals = tmp_path / "hospitals"  # hospitals/<site>: each one's FEDCARE_DIR
        self.elsewhere = tmp_path / "elsewhere"  # the folder every command runs from
        self.elsewhere.mkdir()
        self.op_env = fedcare_env(self.operator)
        self.procs = Processes(tmp_path / "logs")
        self.envs: dict[str, dict] = {}

    def mark(self, what: str) -> None:
        self.timings[what] = time.monotonic() - self.t0

    def bash(self, name: str, command: str, env: dict, cwd: Path | None = None,
             timeout: float = 120) -> str:
        """Run a guide command to completion; its output (it must exit 0)."""
        rc = self.procs.run(name, ["bash", "-c", "set -e\n" + command],
                            cwd or self.elsewhere, env, timeout)
        out = self.procs.log(name).read_text(errors="replace")
        assert rc == 0, f"{name} exited {rc}:\n{command}\n{out}"
        return out

    def loopback(self, command: str) -> str:
        return command.replace(GUIDE_ADDRESS, self.address)

    def start_superlink(self, name: str = "superlink") -> None:
        """The guide's SuperLink (TLS, SuperNode auth, no runtime installs, its state
        in a database), on loopback; returns once it listens."""
        superlink = guide_command("flower-superlink")
        assert "--host 0.0.0.0 --port 8000" in superlink
        self.procs.start(name, ["bash", "-c", "exec " + superlink.replace(
            "--host 0.0.0.0 --port 8000", f"--host 127.0.0.1 --port {self.port}")],
            self.elsewhere, self.op_env)
        wait_until(lambda: "Uvicorn running on https://" in
                   self.procs.log(name).read_text(errors="replace")
                   or self.procs.started[name].poll() is not None,
                   60, "the SuperLink to listen")
        assert self.procs.started[name].poll() is None, "the SuperLink exited"

    def kill_server(self) -> list[str]:
        """SIGKILL the SuperLink's process group and the SuperExec and ServerApp it
        started (Flower detaches them into sessions of their own); what was killed."""
        superlink = self.procs.started["superlink"]
        os.killpg(superlink.pid, signal.SIGKILL)
        superlink.wait(timeout=30)
        killed = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            programs = [Path(a).name for a in argv[:2]]
            if any(p in ("flower-superexec", "flwr-serverapp") for p in programs) and any(
                    a.endswith(f":{self.port}") for a in argv):
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(programs[-1])
                except ProcessLookupError:
                    pass
        return killed

    def supernode(self, name: str, key: Path, ca: Path | None, node_config: str,
                  env: dict, *extra: str, port: int = 0) -> subprocess.Popen:
        args = [str(BIN / "flower-supernode"), "--superlink", self.address,
                "--auth-supernode-private-key", str(key),
                "--node-config", node_config, "--port", str(port or free_port()), *extra]
        if ca is not None:
            args += ["--root-certificates", str(ca)]
        return self.procs.start(name, args, self.elsewhere, env)

    def bring_up(self, intruders: bool = False) -> dict[str, tuple[subprocess.Popen, str]]:
        """Steps 1 to 4; with `intruders`, two SuperNodes that must be turned away,
        started so that their rejection overlaps the registrations: name -> (process,
        what its log must say), for the caller to check."""
        tmp_path, procs, bash, loopback = self.tmp_path, self.procs, self.bash, self.loopback
        operator, hospitals, elsewhere = self.operator, self.hospitals, self.elsewhere
        op_env, supernode, envs = self.op_env, self.supernode, self.envs
        # --- step 1: the operator's certificates and the hospitals' keys ----------------
        bash("certs-init", guide_command("fedcare certs init"), op_env)
        certs = operator / "certs"
        add_site(certs, INTRUDER)  # a key pair the operator never registers
        model = write_tiny_model(tmp_path / "tiny-bert")
        test_file = write_records(operator / "test.csv", 80, seed=99)
        trusted = operator / "trusted"  # the auditor's: handed over by the hospitals
        trusted.mkdir()
        self.mark("certs")

        # --- step 2: SuperLink (TLS, SuperNode auth, no runtime installs), connection -
        self.start_superlink()
        connection = "\n".join([guide_command("flwr config list > /dev/null"),
                                loopback(guide_command("grep -q '^\\[superlink\\.fedcare\\]'"))])
        bash("connection", connection + connection + "flwr config list\n", op_env)
        listed = procs.log("connection").read_text()
        assert re.search(r"^\s+fedcare$", listed, re.M), listed  # appended once, run twice
        config_toml = (operator / "flwr" / "config.toml").read_text()
        assert config_toml.count("[superlink.fedcare]") == 1
        assert "[superlink.local]" in config_toml  # Flower's own connections are kept
        self.mark("superlink_up")

        # --- SuperNodes: two intruders that must be turned away ---------------------
        turned_away: dict = {}
        if intruders:
            # intruders first, so that their rejection overlaps the registrations
            bad_config = (f"site='{INTRUDER}' data-file={toml_string(tmp_path / 'x.csv')} "
                          f"state-dir={toml_string(tmp_path / 'x-state')} epsilon-budget=100.0")
            bounded = ("--max-retries", "2", "--max-wait-time", "20")
            turned_away = {
                # a well-formed key the operator never registered
                "intruder-unregistered": (supernode(
                    "intruder-unregistered", certs / "sites" / INTRUDER / "auth.key",
                    certs / "ca.crt", bad_config, op_env, *bounded),
                    "Failed to activate SuperNode"),
                # a registered key, but no CA: the SuperLink's certificate is not trusted
                "intruder-no-ca": (supernode(
                    "intruder-no-ca", certs / "sites" / "site-a" / "auth.key", None,
                    bad_config, op_env, *bounded), "CERTIFICATE_VERIFY_FAILED"),
            }
            self.intruders_started = time.monotonic()

        # --- step 3: the operator registers the hospitals' keys, noting their ids -----
        bash("register", guide_command("for site in site-a site-b site-c; do"), op_env)
        nodes = dict(line.split() for line in (operator / "nodes.txt").read_text().splitlines())
        assert sorted(nodes) == sorted(BUDGETS) and all(i.isdigit() for i in nodes.values())
        self.mark("registered")

        # --- step 4: each hospital's files, policy and SuperNode ---------------------
        receive = "".join(guide_command(first) for first in (
            'mkdir -p "$FEDCARE_DIR/certs/sites/site-a"', "cp ca.crt ", "install -m 600 auth.key"))
        for i, (site, budget) in enumerate(BUDGETS.items()):
            home = hospitals / site
            envs[site] = env = fedcare_env(home)
            inbox = tmp_path / "inbox" / site  # what the operator sent, as received
            inbox.mkdir(parents=True)
            shutil.copy(certs / "ca.crt", inbox / "ca.crt")
            shutil.copy(certs / "sites" / site / "auth.key", inbox / "auth.key")
            bash(f"receive-{site}", receive.replace("site-a", site), env, cwd=inbox)
            assert (home / "certs" / "sites" / site / "auth.key").stat().st_mode & 0o077 == 0
            if site == PATIENT_SITE:  # a file that names each note's patient
                write_patient_records(home / "data" / "notes.csv", 20, seed=i)
            else:
                write_records(home / "data" / "notes.csv", 120, seed=i, skew=LABELS[i])
        # site-a, the guide's hospital: its node config file and ledger key, as shown
        bash("node-config-site-a", guide_command('cat > "$FEDCARE_DIR/node-config.toml"'),
             envs["site-a"])
        bash("site-init-site-a", guide_command('fedcare site init "$FEDCARE_DIR/state"'),
             envs["site-a"])
        load_or_create_site_key(hospitals / "site-b" / "state")  # site-c's: when it approves
        # every hospital approves the release it reviewed: its own copy of the source
        approve = guide_command('fedcare site approve "$FEDCARE_DIR/state"')
        approved = {}
        for site in BUDGETS:
            release_copy(hospitals / site / "release")
            said = bash(f"approve-{site}", approve.replace("site-a", site), envs[site])
            approved[site] = re.search(r"approved app ([0-9a-f]{64})", said)[1]
        assert len(set(approved.values())) == 1, approved  # one source, one hash
        app_hash = approved["site-a"]
        for site in ("site-a", "site-b", "site-c"):
            shutil.copy(hospitals / site / "state" / PUBLIC_KEY_FILE, trusted / f"{site}.pub.pem")
        clientapp = guide_command('fedcare site clientapp "$FEDCARE_DIR/state"')
        ports = {site: free_port() for site in BUDGETS}
        secret = guide_command("( umask 077 && head -c 32 /dev/urandom")
        for site in BUDGETS:  # the secret only the hospital's ClientApp process shares
            bash(f"secret-{site}", secret, envs[site])
        procs.start("site-a", ["bash", "-c", "exec " + loopback(guide_command(
            "flower-supernode --superlink")).replace("9094", str(ports["site-a"]))],
            elsewhere, envs["site-a"])
        for site in ("site-b", "site-c"):  # the inline node config
            home = hospitals / site
            values = {"site": site, "data-file": home / "data" / "notes.csv",
                      "state-dir": home / "state", "epsilon-budget": BUDGETS[site],
                      "delta": 1e-5, "text-column": "note", "label-column": "diagnosis"}
            if site == PATIENT_SITE:  # its own choice: the patient as the unit of privacy
                values.update({"patient-column": "patient", "max-records-per-patient": 2})
            inline = " ".join(f"{k}={toml_string(v) if isinstance(v, (str, Path)) else v}"
                              for k, v in values.items())
            supernode(site, home / "certs" / "sites" / site / "auth.key",
                      home / "certs" / "ca.crt", inline, envs[site], "--isolation", "process",
                      "--superexec-auth-secret-file", str(home / "state" / "runtime.secret"),
                      port=ports[site])
        for site in BUDGETS:  # the hospital's own ClientApp process beside each SuperNode
            procs.start(f"clientapp-{site}", ["bash", "-c", "exec " + clientapp.replace(
                "9094", str(ports[site]))], elsewhere, envs[site])
        self.certs, self.model, self.test_file, self.trusted = certs, model, test_file, trusted
        self.nodes, self.app_hash, self.ports = nodes, app_hash, ports
        return turned_away


def test_three_hospitals_train_over_tls_and_intruders_are_kept_out(tmp_path):
    from peft import PeftModel
    from common.model import build_base

    deployment = Deployment(tmp_path)
    procs, bash, elsewhere, op_env = (deployment.procs, deployment.bash, deployment.elsewhere,
                                      deployment.op_env)
    operator, hospitals, envs, t0 = (deployment.operator, deployment.hospitals,
                                     deployment.envs, deployment.t0)
    timings = deployment.timings
    try:
        intruders = deployment.bring_up(intruders=True)
        intruders_started = deployment.intruders_started
        model, test_file, trusted = deployment.model, deployment.test_file, deployment.trusted
        nodes, app_hash, ports = deployment.nodes, deployment.app_hash, deployment.ports
        # another local process without the secret, polling site-a's Runtime API too
        procs.start("clientapp-no-secret", [str(BIN / "fedcare"), "site", "clientapp",
                                            str(hospitals / "site-a" / "state"),
                                            "--runtime-api", f"127.0.0.1:{ports['site-a']}"],
                    elsewhere, envs["site-a"])

        for name, (proc, reason) in intruders.items():
            left = 60 - (time.monotonic() - intruders_started)
            try:
                rc = proc.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} was still running 60 s after it started") from None
            assert rc != 0, f"{name} exited 0"
            assert reason in procs.log(name).read_text(errors="replace"), name
        timings["intruders_rejected"] = time.monotonic() - t0

        # --- step 5: the operator submits the app -----------------------------------
        out_dir = operator / "runs"
        write_run_config(operator / "run.toml", model, test_file, out_dir)
        run = guide_command('flwr run "$FEDCARE_APP" fedcare')
        rc = procs.run("flwr-run", ["bash", "-c", run], elsewhere, op_env, RUN_TIMEOUT)
        timings["run_done"] = time.monotonic() - t0
        assert rc == 0, f"flwr run exited {rc}"
        stream = procs.log("flwr-run").read_text(errors="replace")
        assert "Successfully started run" in stream
        errors = [p.read_text() for p in out_dir.glob("*/error.txt")] if out_dir.is_dir() else []
        # success as the guide tells it: no Exit Code line, finished:completed, no error.txt
        assert "Exit Code" not in stream and not errors, (
            f"the run failed: {errors}; `flwr run` exits 0 even when the ServerApp fails: "
            "see the flwr-run log below")
        bash("flwr-ls", "flwr ls fedcare --format json", op_env)
        listed = json.loads(procs.log("flwr-ls").read_text())
        assert [r["status"] for r in listed["runs"]] == ["finished:completed"], listed
        runs = sorted(out_dir.glob("*/summary.json"))
        assert len(runs) == 1, f"no run directory with summary.json in {out_dir}"
        run_dir = runs[0].parent
        assert f"run directory {run_dir}" in stream  # the last line the guide names

        # --- what the server kept -------------------------------------------------------
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["private"] is True and summary["rounds"] == 2
        assert summary["sites"] == sorted(BUDGETS)  # the intruders never joined
        for site, budget in BUDGETS.items():
            spend = min(budget, RUN_CAPS[site] or TARGET_EPSILON)  # what this run may spend
            assert 0 < summary["epsilon_per_site"][site] <= spend + 1e-9, site
        assert summary["privacy_unit_per_site"] == {
            site: {"unit": "patient", "max_records_per_patient": 2} if site == PATIENT_SITE
            else {"unit": "record"} for site in BUDGETS}
        assert summary["secure_aggregation"]["rounds"] == {"1": True, "2": True}
        assert summary["audit"]["verified"] is True
        assert 0.0 <= summary["test"]["accuracy"] <= 1.0

        base = build_base(str(model), len(LABELS))
        PeftModel.from_pretrained(base, str(run_dir / "adapter"))

        # --- each hospital: its ledger where the guide says, its node id in its log ---
        status = bash("site-status-site-a",
                      guide_command('fedcare site status "$FEDCARE_DIR/state"'), envs["site-a"])
        assert f"ledger {hospitals / 'site-a' / 'state' / LEDGER_FILE}" in status, status
        for site, budget in BUDGETS.items():
            assert f"SuperNode ID: {nodes[site]}" in procs.log(site).read_text(errors="replace")
            log = procs.log(f"clientapp-{site}").read_text(errors="replace")
            # the FAB `flwr run` built from the operator's folder has the hash each
            # hospital built from its own copy: the approval matched and the app ran
            assert f"app {app_hash} is approved; running it" in log, site
            ledger = hospitals / site / "state" / LEDGER_FILE
            own = verify_path(ledger, trusted)
            assert own.ok and own.sites[0].keys_pinned, [p.message for p in own.problems]
            assert [(a.app_sha256, a.approved) for a in own.sites[0].approvals] == \
                [(app_hash, True)]
            entries = [json.loads(line) for line in ledger.read_text().splitlines()]
            # the approval, then the noisy size (in the clear) and two updates masked by
            # SecAgg+, under the node config's budget and δ, each naming the approved app;
            # no evaluation (off by default at a hospital)
            assert entries[0]["kind"] == "approval" and entries[0]["app_sha256"] == app_hash
            assert [(e["kind"], e["round"], e["secure_aggregation"], e["epsilon_budget"],
                     e["delta"], e["app_sha256"]) for e in entries[1:]] == [
                ("size", 1, False, budget, 1e-5, app_hash),
                ("train", 1, True, budget, 1e-5, app_hash),
                ("train", 2, True, budget, 1e-5, app_hash)]
            # the hospital's own ClientApp log says what it released, line by line
            released = [line for line in log.splitlines()
                        if f"fedcare site {site}: release " in line]
            unit = "patient k=2" if site == PATIENT_SITE else "record"
            assert all(f"unit={unit} " in line and f"ε per {unit.split()[0]} spent" in line
                       for line in released), released
            assert {e.get("privacy_unit") for e in entries[1:]} == {unit.split()[0]}
            assert {line.rsplit("ledger seq ", 1)[1][0] for line in released} == {"1", "2", "3"}
            assert (run_dir / "ledgers" / f"{site}.jsonl").read_text() == ledger.read_text()

        # --- step 6: the auditor -------------------------------------------------------
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

        # --- the operator changes one line in client/: every hospital refuses it -------
        tampered = release_copy(tmp_path / "tampered-app")
        marker = tmp_path / "tampered-code-ran"
        app_py = tampered / "client" / "app.py"
        source = app_py.read_text()
        app_py.write_text(source.replace("\nFIT_CONFIG = ", f"\nopen({str(marker)!r}, 'w')"
                                         f".close()\nFIT_CONFIG = ", 1))
        tampered_hash = bundle_sha256(tampered)
        assert tampered_hash != app_hash
        before = {site: (hospitals / site / "state" / LEDGER_FILE).read_bytes()
                  for site in BUDGETS}
        rc = procs.run("flwr-run-tampered", ["bash", "-c", run.replace(
            '"$FEDCARE_APP"', str(tampered))], elsewhere, op_env, RUN_TIMEOUT)
        timings["tampered_done"] = time.monotonic() - t0
        stream = procs.log("flwr-run-tampered").read_text(errors="replace")
        assert rc == 0 and "Successfully started run" in stream, stream
        bash("flwr-ls-tampered", "flwr ls fedcare --format json", op_env)
        listed = json.loads(procs.log("flwr-ls-tampered").read_text())
        assert sorted(r["status"] for r in listed["runs"]) == [
            "finished:completed", "finished:failed"], listed  # nothing aggregated
        for site in BUDGETS:
            log = procs.log(f"clientapp-{site}").read_text(errors="replace")
            refused = re.findall(r"refused: app ([0-9a-f]{64}) is not approved at this site",
                                 log)
            assert set(refused) == {tampered_hash}, site  # the hash of what was submitted
            assert (hospitals / site / "state" / LEDGER_FILE).read_bytes() == before[site]
        assert not marker.exists(), "code of the unapproved app ran at a hospital"
        # the process without the secret was turned away and never handed a task
        stray = procs.log("clientapp-no-secret").read_text(errors="replace")
        assert procs.started["clientapp-no-secret"].poll() == 2, stray
        assert "refused this process" in stray and " run " not in stray, stray
        assert "SuperExec authentication failed" in procs.log("site-a").read_text(
            errors="replace")
    except BaseException:
        print(procs.tails(), file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        print("timings (s since start): "
              + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()), file=sys.stderr)


RESUMED_RUN = "ward-study-1"  # the guide's run name


@pytest.mark.skipif(os.environ.get("FEDCARE_DEPLOYED_RESUME") != "1",
                    reason="a second deployment (~5 min on 2 cores): .ci/run sets "
                           "FEDCARE_DEPLOYED_RESUME=1")
def test_a_deployed_run_killed_after_round_one_resumes_and_no_site_releases_twice(tmp_path):
    """The same federation; the operator names a 3-round run as the guide says, the
    SuperLink and its ServerApp are killed (SIGKILL) once round 1 is checkpointed and a
    hospital has released round 2, the SuperLink is started again on its database and
    the run is resumed with the guide's command. It must end `finished:completed` in
    the same run directory, no hospital may have released any (round, kind) twice,
    every ledger verifies against the pinned keys, and each hospital's ε is what an
    uninterrupted run plans: its size release and three rounds at the σ fixed in round 1."""
    from server import checkpoint

    deployment = Deployment(tmp_path)
    procs, operator, hospitals = deployment.procs, deployment.operator, deployment.hospitals
    try:
        deployment.bring_up()
        out_dir = operator / "runs"
        write_run_config(operator / "run.toml", deployment.model, deployment.test_file,
                         out_dir, rounds=3, run_name=RESUMED_RUN)
        procs.start("flwr-run", ["bash", "-c", guide_command('flwr run "$FEDCARE_APP" fedcare')],
                    deployment.elsewhere, deployment.op_env)
        resume = guide_command("awk ") + guide_command(
            'flwr run "$FEDCARE_APP" fedcare --run-config "$FEDCARE_DIR/resume.toml"')
        run_dir = out_dir / RESUMED_RUN
        ledgers = {site: hospitals / site / "state" / LEDGER_FILE for site in BUDGETS}

        def released(site: str) -> list[tuple[str, int]]:
            if not ledgers[site].is_file():
                return []
            lines = ledgers[site].read_text().split("\n")[:-1]  # a line being written: not yet
            return [(e["kind"], e["round"]) for e in map(json.loads, lines)
                    if e["kind"] in ("size", "train", "evaluate")]

        def mid_round_two() -> bool:  # round 1 checkpointed, round 2 under way at a site
            return (run_dir / checkpoint.CHECKPOINT_FILE).is_file() and any(
                ("train", 2) in released(site) for site in BUDGETS)

        wait_until(mid_round_two, RUN_TIMEOUT, "round 1's checkpoint and a round-2 release",
                   interval=0.2)
        killed = deployment.kill_server()
        print(f"killed the SuperLink and {killed}", file=sys.stderr)
        stopped_after = checkpoint.load(run_dir).round
        assert stopped_after in (1, 2) and not (run_dir / "summary.json").exists()
        procs.stop("flwr-run")  # the operator's stream of the run that was cut
        deployment.mark("killed")

        deployment.start_superlink("superlink-again")  # the same database: nodes, keys
        rc = procs.run("flwr-run-resumed", ["bash", "-c", resume], deployment.elsewhere,
                       deployment.op_env, RUN_TIMEOUT)
        deployment.mark("resumed_done")
        stream = procs.log("flwr-run-resumed").read_text(errors="replace")
        assert rc == 0 and "Exit Code" not in stream, stream
        assert f"resuming after round {stopped_after} of 3" in stream, stream
        started = re.search(r"Successfully started run (\d+)", stream)[1]
        deployment.bash("flwr-ls", "flwr ls fedcare --format json", deployment.op_env)
        listed = json.loads(procs.log("flwr-ls").read_text())
        status = {str(r["run-id"]): r["status"] for r in listed["runs"]}
        assert status[started] == "finished:completed", listed

        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["rounds"] == 3 and summary["sites"] == sorted(BUDGETS)
        assert summary["rounds_aggregated"] == 3, summary
        assert summary["audit"]["verified"] is True
        assert verify_path(run_dir, deployment.trusted).ok
        for site in BUDGETS:
            own = verify_path(ledgers[site], deployment.trusted)
            assert own.ok and own.sites[0].keys_pinned, [p.message for p in own.problems]
            assert released(site) == [("size", 1), ("train", 1), ("train", 2), ("train", 3)], \
                (site, released(site))  # each (kind, round) once: nothing released twice
            entries = [json.loads(line) for line in ledgers[site].read_text().splitlines()]
            size = next(e for e in entries if e["kind"] == "size")
            train = [e for e in entries if e["kind"] == "train"]
            assert {e["run_id"] for e in train} == {RESUMED_RUN}
            assert len({e["noise_multiplier"] for e in train}) == 1  # σ fixed in round 1
            plan = [(size["noise_multiplier"], 1.0, 1)] + [
                (train[0]["noise_multiplier"], train[0]["sample_rate"], train[0]["steps"])] * 3
            planned = accounting.epsilon(plan, train[0]["delta"])
            assert train[-1]["epsilon"] == pytest.approx(planned, rel=1e-6), site
            assert summary["epsilon_per_site"][site] == pytest.approx(planned, rel=1e-6)
            assert planned <= min(BUDGETS[site], RUN_CAPS[site] or TARGET_EPSILON) + 1e-9
            assert (run_dir / "ledgers" / f"{site}.jsonl").read_text() == \
                ledgers[site].read_text()
        asked_again = [site for site in BUDGETS if "asked again for its" in
                       procs.log(f"clientapp-{site}").read_text(errors="replace")]
        print(f"killed after round {stopped_after} was checkpointed; hospitals that sent a "
              f"released reply again: {asked_again}", file=sys.stderr)
        if stopped_after == 1:  # round 2 was released before the kill: sent again, not redone
            assert asked_again, "no hospital said it sent a released round again"
    except BaseException:
        print(procs.tails(), file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        print("timings (s since start): " + ", ".join(
            f"{k}={v:.1f}" for k, v in deployment.timings.items()), file=sys.stderr)
