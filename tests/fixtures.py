"""Small datasets and models the tests make for themselves (no network, seconds to build)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def shape_image(i: int, size: int = 24) -> Image.Image:
    """A deterministic white shape on black: a disc or a square whose position depends on i."""
    arr = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cx, cy, r = 6 + i % 12, 6 + (i * 7) % 12, 4 + i % 3
    if i % 2:
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 255
    else:
        arr[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = 255
    return Image.fromarray(arr, "L").convert("RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def caption(i: int) -> str:
    return f"a {'disc' if i % 2 else 'square'} number {i}"


def make_folder(root: Path, n: int = 6, corrupt: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img{i:02d}.png"
        shape_image(i).save(root / name)
        rows.append({"file_name": name, "text": caption(i)})
    if corrupt:
        data = png_bytes(shape_image(99))
        (root / "broken.png").write_bytes(data[: len(data) // 3])  # truncated PNG
        rows.insert(2, {"file_name": "broken.png", "text": "a broken file"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_tars(root: Path, shards: int = 2, per_shard: int = 3) -> str:
    root.mkdir(parents=True, exist_ok=True)
    i = 0
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for _ in range(per_shard):
                for ext, data in (("png", png_bytes(shape_image(i))), ("txt", caption(i).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
    return str(root / f"{{00000..{shards - 1:05d}}}.tar")


def make_hf(root: Path, n: int = 5) -> Path:
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [shape_image(i) for i in range(n)], "text": [caption(i) for i in range(n)]}, features=feats
    )
    ds.save_to_disk(str(root))
    return root


def make_autoencoder(out: Path, channels: int = 1, resolution: int = 32) -> Path:
    """An untrained tiny AutoencoderKL (f=4) saved like a trained one: enough to test the plumbing."""
    import torch

    from ldmscale.data.autoencoder import build_autoencoder
    from ldmscale.data.config import AutoencoderConfig

    torch.manual_seed(0)
    vae = build_autoencoder(
        AutoencoderConfig(channels=channels, resolution=resolution, block_out_channels=(8, 16, 16), norm_groups=8)
    )
    vae.register_to_config(scaling_factor=0.7)
    vae.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_clip(out: Path, hidden: int = 32) -> Path:
    """A CLIP text model + tokenizer built from config (character-level BPE with no merges): the real
    transformers classes, tiny weights, no download."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    out.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    CLIPTextModel(cfg).save_pretrained(out)
    return out


def make_tiny_clip_model(out: Path, image_size: int = 32) -> Path:
    """A full CLIPModel (text + vision towers) and CLIPProcessor from config, for CLIP-score tests."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    make_tiny_clip(out / "_text")
    tok = CLIPTokenizer.from_pretrained(out / "_text")
    torch.manual_seed(0)
    text_cfg = json.loads((out / "_text" / "config.json").read_text())
    text_cfg = {
        k: v
        for k, v in text_cfg.items()
        if k
        in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        )
    }
    cfg = CLIPConfig(
        text_config=text_cfg,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(out)
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tok,
    )
    proc.save_pretrained(out)
    return out
