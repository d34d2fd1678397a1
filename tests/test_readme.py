"""A newcomer's walk-through of the README: every command in its code blocks runs here, in order, in one folder, at
a tiny size where the README's is hours of CPU (SHRINK says exactly what changes), and the printed output it shows
is what the command prints. A command that cannot run on a 2-core CPU without a network is named in ELSEWHERE with
where it is exercised instead, so that a README example can no longer drift unseen."""

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
from conftest import ROOT, run_cli
from PIL import Image

README = (ROOT / "README.md").read_text()

# README command (its first words) -> (text replaced, replacement) or extra arguments, to run at a tiny size
SHRINK = {
    "ldmscale autoencoder train": ["--set", "steps=3", "--set", "max_images=64"],
    "ldmscale data prepare": ["--limit", "64"],
    "ldmscale classifier train": ["--set", "epochs=1", "--set", "width=4"],
    "ldmscale train": [("--images 40000", "--images 16"), ("--images 20000", "--images 16")],
    # 8 images; no bootstrap: each replica of a 2048-dimensional FID costs 5 s of eigendecompositions here
    "ldmscale eval": [
        ("--num-images 1000", "--num-images 8"),
        ("--num-images 500", "--num-images 8"),
        "--bootstrap",
        "0",
    ],
}
# commands that need what this machine has not, and where the suite runs them instead
ELSEWHERE = {
    "make demo": "about 20 minutes; `make demo` itself (docs/demo.md has its measured run)",
    "make test": "this suite",
    "ldmscale plan backbones --train-flops 2e13": "an IsoFLOP study: test_backbones.py::"
    "test_isoflop_study_trains_every_size_to_each_budget_and_reports_per_backbone",
    "ldmscale train --cache cache/laion": "a LAION cache and GPUs; test_devices.py runs train under accelerate",
    "accelerate launch": "8 GPUs or 4 nodes; test_devices.py runs DDP and FSDP with 2 CPU processes",
}


def readme_commands() -> list[tuple[str, str]]:
    """(language, command) for every command of the README's code blocks, continuation lines joined."""
    out = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", README, re.S | re.M):
        if lang == "python":
            out.append(("python", body))
        elif lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    out.append(("bash", shlex.join(words)))
        elif body.startswith("$ "):  # a block that shows a command and what it prints
            out.append(("output", body))
    return out


def _elsewhere(cmd: str) -> str | None:
    return next((why for start, why in ELSEWHERE.items() if cmd.startswith(start)), None)


def _shrunk(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    for start, changes in SHRINK.items():
        if cmd.startswith(start + " "):
            for c in changes:
                if isinstance(c, tuple):
                    cmd = cmd.replace(*c)
                    words = shlex.split(cmd)
                else:
                    words.append(c)
    return words[1:]


def _photos(root: Path, n: int = 30) -> None:
    """The own-data section's folder: coloured shapes with a caption each (every 10th held out: 3 for validation)."""
    from fixtures import shape_image

    root.mkdir()
    rows = []
    for i in range(n):
        arr = np.asarray(shape_image(i, 32)).copy()
        arr[..., 1 + i % 2] = 0
        Image.fromarray(arr).save(root / f"cat{i}.png")
        rows.append({"file_name": f"cat{i}.png", "text": "a yellow shape" if i % 2 else "a magenta shape"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_every_readme_command_runs_or_says_where_it_is_run(tmp_path, monkeypatch, tiny_cache, tiny_classifier):
    from test_integrity_study import STUDY

    monkeypatch.chdir(tmp_path)
    _photos(tmp_path / "photos")
    (tmp_path / "tiny.toml").write_text(STUDY.format(cache=tiny_cache, classifier=tiny_classifier))
    run_cli(
        "study", "run", "tiny.toml", "--out", "demo", "--no-report", check=True, cwd=tmp_path
    )  # `demo`, at a tiny size
    ran, skipped = [], []
    for lang, cmd in readme_commands():
        if lang == "python":  # the export's loading lines, after `ldmscale export` wrote export/c32
            namespace: dict = {}
            exec(cmd.replace("num_inference_steps=8", "num_inference_steps=2"), namespace)
            assert namespace["images"][0].size == (32, 32)
            ran.append("python")
        elif lang == "output":
            command, *shown = cmd.splitlines()
            if _elsewhere(command[2:]):
                skipped.append(command[2:])
                continue
            proc = run_cli(*shlex.split(command[2:])[1:], check=True, cwd=tmp_path)
            assert proc.stdout.splitlines() == shown, command  # the README shows what the command prints
            ran.append(command)
        elif _elsewhere(cmd):
            skipped.append(cmd)
        else:
            proc = run_cli(*_shrunk(cmd), cwd=tmp_path)
            assert proc.returncode == 0, f"README command failed: {cmd}\n{proc.stderr[-2000:]}"
            ran.append(cmd)
    assert len(ran) == 20 and "python" in ran, ran
    # every exception is still in the README, and nothing else is skipped
    assert {next(s for s in ELSEWHERE if c.startswith(s)) for c in skipped} == set(ELSEWHERE)
    assert Image.open("samples/ddim-p00-000.png").mode == "L" and (tmp_path / "runs/photos-c16/eval").is_dir()
    result = json.loads(next((tmp_path / "runs/photos-c16/eval").glob("*.json")).read_text())
    assert result["reference"]["spec"] == "folder:photos:validation" and "fid" in result["metrics"]
    shutil.rmtree(tmp_path / "runs")
