"""`ldmscale study lr-sweep` (#28): every size of a study trained at every learning rate for one training budget, the
rule that picks a learning rate per size, and the [train.per_size] table it prints."""

import json
import math

from conftest import run_cli

from ldmscale.study.spec import load_study
from ldmscale.study.sweep import choose, per_size_toml

STUDY = """
name = "sweep"
[train]
sizes = ["c4", "c8"]
[train.set]
batch_size = 8
lr = 1e-3
[train.per_size]
c4 = {{ batch_size = 16, lr_schedule = "wsd" }}
"""


def row(size, lr, loss, se=0.01):
    return {"size": size, "lr": lr, "val_loss": loss, "val_loss_se": se}


def test_the_rule_takes_the_smallest_lr_tied_with_the_best_and_skips_diverged_runs():
    rows = [
        row("c4", 1e-3, 0.50),
        row("c4", 1e-2, 0.47),  # 0.03 better: more than 2 x 0.0141, so it wins
        row("c8", 1e-3, 0.40),
        row("c8", 1e-2, 0.38),  # 0.02 better: within 2 x 0.0141, tied, and the smaller lr is kept
        row("c8", 3e-2, math.nan),
        row("c16", 1e-2, math.nan),  # no finite run: no choice
    ]
    assert choose(rows) == {"c4": 1e-2, "c8": 1e-3}


def test_the_per_size_table_keeps_a_sizes_other_settings(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(STUDY.format())
    study = load_study(path)
    text = per_size_toml(study, {"c4": 1e-2, "c8": 1e-3})  # c8 at the study's own lr gets no line
    assert text == '[train.per_size]\nc4 = { batch_size = 16, lr_schedule = "wsd", lr = 0.01 }'


def test_a_sweep_trains_every_size_at_every_lr_once_and_prints_the_choice(tmp_path, tiny_cache):
    path, out = tmp_path / "s.toml", tmp_path / "sweep"
    path.write_text(STUDY.format())
    args = ("study", "lr-sweep", path, "--cache", tiny_cache, "--out", out, "--lrs", "1e-3,1e-2", "--flops", "8.8e9")
    p = run_cli(*args, "--no-progress", check=True)
    result = json.loads((out / "sweep.json").read_text())
    # c4: 0.0212 GFLOPs a forward pass (8x8x4 latents, 77x384 context), batch 16 -> 8.6 -> 9 steps; c8: 0.0457, 8
    assert [(r["size"], r["lr"], r["steps"]) for r in result["runs"]] == [
        ("c4", 1e-3, 9),
        ("c4", 1e-2, 9),
        ("c8", 1e-3, 8),
        ("c8", 1e-2, 8),
    ]
    assert result["chosen"] == choose(result["runs"]) and set(result["chosen"]) == {"c4", "c8"}
    for r in result["runs"]:
        run = out / f"{r['size']}-lr{r['lr']:g}"
        cfg = json.loads((run / "config.json").read_text())["train"]
        assert (cfg["lr"], cfg["lr_schedule"], cfg["warmup_fraction"]) == (r["lr"], "cosine", 0.05)
        assert cfg["batch_size"] * r["steps"] == cfg["images"] and cfg["batch_size"] == (16 if r["size"] == "c4" else 8)
        last = json.loads((run / "validation.jsonl").read_text().splitlines()[-1])
        assert (last["step"], last["val_loss"]) == (r["steps"], r["val_loss"])
        chosen = result["chosen"][r["size"]] == r["lr"]
        loss = f"{r['val_loss']:.4f} +- {r['val_loss_se']:.4f}"
        line = f"  {r['size']:>5}  lr {r['lr']:<7g} {r['steps']:>6} steps  {loss} {'*' if chosen else ' '}"
        assert line in p.stdout.splitlines()
    study = load_study(path)
    assert p.stdout.rstrip().endswith(per_size_toml(study, result["chosen"]))

    # again: the finished runs are kept, not trained again, and the answer is the same
    stamps = {q: q.stat().st_mtime_ns for q in out.glob("*/checkpoints/*/model.safetensors")}
    again = run_cli(*args, "--no-progress", check=True)
    assert {q: q.stat().st_mtime_ns for q in out.glob("*/checkpoints/*/model.safetensors")} == stamps
    assert again.stdout.split("\n\nvalidation loss")[1] == p.stdout.split("\n\nvalidation loss")[1]


def test_a_sweep_refuses_bad_input_in_one_line(tmp_path, tiny_cache):
    path = tmp_path / "s.toml"
    path.write_text(STUDY.format())
    base = ("study", "lr-sweep", path, "--out", tmp_path / "o")
    for extra, says in [
        (("--cache", tiny_cache, "--lrs", "0,1e-2", "--flops", "2.2e9"), "give distinct positive learning rates"),
        (("--cache", tiny_cache, "--lrs", "1e-2,x", "--flops", "2.2e9"), "give learning rates separated by commas"),
        (("--cache", tmp_path, "--lrs", "1e-2", "--flops", "2.2e9"), "is not a latent cache"),
        (("--cache", tiny_cache, "--lrs", "1e-2", "--flops", "1e8"), "buys c4 0 optimizer step(s) at batch 16"),
    ]:
        p = run_cli(*base, *extra)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "o").exists()
