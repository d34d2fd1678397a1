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
    "threads.py": ["--size", "c8", "--steps", "1", "--images", "2", "--repeats", "1", "--no-busy"],
    "side_by_side.py": ["--sizes", "c8", "--steps", "2", "--batch", "8", "--cache-images", "32"],
}


ROWS = {
    "prepare.py": 1,
    "train_cache.py": 1,
    "sampling.py": 1,
    "features.py": 1,
    "speedups.py": 2,
    "verify.py": 1,
    "threads.py": 1,
    "side_by_side.py": 1,
}  # rows each adds to make bench's table


def test_every_bench_script_has_a_tiny_size():
    assert set(TINY) == set(SCRIPTS) == set(ROWS)  # a new bench gets a tiny size and its rows here


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bench_script_runs_at_a_tiny_size_and_lands_in_the_table(script, tmp_path, monkeypatch):
    import common  # bench/common.py: record() writes here, never to make bench's bench/results.json

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results.json")
    monkeypatch.chdir(ROOT / "bench")
    monkeypatch.setattr(sys, "argv", [script, *TINY[script]])
    threads = torch.get_num_threads()
    try:  # in this process, as `python bench/X.py` would run it (spares a start-up)
        runpy.run_path(str(ROOT / "bench" / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == [script.removesuffix(".py")]
    assert len(table(results).splitlines()) == 2 + ROWS[script]  # the header, and this bench's rows
