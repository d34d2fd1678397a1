"""Export a run as a diffusers pipeline folder that `StableDiffusionPipeline.from_pretrained` loads (a DiT run:
`PixArtAlphaPipeline`).

unet (EMA weights by default), vae, scheduler (DDIM with SD v1.5's schedule), text_encoder and tokenizer.
With a CLIP text encoder the pipeline runs as is. With MiniLM the text encoder is ldmscale's zero-padding
encoder (pipeline_text.py, copied into the folder), so plain prompts give exactly ldmscale's states; the folder
then loads with trust_remote_code=True and is refused without it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ldmscale.errors import UserError
from ldmscale.io import atomic_dir, check_output
from ldmscale.names import Backbone, Kind, backbone_of


def export(
    run: str | Path, out: str | Path, which: str = "latest", weights: str = "ema", overwrite: bool = False
) -> Path:

    check_output(out, "export", overwrite)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the SD pipeline module imports image processors that warn about torchvision
    try:
        from diffusers import StableDiffusionPipeline
    finally:
        hf_logging.set_verbosity(level)

    from ldmscale.diffusion.generate import load_run
    from ldmscale.diffusion.schedulers import make_sampler

    model = load_run(run, which, weights, device="cpu")  # saved from the CPU, whatever the machine
    if model.config.get("kind") != Kind.TEXT_TO_IMAGE:
        raise UserError(
            f"run {run} is a {model.config.get('kind')} model; only text-to-image runs export as a pipeline"
        )
    backbone = backbone_of(model.config)
    # the pipeline that samples each (backbone, objective) as ldmscale does: SD's and PixArt's step DDPM
    # schedulers, SD3's the flow ones
    pipeline = {
        (Backbone.UNET, False): "StableDiffusionPipeline",
        (Backbone.DIT, False): "PixArtAlphaPipeline",
        (Backbone.MMDIT, True): "StableDiffusion3Pipeline",
    }.get((backbone, model.prediction == "flow"))
    if pipeline is None:
        raise UserError(
            f"run {run} ({backbone}, prediction={model.prediction}): no diffusers pipeline samples this "
            "combination as ldmscale does (UNet and DiT runs on the DDPM objective, MM-DiT runs on flow "
            "export); sample it with `ldmscale sample`"
        )
    if pipeline == "StableDiffusion3Pipeline":
        return _export_sd3(model, run, out, weights)
    scheduler = make_sampler("ddim", model.prediction)
    tok = model.text.tokenizer
    tok.model_max_length = model.text.max_length  # the pipeline pads prompts to this length
    text_encoder = model.text.model
    if model.text.zero_pad:
        from ldmscale.diffusion.pipeline_text import MiniLMTextEncoder

        text_encoder = MiniLMTextEncoder(text_encoder.config)
        text_encoder.load_state_dict(model.text.model.state_dict())
        text_encoder.config.use_attention_mask = True  # the pipeline then passes the mask it tokenized
    if backbone == Backbone.DIT:  # the bare PixArtTransformer2DModel; prompts go in as ldmscale's states (see below)
        from diffusers import PixArtAlphaPipeline

        pipe = PixArtAlphaPipeline(
            tokenizer=tok, text_encoder=text_encoder, vae=model.vae, transformer=model.unet.net, scheduler=scheduler
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=model.vae,
            text_encoder=text_encoder,
            tokenizer=tok,
            unet=model.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if model.text.zero_pad:  # the class travels with the folder as remote code
            import json
            import shutil

            from ldmscale.diffusion import pipeline_text

            shutil.copyfile(pipeline_text.__file__, Path(tmp) / "text_encoder" / "ldmscale_text.py")
            index = json.loads((Path(tmp) / "model_index.json").read_text())
            index["text_encoder"] = ["ldmscale_text", "MiniLMTextEncoder"]
            (Path(tmp) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (Path(tmp) / "ldmscale_source.txt").write_text(
            f"run: {Path(run).resolve()}\ncheckpoint: {model.ckpt.name}\nweights: {weights}\n"
            f"text encoder: {model.text.spec} (zero-padded states: {model.text.zero_pad})\n"
            + (
                "PixArtAlphaPipeline: the DiT attends to every token of ldmscale's states; call the pipeline with "
                "prompt_embeds from ldmscale's encoder and all-ones prompt_attention_mask / "
                "negative_prompt_attention_mask, use_resolution_binning=False (its own prompt encoding masks padding "
                "and pads to 120 tokens)\n"
                if backbone == Backbone.DIT
                else ""
            )
        )
    return Path(out)


def load_line(folder: str | Path) -> str:
    """The Python that loads an exported folder as it was written: its pipeline class, trust_remote_code when the
    text encoder travels as code, no text encoders for SD3; and, for PixArt, how to call it at ldmscale's sizes."""

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    cls = index["_class_name"]
    args = [repr(str(folder))]
    if cls == "StableDiffusion3Pipeline":
        args += [f"{k}=None" for k in SD3_TEXT_SLOTS]
    elif index.get("text_encoder", [None])[0] == "ldmscale_text":
        args.append("trust_remote_code=True")
    line = f"from diffusers import {cls}; pipe = {cls}.from_pretrained({', '.join(args)})"
    if cls == "PixArtAlphaPipeline":
        side = json.loads((folder / "transformer" / "config.json").read_text())["sample_size"] * 2 ** (
            len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]) - 1
        )
        line += (
            f"; pipe(prompt_embeds=..., prompt_attention_mask=..., height={side}, width={side}, "
            "use_resolution_binning=False)  # prompt_embeds from ldmscale's encoder: see ldmscale_source.txt"
        )
    elif cls == "StableDiffusion3Pipeline":
        line += "; pipe(prompt_embeds=..., pooled_prompt_embeds=...)  # see ldmscale_source.txt"
    return line


# SD3's pipeline encodes prompts with its own three text encoders; an ldmscale MM-DiT reads ldmscale's states,
# so the folder has none and prompts go in as embeddings
SD3_TEXT_SLOTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


def _export_sd3(model, run, out, weights: str) -> Path:
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as d_logging

    from ldmscale.diffusion.schedulers import make_sampler

    pipe = StableDiffusion3Pipeline(
        transformer=model.unet.net,
        scheduler=make_sampler("flow-euler"),
        vae=model.vae,
        **{k: None for k in SD3_TEXT_SLOTS},
    )
    level = d_logging.get_verbosity()
    d_logging.set_verbosity_error()  # "None cannot be saved", once per empty text slot
    try:
        with atomic_dir(out) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            (Path(tmp) / "ldmscale_source.txt").write_text(
                f"run: {Path(run).resolve()}\ncheckpoint: {model.ckpt.name}\nweights: {weights}\n"
                f"text encoder: {model.text.spec} (not in this folder)\n"
                "StableDiffusion3Pipeline.from_pretrained(folder, text_encoder=None, tokenizer=None, "
                "text_encoder_2=None, "
                "tokenizer_2=None, text_encoder_3=None, tokenizer_3=None); call it with prompt_embeds from ldmscale's "
                "encoder and pooled_prompt_embeds = prompt_embeds.mean(1) (and the same for the empty prompt)\n"
            )
    finally:
        d_logging.set_verbosity(level)
    return Path(out)
