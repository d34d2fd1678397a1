"""Fault injection over classes of input, not single cases: every numeric config field and CLI option against
{0, -1, nan, inf, huge, wrong type}; the --out rule for every verb that writes; the run lock across two processes;
kill -9 in the middle of a checkpoint prune. The sweeps are generated from the config dataclasses and the click
commands, so a new field or option is covered without editing this file."""

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import click
import pytest
from conftest import ROOT, run_cli, tiny_train_config

from ldmscale.config import from_dict
from ldmscale.errors import UserError

BAD = [0, -1, math.nan, math.inf, 1e40, "x"]
ALWAYS_BAD = [math.nan, math.inf, 1e40, "x"]


def _config_classes():
    from ldmscale.data.config import AutoencoderConfig, PrepareConfig
    from ldmscale.eval.config import ClassifierConfig, EvalConfig
    from ldmscale.study.spec import DataSection, EvalSection, TaskSection, TrainSection
    from ldmscale.tasks.config import DistillConfig, DreamBoothConfig, SRConfig
    from ldmscale.train.config import TrainConfig

    return [
        TrainConfig,
        EvalConfig,
        PrepareConfig,
        AutoencoderConfig,
        ClassifierConfig,
        DistillConfig,
        SRConfig,
        DreamBoothConfig,
        DataSection,
        TrainSection,
        EvalSection,
        TaskSection,
    ]


def _numeric_kind(tp):
    """'scalar' for an int/float field, 'list' for a tuple/list of numbers, None otherwise."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if tp in (int, float):
        return "scalar"
    if typing.get_origin(tp) in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return "list" if args and all(_numeric_kind(a) == "scalar" for a in args) else None
    return None


NUMERIC_FIELDS = [
    (cls, f.name, _numeric_kind(typing.get_type_hints(cls, include_extras=True)[f.name]))
    for cls in _config_classes()
    for f in dataclasses.fields(cls)
    if _numeric_kind(typing.get_type_hints(cls, include_extras=True)[f.name])
]
REQUIRED = {"PrepareConfig": {"source": "animal-mnist", "autoencoder": "x"}}


def test_the_sweep_covers_every_config():
    assert len(NUMERIC_FIELDS) >= 75
    assert {cls.__name__ for cls, _, _ in NUMERIC_FIELDS} == {c.__name__ for c in _config_classes()}


@pytest.mark.parametrize("cls,name,kind", NUMERIC_FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in NUMERIC_FIELDS])
def test_every_numeric_config_field_refuses_bad_values_with_a_user_error(cls, name, kind):
    default = {f.name: f for f in dataclasses.fields(cls)}[name]
    for value in BAD:
        v = value
        if kind == "list":
            n = len(default.default) if isinstance(default.default, tuple) and default.default else 1
            v = [value] * max(1, n)
        try:
            from_dict(cls, REQUIRED.get(cls.__name__, {}) | {name: v})
        except UserError as e:
            assert name in str(e), f"{cls.__name__}.{name}={value!r}: the message does not name the field: {e}"
            continue
        assert value not in ALWAYS_BAD and not (isinstance(value, float) and not math.isfinite(value)), (
            f"{cls.__name__}.{name} accepted {value!r}"
        )


def _commands(group=None, path=()):
    from ldmscale.cli.main import MODULES, cli, register

    if group is None:
        register(*MODULES)
        group = cli
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))
        else:
            yield path + (name,), cmd


def _numeric(param):
    t = param.type
    return isinstance(param, click.Option) and (
        isinstance(t, (click.types.IntParamType, click.types.FloatParamType))
        or t.name in ("integer", "float", "integer range", "float range")
    )


# arguments that make each command fail fast (one line, exit 2) once its options are valid
BASE = {
    ("family",): ["--size", "c8"],
    ("data", "prepare"): ["--source", "folder:/nonexistent", "--autoencoder", "/nonexistent", "--out", "{tmp}/c"],
    ("train",): ["--cache", "/nonexistent", "--size", "c8", "--out", "{tmp}/r"],
    ("sample",): ["--run", "/nonexistent", "--prompt", "a cat", "--out", "{tmp}/s"],
    ("eval",): ["--run", "/nonexistent"],
    ("compare",): ["--a", "folder:/nonexistent", "--b", "folder:/nonexistent"],
    ("plan",): ["/nonexistent"],
    ("study", "calibrate"): ["/nonexistent"],
    ("study", "run"): ["/nonexistent.toml", "--out", "{tmp}/st"],
    ("study", "lr-sweep"): ["/nonexistent.toml", "--cache", "/nonexistent", "--out", "{tmp}/lr", "--lrs", "1e-2"],
    ("finetune", "sr"): ["--init", "/nonexistent", "--out", "{tmp}/f"],
    ("finetune", "dreambooth"): [
        "--init",
        "/nonexistent",
        "--subject",
        "/nonexistent",
        "--class-prompt",
        "a cat",
        "--out",
        "{tmp}/d",
    ],
    ("distill",): ["--teacher", "/nonexistent", "--out", "{tmp}/t"],
    ("autoencoder", "train"): ["--source", "folder:/nonexistent", "--out", "{tmp}/a"],
    ("classifier", "train"): ["--source", "folder:/nonexistent", "--out", "{tmp}/k"],
}
CLI_CASES = [(path, opt) for path, cmd in _commands() for opt in cmd.params if _numeric(opt)]


def _main(argv, capfd):
    import logging

    from ldmscale.cli.main import main

    for logger in [logging.getLogger()] + [logging.getLogger(n) for n in logging.root.manager.loggerDict]:
        for h in getattr(logger, "handlers", []):  # libraries' handlers bound to an earlier test's captured stderr
            if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
                h.stream = sys.stderr

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capfd.readouterr()
    return e.value.code, out.err


def test_the_cli_sweep_covers_every_numeric_option():
    assert len(CLI_CASES) >= 25 and {p for p, _ in CLI_CASES} <= set(BASE), {p for p, _ in CLI_CASES} - set(BASE)


@pytest.mark.parametrize("path,opt", CLI_CASES, ids=[" ".join(p) + " " + o.opts[0] for p, o in CLI_CASES])
def test_every_numeric_cli_option_fails_in_one_line(path, opt, tmp_path, capfd):
    base = [a.replace("{tmp}", str(tmp_path)) for a in BASE[path]]
    for value in BAD:
        code, err = _main([*path, *base, opt.opts[0], value], capfd)
        lines = err.strip().splitlines()
        assert code == 2 or (code == 0 and value not in ALWAYS_BAD), (path, opt.opts[0], value, code, err[-2000:])
        if code == 2:
            assert len(lines) == 1 and "error" in lines[0], (path, opt.opts[0], value, err[-2000:])


def _set_targets():
    """Every verb's --set and the configs it reaches (a generated option's command and its sections)."""
    from ldmscale.model.family import ModelSize

    by_cmd = {
        ("train",): "TrainConfig",
        ("eval",): "EvalConfig",
        ("data", "prepare"): "PrepareConfig",
        ("autoencoder", "train"): "AutoencoderConfig",
        ("classifier", "train"): "ClassifierConfig",
        ("finetune", "sr"): "SRConfig TrainConfig",
        ("finetune", "dreambooth"): "DreamBoothConfig TrainConfig",
        ("distill",): "DistillConfig TrainConfig",
    }
    classes = {c.__name__: c for c in _config_classes()}
    out = [(("family",), ModelSize, f.name, "scalar") for f in dataclasses.fields(ModelSize)]
    for path, names in by_cmd.items():
        for name in names.split():
            out += [(path, classes[name], f, k) for c, f, k in NUMERIC_FIELDS if c is classes[name]]
    return out


SET_CASES = _set_targets()


def test_every_verb_with_set_is_in_the_set_sweep():
    with_set = {path for path, cmd in _commands() if any("--set" in p.opts for p in cmd.params)}
    assert with_set == {path for path, *_ in SET_CASES}, with_set ^ {path for path, *_ in SET_CASES}
    assert len(SET_CASES) == 120  # a new numeric field raises this count


@pytest.mark.parametrize("path", sorted({p for p, *_ in SET_CASES}), ids=" ".join)
def test_every_numeric_set_target_of_every_verb_fails_in_one_line(path, tmp_path, capfd):
    """`--set FIELD=VALUE` for every numeric field a verb's --set reaches (model sizes included), every bad value."""
    base = [a.replace("{tmp}", str(tmp_path)) for a in BASE[path]]
    for _, cls, name, kind in [c for c in SET_CASES if c[0] == path]:
        two_sections = path in {("finetune", "sr"), ("finetune", "dreambooth"), ("distill",)}
        section = f"train.{name}" if two_sections and cls.__name__ == "TrainConfig" else name
        for value in BAD:
            text = f"{value}" if kind == "scalar" else f"{value},{value}"
            code, err = _main([*path, *base, "--set", f"{section}={text}"], capfd)
            lines = err.strip().splitlines()
            assert code == 2 or (code == 0 and value not in ALWAYS_BAD), (path, name, value, code, err[-2000:])
            if code == 2:
                assert len(lines) == 1 and "error" in lines[0], (path, name, value, err[-2000:])


STUDY = """
name = "s"
[data]
cache = "/nonexistent"
[train]
sizes = ["c8"]
[eval]
samplers = ["ddim"]
steps = [2]
guidance = [2.0]
classifier = "/nonexistent"
"""


def _toml(v):
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f'"{v}"' if isinstance(v, str) else repr(v)


STUDY_FIELDS = [
    (sec, name, kind)
    for cls, name, kind in NUMERIC_FIELDS
    for sec in [{"DataSection": "data", "TrainSection": "train", "EvalSection": "eval"}.get(cls.__name__)]
    if sec
]


@pytest.mark.parametrize("section,name,kind", STUDY_FIELDS, ids=[f"{s}.{n}" for s, n, _ in STUDY_FIELDS])
def test_every_numeric_study_field_is_checked_when_the_file_loads(section, name, kind, tmp_path):
    from ldmscale.study.spec import load_study

    for value in BAD:
        text = _toml(value) if kind == "scalar" else f"[{_toml(value)}]"
        body = STUDY.replace(f"[{section}]\n", f"[{section}]\n{name} = {text}\n", 1)
        body = "\n".join(line for line in body.splitlines() if not (line.startswith(f"{name} = ") and text not in line))
        path = tmp_path / "s.toml"
        path.write_text(body)
        try:
            load_study(path)
        except UserError as e:
            assert len(str(e).splitlines()) == 1
            continue
        assert value not in ALWAYS_BAD, f"[{section}] {name} = {text} was accepted"


# ------------------------------------------------------------------------------------------ the --out rule


@pytest.fixture()
def outputs(tmp_path, tiny_run, tiny_cache):
    """One existing output of each protected kind, and a plain file."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    return {"run": run, "cache": tiny_cache, "file": tmp_path / "file.txt", "other": tmp_path / "photos"}


def _writers(o, tiny_run, tiny_cache):
    """Every verb that takes --out, with arguments that would otherwise make it work."""
    return {
        "autoencoder train": ["autoencoder", "train", "--set", "steps=1"],
        "classifier train": ["classifier", "train", "--set", "epochs=1"],
        "data prepare": [
            "data",
            "prepare",
            "--source",
            "animal-mnist",
            "--autoencoder",
            str(tiny_cache),
            "--num-images",
            "4",
        ],
        "train": ["train", "--cache", str(tiny_cache), "--size", "c8", "--images", "8"],
        "sample": ["sample", "--run", str(tiny_run), "--prompt", "a cat", "--steps", "1", "--num-images", "1"],
        "export": ["export", "--run", str(tiny_run)],
        "finetune sr": ["finetune", "sr", "--init", str(tiny_run), "--images", "8"],
        "distill": ["distill", "--teacher", str(tiny_run), "--images", "8"],
        "study run": ["study", "run", str(ROOT / "studies" / "demo.toml")],
    }


def test_no_verb_replaces_what_it_did_not_make(outputs, tiny_run, tiny_cache, capfd):
    before = {
        k: sorted(str(p) for p in Path(v).rglob("*")) if Path(v).is_dir() else Path(v).read_text()
        for k, v in outputs.items()
    }
    for verb, args in _writers(outputs, tiny_run, tiny_cache).items():
        for kind, target in outputs.items():
            if (verb, kind) in {
                ("train", "run"),
                ("finetune sr", "run"),
                ("distill", "run"),
                ("data prepare", "cache"),
            }:
                continue  # the same kind: continued, tested elsewhere
            code, err = _main([*args, "--out", target], capfd)
            assert code == 2 and len(err.strip().splitlines()) == 1, (verb, kind, err[-1500:])
            assert str(target) in err and ("--out" in err), (verb, kind, err)
    after = {
        k: sorted(str(p) for p in Path(v).rglob("*")) if Path(v).is_dir() else Path(v).read_text()
        for k, v in outputs.items()
    }
    assert after == before


def test_overwrite_replaces_only_the_same_kind(tmp_path, tiny_run, capfd):
    export = tmp_path / "export"
    assert _main(["export", "--run", tiny_run, "--out", export], capfd)[0] == 0
    code, err = _main(["export", "--run", tiny_run, "--out", export], capfd)
    assert code == 2 and "pass --overwrite" in err
    assert _main(["export", "--run", tiny_run, "--out", export, "--overwrite"], capfd)[0] == 0
    assert not list(tmp_path.glob(".export*"))  # nothing left beside it
    code, err = _main(["export", "--run", tiny_run, "--out", tiny_run, "--overwrite"], capfd)
    assert code == 2 and "never replaces" in err and (tiny_run / "config.json").exists()


# ------------------------------------------------------------------------------------------ locks and kills


def _wait_for(pred, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_a_run_in_use_is_locked_and_the_lock_dies_with_its_process(tmp_path, tiny_cache):
    run = tmp_path / "run"
    args = [
        "train",
        "--cache",
        tiny_cache,
        "--size",
        "c8",
        "--images",
        "100000",
        "--set",
        "batch_size=8",
        "--set",
        "checkpoint_every=8",
        "--out",
        run,
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "ldmscale", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_for(lambda: (run / "checkpoints" / "LATEST").exists())
        second = run_cli(*args)
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1
        assert f"in use by process {first.pid}" in second.stderr
        assert first.poll() is None  # the first one was not disturbed
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # kill -9 releases the lock: the same command continues the run
    again = run_cli(*args[:6], "8", *args[7:])  # a shorter --images: the run is already past it, so it just stops
    assert again.returncode == 0, again.stderr[-2000:]


KILL_IN_PRUNE = """
import os, shutil, signal, sys
from ldmscale import checkpoint
real = shutil.rmtree
def dying_rmtree(path, *a, **k):
    files = sorted(p for p in os.listdir(path))
    os.unlink(os.path.join(path, files[0]))  # delete part of the checkpoint, then die
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.shutil.rmtree = dying_rmtree
from ldmscale.train.loop import train, TrainConfig
from ldmscale.config import from_dict
import json
train(from_dict(TrainConfig, json.loads(sys.argv[1])), sys.argv[2], progress=False)
"""


def test_kill_during_a_checkpoint_prune_leaves_only_complete_checkpoints(tmp_path, tiny_cache):
    import json

    from ldmscale import checkpoint
    from ldmscale.config import to_dict
    from ldmscale.train.loop import train

    cfg = tiny_train_config(tiny_cache, images=48, checkpoint_every=8, keep=1)
    run = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-c", KILL_IN_PRUNE, json.dumps(to_dict(cfg)), str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == -signal.SIGKILL
    left = [c.name for c in checkpoint.list_checkpoints(run)]
    assert left == ["step-000002"]  # the pruned step-000001 is gone from the listing, though half deleted
    assert list((run / "checkpoints").glob(".step-000001.deleting"))
    train(cfg, run, progress=False)  # resumes from step 2 and cleans up
    assert not list((run / "checkpoints").glob(".*deleting"))
    clean = tmp_path / "clean"
    train(cfg, clean, progress=False)
    a, b = (checkpoint.load_weights(checkpoint.latest(r), "raw") for r in (run, clean))
    assert all((a[k] == b[k]).all() for k in a)
