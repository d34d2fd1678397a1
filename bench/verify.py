"""The cost of verifying a checkpoint when it is read (sha256 against state.json's record) against the read it
guards, unverified: sampling, evaluation and export verify the weights files and load the EMA weights into the
UNet; a resume verifies every file and loads the weights and the optimizer state.
Run: .venv/bin/python bench/verify.py [--sizes c32,c64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import record

from ldmscale import checkpoint
from ldmscale.model.family import build_network, network_config, parse_size


def best_of(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="c32,c64,c128")
    args = ap.parse_args()
    out = {}
    for name in args.sizes.split(","):
        config = network_config(parse_size(name), 8, 384, 4)
        net = build_network(config)
        state = net.state_dict()
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp)
            ckpt = checkpoint.save(
                run,
                1,
                config,
                state,
                state,
                {"optimizer": {k: v.clone() for k, v in state.items()}},
                {"step": 1},
                keep=1,
            )
            size_mb = sum(p.stat().st_size for p in ckpt.iterdir()) / 1e6

            def load(config=config, ckpt=ckpt):
                build_network(config).load_state_dict(checkpoint.load_weights(ckpt, "ema"))

            def resume(config=config, ckpt=ckpt):
                build_network(config).load_state_dict(checkpoint.load_weights(ckpt, "raw"))
                checkpoint.load_optimizer(ckpt)

            t_load, t_verify = best_of(load), best_of(lambda c=ckpt: checkpoint.damage(c, checkpoint.WEIGHTS))
            t_resume, t_all = best_of(resume), best_of(lambda c=ckpt: checkpoint.damage(c))
        out[name] = {
            "checkpoint_mb": round(size_mb, 1),
            "load_s": round(t_load, 4),
            "verify_s": round(t_verify, 4),
            "verify_over_load": round(t_verify / t_load, 3),
            "resume_load_s": round(t_resume, 4),
            "resume_verify_s": round(t_all, 4),
            "resume_verify_over_load": round(t_all / t_resume, 3),
        }
        print(
            f"{name}: checkpoint {size_mb:.1f} MB (model, EMA, optimizer); sampling: load {t_load:.3f} s, verify "
            f"{t_verify:.3f} s ({t_verify / t_load:.2f}x); resume: load {t_resume:.3f} s, verify {t_all:.3f} s "
            f"({t_all / t_resume:.2f}x)"
        )
    record("verify", {"baseline": "the same loads, unverified", "sizes": out})


if __name__ == "__main__":
    main()
