"""One CLI vocabulary: one word per concept on every verb, the old spellings as deprecated aliases for one release,
and the `train` options generated from TrainConfig (a field added there is an option, with help, or this fails)."""

import dataclasses

import click
import pytest

from ldmscale.cli.main import MODULES, cli, register
from ldmscale.cli.options import field_help, given_overrides
from ldmscale.config import apply_overrides
from ldmscale.train.config import TrainConfig

register(*MODULES)

# concept -> the one word for it (and where the study file uses the same word)
VOCABULARY = {
    "a data source, SOURCE[:SPLIT]": "--source",
    "a latent cache": "--cache",  # [data] cache
    "images to produce or read": "--num-images",  # [eval] num_images
    "training duration in images": "--images",  # [train] images, TrainConfig.images
    "images per batch": "--batch-size",
    "output format": "--format",
    "a study folder": "the positional DIR",
}
# spellings that meant one of those concepts before; none may be a visible option anywhere
RETIRED = {"--data", "--limit", "--num", "--json", "--study", "--num-image", "--n"}
# the old spellings that still parse, per command, and the tokens they stand for
ALIASES = {
    "train": {"--data": ["--cache"]},
    "sample": {"--num": ["--num-images"], "--lr": ["--lowres"]},
    "data prepare": {"--limit": ["--num-images"]},
    "compare": {"--limit": ["--num-images"]},
    "finetune sr": {"--data": ["--source"], "--train-set": ["--set"]},
    "finetune dreambooth": {"--train-set": ["--set"]},
    "study report": {"--study": ["--study-file"]},
    "plan": {"--study": [], "--json": ["--format", "json"]},
}


def _commands(group=cli, path=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))
        else:
            yield " ".join(path + (name,)), cmd


COMMANDS = dict(_commands())


def _options(cmd):
    return [o for p in cmd.params if isinstance(p, click.Option) and not p.hidden for o in p.opts]


def test_no_verb_uses_a_retired_spelling():
    used = {(path, o) for path, cmd in COMMANDS.items() for o in _options(cmd) if o in RETIRED}
    assert not used, f"retired spellings still declared: {sorted(used)}"
    # --lr is a learning rate wherever it appears (it was also sample's low-resolution inputs)
    with_lr = [(p, o.help) for p, c in COMMANDS.items() for o in c.params if "--lr" in getattr(o, "opts", ())]
    assert sorted(p for p, _ in with_lr) == ["autoencoder train", "classifier train", "train"]
    assert all("learning rate" in h.lower() for _, h in with_lr), with_lr


def test_each_concept_has_one_word():
    counts = {(path, o) for path, cmd in COMMANDS.items() for o in _options(cmd) if "images" in o}
    # every option about a number of images is --num-images, except training duration (--images) and DreamBooth's
    # class-prior images (--num-class-images, the word of diffusers' train_dreambooth.py)
    assert {o for _, o in counts} == {"--num-images", "--images", "--num-class-images"}, counts
    assert [p for p, o in counts if o == "--num-class-images"] == ["finetune dreambooth"]
    for path, cmd in COMMANDS.items():
        for p in cmd.params:
            if "--images" in getattr(p, "opts", ()):
                assert "duration" in p.help.lower(), (path, p.help)
            if "--num-images" in getattr(p, "opts", ()):
                assert "duration" not in p.help.lower(), (path, p.help)
    # sources are --source; the roles of a source (eval's reference, sample's low-resolution inputs, compare's two
    # sets) name the role and say SOURCE[:SPLIT]
    for path, cmd in COMMANDS.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and "SOURCE" in (p.help or ""):
                assert p.opts[0] in {"--source", "--reference", "--lowres", "--a", "--b"}, (path, p.opts)
    assert {p for p, c in COMMANDS.items() if "--source" in _options(c)} == {
        "autoencoder train",
        "data prepare",
        "classifier train",
        "finetune sr",
    }
    assert "--format" in _options(COMMANDS["family"]) and "--format" in _options(COMMANDS["plan"])
    assert "--cache" in _options(COMMANDS["train"])
    # the study folder is the positional argument wherever a command reads one
    for path in ("study report", "plan"):
        assert [p.name for p in COMMANDS[path].params if isinstance(p, click.Argument)] == ["out"], path


@pytest.mark.parametrize("path", sorted(ALIASES))
def test_old_spellings_still_parse_and_say_they_are_deprecated(path, capsys):
    cmd = COMMANDS[path]
    assert cmd.aliases == ALIASES[path]
    base = {
        "train": [],
        "sample": ["--run", "r", "--out", "o"],
        "data prepare": ["--out", "o", "--autoencoder", "a"],
        "compare": ["--a", "x", "--b", "y"],
        "finetune sr": ["--init", "i", "--out", "o"],
        "finetune dreambooth": ["--init", "i", "--subject", "s", "--out", "o"],
        "study report": ["DIR"],
        "plan": [],
    }[path]
    values = {
        "--data": "somewhere",
        "--num": "3",
        "--lr": "animal-mnist:validation",
        "--limit": "5",
        "--study": "DIR",
        "--json": None,
        "--train-set": "lr=1e-4",
    }
    for old, new in ALIASES[path].items():
        value = values[old]
        old_args = [old] + ([value] if value is not None else [])
        new_args = new + ([value] if value is not None else [])
        if path == "train":
            base = ["--out", "o"]
        if path == "plan":
            base = [] if old == "--study" else ["DIR"]
        extra = ["--source", "s"] if path == "data prepare" else []
        got = cmd.make_context(path, base + extra + old_args).params
        want = cmd.make_context(path, base + extra + new_args).params
        assert got == want, (path, old)
        assert f"{old} is deprecated" in capsys.readouterr().err
        if value is not None:  # --old=value too
            got_eq = cmd.make_context(path, base + extra + [f"{old}={value}"]).params
            assert got_eq == want
        assert old in cmd.epilog  # the help lists the deprecated spellings


def test_every_train_config_field_is_a_train_option_with_help():
    train = COMMANDS["train"]
    by_name = {p.name: p for p in train.params}
    helps = field_help(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        assert f.name in by_name, f"TrainConfig.{f.name} has no `ldmscale train` option"
        assert f.name in helps and by_name[f.name].help, f"TrainConfig.{f.name} has no help comment"
    assert by_name["data"].opts == ["--cache"] and by_name["batch_size"].opts == ["--batch-size"]


def test_train_options_and_set_build_the_same_config():
    train = COMMANDS["train"]
    params = train.make_context(
        "train",
        [
            "--out",
            "o",
            "--cache",
            "c",
            "--lr",
            "5e-4",
            "--batch-size",
            "8",
            "--betas",
            "0.8,0.99",
            "--no-ema-warmup",
            "--prediction",
            "v_prediction",
            "--checkpoint-at",
            "3,9",
        ],
    ).params
    fields = {k: v for k, v in params.items() if k not in ("out", "config_file", "overrides")}
    from_options = apply_overrides(TrainConfig(), given_overrides(TrainConfig, fields))
    from_set = apply_overrides(
        TrainConfig(),
        [
            "data=c",
            "lr=5e-4",
            "batch_size=8",
            "betas=0.8,0.99",
            "ema_warmup=false",
            "prediction=v_prediction",
            "checkpoint_at=3,9",
        ],
    )
    assert from_options == from_set
    assert (
        from_options.lr,
        from_options.batch_size,
        from_options.betas,
        from_options.ema_warmup,
        from_options.checkpoint_at,
    ) == (5e-4, 8, (0.8, 0.99), False, (3, 9))
    # options not given stay None, so a continued run keeps its own settings
    assert params["seed"] is None and params["fsdp"] is None


@pytest.mark.parametrize("path", ["sample", "eval"])
def test_every_sampler_is_named_in_the_help_of_each_verb_that_samples(path, capsys):
    from ldmscale.cli.main import main
    from ldmscale.diffusion.schedulers import SAMPLERS

    with pytest.raises(SystemExit):
        main([*path.split(), "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # click wraps lines at hyphens
    assert [s for s in SAMPLERS if s not in text] == []
