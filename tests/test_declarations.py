"""Configs are declared once: a field added to a config dataclass reaches the CLI and the study file, or this fails."""

import dataclasses

import click
import pytest

from ldmscale.cli.main import MODULES, cli, register
from ldmscale.cli.options import field_help
from ldmscale.data.config import AutoencoderConfig, PrepareConfig
from ldmscale.eval.config import ClassifierConfig, EvalConfig, EvalSettings
from ldmscale.study.spec import EVAL_SHARED, EvalSection, eval_config
from ldmscale.tasks.config import DistillConfig, DreamBoothConfig, SRConfig
from ldmscale.train.config import TrainConfig

register(*MODULES)
# every verb whose options are generated from a config: (its config, the fields spelled with another word, fields
# that are not options and why)
GENERATED = {
    ("train",): (TrainConfig, {"data": "--cache"}, {}),
    ("eval",): (EvalConfig, {}, {"tag": "a study's label for its own evaluations (--set tag=... sets it)"}),
    ("data", "prepare"): (PrepareConfig, {"max_length": "--context-len", "limit": "--num-images"}, {}),
    ("autoencoder", "train"): (AutoencoderConfig, {"max_images": "--num-images"}, {}),
    ("classifier", "train"): (ClassifierConfig, {}, {}),
    ("finetune", "sr"): (SRConfig, {"data": "--source", "limit": "--num-images"}, {}),
    ("finetune", "dreambooth"): (DreamBoothConfig, {}, {}),
    ("distill",): (DistillConfig, {}, {}),
}
# EvalConfig fields a study sets per job rather than in [eval], and why
PER_JOB = {
    "sampler": "[eval] samplers is a grid",
    "steps": "[eval] steps is a grid",
    "guidance": "[eval] guidance is a grid",
    "checkpoint": "every training-curve checkpoint is a job",
    "tag": "set by the study on agreement evaluations",
    "classifier": "given, or trained by the study",
}


def _command(path):
    cmd = cli
    for word in path:
        cmd = cmd.commands[word]
    return cmd


def _names(fields_of) -> set[str]:
    return {f.name for f in dataclasses.fields(fields_of)}


@pytest.mark.parametrize("path", list(GENERATED), ids=" ".join)
def test_every_config_field_is_an_option_with_its_comment_and_default_as_help(path):
    cls, renamed, absent = GENERATED[path]
    params = {p.name: p for p in _command(path).params if isinstance(p, click.Option)}
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in absent:
            assert f.name not in params
            continue
        p = params.get(f.name)
        assert p is not None, f"{cls.__name__}.{f.name} is not an option of `ldmscale {' '.join(path)}`"
        assert p.opts[0] == renamed.get(f.name, "--" + f.name.replace("_", "-"))
        assert p.default is None  # not given: the config's default (or a continued run's own value)
        assert f.name in helps, f"{cls.__name__}.{f.name} has no comment: its option would have no help"
        doc = helps[f.name]
        assert p.help.startswith(doc[:1].upper() + doc[1:]), (f.name, p.help)
        if not p.required:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
            assert p.help.endswith(f"[default: {shown or 'none'}]"), (f.name, p.help)
    assert "--set" in [o for p in params.values() for o in p.opts]


def test_generated_help_reads_as_written():
    """Golden help lines: the comment after a field, capitalized, its continuation lines joined, the default."""
    params = {p.name: p for p in _command(("eval",)).params}
    assert params["num_images"].help == "Images to generate and measure [default: 1000]"
    assert params["metrics"].help == (
        "Fid, fd-classifier, caption-accuracy, clip; psnr, consistency, ssim, lpips "
        "(super-resolution); subject-ssim, subject-fidelity (DreamBooth) "
        "[default: fd-classifier,caption-accuracy]"
    )
    params = {p.name: p for p in _command(("data", "prepare")).params}
    assert (
        params["source"].required
        and params["source"].help == "Animal-mnist, folder:PATH, wds:PATTERN or hf:NAME[:SPLIT]"
    )
    params = {p.name: p for p in _command(("finetune", "sr")).params}
    assert params["init"].required and params["images"].help.startswith(
        "Fine-tuning duration in images [default: 20000]"
    )


def test_the_study_eval_section_is_the_eval_settings_plus_its_grid():
    assert EVAL_SHARED == _names(EvalSettings) and issubclass(EvalSection, EvalSettings)
    assert issubclass(EvalConfig, EvalSettings)
    missing = _names(EvalConfig) - _names(EvalSection) - set(PER_JOB)
    assert not missing, f"EvalConfig fields a study file cannot set: {sorted(missing)}"
    # every [eval] field of the same name reaches the evaluations
    ev = EvalSection(
        lpips="lp.pt",
        precision="bf16",
        weights="raw",
        fid_resize="pytorch",
        seed=7,
        bootstrap=3,
        spacing="trailing",
        clip="clipdir",
        inception="inc.pt",
        reference="animal-mnist:train",
    )
    cfg = eval_config(ev, "clf", sampler="ddim", steps=4, guidance=2.0)
    for name in EVAL_SHARED:
        assert getattr(cfg, name) == getattr(ev, name), name
    assert (cfg.classifier, cfg.sampler, cfg.steps, cfg.guidance) == ("clf", "ddim", 4, 2.0)


def test_task_kinds_are_declared_once():
    import typing

    from ldmscale.eval import registry
    from ldmscale.study import tasks
    from ldmscale.study.jobs import WAVES
    from ldmscale.study.spec import TaskSection

    kinds = typing.get_args(typing.get_type_hints(TaskSection)["kind"])
    assert set(kinds) == set(tasks.KINDS)  # the study file's choices are the registry's kinds
    for k in tasks.KINDS.values():
        assert WAVES[k.job_kind] == 4 and k.name in registry.EVAL_KIND


def test_every_option_has_help_every_group_an_example_and_verbs_follow_the_pipeline():
    import click

    from ldmscale.cli.main import ORDER

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


def test_objectives_and_training_data_satisfy_the_loops_protocols(tiny_cache):
    """The loop's interfaces are typed (train/objectives.py): every objective is an Objective, a cache TrainData."""
    from ldmscale.data.cache import LatentCache
    from ldmscale.tasks.distill import Consistency, Progressive
    from ldmscale.train.objectives import Denoising, Objective, RectifiedFlow, TrainData

    assert [
        c.__name__ for c in (Denoising, RectifiedFlow, Consistency, Progressive) if not issubclass(c, Objective)
    ] == []
    assert isinstance(LatentCache(tiny_cache), TrainData)
    assert not isinstance(object(), TrainData) and not issubclass(dict, Objective)


@pytest.mark.parametrize(
    "cls,kind", [(SRConfig, "super-resolution"), (DreamBoothConfig, "dreambooth"), (DistillConfig, "consistency")]
)
def test_a_task_trains_with_the_same_loop_from_the_cli_and_from_a_study(cls, kind, tiny_run, tmp_path, monkeypatch):
    """The task's defaults live in its config (train_defaults, default_images): `finetune`/`distill` and a study's
    [tasks.*] of the same init run build one TrainConfig, and one --set / set convention routes keys to either."""
    from ldmscale.checkpoint import read_run_config
    from ldmscale.cli import tasks as cli_tasks
    from ldmscale.config import from_dict, to_dict
    from ldmscale.study import tasks
    from ldmscale.study.spec import Study, TaskSection

    init_train = read_run_config(tiny_run)["train"]
    base = from_dict(TrainConfig, {k: v for k, v in init_train.items() if k in TrainConfig.__dataclass_fields__})
    sets = {"lr": "3e-4", "warmup_steps": "7"} | (
        {"subject": "examples/subject_elephant"} if kind == "dreambooth" else {}
    )
    task = TaskSection(kind=kind, set=sets)
    study = Study(data=dataclasses.replace(Study().data, source="animal-mnist"))
    built = tasks.kind(kind).build(task, study, study.eval, base, tiny_run, tmp_path / "t", False)

    overrides = [f"{k}={v}" for k, v in sets.items()]
    if cls is DistillConfig:
        from ldmscale.tasks.distill import configs

        _, from_cli = configs(str(tiny_run), kind, overrides)
        init_seed = {"seed": base.seed}  # the study names the teacher's seed and size before the teacher exists
        assert to_dict(from_cli) == to_dict(built.train) | init_seed
    else:
        from ldmscale.tasks.superres import sr_prediction

        extra = (
            {"data": lambda c, _: c.data, "prediction": lambda _, t: sr_prediction(t["prediction"])}
            if cls is SRConfig
            else {}
        )
        _, from_cli = cli_tasks._configs(
            cls, "init", {"init": str(tiny_run), "out": tmp_path / "cli"}, overrides, None, **extra
        )
        assert to_dict(from_cli) == to_dict(built.train)
    assert (built.train.lr, built.train.warmup_steps, built.images) == (3e-4, 7, cls.default_images)
    if cls is not DistillConfig:  # a fine-tune keeps its init run's loop otherwise
        assert (built.train.batch_size, built.train.lr_schedule) == (base.batch_size, base.lr_schedule)


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["finetune", "dreambooth", "--set", "seed=1"],
            "'seed' is a field of task and train; name one: task.seed=... or train.seed=...",
        ),
        (["distill", "--set", "nope=1"], "unknown key 'nope' (task: checkpoint, cond_dim,"),
        (["finetune", "sr", "--set", "lr"], "is not of the form KEY=VALUE"),
        (["eval", "--set", "steps=0"], "steps must be >= 1 and <= 1,000, got 0"),
    ],
)
def test_one_set_convention_on_every_verb(argv, message, tiny_run, tmp_path):
    from conftest import run_cli

    where = {
        "finetune": ["--init", str(tiny_run), "--out", str(tmp_path / "o")],
        "distill": ["--teacher", str(tiny_run), "--out", str(tmp_path / "o")],
        "eval": ["--run", str(tiny_run)],
    }
    extra = ["--subject", "examples/subject_elephant"] if "dreambooth" in argv else []
    proc = (
        run_cli(*argv[:2], *where[argv[0]], *extra, *argv[2:])
        if argv[0] == "finetune"
        else run_cli(argv[0], *where[argv[0]], *argv[1:])
    )
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
