"""Configs are declared once: a field added to a config dataclass reaches the CLI and the study file, or this fails."""

import dataclasses

from ldmscale.cli.eval import eval_cmd
from ldmscale.eval.evaluate import EvalConfig
from ldmscale.study.spec import EVAL_SHARED, EvalSection, eval_config

# EvalConfig fields a study sets per job rather than in [eval], and why
PER_JOB = {"sampler": "[eval] samplers is a grid", "steps": "[eval] steps is a grid",
           "guidance": "[eval] guidance is a grid", "checkpoint": "every training-curve checkpoint is a job",
           "tag": "set by the study on agreement evaluations", "classifier": "given, or trained by the study"}
# EvalConfig fields that are not `ldmscale eval` options, and why
NOT_ON_EVAL_CLI = {"tag": "a study's label for its own evaluations", "metrics": "spelled --metrics (a list)"}


def _names(fields_of) -> set[str]:
    return {f.name for f in dataclasses.fields(fields_of)}


def test_every_eval_field_is_an_eval_option():
    options = {p.name for p in eval_cmd.params}
    missing = _names(EvalConfig) - options - set(NOT_ON_EVAL_CLI)
    assert not missing, f"EvalConfig fields without an `ldmscale eval` option: {sorted(missing)}"
    assert "metric_list" in options and "--metrics" in next(p for p in eval_cmd.params if p.name == "metric_list").opts


def test_every_eval_field_is_a_study_field_or_set_per_job():
    missing = _names(EvalConfig) - _names(EvalSection) - set(PER_JOB)
    assert not missing, f"EvalConfig fields a study file cannot set: {sorted(missing)}"
    # and every [eval] field of the same name reaches the evaluations
    ev = EvalSection(lpips="lp.pt", precision="bf16", weights="raw", fid_resize="pytorch", seed=7, bootstrap=3,
                     spacing="trailing", clip="clipdir", inception="inc.pt", reference="animal-mnist:train")
    cfg = eval_config(ev, "clf", sampler="ddim", steps=4, guidance=2.0)
    for name in _names(EvalConfig) & EVAL_SHARED:
        assert getattr(cfg, name) == getattr(ev, name), name
    assert (cfg.classifier, cfg.sampler, cfg.steps, cfg.guidance) == ("clf", "ddim", 4, 2.0)


def test_task_kinds_are_declared_once():
    import typing

    from ldmscale.eval import registry
    from ldmscale.study.cluster import WAVES
    from ldmscale.study.spec import TaskSection
    from ldmscale.tasks import kinds as tasks

    kinds = typing.get_args(typing.get_type_hints(TaskSection)["kind"])
    assert set(kinds) == set(tasks.KINDS)  # the study file's choices are the registry's kinds
    for k in tasks.KINDS.values():
        assert WAVES[k.job_kind] == 3 and k.name in registry.EVAL_KIND


def test_every_option_has_help_every_group_an_example_and_verbs_follow_the_pipeline():
    import click

    from ldmscale.cli.main import MODULES, ORDER, cli, register

    register(*MODULES)
    assert cli.list_commands(None) == list(ORDER)

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            assert "Example" in (cmd.help or ""), f"{path}: group help without an example"
            for name, sub in cmd.commands.items():
                yield from walk(sub, f"{path} {name}")
        else:
            assert "Example" in (cmd.epilog or "") + (cmd.help or ""), f"{path}: no example"
            for p in cmd.params:
                if isinstance(p, click.Option):
                    yield path, p.opts[0], p.help

    missing = [f"{path} {opt}" for path, opt, text in walk(cli, "ldmscale") if not text]
    assert not missing, f"options without help: {missing}"


def test_every_prepare_field_is_a_data_prepare_option_with_the_same_default():
    from ldmscale.cli.data import data_group
    from ldmscale.data.cache import PrepareConfig

    params = {p.name: p for p in data_group.commands["prepare"].params}
    for f in dataclasses.fields(PrepareConfig):
        assert f.name in params, f"PrepareConfig.{f.name} has no `ldmscale data prepare` option"
        if f.default is not dataclasses.MISSING:
            assert params[f.name].default == f.default, (f.name, params[f.name].default, f.default)
    assert params["max_length"].opts == ["--context-len"] and params["limit"].opts == ["--num-images"]


def test_train_option_defaults_are_the_config_defaults():
    """Generated options default to None (a continued run keeps its settings); the help shows the config's."""
    from ldmscale.cli.train import train_cmd
    from ldmscale.train.config import TrainConfig

    params = {p.name: p for p in train_cmd.params}
    for f in dataclasses.fields(TrainConfig):
        assert params[f.name].default is None
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        assert f"[default: {shown if shown != '' else 'none'}]" in params[f.name].help, f.name


def test_objectives_and_training_data_satisfy_the_loops_protocols(tiny_cache):
    """The loop's interfaces are typed (train/objectives.py): every objective is an Objective, a cache TrainData."""
    from ldmscale.data.cache import LatentCache
    from ldmscale.tasks.distill import Consistency, Progressive
    from ldmscale.train.objectives import Denoising, Objective, RectifiedFlow, TrainData

    assert [c.__name__ for c in (Denoising, RectifiedFlow, Consistency, Progressive)
            if not issubclass(c, Objective)] == []
    assert isinstance(LatentCache(tiny_cache), TrainData)
    assert not isinstance(object(), TrainData) and not issubclass(dict, Objective)
