"""`python -m simulations.gpu_check`: every check is reported on its own line, a check
that raises is counted as failed, and on a machine without CUDA the CPU parts pass."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.gpu_check import Check, Failed, Skipped, expect, run_checks

ROOT = Path(__file__).resolve().parents[1]
CPU_CHECKS = ("device choice (cpu)", "dp step (lora shape, cpu)", "dp step (head shape, cpu)",
              "dp step (patient level, head shape, cpu)",
              "simulation (3 sites, SecAgg+, default recipe, cpu)",
              "audit verify (the cpu run)", "predict --explain (cpu)")


def _crash() -> str:
    raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")


def _skip() -> str:
    raise Skipped("no CUDA device")


def _wrong() -> str:
    expect(False, "max |diff| 3.0e-02")
    return "unreachable"


def test_a_raising_check_fails_and_the_checks_after_it_still_run():
    lines: list[str] = []
    counts = run_checks([Check("ok", lambda: "loss 2.89 finite"), Check("crash", _crash),
                         Check("wrong", _wrong), Check("gpu only", _skip),
                         Check("after", lambda: "ran")], lines.append)
    assert counts == (2, 2)
    assert lines == ["PASS  ok: loss 2.89 finite",
                     "FAIL  crash: RuntimeError: CUDA error: an illegal memory access was "
                     "encountered",  # one line, whatever the message held
                     "FAIL  wrong: max |diff| 3.0e-02",
                     "SKIP  gpu only: no CUDA device",
                     "PASS  after: ran",
                     "2 passed, 2 failed"]


def test_expect_raises_with_the_figures_only_when_the_condition_fails():
    expect(True, "fine")
    with pytest.raises(Failed, match="loss nan"):
        expect(False, "loss nan")


def test_a_work_dir_that_holds_files_is_refused(tmp_path):
    from simulations.gpu_check import main

    (tmp_path / "old.log").write_text("an earlier check")
    with pytest.raises(SystemExit) as exit_:
        main(["--work-dir", str(tmp_path)])
    assert exit_.value.code == 2


@pytest.mark.slow
def test_without_cuda_the_cpu_checks_pass_and_the_shared_gpu_check_is_skipped(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "simulations.gpu_check",
                           "--work-dir", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert lines[0] == "no CUDA device: running the CPU parts only (checks marked cpu)"
    passed = {line.split(":", 1)[0][6:] for line in lines if line.startswith("PASS  ")}
    assert passed == set(CPU_CHECKS)
    assert [line for line in lines if line.startswith("SKIP  ")] == [
        "SKIP  shared GPU (3 sites, gpus_per_site 0.3): no CUDA device: sites sharing one "
        "GPU need one"]
    assert not [line for line in lines if line.startswith("FAIL")]
    count = re.fullmatch(r"(\d+) passed, (\d+) failed", lines[-1])
    assert count and (int(count[1]), int(count[2])) == (len(CPU_CHECKS), 0)
    lora = next(line for line in lines if line.startswith("PASS  dp step (lora shape"))
    gap = float(re.search(r"max \|diff\| ([0-9.e+-]+)", lora)[1])
    assert gap <= 1e-5 and "noise generator on cpu = params' device" in lora
    assert (tmp_path / "work" / "simulation" / "summary.json").is_file()
