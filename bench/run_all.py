"""`make bench`: run every bench script, then write bench/results.json (each script merges its entry) and
bench/results.md, a Markdown table of the ratios against their named baselines."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "prepare.py",
    "train_cache.py",
    "sampling.py",
    "features.py",
    "speedups.py",
    "verify.py",
    "threads.py",
    "side_by_side.py",
]


def table(results: dict) -> str:
    rows = ["| bench | ldmscale | baseline | ratio | fraction of fp32 matmul peak |", "|---|---|---|---|---|"]
    if "prepare" in results:
        r = results["prepare"]
        rows.append(
            f"| data prepare (images/s) | {r['ldmscale_images_per_s']} | {r['baseline_images_per_s']} "
            f"({r['baseline']}) | {r['ratio']}x | |"
        )
    if "train_cache" in results:
        r = results["train_cache"]
        for size, s in r["sizes"].items():
            rows.append(
                f"| train {size} (images/s) | {s['cache_images_per_s']} from the cache | "
                f"{s['on_the_fly_images_per_s']} ({r['baseline']}) | {s['ratio']}x | "
                f"{s['fraction_of_peak']:.0%} of {r['matmul_peak_gflops']} GFLOP/s |"
            )
    if "sampling" in results:
        r = results["sampling"]
        rows.append(
            f"| sample {r['size']} DDIM {r['steps']} steps (images/s) | {r['ldmscale_images_per_s']} | "
            f"{r['baseline_images_per_s']} ({r['baseline']}) | {r['ratio']}x | {r['fraction_of_peak']:.0%} |"
        )
    if "features" in results:
        r = results["features"]
        rows.append(
            f"| FID features (images/s) | {r['ldmscale_images_per_s']} | {r['baseline_images_per_s']} "
            f"({r['baseline']}) | {r['ratio']}x | |"
        )
    if "speedups" in results:

        def r(x):  # median (min-max), verdict
            return f"{x['median']}x ({x['min']}-{x['max']}, {x['verdict']})" if isinstance(x, dict) else f"{x}x"

        for size, s in results["speedups"]["sizes"].items():
            parts = [
                f"channels-last {r(s['channels_last'])}",
                f"fused AdamW {r(s['fused_adamw'])}",
                f"SDPA vs classic {r(s['sdpa_vs_classic'])}",
                f"bf16 autocast {r(s['bf16_autocast'])}",
            ]
            if "heads" in s:
                parts.insert(
                    0, f"{s['heads']['ldmscale_heads']} heads vs 8: {r(s['heads']['speedup_vs_8_heads'])} (same FLOPs)"
                )
            rows.append(f"| train step {size}: speed work | {'; '.join(parts)} | step {s['baseline_step_s']} s | | |")
        fc = results["speedups"]["flop_cache"]
        rows.append(f"| FLOP count C=320 (s) | {fc['cached_s']} cached | {fc['cold_s']} counted | {fc['speedup']}x | |")
    if "threads" in results:
        t = results["threads"]
        rows.append(
            f"| sample {t['size']} beside a busy process (ms/image) | {t['ms_per_image']['default policy']} "
            f"default threads | {t['ms_per_image']['OMP_NUM_THREADS=1']} (one thread) | "
            f"{t['default_over_one_thread']}x (a thread per core: {t['thread_per_core_over_one_thread']}x) | |"
        )
    if "side_by_side" in results:
        r = results["side_by_side"]
        for size, v in r["sizes"].items():
            rows.append(
                f"| train {r['runs']} {size} runs side by side, a thread each (s) | {v['side_by_side_s']} | "
                f"{v['one_at_a_time_s']} ({r['baseline']}) | {v['speedup']}x | |"
            )
    for size, v in results.get("verify", {}).get("sizes", {}).items():
        rows.append(
            f"| verify checkpoint {size} ({v['checkpoint_mb']} MB), s: sampling; resume | {v['verify_s']}; "
            f"{v['resume_verify_s']} | {v['load_s']}; {v['resume_load_s']} (the loads, unverified) | "
            f"{v['verify_over_load']}x; {v['resume_verify_over_load']}x | |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    t0 = time.time()
    for script in SCRIPTS:
        print(f"== bench/{script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script)], check=True, cwd=HERE)
    results = json.loads((HERE / "results.json").read_text())
    md = table(results)
    (HERE / "results.md").write_text(
        f"Measured {time.strftime('%Y-%m-%d')} on this machine; `make bench` took "
        f"{(time.time() - t0) / 60:.1f} min.\n\n" + md
    )
    print(md)


if __name__ == "__main__":
    main()
