"""`ldmscale verify PATH [--repair]`: every file of a run, a latent cache or a study folder checked against the
record written with it (bytes + sha256; the structure of files from before records), and what can be repaired,
repaired: damaged checkpoints, eval results and job records set aside (never deleted) so the next command redoes
them, a damaged config.json rewritten from the newest intact checkpoint, damaged cache shards encoded again."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from ldmscale import checkpoint, integrity
from ldmscale.config import from_dict
from ldmscale.data.config import PrepareConfig
from ldmscale.data.shard_index import INDEX, MANIFEST, damaged_files, file_damage
from ldmscale.errors import UserError
from ldmscale.io import DirLock, atomic_write_json, output_kind
from ldmscale.study.jobs import record_problem


@dataclass
class Report:
    checked: int = 0
    damaged: list[str] = field(default_factory=list)  # "PATH: what is wrong"
    repaired: list[str] = field(default_factory=list)

    def check(self, path: Path, what: str) -> bool:
        self.checked += 1
        line = f"{path}: {what}"
        if what and line not in self.damaged:
            self.damaged.append(line)
        return bool(what)


def verify(path: str | Path, repair: bool = False) -> Report:
    path = Path(path)
    kind = output_kind(path) if path.is_dir() else None
    if kind in (None, ""):
        raise UserError(f"{path} is not an ldmscale run, latent cache, study or model folder")
    rep = Report()
    {"run": _run, "cache": _cache, "study": _study}.get(kind, _folder)(path, rep, repair)
    return rep


def _folder(path: Path, rep: Report, repair: bool) -> None:
    """An autoencoder, classifier, export or samples folder: each weights and JSON file by its structure."""
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".json", ".pt", ".bin") and "damaged" not in p.parts:
            rep.check(p, integrity.structure_damage(p))


def _run(run: Path, rep: Report, repair: bool) -> None:
    with DirLock(run, "run") if repair else nullcontext():
        for ckpt in checkpoint.list_checkpoints(run):
            rep.check(ckpt, checkpoint.damage(ckpt))
        good = checkpoint.newest_intact(run, announce=False)
        if repair and good is not None:
            checkpoint.set_aside_after(run, checkpoint.load_state(good)["step"])
            checkpoint.point_latest(run, good)
        if rep.check(run / "config.json", integrity.json_damage(run / "config.json")) and repair and good is not None:
            config = _config_of(good)
            if config:
                integrity.set_aside(run / "config.json", run / "damaged")
                atomic_write_json(run / "config.json", config)
                rep.repaired.append(f"{run / 'config.json'}: rewritten from {good.name}")
        _eval_results(run / "eval", rep, repair)


def _config_of(ckpt: Path) -> dict | None:

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["ldmscale_config"]) if "ldmscale_config" in meta else None


def _eval_results(folder: Path, rep: Report, repair: bool) -> None:
    for p in sorted(folder.glob("*.json")):
        if rep.check(p, integrity.json_damage(p)) and repair:
            rep.repaired.append(
                f"{p}: moved to {integrity.set_aside(p, folder / 'damaged')} (evaluated again by the "
                "next eval or study run)"
            )


def _cache(cache: Path, rep: Report, repair: bool) -> None:
    from ldmscale.data.cache import prepare

    rep.check(cache / "prepare.json", integrity.json_damage(cache / "prepare.json"))
    for name in (MANIFEST, INDEX):
        rep.check(cache / name, file_damage(cache, name))
    bad = damaged_files(cache)
    shards = [p for d in cache.iterdir() if d.is_dir() and d.name != "damaged" for p in d.glob("shard-*.safetensors")]
    rep.checked += len(shards) + 1
    rep.damaged += [f"{p}: {what}" for p, what in bad]
    if repair and (bad or any(str(cache / n) in d for n in (MANIFEST, INDEX) for d in rep.damaged)):
        try:
            settings = integrity.read_json(cache / "prepare.json", "cache settings")
        except (ValueError, OSError):
            raise UserError(
                f"cache {cache}: prepare.json is damaged or missing, so the cache's settings are unknown; "
                "prepare a new cache"
            ) from None
        prepare(from_dict(PrepareConfig, settings), cache)
        rep.repaired.append(f"{cache}: {len(bad)} damaged file(s) encoded again")


def _study(study: Path, rep: Report, repair: bool) -> None:
    with DirLock(study, "study") if repair else nullcontext():
        for rec in sorted((study / "jobs").glob("*.json")):
            why, bad = record_problem(study, rec)
            for out, what in bad:
                if rep.check(out, what) and repair and out.exists():
                    rep.repaired.append(f"{out}: moved to {integrity.set_aside(out, out.parent / 'damaged')}")
            if rep.check(rec, why or (f"its output {bad[0][0]} is damaged" if bad else "")) and repair:
                rep.repaired.append(
                    f"{rec}: moved to {integrity.set_aside(rec, rec.parent / 'damaged')} (the next "
                    "study run runs the job again)"
                )
        for sub in ("autoencoder", "classifier"):
            if (study / sub).is_dir():
                _folder(study / sub, rep, repair)
        if (study / "cache").is_dir():
            _cache(study / "cache", rep, repair)
    for run in sorted({p.parent for p in study.glob("**/config.json") if (p.parent / "checkpoints").is_dir()}):
        _run(run, rep, repair)
