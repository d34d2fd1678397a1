"""`ldmscale autoencoder train` and `ldmscale data prepare`: the first stage and the latent cache."""

from __future__ import annotations

from pathlib import Path

import click

from ldmscale.cli.options import Verb, config_options, given_overrides, set_option
from ldmscale.config import apply_overrides, load_json
from ldmscale.data.config import AutoencoderConfig, PrepareConfig


@click.group("autoencoder")
def autoencoder_group() -> None:
    """Train a KL autoencoder (the LDM first stage) from scratch.

    \b
    Examples:
      ldmscale autoencoder train --source animal-mnist --out runs/ae
    """


@autoencoder_group.command(
    "train",
    epilog="""
\b
Examples:
  ldmscale autoencoder train --source animal-mnist --out runs/ae
  ldmscale autoencoder train --source folder:photos --out runs/ae-rgb --channels 3 --resolution 64
""",
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Output folder (diffusers AutoencoderKL format)."
)
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="AutoencoderConfig JSON.")
@config_options(AutoencoderConfig, rename={"max_images": "num_images"})
@set_option("AutoencoderConfig")
@click.option(
    "--overwrite", is_flag=True, help="Replace an autoencoder already at --out (nothing else is ever replaced)."
)
def autoencoder_train(out, config_file, overrides, overwrite, **fields) -> None:
    """Train a small KL autoencoder and measure its latent scaling factor."""
    from ldmscale.data.autoencoder import train_autoencoder
    from ldmscale.data.sources import parse_source

    cfg = load_json(AutoencoderConfig, config_file) if config_file else AutoencoderConfig()
    cfg = apply_overrides(cfg, [*given_overrides(AutoencoderConfig, fields), *overrides])
    parse_source(cfg.source)
    report = train_autoencoder(cfg, out, overwrite=overwrite)
    click.echo(
        f"saved {out}: validation PSNR {report['validation_psnr_db']:.2f} dB, "
        f"scaling factor {report['scaling_factor']:.4f}, {report['params']:,} params, "
        f"trained {report['train_seconds']:.0f} s"
    )


@click.group("data")
def data_group() -> None:
    """Prepare data: encode images and captions once into a latent cache.

    \b
    Examples:
      ldmscale data prepare --source animal-mnist --autoencoder runs/ae --text-encoder minilm --resolution 32 \\
          --out runs/cache
    """


# PrepareConfig fields spelled with the vocabulary's word on the command line
PREPARE_NAMES = {"max_length": "context_len", "limit": "num_images"}


@data_group.command(
    "prepare",
    cls=Verb,
    aliases={"--limit": ["--num-images"]},
    epilog="""
\b
Examples:
  ldmscale data prepare --source animal-mnist --autoencoder runs/ae --text-encoder minilm --resolution 32 \\
      --out runs/cache
  ldmscale data prepare --source wds:shards/{00000..00099}.tar --autoencoder stabilityai/sd-vae-ft-mse \\
      --text-encoder clip-l --resolution 256 --out cache/laion
""",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache folder (resumes a partial one).")
@config_options(PrepareConfig, rename=PREPARE_NAMES)
@set_option("PrepareConfig")
def data_prepare(out, overrides, **fields) -> None:
    """Encode a dataset into a sharded latent + text-embedding cache."""
    from ldmscale.data.cache import prepare

    given = given_overrides(PrepareConfig, fields)
    cfg = apply_overrides(
        PrepareConfig(source=fields["source"], autoencoder=fields["autoencoder"]), given + list(overrides)
    )
    m = prepare(cfg, out)
    counts = ", ".join(f"{k} {v['count']}" for k, v in m["splits"].items())
    rate = f", {m['images_per_second']} images/s" if m.get("images_per_second") else ""
    click.echo(
        f"cache {out}: {m['total']} images ({counts}), {m['skipped_total']} skipped, "
        f"latent {'x'.join(map(str, m['latent_shape']))}, text {m['context_len']}x{m['context_dim']}, "
        f"scaling factor {m['autoencoder']['scaling_factor']:.4f}{rate}"
    )
    if m["skipped_total"]:
        click.echo(f"skipped items are listed in {Path(out) / 'skipped.json'}")


COMMANDS = [autoencoder_group, data_group]
