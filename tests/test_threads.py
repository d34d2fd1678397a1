"""Threads that fit the machine: the policy's order of sources, the cores other processes keep busy, a launch's
share, and the choice recorded beside every latency."""

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_cli

from ldmscale import device
from ldmscale.errors import UserError


def test_the_sources_in_order_and_bad_values(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LDMSCALE_THREADS", "2")
    assert device.thread_count(5) == (5, "--threads")
    assert device.thread_count() == (2, "LDMSCALE_THREADS")
    monkeypatch.delenv("LDMSCALE_THREADS")
    assert device.thread_count() == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("LDMSCALE_THREADS", "two")
    with pytest.raises(UserError, match="LDMSCALE_THREADS='two' is not a whole number of threads"):
        device.thread_count()
    monkeypatch.setenv("LDMSCALE_THREADS", "0")
    with pytest.raises(UserError, match="give at least 1 thread"):
        device.thread_count()


def test_the_default_takes_the_idle_cores_and_shares_them_in_a_launch(monkeypatch):
    monkeypatch.delenv("LDMSCALE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for busy, local, want in [(0.0, 1, 8), (2.6, 1, 5), (7.9, 1, 1), (0.0, 2, 4), (3.0, 2, 2), (8.0, 4, 1)]:
        monkeypatch.setattr(device, "_busy_cores", lambda cores, b=busy: b)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
        assert device.thread_count()[0] == want, (busy, local)


def test_busy_cores_sees_a_process_spinning_on_this_machine():
    cores = set(os.sched_getaffinity(0))
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = device._busy_cores(cores, seconds=0.5)
    finally:
        spin.kill()
    assert busy >= 0.8  # at least the spinning process (the suite's other worker may add its own)


def test_the_cli_option_sets_torch_threads_and_results_record_them(tiny_run, tiny_classifier, tmp_path):
    p = run_cli(
        "--threads",
        "1",
        "eval",
        "--run",
        tiny_run,
        "--steps",
        "1",
        "--num-images",
        "4",
        "--classifier",
        tiny_classifier,
        "--reference-count",
        "20",
        "--bootstrap",
        "0",
        "--seed",
        "7",
        check=True,
    )
    import json

    results = [json.loads(f.read_text()) for f in (tiny_run / "eval").glob("*.json")]
    mine = [r for r in results if r["config"]["seed"] == 7]
    assert len(mine) == 1 and mine[0]["threads"] == 1 and mine[0]["load_average"] is not None
    assert p.returncode == 0 and torch.get_num_threads() >= 1
    bad = run_cli("--threads", "0", "family")
    assert bad.returncode == 2 and "--threads" in bad.stderr
