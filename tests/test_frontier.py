"""bench.frontier: robust accuracy against cost per configuration, the Pareto front and the targets."""
from __future__ import annotations

import pandas as pd
import pytest

import bench.frontier
from bench.frontier import frontier_table


def _rows(defence, target, clean, worst, purify_s, scorings=("single", "vote"), eps=8):
    rows = []
    autoattack = "apgd-dlr" if defence.split("(")[0] in ("bcm", "denoise", "diffusion") else "aa-standard"
    for scoring in scorings:
        shift = 0.0 if scoring == "vote" else -0.01  # single differs from vote: the scoring must be picked
        threats = [("clean", clean, 0), ("pgd-margin", worst + 0.02, eps), (autoattack, worst + 0.05, eps),
                   ("worst", worst, eps)] + ([("apgd-ce", worst + 0.07, eps)] if autoattack == "apgd-dlr" else [])
        for threat, accuracy, e in threats:
            rows.append(dict(suite="v2", preset="small", ci_low=accuracy + shift - 0.03, ci_high=accuracy + shift + 0.03, defence=defence, family=defence, target=target, split="val", n=200,
                             data_seed=0, protocol="cpu", bf16=True, checkpoints="ab", scoring=scoring, threat=threat,
                             eps=e, accuracy=accuracy + shift, evals=10, nfe=2 if defence.startswith("bcm") else 0,
                             purify_s_per_image=purify_s, step_s_per_image=3 * purify_s))
    return rows


@pytest.fixture
def frame():
    return pd.DataFrame(_rows("bcm(eps_inv=0.3, t_star=1)", "preact", 0.80, 0.10, 0.01)
                        + _rows("jpeg(quality=75)", "preact", 0.70, 0.05, 0.001)
                        + _rows("diffusion(solver=sde, steps=100, t_star=1)", "preact", 0.75, 0.08, 1.0)
                        + _rows("bcm(eps_inv=0.3, t_star=1)", "preact:bcm-fgsm", 0.72, 0.40, 0.01)
                        + [r for r in _rows("bcm(eps_inv=0.3, t_star=2)", "preact", 0.7, 0.2, 0.01) if r["threat"] != "worst"])


def test_vote_decisions_cost_n_evaluations_of_a_randomized_defence_and_one_of_a_deterministic_one(frame):
    table = frontier_table(frame, 8, "vote").set_index(["defence", "target"])
    bcm = table.loc[("bcm(eps_inv=0.3, t_star=1)", "preact")]
    assert (bcm.clean, bcm.robust, bcm.pgd_margin, bcm.autoattack) == pytest.approx((0.80, 0.10, 0.12, 0.15))
    assert (bcm.robust_low, bcm.robust_high) == pytest.approx((0.07, 0.13))
    assert bcm.autoattack_version == "apgd"  # the better of APGD-CE (0.17) and APGD-DLR (0.15)
    assert (bcm.draws, bcm.nfe, bcm.decision_s, bcm.attack_step_s) == pytest.approx((10, 20, 0.1, 0.03))
    jpeg = table.loc[("jpeg(quality=75)", "preact")]
    assert (jpeg.draws, jpeg.nfe, jpeg.decision_s) == pytest.approx((1, 0, 0.001))
    assert jpeg.autoattack_version == "standard" and jpeg.autoattack == pytest.approx(0.10)
    assert ("bcm(eps_inv=0.3, t_star=2)", "preact") not in table.index  # no worst-case row: not on the plane


def test_pareto_front_and_targets(frame):
    table = frontier_table(frame, 8, "vote").set_index(["defence", "target"])
    assert table.pareto.to_dict() == {
        ("jpeg(quality=75)", "preact"): True,                                # the cheapest
        ("bcm(eps_inv=0.3, t_star=1)", "preact"): False,                     # as costly, less robust than fine-tuned
        ("bcm(eps_inv=0.3, t_star=1)", "preact:bcm-fgsm"): True,
        ("diffusion(solver=sde, steps=100, t_star=1)", "preact"): False}     # costlier and less robust
    assert table.meets_target[("bcm(eps_inv=0.3, t_star=1)", "preact:bcm-fgsm")]
    assert table.meets_target.sum() == 1


def test_single_scoring_takes_its_own_rows_and_one_evaluation(frame):
    table = frontier_table(frame, 8, "single").set_index(["defence", "target"])
    bcm = table.loc[("bcm(eps_inv=0.3, t_star=1)", "preact")]
    assert (bcm.robust, bcm.draws, bcm.decision_s) == pytest.approx((0.09, 1, 0.01))
    with pytest.raises(ValueError, match="scoring must be one of"):
        frontier_table(frame, 8, "best")


def test_cli_writes_csv_markdown_and_png_and_rejects_missing_results(frame, tmp_path, capsys):
    results = tmp_path / "adaptive.csv"
    frame.assign(bf16=frame.bf16.map({True: "true", False: "false"}), t_star="", eps_inv="", restarts=1,
                 wall_s=0, s_per_image=0, steps=20, eot=4, attack_seed=0, eval_seed=1).to_csv(results, index=False)
    out = tmp_path / "frontier" / "f.csv"
    bench.frontier.main(["--results", str(results), "--out", str(out)])
    assert len(pd.read_csv(out)) == 4 and out.with_suffix(".png").stat().st_size > 0
    md = out.with_suffix(".md").read_text()
    assert "white-box L-inf eps = 8/255, suite v2, `cpu` protocol" in md and "| preact:bcm-fgsm |" in md
    assert "| standard " in md and "| apgd " in md  # which AutoAttack each row took
    with pytest.raises(SystemExit) as exit_info:
        bench.frontier.main(["--results", str(tmp_path / "nothing.csv")])
    assert exit_info.value.code == 2 and "run `python -m bench.adaptive` first" in capsys.readouterr().err
