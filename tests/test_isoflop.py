"""The IsoFLOP analysis on synthetic tables with known laws: the fit recovers the exponents, its bootstrap interval
covers them under noise, and a held-out budget is predicted within the interval."""

import math

import numpy as np
import pytest

from ldmscale.analysis.isoflop import fit_parabola, isoflop, loss_to_metric

BUDGETS = [1e12, 1e13, 1e14]
SIZES = [10**x for x in np.arange(7.5, 11.51, 0.5)]
A_TRUE, B_TRUE = 0.5, 0.1  # N_opt = 1e3 C^0.5, L_opt = 50 C^-0.1


def n_opt(c):
    return 1e3 * c**A_TRUE


def l_opt(c):
    return 50 * c**-B_TRUE


def table(noise=0.0, repeats=1, seed=0, budgets=BUDGETS):
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        for n in SIZES:
            for _ in range(repeats):
                loss = l_opt(c) + 0.05 * (math.log10(n) - math.log10(n_opt(c))) ** 2
                rows.append({"budget": c, "params": n, "val_loss": loss + noise * rng.standard_normal()})
    return rows


def test_exact_table_recovers_the_laws():
    fit = isoflop(table(), bootstrap=20)
    assert [p.ok for p in fit.parabolas] == [True, True, True]
    for p, c in zip(fit.parabolas, BUDGETS):
        assert p.n_opt == pytest.approx(n_opt(c), rel=1e-9)
        assert p.loss_opt == pytest.approx(l_opt(c), rel=1e-9)
    assert fit.n_opt.a == pytest.approx(A_TRUE, abs=1e-9)
    assert fit.loss_opt.a == pytest.approx(-B_TRUE, abs=1e-9)
    assert fit.n_opt(1e16) == pytest.approx(n_opt(1e16), rel=1e-6)


def test_noisy_table_interval_covers_the_truth_and_predicts_a_held_out_budget():
    fit = isoflop(table(noise=0.01, repeats=3, seed=1), bootstrap=300)
    lo, hi = fit.n_opt.interval_a
    assert lo < A_TRUE < hi and hi - lo < 0.3
    lo, hi = fit.loss_opt.interval_a
    assert lo < -B_TRUE < hi
    held_out = 1e15
    p = fit.predict(held_out)
    measured = isoflop(table(noise=0.01, repeats=3, seed=2, budgets=[held_out]), bootstrap=0).parabolas[0]
    assert p["n_opt_interval"][0] < measured.n_opt < p["n_opt_interval"][1]
    assert p["loss_interval"][0] < measured.loss_opt < p["loss_interval"][1]


def test_an_optimum_outside_the_sizes_is_not_extrapolated():
    rows = [r for r in table() if r["params"] < 0.9 * n_opt(r["budget"])]  # only sizes below the optimum
    fit = isoflop(rows, bootstrap=0)
    assert not any(p.ok for p in fit.parabolas) and fit.n_opt is None
    assert "beyond the largest size" in fit.parabolas[0].why and "2 or more" in fit.why
    assert fit.predict(1e15)["why"] == fit.why
    assert not fit_parabola(1.0, [1, 10], [1.0, 2.0]).ok  # two sizes: no parabola


def test_loss_reads_as_quality():
    rows = [{"val_loss": v, "fd": 10 + 40 * math.log10(v)} for v in (0.2, 0.3, 0.5, 0.8)]
    rel = loss_to_metric(rows, "fd")
    assert rel["spearman"] == pytest.approx(1.0) and rel["slope"] == pytest.approx(40.0)
    assert rel["read"](0.4) == pytest.approx(10 + 40 * math.log10(0.4))
    assert loss_to_metric(rows[:2], "fd") is None


def test_one_row_per_size_bootstraps_from_the_standard_errors():
    """The usual table (one run per size and budget): the interval comes from each loss's standard error, and
    the 90% interval covers the true exponent in most of 20 noisy tables."""
    covered, widths = 0, []
    for seed in range(20):
        rows = [r | {"val_loss_std": 0.01} for r in table(noise=0.01, seed=seed)]
        lo, hi = isoflop(rows, bootstrap=200, seed=seed).n_opt.interval_a
        covered += lo < A_TRUE < hi
        widths.append(hi - lo)
    assert covered >= 15 and min(widths) > 0.01  # a real width, not a degenerate resampling of distinct rows


def test_the_share_of_replicates_with_an_interior_optimum_and_an_edge_says_which_sizes_to_add():
    from ldmscale.analysis.isoflop import isoflop

    params = [2e5, 5e5, 1e6, 2e6, 5e6]
    rows = []
    for c, opt in ((1e11, 1e6), (1e12, 1e9)):  # an interior optimum, then one far beyond the largest size
        for n in params:
            x = math.log10(n) - math.log10(opt)
            rows.append({"budget": c, "params": n, "val_loss": 0.1 + 0.02 * x * x, "val_loss_std": 0.002})
    fit = isoflop(rows, bootstrap=100)
    assert fit.interior[1e11] >= 0.95 and fit.interior[1e12] == 0.0
    assert fit.parabolas[1].why == "the optimum lies beyond the largest size trained at this budget: add larger sizes"
    assert fit.n_opt is None and "an interior optimum at 1 of 2 budgets" in fit.why


def test_the_held_out_budget_is_inside_the_prediction_or_a_miss():
    from ldmscale.analysis.isoflop import Parabola, held_out_outcome

    inside = Parabola(1e12, 1.0, -12.0, 40.0, 5, 5.0, 7.0)  # minimum at log10 N = 6
    pred = {"n_opt": 9e5, "n_opt_interval": (5e5, 2e6)}
    assert held_out_outcome(pred, inside) == "inside the prediction: N_opt 1e+06 in [5e+05, 2e+06]"
    assert held_out_outcome(pred | {"n_opt_interval": (1e5, 5e5)}, inside).startswith("a miss: N_opt 1e+06 outside")
    edge = Parabola(1e12, 1.0, -16.0, 40.0, 5, 5.0, 7.0)  # minimum at 8: beyond the largest size
    assert held_out_outcome(pred, edge).startswith("not measured: the optimum lies beyond the largest size")
    assert held_out_outcome({"why": "too few"}, inside) == "not predicted: too few"
    # the loss is judged beside the size, as in make isoflop (docs/isoflop.md): N_opt inside, the loss a miss
    # (36 - 72 + 40 = 4 at the minimum)
    both = pred | {"loss": 30.0, "loss_interval": (29.0, 31.0)}
    assert held_out_outcome(both, inside) == (
        "inside the prediction: N_opt 1e+06 in [5e+05, 2e+06]; "
        "a miss: loss 4.0000 outside the predicted [29.0000, 31.0000]"
    )


def test_a_size_whose_loss_rose_with_compute_is_named():
    from ldmscale.analysis.isoflop import rising

    # the first `make isoflop` with per-size lr 1e-2 and AdamW beta2 0.999: c12's constant-lr run diverged at step
    # 230, so its 1.2e12 branch scored 1.0074 while c8 only stalled (0.1562 -> 0.1566, within its error)
    runs = {"c8": [(0.2869, 0.0132), (0.1921, 0.0103), (0.1562, 0.0085), (0.1566, 0.0080)]}
    runs["c12"] = [(0.2927, 0.0136), (0.2209, 0.0116), (0.1672, 0.0091), (1.0074, 0.0060)]
    pts = [
        {"size": s, "budget": b, "val_loss": loss, "val_loss_std": se}
        for s, rows in runs.items()
        for b, (loss, se) in zip([1.5e11, 3e11, 6e11, 1.2e12], rows)
    ]
    assert rising(pts) == [
        "c12 at 1.2e+12 FLOPs: loss 1.0074, above its 0.1672 at 6e+11 by 77 standard errors (diverged?)"
    ]
