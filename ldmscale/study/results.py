"""A study's results table: one flat row per evaluation result of a job the study plans (results.csv), read back
from the eval results on disk, or from results.csv alone when the runs are elsewhere."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ldmscale.integrity import note, read_json
from ldmscale.io import atomic_write_text
from ldmscale.names import Kind
from ldmscale.study.plan import plan_jobs
from ldmscale.study.spec import Study


def study_results(out: Path, study: Study) -> tuple[list[dict], int]:
    """The results table of a study as it is now: a row per eval result of a job it plans. Results of jobs no longer
    in it (a setting changed) stay on disk but are left out; how many is the second value."""
    out = Path(out).resolve()
    wanted = {
        _result_key(
            Path(j.config["run"]).relative_to(out),
            _relative({k: v for k, v in j.config.items() if k != "run"}, str(out)),
        )
        for j in plan_jobs(study, out)
        if j.kind in ("eval", "task-eval")
    }
    rows = collect(out)
    if not rows and (out / "results.csv").exists():  # the runs are elsewhere (or gone): the table they made stays
        note(f"no evaluation results under {out}/runs: reading {out}/results.csv as written by the last study run")
        return read_csv(out / "results.csv"), 0
    mine = [r for r in rows if r.pop("_key") in wanted]
    return mine, len(rows) - len(mine)


def _result_key(run: Path, config: dict) -> str:
    return f"{run}:{json.dumps(config, sort_keys=True)}"


def _relative(config: dict, root: str) -> dict:
    """The config with paths inside the study folder written relative to it (a moved study keeps its results)."""
    return {
        k: "{study}" + v[len(root) :] if isinstance(v, str) and (v == root or v.startswith(root + "/")) else v
        for k, v in config.items()
    }


def collect(out: Path) -> list[dict]:
    """One flat row per eval result under the folder (metrics as columns), whichever job wrote it."""
    rows, seeds = [], {}
    out = Path(out)
    for path in sorted(out.glob("**/eval/*.json")):
        try:
            r = read_json(path, "eval result")
        except ValueError as e:  # the next `study run` evaluates it again
            note(f"{e}; left out of the results (the next `ldmscale study run` evaluates it again)")
            continue
        row = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
        row.update(r.get("metrics", {}))
        row["file"] = str(path.relative_to(out))
        row.setdefault("task", Kind.TEXT_TO_IMAGE)
        if row.get("train_seed") is None:  # results written before seeds were recorded: the run's config says
            run = path.parent.parent
            if run not in seeds:
                cfg = run / "config.json"
                seeds[run] = int(json.loads(cfg.read_text())["train"].get("seed", 0)) if cfg.exists() else 0
            row["train_seed"] = seeds[run]
        rel = path.parent.parent.relative_to(out)
        root = str(r.get("run", ""))  # where the study folder was when this result was written
        root = root[: -len(str(rel)) - 1] if root.endswith("/" + str(rel)) else str(out.resolve())
        row["_key"] = _result_key(rel, _relative(r.get("config", {}), root))
        if row.get("executed_cost") is None and row.get("model_calls_per_image") is not None:
            row["executed_cost"] = float(row["norm_cost"]) * float(row["model_calls_per_image"])
        rows.append(row)
    return rows


def read_csv(path: Path) -> list[dict]:
    """results.csv back as rows: empty cells None, numbers and booleans as written by write_csv."""

    def value(v: str):
        if v == "":
            return None
        if v in ("True", "False"):
            return v == "True"
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]


def write_csv(rows: list[dict], path: Path) -> None:

    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
