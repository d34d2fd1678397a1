"""`ldmscale family`: the model family and its exact accounting."""

from __future__ import annotations

import csv
import io
import json

import click

from ldmscale.config import apply_overrides
from ldmscale.errors import UserError
from ldmscale.names import Backbone

EXAMPLE = """
\b
Examples:
  ldmscale family --preset paper
  ldmscale family --preset cpu --format json
  ldmscale family --size c48 --size 83M --latent-size 32 --context-dim 768
  ldmscale family --preset cpu --set heads=1
  ldmscale family --backbone dit
  ldmscale family --backbone mmdit --preset cpu --latent-size 8
"""


def format_table(rows: list[dict]) -> str:
    head = ["name", "width", "depth", "paper", "params", "vs paper", "GFLOPs/fwd", "norm cost", "layout"]
    body = []
    for r in rows:
        if r["params_vs_paper_pct"] is None:
            vs = ""
        elif r["paper_label"].endswith("B"):
            vs = "rounds" if r["matches_paper"] else "differs"
        else:
            vs = f"{r['params_vs_paper_pct']:+.2f}%"
        params = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e9 else f"{r['params_m']:.2f}M"
        body.append(
            [
                r["name"],
                str(r["C"]),
                str(r["depth"] or ""),
                r["paper_label"],
                params,
                vs,
                f"{r['gflops']:.1f}" if r["gflops"] >= 10 else f"{r['gflops']:.3f}",
                f"{r['norm_cost']:.3f}",
                r["layout"],
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [
        "  ".join(h.rjust(w) if i in (1, 2, 4, 5, 6, 7) else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))
    ]
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append(
            "  ".join(v.rjust(w) if i in (1, 2, 4, 5, 6, 7) else v.ljust(w) for i, (v, w) in enumerate(zip(b, widths)))
        )
    r0 = rows[0]
    lines.append("")
    lines.append(
        f"FLOPs: one forward pass per sample, {r0['latent']} latent, {r0['context']} text context, "
        f"{r0['flops_convention']}; norm cost = FLOPs / FLOPs of the C=320 UNet (SD v1.5) at the same latent and "
        "context, whatever the "
        "backbone."
    )
    return "\n".join(line.rstrip() for line in lines)


def format_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


@click.command("family", epilog=EXAMPLE)
@click.option("--preset", default=None, help="paper (11 sizes, 39M-5B) or cpu (tiny sizes). Default: paper.")
@click.option(
    "--size",
    "sizes",
    multiple=True,
    help="Size name instead of a preset: c<width>, a paper label (83M), sd1.5, dit-xl, dit-64x4, mmdit-d24, ... "
    "Repeatable.",
)
@click.option(
    "--backbone",
    default=Backbone.UNET.value,
    show_default=True,
    type=click.Choice([b.value for b in Backbone]),
    help="The preset's backbone: the SD v1.5 UNet by width, DiT (S/B/L/XL) or MM-DiT (SD3, by depth).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="table for people; json or csv for programs.",
)
@click.option(
    "--latent-size",
    type=click.IntRange(1, 1 << 16),
    default=None,
    help="Latent side (default: the preset's, 64 for paper).",
)
@click.option("--latent-channels", type=click.IntRange(1, 1 << 16), default=None, help="Latent channels (default 4).")
@click.option("--context-len", type=click.IntRange(1, 1 << 16), default=None, help="Text tokens (default 77).")
@click.option(
    "--context-dim",
    type=click.IntRange(1, 1 << 16),
    default=None,
    help="Text token width (default: 1024 paper, 384 cpu).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a size field (heads, norm_groups, layers_per_block) for every size.",
)
def family_cmd(preset, sizes, backbone, fmt, latent_size, latent_channels, context_len, context_dim, overrides) -> None:
    """List model sizes with parameters, forward GFLOPs and normalized cost."""
    from ldmscale.model.family import PRESETS, ModelSize, parse_size, preset_sizes
    from ldmscale.model.flops import family_rows

    if preset and sizes:
        raise UserError("give --preset or --size, not both")
    p = PRESETS.get(preset or "paper")
    if p is None:
        raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    if sizes:
        chosen = [parse_size(s) for s in sizes]
    elif backbone == Backbone.UNET:
        chosen = preset_sizes(p.name)
    else:
        from ldmscale.model.transformers import PRESETS as BACKBONE_PRESETS

        chosen = [parse_size(s) for s in BACKBONE_PRESETS[backbone][p.name]]
    if overrides and any(not isinstance(s, ModelSize) for s in chosen):
        raise UserError("--set changes UNet sizes; name a transformer's options in its size (dit-64x4:h2)")
    chosen = [apply_overrides(s, overrides) for s in chosen]
    latent = latent_size or p.latent_size
    for name, v in (
        ("latent size", latent),
        ("context length", context_len),
        ("context dim", context_dim),
        ("latent channels", latent_channels),
    ):
        if v is not None and v < 1:
            raise UserError(f"{name} must be positive, got {v}")
    if latent % 8 and any(isinstance(s, ModelSize) for s in chosen):
        raise UserError(f"latent size {latent} must be a multiple of 8 (the UNet downsamples 3 times)")
    rows = family_rows(
        chosen,
        latent,
        context_len or p.context_len,
        context_dim or p.context_dim,
        latent_channels or p.latent_channels,
        progress=fmt == "table",
    )
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        click.echo(format_csv(rows), nl=False)
    else:
        click.echo(format_table(rows))


COMMANDS = [family_cmd]
