"""The CLI's shared vocabulary: deprecated spellings, and options generated from a config dataclass.

One word per concept across every verb (tests/test_vocabulary.py holds the table): `--source` a data source
(SOURCE[:SPLIT]), `--cache` a latent cache, `--num-images` images to produce or read, `--images` a training
duration, `--batch-size`, `--format`, and a study folder as the positional DIR. Old spellings still work for one
release: `Verb` rewrites them before parsing and says so on stderr.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing

import click

# deprecated spellings are accepted until this release; then the aliases go
REMOVED_IN = "0.2"


class Verb(click.Command):
    """A command that accepts deprecated option spellings: `aliases` maps an old flag to the tokens that replace it
    (`{"--data": ["--cache"]}`; `["--format", "json"]` for a flag that became a value; `[]` for an option that
    became the positional argument)."""

    def __init__(self, *args, aliases: dict[str, list[str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.aliases = aliases or {}
        if self.aliases:
            said = "; ".join(
                f"{old} -> {' '.join(new) or 'the positional argument'}" for old, new in self.aliases.items()
            )
            self.epilog = (self.epilog or "") + f"\n\b\nDeprecated spellings (removed in {REMOVED_IN}): {said}.\n"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out = []
        for tok in args:
            flag, eq, value = tok.partition("=")
            if flag in self.aliases and tok.startswith("--"):
                new = self.aliases[flag]
                click.echo(
                    f"{ctx.command_path}: {flag} is deprecated, use "
                    f"{' '.join(new) or 'the positional argument'} (removed in {REMOVED_IN})",
                    err=True,
                )
                out += new + ([value] if eq else [])
            else:
                out.append(tok)
        return super().parse_args(ctx, out)


def field_help(cls: type) -> dict[str, str]:
    """Each field's help text: the comment after its declaration in the class body, with the comment-only lines
    right below it (declared once, there; read with tokenize, so a formatter may wrap the declaration)."""
    text: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        src = textwrap.dedent(inspect.getsource(klass))
        comments = {
            tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(src).readline)
            if tok.type == tokenize.COMMENT
        }
        lines = src.splitlines()
        body = ast.parse(src).body[0].body
        for node in body:
            if not (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.target.id in klass.__dataclass_fields__
            ):
                continue
            found = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            if not found:
                continue
            n = node.end_lineno + 1
            while n <= len(lines) and lines[n - 1].strip().startswith("#"):  # continued on the next lines
                found.append(comments[n])
                n += 1
            text[node.target.id] = " ".join(found)
    return text


class ConfigValue(click.ParamType):
    """A config field's value as typed on the command line; `apply_overrides` parses and checks it, so the CLI,
    `--set` and the config file share one set of rules. The name says the kind (the fault sweep reads it)."""

    def __init__(self, tp):
        base = tp
        while typing.get_origin(base) is typing.Annotated:
            base = typing.get_args(base)[0]
        self.name = {int: "integer", float: "float"}.get(base, "text")
        self.metavar_text = {int: "INT", float: "FLOAT", str: "TEXT"}.get(base, "A,B,...")

    def get_metavar(self, param, ctx=None):
        return self.metavar_text

    def convert(self, value, param, ctx):
        return str(value)


def config_options(
    cls: type, rename: dict[str, str] | None = None, skip: tuple[str, ...] = (), required: tuple[str, ...] = ()
):
    """A decorator adding one option per field of a config dataclass (`--batch-size` for batch_size; `rename`
    gives another word, e.g. data -> cache). The command receives `<field>` kwargs, None when not given;
    `given_overrides` turns them into `field=value` overrides. A field without a default, or named in `required`, is
    a required option."""
    rename = rename or {}
    hints = typing.get_type_hints(cls, include_extras=True)
    helps = field_help(cls)
    names_required = set(required)

    def decorate(fn):
        for f in reversed([f for f in dataclasses.fields(cls) if f.name not in skip]):
            tp, base = hints[f.name], hints[f.name]
            while typing.get_origin(base) is typing.Annotated:
                base = typing.get_args(base)[0]
            flag = "--" + rename.get(f.name, f.name).replace("_", "-")
            required = f.name in names_required or (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            doc = helps.get(f.name, "")
            text = f"{doc[:1].upper()}{doc[1:]}" + ("" if required else f" [default: {shown_default(f)}]")
            if base is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=text)(fn)
            elif typing.get_origin(base) is typing.Literal:
                fn = click.option(
                    flag,
                    f.name,
                    type=click.Choice([str(c) for c in typing.get_args(base)]),
                    default=None,
                    required=required,
                    help=text,
                )(fn)
            else:
                fn = click.option(flag, f.name, type=ConfigValue(tp), default=None, required=required, help=text)(fn)
        return fn

    return decorate


def shown_default(f: dataclasses.Field) -> str:
    """A field's default as the help shows it: lists comma-separated, an empty string as "none"."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
    return shown if shown != "" else "none"


def given_overrides(cls: type, kwargs: dict) -> list[str]:
    """`field=value` for every generated option the user gave (in field order), for `apply_overrides`."""
    out = []
    for f in dataclasses.fields(cls):
        v = kwargs.get(f.name)
        if v is not None:
            out.append(f"{f.name}={str(v).lower() if isinstance(v, bool) else v}")
    return out


def set_option(*sections: str):
    """The `--set KEY=VALUE` option of every verb: any field of the verb's configs (named in the help)."""
    return click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help=f"Set a {' or '.join(sections)} field (repeatable); a key two of them share takes its "
        "section: train.seed=1."
        if len(sections) > 1
        else f"Set a {sections[0]} field (repeatable), as its option would.",
    )
