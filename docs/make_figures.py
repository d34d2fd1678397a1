"""The downstream and distillation figures under docs/ (issues 7 and 8), from trained runs.

    python docs/make_figures.py sr --runs runs/c16-sr runs/c32-sr
    python docs/make_figures.py lcm --pairs runs/c16:runs/c16-lcm-w3 runs/c32:runs/c32-lcm-w3
    python docs/make_figures.py dreambooth --init runs/c32 --run runs/c32-db2 --classifier runs/classifier

Each writes a labelled PNG under docs/ and prints the numbers it shows. The metrics in the README come
from `ldmscale eval` (eval/*.json of each run); these figures only show what the samples look like.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldmscale.data.degrade import degrade, resize  # noqa: E402
from ldmscale.data.sources import ANIMAL_CLASSES, load_images  # noqa: E402
from ldmscale.diffusion.generate import generate, load_run  # noqa: E402
from ldmscale.eval.metrics import subject_fidelity, subject_ssim  # noqa: E402
from ldmscale.eval.reference import parse_reference  # noqa: E402

DOCS = Path(__file__).parent


def table(columns: list[torch.Tensor], titles: list[str], out: Path, row_labels: list[str] | None = None) -> None:
    """A labelled image table: one column per tensor of uint8 images [N,1|3,H,W]."""
    n, k = len(columns[0]), len(columns)
    fig, axes = plt.subplots(n, k, figsize=(1.1 * k + (0.9 if row_labels else 0), 1.1 * n), squeeze=False)
    for j, (col, title) in enumerate(zip(columns, titles)):
        for i in range(n):
            ax = axes[i][j]
            img = col[i].numpy()
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
            if j == 0 and row_labels:
                ax.set_ylabel(row_labels[i], fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def sr_figure(runs: list[str], n: int, steps: int) -> None:
    models = [load_run(r) for r in runs]
    cfg = models[0].config
    res, ch = int(cfg["data"]["resolution"]), int(cfg["data"]["channels"])
    src, split = parse_reference("animal-mnist:validation")
    hr, caps, _ = load_images(src, split, res, ch, 200)
    pick = np.linspace(0, len(hr) - 1, n).astype(int)  # spread over the (shuffled) split
    hr = torch.as_tensor(hr[pick])
    caps = [caps[i] for i in pick]
    seeds = list(range(n))
    scale, kind = int(cfg["task"]["scale"]), cfg["task"]["degradation"]
    lr = degrade(hr, scale, kind, seeds)
    cols, titles = [resize(lr, res, "nearest"), resize(lr, res, "bicubic")], [f"input {res // scale}px", "bicubic"]
    for _r, m in zip(runs, models):
        from ldmscale.tasks.superres import upscale

        out, _ = upscale(m, lr, caps, seeds, "ddim", steps, 1.0)
        cols.append(out)
        titles.append(f"{m.config['train']['size']} SR")
    cols.append(hr), titles.append(f"original {res}px")
    table(cols, titles, DOCS / "superres.png")


def lcm_figure(pairs: list[str], steps: int, guidance: float) -> None:
    prompts = [f"a {c}" for c in ANIMAL_CLASSES]
    seeds = list(range(len(prompts)))
    cols, titles = [], []
    for pair in pairs:
        teacher, student = pair.split(":")
        t, s = load_run(teacher), load_run(student)
        size = t.config["train"]["size"]
        cols.append(generate(t, prompts, "ddim", steps, guidance, seeds)[0])
        titles.append(f"{size} teacher\nDDIM {steps}")
        cols.append(generate(s, prompts, "lcm", steps, guidance, seeds)[0])
        titles.append(f"{size} LCM\n{steps} steps")
        cols.append(generate(t, prompts, "ddim", 50, guidance, seeds)[0])
        titles.append(f"{size} teacher\nDDIM 50")
    table(cols, titles, DOCS / "distill_lcm.png", row_labels=prompts)


def dreambooth_figure(init: str, run: str, classifier: str, n: int, steps: int, guidance: float, n_stats: int) -> None:
    from ldmscale.eval.features import ClassifierFeatures
    from ldmscale.tasks.dreambooth import subject_images

    base, db = load_run(init), load_run(run)
    task = db.config["task"]
    res, ch = int(db.config["data"]["resolution"]), int(db.config["data"]["channels"])
    subject = subject_images(task["subject"], res, ch)
    seeds = list(range(max(n, n_stats)))  # the grid shows the first n; the numbers use all of them
    before = generate(base, [task["class_prompt"]] * len(seeds), "ddim", steps, guidance, seeds)[0]
    after_id = generate(db, [task["instance_prompt"]] * len(seeds), "ddim", steps, guidance, seeds)[0]
    after_cls = generate(db, [task["class_prompt"]] * len(seeds), "ddim", steps, guidance, seeds)[0]
    feat = ClassifierFeatures(classifier)
    subject_feats = feat(subject)

    def fidelity(images):
        return {"subject-fidelity": round(subject_fidelity(feat(images), subject_feats)[0], 3),
                "subject-ssim": round(subject_ssim(images, subject)[0], 3), "images": len(images)}

    label = ANIMAL_CLASSES.index(task["class_prompt"].split()[-1])
    src, split = parse_reference("animal-mnist:validation")
    real, _, labels = load_images(src, split, res, ch, 1000)
    same_class = torch.as_tensor(real[np.asarray(labels) == label])
    numbers = {"subject (its own views)": fidelity(subject), "real images of the class": fidelity(same_class),
               f"initial model, '{task['class_prompt']}'": fidelity(before),
               f"DreamBooth model, '{task['instance_prompt']}'": fidelity(after_id),
               f"DreamBooth model, '{task['class_prompt']}'": fidelity(after_cls)}
    print(json.dumps(numbers, indent=1))
    reps = (n + len(subject) - 1) // len(subject)
    cols = [subject.repeat(reps, 1, 1, 1)[:n], before[:n], after_id[:n], after_cls[:n]]
    titles = ["subject\n(training views)", f"initial model\n'{task['class_prompt']}'",
              f"DreamBooth\n'{task['instance_prompt']}'", f"DreamBooth\n'{task['class_prompt']}'"]
    table(cols, titles, DOCS / "dreambooth.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("sr")
    a.add_argument("--runs", nargs="+", required=True)
    a.add_argument("--n", type=int, default=8)
    a.add_argument("--steps", type=int, default=25)
    b = sub.add_parser("lcm")
    b.add_argument("--pairs", nargs="+", required=True, help="TEACHER:STUDENT run pairs")
    b.add_argument("--steps", type=int, default=4)
    b.add_argument("--guidance", type=float, default=3.0)
    c = sub.add_parser("dreambooth")
    c.add_argument("--init", required=True)
    c.add_argument("--run", required=True)
    c.add_argument("--classifier", required=True)
    c.add_argument("--n", type=int, default=8)
    c.add_argument("--steps", type=int, default=25)
    c.add_argument("--guidance", type=float, default=3.0)
    c.add_argument("--n-stats", type=int, default=64, help="images behind the printed numbers")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.cmd == "sr":
        sr_figure(args.runs, args.n, args.steps)
    elif args.cmd == "lcm":
        lcm_figure(args.pairs, args.steps, args.guidance)
    else:
        dreambooth_figure(args.init, args.run, args.classifier, args.n, args.steps, args.guidance, args.n_stats)


if __name__ == "__main__":
    main()
