"""Export a run as a diffusers pipeline folder that `StableDiffusionPipeline.from_pretrained` loads.

unet (EMA weights by default), vae, scheduler (DDIM with SD v1.5's schedule), text_encoder and tokenizer.
With a CLIP text encoder the pipeline runs as is. With MiniLM the text encoder is ldmscale's zero-padding
encoder (pipeline_text.py, copied into the folder), so plain prompts give exactly ldmscale's states; the folder
then loads with trust_remote_code=True and is refused without it.
"""

from __future__ import annotations

from pathlib import Path

from ldmscale.errors import UserError
from ldmscale.io import atomic_dir


def export(run: str | Path, out: str | Path, which: str = "latest", weights: str = "ema", overwrite: bool = False) -> Path:
    from ldmscale.io import check_output

    check_output(out, "export", overwrite)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the SD pipeline module imports image processors that warn about torchvision
    try:
        from diffusers import StableDiffusionPipeline
    finally:
        hf_logging.set_verbosity(level)

    from ldmscale.diffusion.samplers import make_sampler
    from ldmscale.diffusion.sampling import load_run

    model = load_run(run, which, weights, device="cpu")  # saved from the CPU, whatever the machine
    if model.config.get("kind") != "text-to-image":
        raise UserError(f"run {run} is a {model.config.get('kind')} model; only text-to-image runs export as a pipeline")
    if "unet" not in model.config or model.prediction == "flow":
        # PixArt-alpha / SD3 pipeline folders (their T5/CLIP text stacks around ldmscale's encoder) are not written yet
        raise UserError(f"run {run} ({model.config.get('backbone', 'unet-sd15')}, prediction={model.prediction}): "
                        "export writes StableDiffusionPipeline folders for UNet runs on the DDPM objective only; "
                        "sample this run with `ldmscale sample`")
    scheduler = make_sampler("ddim", model.prediction)
    tok = model.text.tokenizer
    tok.model_max_length = model.text.max_length  # the pipeline pads prompts to this length
    text_encoder = model.text.model
    if model.text.zero_pad:
        from ldmscale.diffusion.pipeline_text import MiniLMTextEncoder

        text_encoder = MiniLMTextEncoder(text_encoder.config)
        text_encoder.load_state_dict(model.text.model.state_dict())
        text_encoder.config.use_attention_mask = True  # the pipeline then passes the mask it tokenized
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=text_encoder, tokenizer=tok, unet=model.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
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
            f"text encoder: {model.text.spec} (zero-padded states: {model.text.zero_pad})\n")
    return Path(out)
