import numpy as np
import pytest

from ldmscale.analysis import scaling as analysis


def test_power_law_fit_recovers_known_exponent_with_noise():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e12, 1e16, 12)
    a, b, c = 4e3, 0.3, 5.0
    y = a * x**-b + c
    y_noisy = y * (1 + 0.01 * rng.normal(size=len(x)))
    fit = analysis.fit_power_law(x, y_noisy, boot=100)
    assert fit.b == pytest.approx(b, rel=0.15)
    assert fit.c == pytest.approx(c, abs=0.5)
    assert fit.ci["b"][0] <= b <= fit.ci["b"][1]
    assert np.allclose(fit(x), y, rtol=0.03)
    exact = analysis.fit_power_law(x, y, boot=0)
    assert exact.b == pytest.approx(b, rel=1e-3) and exact.a == pytest.approx(a, rel=1e-2)


def _row(size, norm_cost, sampler, steps, guidance, fd, std=0.1, images=100):
    return {
        "size": size,
        "norm_cost": norm_cost,
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "sampling_cost": norm_cost * steps,
        "fd-classifier": fd,
        "fd-classifier_std": std,
        "images_seen": images,
        "latency_ms_per_image": norm_cost * steps * 10,
        "model_calls_per_image": 2 * steps,
        "checkpoint": "x",
    }


# a hand-made table: the small model is better at low budgets, the large one at high budgets
TABLE = [
    _row("small", 0.1, "ddim", 5, 2.0, 30.0),
    _row("small", 0.1, "ddim", 5, 4.0, 28.0),
    _row("small", 0.1, "ddim", 20, 2.0, 20.0),
    _row("small", 0.1, "ddim", 50, 2.0, 18.0),
    _row("large", 1.0, "ddim", 5, 2.0, 35.0),
    _row("large", 1.0, "ddim", 5, 4.0, 40.0),
    _row("large", 1.0, "ddim", 20, 2.0, 12.0),
    _row("large", 1.0, "ddim", 50, 2.0, 10.0),
]


def test_best_over_guidance_keeps_the_best_guidance():
    best = analysis.best_over_guidance(TABLE, "fd-classifier")
    assert len(best) == 6
    small5 = next(r for r in best if r["size"] == "small" and r["steps"] == 5)
    assert small5["guidance"] == 4.0 and small5["fd-classifier"] == 28.0
    large5 = next(r for r in best if r["size"] == "large" and r["steps"] == 5)
    assert large5["guidance"] == 2.0


def test_frontier_and_crossover_on_a_hand_made_table():
    best = analysis.best_over_guidance(TABLE, "fd-classifier")
    front = analysis.pareto_frontier(best, "fd-classifier")
    assert [(r["size"], r["steps"]) for r in front] == [
        ("small", 5),
        ("small", 20),
        ("small", 50),
        ("large", 20),
        ("large", 50),
    ]
    (x,) = analysis.crossovers(best, "fd-classifier")
    # at matched executed cost (2 calls a step): small 1, 4, 10; large 10, 40, 100. They meet at 10 only, where
    # small's 50 steps (18) beat large's 5 (35); the envelope rule called large's 20 steps at 40 a crossover
    assert (x["smaller"], x["larger"], x["crossover"], x["kind"]) == (
        "small",
        "large",
        None,
        "smaller wins at every budget",
    )
    assert (x["budgets_where_smaller_wins"], x["budgets"], x["range"]) == (1, 1, (10.0, 10.0))
    more = TABLE + [_row("small", 0.1, "ddim", 200, 2.0, 17.0), _row("small", 0.1, "ddim", 500, 2.0, 16.5)]
    (x,) = analysis.crossovers(analysis.best_over_guidance(more, "fd-classifier"), "fd-classifier")
    # small now reaches 100: at 40 large (20 steps, 12) beats small (200 steps, 17), and at 100 again
    assert (x["kind"], x["crossover"], x["range"]) == ("crossover", 40.0, (10.0, 100.0))


def test_crossover_edge_cases():
    only_small_better = [_row("s", 0.1, "ddim", 5, 2, 1.0), _row("l", 1.0, "ddim", 5, 2, 9.0)]
    x = analysis.crossovers(only_small_better, "fd-classifier")[0]
    assert x["crossover"] is None and x["kind"] == "no budget where both run"
    large_better = [_row("s", 0.1, "ddim", 50, 2, 9.0), _row("l", 1.0, "ddim", 5, 2, 1.0)]
    x = analysis.crossovers(large_better, "fd-classifier")[0]
    assert x["crossover"] is None and x["kind"] == "larger wins wherever both run"
    more = TABLE + [_row("small", 0.1, "ddim", 200, 2.0, 17.0), _row("small", 0.1, "ddim", 500, 2.0, 16.5)]
    higher_better = [dict(r, **{"caption-accuracy": 1 / r["fd-classifier"]}) for r in more]
    (x,) = analysis.crossovers(analysis.best_over_guidance(higher_better, "caption-accuracy"), "caption-accuracy")
    assert x["crossover"] == 40.0


def test_planner_choice_on_a_hand_made_table():
    best = analysis.best_over_guidance(TABLE, "fd-classifier")
    p = analysis.plan(best, 3.0, "fd-classifier", "sampling_cost")
    assert (p["best"]["size"], p["best"]["steps"], p["best"]["guidance"]) == ("small", 20, 2.0)
    assert p["best"]["fd-classifier_std"] == 0.1 and p["runner_up"] is None  # nothing of another size fits
    p = analysis.plan(best, 100.0, "fd-classifier", "sampling_cost")
    assert (p["best"]["size"], p["best"]["steps"]) == ("large", 50)
    assert (p["runner_up"]["size"], p["runner_up"]["steps"]) == ("small", 50)
    p = analysis.plan(best, 0.1, "fd-classifier", "sampling_cost")
    assert p["best"] is None and "cheapest configuration costs 0.5" in p["message"]
    p = analysis.plan(best, 60.0, "fd-classifier", cost="latency_ms_per_image")
    assert (p["best"]["size"], p["best"]["steps"]) == ("small", 50)
    # the default axis is executed cost (2 calls a step here): a budget of 3 buys small's 5 steps, not its 20
    p = analysis.plan(analysis.with_costs(best), 3.0, "fd-classifier")
    assert (p["cost"], p["best"]["steps"], p["best"]["executed_cost"]) == ("executed_cost", 5, 1.0)
    assert "small with ddim at 20 steps, guidance 2: fd-classifier 20 ± 0.1" in analysis.describe_choice(
        analysis.plan(best, 3.0, "fd-classifier", "sampling_cost")["best"], "fd-classifier"
    )


def test_final_rows_and_training_curves():
    rows = [
        dict(_row("s", 0.1, "ddim", 20, 3.0, v, images=n), train_flops=n * 1e9)
        for n, v in ((10, 30), (20, 25), (40, 21))
    ]
    assert [r["images_seen"] for r in analysis.final_rows(rows)] == [40]
    curves = analysis.training_curves(rows, "fd-classifier", "ddim", 20, 3.0)
    assert [r["images_seen"] for r in curves["s"]] == [10, 20, 40]


def test_power_law_fit_flags_data_that_do_not_decay():
    x = np.geomspace(1e12, 1e15, 5)
    rising = analysis.fit_power_law(x, np.array([76.0, 95.0, 108.0, 91.0, 90.5]), boot=20)
    assert not rising.ok
    assert analysis.fit_power_law(x, 3e3 * x**-0.25 + 2, boot=0).ok
