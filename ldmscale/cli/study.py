"""`ldmscale study run|report` and `ldmscale plan`: the scaling study end to end."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ldmscale.cli.main import FINITE
from ldmscale.cli.options import Verb
from ldmscale.errors import UserError
from ldmscale.names import Kind, backbone_of, task_of


def _study_of(out: Path, study_file: Path | None):
    from ldmscale.study.spec import load_study

    if study_file:
        return load_study(study_file)
    saved = out / "study.toml"
    if not saved.exists():
        raise UserError(f"{out} is not a study folder (no study.toml); run `ldmscale study run STUDY.toml --out {out}`")
    return load_study(saved)


@click.group("study")
def study_group() -> None:
    """Run a scaling study (sizes x training x samplers x steps x guidance) and report on it.

    \b
    Examples:
      ldmscale study run studies/demo.toml --out demo
      ldmscale study report demo
    """


@study_group.command(
    "run",
    epilog="""
\b
Examples:
  ldmscale study run studies/demo.toml --out demo --jobs 2
  ldmscale study run studies/demo.toml --out demo --dry-run
  ldmscale study run studies/paper.toml --out /scratch/paper --executor slurm
\b
Running it again skips finished jobs; a killed study loses at most the job in flight.
""",
)
@click.argument("study_file", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Study folder (created, or resumed: finished jobs are skipped).",
)
@click.option("--dry-run", is_flag=True, help="List the jobs and their estimated cost, run nothing.")
@click.option(
    "--executor",
    default="local",
    type=click.Choice(["local", "slurm", "submitit-local"]),
    show_default=True,
    help="local (this process), slurm or submitit-local (through submitit, in dependency waves).",
)
@click.option(
    *("--jobs", "-j", "parallel"),
    default=1,
    type=click.IntRange(1, 64),
    show_default=True,
    help="With the local executor: a wave's training jobs run N at a time in their own processes, each with its share "
    "of the threads; evaluations one at a time with all (on 2 cores, -j 2 trains 1.6-1.9x the images a second: "
    "bench/side_by_side.py).",
)
@click.option("--report/--no-report", default=True, show_default=True, help="Write the report when done.")
def study_run(study_file, out, dry_run, executor, parallel, report) -> None:
    """Train every size and evaluate every grid point of a study file."""
    from ldmscale.study.jobs import job_done, run_jobs
    from ldmscale.study.plan import plan_jobs, sample_size_warnings
    from ldmscale.study.results import study_results, write_csv
    from ldmscale.study.spec import load_study, read_toml, resolved_toml

    if parallel > 1 and executor != "local":
        raise UserError(f"--jobs {parallel} is for the local executor; {executor} runs each wave side by side already")
    study = load_study(study_file)
    saved, resolved = out / "study.toml", resolved_toml(study_file)
    if saved.exists() and read_toml(saved) != read_toml(Path(study_file)):
        click.echo(f"note: {saved} differs from {study_file}; jobs whose resolved config changed will run again")
    jobs = plan_jobs(study, out, progress=False)
    warnings = [f"warning: {w}" for w in sample_size_warnings(study)]
    if dry_run:
        for w in warnings:
            click.echo(w, err=True)
        total = 0.0
        for j in jobs:
            state = "done" if job_done(out, j) else "todo"
            total += 0 if state == "done" else j.cost_flops
            cost = f"{j.cost_flops:.3e}" if j.cost_flops else "-"
            click.echo(f"{state:4}  {j.kind:11} {cost:>10} FLOPs  {j.name}")
        click.echo(
            f"{len(jobs)} jobs, {sum(not job_done(out, j) for j in jobs)} to run, "
            f"~{total:.3e} FLOPs to do (multiply-add = 2)"
        )
        return
    from ldmscale.io import DirLock, atomic_write_text, check_output

    if executor != "local":
        from ldmscale.study.cluster import preflight

        preflight(study.cluster, jobs, executor)
    check_output(out, "study")
    for w in warnings:  # after the --out check, so a refused folder is still one line
        click.echo(w, err=True)
    with DirLock(out, "study"):
        if not saved.exists() or read_toml(saved) != read_toml(Path(study_file)):
            atomic_write_text(saved, resolved)
        if executor == "local":
            result = run_jobs(out, jobs, log=click.echo, parallel=parallel)
        else:
            from ldmscale.study.cluster import run_submitit

            result = run_submitit(out, jobs, executor, log=click.echo, parameters=study.cluster)
        rows, stale = study_results(out, study)
        write_csv(rows, out / "results.csv")
        click.echo(
            f"{result['ran']} jobs run in {result['seconds']:.0f} s; {len(rows)} results in {out / 'results.csv'}"
            + (f" ({stale} results of jobs no longer in the study left out, kept on disk)" if stale else "")
        )
        if report and rows:
            _report(out, study)


def _report(out: Path, study) -> None:
    from ldmscale.analysis.report import build_report
    from ldmscale.analysis.scaling import describe_choice

    overlay = study.name.startswith("paper")
    r = build_report(out, study, overlay_paper=overlay)
    click.echo(f"report: {r['html']}")
    click.echo(f"in one line: {r['analysis']['headline']}")
    metric = r["analysis"]["metric"]
    click.echo(
        f"\nthe paper's claims at this budget (evidence in the report; the standard errors hold "
        f"{r['analysis']['noise']}):"
    )
    for c in r["analysis"]["claims"]:
        click.echo(f"  {c['claim']}  {c['verdict']:<14} {c['statement']}")
        if c["verdict"] != "holds" and c["reason"]:
            click.echo(f"     {'' if c['verdict'] == 'not measured' else 'why not: '}{c['reason']}")
    if r["analysis"].get("agreement"):
        ag = r["analysis"]["agreement"]
        click.echo(
            f"metric check: {ag['a']} and {ag['b']} rank {ag['points']} final configurations with Spearman "
            f"{ag['spearman']:.2f}"
        )
    click.echo("")
    for p in r["plans"]:
        click.echo(
            f"plan for executed-cost budget {p['budget']:.3g} ({p['why']}): {describe_choice(p['best'], metric)}"
        )
        click.echo(f"    runner-up: {describe_choice(p['runner_up'], metric)}; {p['note']}")
    for bb, p in (r["analysis"].get("training_plans") or {}).items():
        if p.get("n_opt"):
            click.echo(
                f"plan for training budget {p['budget']:.3g} FLOPs, {bb}: compute-optimal size {p['n_opt']:.3g} "
                f"parameters, nearest trained {p['size']} for {p['images']:,} images, predicted validation loss "
                f"{p['loss']:.4f}"
            )
        else:
            click.echo(f"plan for training budget {p['budget']:.3g} FLOPs, {bb}: not predicted ({p['why']})")


@study_group.command(
    "report",
    cls=Verb,
    aliases={"--study": ["--study-file"]},
    epilog="""
\b
Example:
  ldmscale study report demo
""",
)
@click.argument("out", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--study-file", "study_file", type=click.Path(path_type=Path), help="Study file (default: OUT/study.toml)."
)
def study_report(out, study_file) -> None:
    """Figures (PNG, SVG), a Markdown summary and a self-contained HTML report of a study."""
    if not out.is_dir():
        raise UserError(f"study folder not found: {out}")
    _report(out, _study_of(out, study_file))


@study_group.command(
    "calibrate",
    epilog="""
\b
Examples:
  ldmscale study calibrate demo
  ldmscale study calibrate demo --seeds 3 --studies 1000 --format json
  ldmscale study calibrate demo --profile-out profile.json
""",
)
@click.argument("out", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--studies", default=500, show_default=True, type=click.IntRange(10, 100_000), help="Simulated studies per world."
)
@click.option(
    "--seeds",
    type=click.IntRange(1, 100),
    default=None,
    help="Training seeds per simulated study (default: as many as the study has).",
)
@click.option(
    "--profile-out",
    type=click.Path(path_type=Path),
    help="Also write the study's profile (per configuration: mean, evaluation error, training-seed spread) as JSON.",
)
@click.option(
    "--format",
    "fmt",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="Print the rates as text or JSON.",
)
def study_calibrate(out, studies, seeds, profile_out, fmt) -> None:
    """How often the claims' rules say "holds" on this study's grid and noise: where size has no effect at matched
    cost (false "holds"), and where the effects are the ones measured (power)."""
    from ldmscale.analysis import calibrate
    from ldmscale.analysis.report import task_metrics
    from ldmscale.io import atomic_write_json
    from ldmscale.study.results import study_results

    study = _study_of(out, None)
    ev = study.eval
    rows, _ = study_results(out, study)
    if not rows:
        raise UserError(f"no evaluation results in {out}")
    prof = calibrate.profile(rows, ev.primary)
    if profile_out:
        atomic_write_json(profile_out, prof)
    n = seeds or len({r.get("train_seed") or 0 for r in rows})
    res = calibrate.summary(
        prof,
        ev.primary,
        (ev.curve_sampler, ev.curve_steps, ev.curve_guidance),
        n,
        studies,
        task_metrics=task_metrics(ev.primary),
    )
    if fmt == "json":
        click.echo(json.dumps({"seeds": n, "studies": studies, "claims": res}, indent=2))
        return
    click.echo(
        f"{studies} simulated studies per world, {n} training seed{'s' * (n > 1)} each, on {out}'s grid and noise"
    )
    click.echo("claim  false 'holds' (size has no effect)  'holds' at the measured effects")
    for c, r in res.items():
        click.echo(f"  {c}    {100 * r['null_holds']:5.1f}%                             {100 * r['power_holds']:5.1f}%")


@click.command(
    "plan",
    cls=Verb,
    aliases={"--study": [], "--json": ["--format", "json"]},
    epilog="""
\b
Examples:
  ldmscale plan demo --budget 0.5
  ldmscale plan demo --budget-ms 40 --metric caption-accuracy --format json
  ldmscale plan backbones --train-flops 2e13      # an isoflop study: the compute-optimal size per backbone
""",
)
@click.argument("out", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--budget", type=FINITE, help="Sampling budget in the units of --cost.")
@click.option(
    "--cost",
    "cost_axis",
    default="executed",
    show_default=True,
    type=click.Choice(["executed", "paper"]),
    help="executed: normalized cost x model calls per image, as each sampler and guidance run (Heun's two "
    "calls a step, guidance's two, an LCM step's one); paper: normalized cost x steps (the paper's axis).",
)
@click.option("--budget-ms", type=FINITE, help="Budget in milliseconds per image, as measured on this hardware.")
@click.option(
    "--train-flops",
    type=FINITE,
    help="A training budget in FLOPs (isoflop studies): the compute-optimal size, "
    "its images, predicted loss and quality, per backbone.",
)
@click.option("--metric", default=None, help="Metric to optimize (default: the study's primary metric).")
@click.option("--sampler", default=None, help="Only consider this sampler.")
@click.option(
    "--format",
    "fmt",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="Print the answer as text or JSON.",
)
def plan_cmd(out, budget, budget_ms, train_flops, cost_axis, metric, sampler, fmt) -> None:
    """The best (size, sampler, steps, guidance) within a sampling budget, and the runner-up."""
    from ldmscale.analysis.scaling import (
        best_over_guidance,
        describe_choice,
        final_rows,
        latency_note,
        plan,
        plan_note,
        with_costs,
    )
    from ldmscale.analysis.stats import aggregate_seeds
    from ldmscale.study.results import study_results

    if sum(x is not None for x in (budget, budget_ms, train_flops)) != 1:
        raise UserError("give exactly one of --budget (normalized-cost units), --budget-ms or --train-flops")
    study = _study_of(out, None)
    if train_flops is not None:
        return _plan_training(out, study, train_flops, metric or study.eval.primary, fmt)
    metric = metric or study.eval.primary
    rows = [r for r in study_results(out, study)[0] if task_of(r) == Kind.TEXT_TO_IMAGE and not r.get("tag")]
    if not rows:
        raise UserError(f"no evaluation results in {out}")
    if not any(r.get(metric) is not None for r in rows):
        raise UserError(f"no results carry the metric {metric!r}")
    if sampler:
        rows = [r for r in rows if r["sampler"] == sampler]
    best = best_over_guidance(final_rows(with_costs(aggregate_seeds(rows))), metric)
    cost = (
        {"executed": "executed_cost", "paper": "sampling_cost"}[cost_axis]
        if budget is not None
        else "latency_ms_per_image"
    )
    p = plan(best, budget if budget is not None else budget_ms, metric, cost)
    if budget_ms is not None:
        p["latency_conditions"] = latency_note(rows)
    if fmt == "json":
        click.echo(json.dumps(p, indent=2))
        return
    unit = {
        "executed_cost": "executed-cost units (normalized cost x model calls)",
        "sampling_cost": "sampling-cost units (normalized cost x steps)",
        "latency_ms_per_image": "ms/image",
    }[cost]
    if p["best"] is None:
        click.echo(p["message"])
        return
    click.echo(f"budget {p['budget']:g} {unit}: {describe_choice(p['best'], metric)}")
    click.echo(f"runner-up: {describe_choice(p['runner_up'], metric)}")
    click.echo(plan_note(p, metric))
    if budget_ms is not None:
        click.echo(p["latency_conditions"])


def _plan_training(out, study, train_flops: float, metric: str, fmt: str) -> None:
    from ldmscale.analysis.isoflop import plan_training, study_isoflop
    from ldmscale.analysis.scaling import final_rows
    from ldmscale.study.results import study_results

    if study.train.budget != "isoflop":
        raise UserError(
            f'--train-flops reads an isoflop study ([train] budget = "isoflop"); {out} is budget = '
            f"{study.train.budget!r}"
        )
    if not train_flops > 0:
        raise UserError(f"--train-flops must be positive, got {train_flops:g}")
    rows = [r for r in study_results(out, study)[0] if task_of(r) == Kind.TEXT_TO_IMAGE]
    ev = study.eval
    iso = study_isoflop(
        rows, list(study.train.budgets), metric, (ev.curve_sampler, ev.curve_steps, ev.curve_guidance), bootstrap=200
    )
    answers = {}
    for bb, res in iso.items():
        sizes = {
            r["size"]: {"size": r["size"], "params": int(r["params"]), "forward_flops": float(r["gflops"]) * 1e9}
            for r in final_rows(rows)
            if backbone_of(r) == bb
        }
        answers[bb] = plan_training(res, train_flops, list(sizes.values()), metric)
    if not answers:
        raise UserError(f"no validation losses in {out}: its runs predate validation loss, or nothing has run")
    if fmt == "json":
        click.echo(json.dumps(answers, indent=2))
        return
    for bb, p in answers.items():
        if "n_opt" not in p:
            click.echo(f"{bb}: not predicted: {p['why']}")
            continue
        q = f", {metric} ~ {p['quality']:.3g}" if p.get("quality") is not None else ""
        lo, hi = p["n_opt_interval"]
        click.echo(
            f"{bb}: train {p['size']} ({p['size_params']:,} parameters) on {p['images']:,} images; for "
            f"{train_flops:.3g} training FLOPs the compute-optimal size is {p['n_opt']:.3g} parameters (90% interval "
            f"{lo:.3g}-{hi:.3g}), the trained size nearest to it {p['size']}; predicted validation loss "
            f"{p['loss']:.4f} ({p['loss_interval'][0]:.4f}-{p['loss_interval'][1]:.4f}){q}"
        )


COMMANDS = [study_group, plan_cmd]
