"""Every bench script runs at a tiny size, so a bench that breaks fails the suite instead of `make bench` on the
day someone needs its figures (#27). The figures themselves come from `make bench` (docs/speed.md)."""

import json
import runpy
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from run_all import SCRIPTS, table  # noqa: E402  (bench/ is not a package)

TINY = {  # each script's arguments at a size that runs in seconds here
    "prepare.py": ["--images", "32"],
    "train_cache.py": ["--sizes", "c8", "--steps", "2", "--batch", "8", "--cache-images", "32"],
    "sampling.py": ["--size", "c8", "--steps", "2", "--images", "2"],
    "features.py": ["--images", "8", "--batch", "8"],
    "speedups.py": ["--sizes", "c8", "--repeats", "1"],
    "verify.py": ["--sizes", "c8"],
    "threads.py": ["--size", "c8", "--steps", "1", "--images", "2", "--repeats", "1"],
}


@pytest.mark.xdist_group("bench")
def test_every_bench_script_runs_at_a_tiny_size_and_lands_in_the_table(tmp_path, monkeypatch, capsys):
    assert set(TINY) == set(SCRIPTS)  # a new bench gets a tiny size here
    import common  # bench/common.py: record() writes here, never to make bench's bench/results.json

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results.json")
    monkeypatch.chdir(ROOT / "bench")
    threads = torch.get_num_threads()
    try:
        for script in SCRIPTS:  # in this process, as `python bench/X.py` would run it (spares 7 start-ups)
            monkeypatch.setattr(sys, "argv", [script, *TINY[script]])
            runpy.run_path(str(ROOT / "bench" / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"prepare", "train_cache", "sampling", "features", "speedups", "verify", "threads"}
    rows = table(results).splitlines()
    assert len(rows) == 2 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1, rows  # header, prepare, c8, sampling, features,
    # speed work, FLOP cache, threads, verify
    assert results["sampling"]["ratio"] > 0 and results["verify"]["sizes"]["c8"]["verify_s"] > 0
