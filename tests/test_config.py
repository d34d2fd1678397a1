import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from ldmscale.config import apply_overrides, from_dict, load_json, save_json, to_dict
from ldmscale.errors import UserError


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    steps: int = 10
    flag: bool = False
    mode: Literal["eps", "v"] = "eps"
    maybe: int | None = None
    sizes: tuple[str, ...] = ("c8",)
    inner: Inner = field(default_factory=Inner)


def test_round_trip_through_json(tmp_path):
    cfg = Outer(name="run", steps=5, flag=True, mode="v", maybe=3, sizes=("c8", "c16"), inner=Inner(lr=0.5))
    save_json(cfg, tmp_path / "c.json")
    assert load_json(Outer, tmp_path / "c.json") == cfg
    assert from_dict(Outer, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(UserError) as e:
        from_dict(Outer, {"stepz": 3})
    assert "'stepz'" in str(e.value) and "steps" in str(e.value) and "inner" in str(e.value)
    with pytest.raises(UserError, match="Outer.inner: unknown key 'lrr'"):
        from_dict(Outer, {"inner": {"lrr": 1}})


def test_types_are_checked():
    with pytest.raises(UserError, match="expected an integer"):
        from_dict(Outer, {"steps": "ten"})
    with pytest.raises(UserError, match="not one of"):
        from_dict(Outer, {"mode": "x0"})
    with pytest.raises(UserError, match="expected 2 values"):
        from_dict(Outer, {"inner": {"betas": [0.9]}})


def test_overrides_parse_against_field_types():
    cfg = apply_overrides(
        Outer(),
        ["steps=20", "flag=true", "inner.lr=3e-4", "sizes=c8,c16,c32", "maybe=none", "mode=v", "inner.betas=[0.8,0.9]"],
    )
    assert cfg.steps == 20 and cfg.flag is True and cfg.inner.lr == 3e-4
    assert cfg.sizes == ("c8", "c16", "c32") and cfg.maybe is None and cfg.mode == "v"
    assert cfg.inner.betas == (0.8, 0.9)
    with pytest.raises(UserError, match="unknown key 'nope'"):
        apply_overrides(Outer(), ["inner.nope=1"])
    with pytest.raises(UserError, match="cannot parse"):
        apply_overrides(Outer(), ["steps=abc"])
    with pytest.raises(UserError, match="not one of"):
        apply_overrides(Outer(), ["mode=x0"])
    with pytest.raises(UserError, match="not a config section"):
        apply_overrides(Outer(), ["steps.x=1"])
