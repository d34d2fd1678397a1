"""`ldmscale autoencoder train` and `ldmscale data prepare`: the first stage and the latent cache."""

from __future__ import annotations

from pathlib import Path

import click

from ldmscale.cli.options import Verb
from ldmscale.config import apply_overrides, from_dict, load_json
from ldmscale.errors import UserError


@click.group("autoencoder")
def autoencoder_group() -> None:
    """Train a KL autoencoder (the LDM first stage) from scratch.

    \b
    Examples:
      ldmscale autoencoder train --source animal-mnist --out runs/ae
    """


@autoencoder_group.command("train", epilog="""
\b
Examples:
  ldmscale autoencoder train --source animal-mnist --out runs/ae
  ldmscale autoencoder train --source folder:photos --out runs/ae-rgb --set channels=3 --set resolution=64
""")
@click.option("--source", default="animal-mnist", show_default=True, help="Data source spec (animal-mnist, folder:PATH, wds:PATTERN, hf:NAME).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder (diffusers AutoencoderKL format).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="AutoencoderConfig JSON.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field, e.g. steps=500.")
@click.option("--overwrite", is_flag=True, help="Replace an autoencoder already at --out (nothing else is ever replaced).")
def autoencoder_train(source, out, config_file, overrides, overwrite) -> None:
    """Train a small KL autoencoder and measure its latent scaling factor."""
    from ldmscale.data.autoencoder import AutoencoderConfig, train_autoencoder
    from ldmscale.data.sources import parse_source

    cfg = load_json(AutoencoderConfig, config_file) if config_file else from_dict(AutoencoderConfig, {"source": source})
    cfg = apply_overrides(cfg, overrides)
    parse_source(cfg.source)
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError("steps and batch_size must be positive")
    report = train_autoencoder(cfg, out, overwrite=overwrite)
    click.echo(f"saved {out}: validation PSNR {report['validation_psnr_db']:.2f} dB, "
               f"scaling factor {report['scaling_factor']:.4f}, {report['params']:,} params, "
               f"trained {report['train_seconds']:.0f} s")


@click.group("data")
def data_group() -> None:
    """Prepare data: encode images and captions once into a latent cache.

    \b
    Examples:
      ldmscale data prepare --source animal-mnist --autoencoder runs/ae --text-encoder minilm --resolution 32 --out runs/cache
    """


@data_group.command("prepare", cls=Verb, aliases={"--limit": ["--num-images"]}, epilog="""
\b
Examples:
  ldmscale data prepare --source animal-mnist --autoencoder runs/ae --text-encoder minilm --resolution 32 --out runs/cache
  ldmscale data prepare --source wds:shards/{00000..00099}.tar --autoencoder stabilityai/sd-vae-ft-mse \\
      --text-encoder clip-l --resolution 256 --out cache/laion
""")
@click.option("--source", required=True, help="animal-mnist, folder:PATH, wds:PATTERN or hf:NAME[:SPLIT].")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache folder (resumes a partial one).")
@click.option("--autoencoder", required=True, help="AutoencoderKL folder or hub id.")
@click.option("--text-encoder", default="minilm", show_default=True, help="minilm, clip-l[:PATH], clip-h[:PATH] or clip:PATH.")
@click.option("--resolution", default=32, show_default=True, type=int, help="Image side after center crop and resize.")
@click.option("--shard-size", default=1000, show_default=True, type=int,
              help='Images per cache shard (a killed prepare resumes at the first missing shard).')
@click.option("--batch-size", default=250, show_default=True, type=int, help='Images encoded per batch.')
@click.option("--context-len", "max_length", default=77, show_default=True, type=click.IntRange(2, 512),
              help="Text tokens kept per caption (SD: 77); FLOPs and normalized cost follow it.")
@click.option("--num-images", "limit", default=0, type=int, help="Encode at most N images per split (0: all).")
def data_prepare(source, out, autoencoder, text_encoder, resolution, shard_size, batch_size, max_length,
                 limit) -> None:
    """Encode a dataset into a sharded latent + text-embedding cache."""
    from ldmscale.data.cache import PrepareConfig, prepare

    if resolution < 1 or shard_size < 1 or batch_size < 1 or limit < 0:
        raise UserError("resolution, shard size and batch size must be positive")
    cfg = PrepareConfig(source=source, autoencoder=autoencoder, text_encoder=text_encoder, resolution=resolution,
                        shard_size=shard_size, batch_size=batch_size, max_length=max_length, limit=limit)
    m = prepare(cfg, out)
    counts = ", ".join(f"{k} {v['count']}" for k, v in m["splits"].items())
    rate = f", {m['images_per_second']} images/s" if m.get("images_per_second") else ""
    click.echo(f"cache {out}: {m['total']} images ({counts}), {m['skipped_total']} skipped, "
               f"latent {'x'.join(map(str, m['latent_shape']))}, text {m['context_len']}x{m['context_dim']}, "
               f"scaling factor {m['autoencoder']['scaling_factor']:.4f}{rate}")
    if m["skipped_total"]:
        click.echo(f"skipped items are listed in {Path(out) / 'skipped.json'}")


COMMANDS = [autoencoder_group, data_group]
