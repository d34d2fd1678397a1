"""Export a run as a diffusers pipeline folder that `StableDiffusionPipeline.from_pretrained` loads.

unet (EMA weights by default), vae, scheduler (DDIM with SD v1.5's schedule), text_encoder and tokenizer.
With a CLIP text encoder the pipeline runs as is. With MiniLM the folder loads the same way (BertModel as
text_encoder) and the prompt states come from ldmscale's encoder, passed as `prompt_embeds` (README).
"""

from __future__ import annotations

from pathlib import Path

from ldmscale.config import UserError
from ldmscale.io import atomic_dir


def export(run: str | Path, out: str | Path, which: str = "latest", weights: str = "ema") -> Path:
    from diffusers import StableDiffusionPipeline

    from ldmscale.diffusion import make_sampler
    from ldmscale.sample import load_run

    model = load_run(run, which, weights)
    if model.config.get("kind") != "text-to-image":
        raise UserError(f"run {run} is a {model.config.get('kind')} model; only text-to-image runs export as a pipeline")
    scheduler = make_sampler("ddim", model.prediction)
    tok = model.text.tokenizer
    tok.model_max_length = model.text.max_length  # the pipeline pads prompts to this length
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text.model, tokenizer=tok, unet=model.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / "ldmscale_source.txt").write_text(
            f"run: {Path(run).resolve()}\ncheckpoint: {model.ckpt.name}\nweights: {weights}\n"
            f"text encoder: {model.text.spec} (zero-padded states: {model.text.zero_pad})\n")
    return Path(out)
