"""bench.frontier: robust accuracy against cost per configuration, the Pareto front and the targets."""
from __future__ import annotations

import re

import pandas as pd
import pytest
import yaml

import bench.frontier
from bench.frontier import PUBLISHED, frontier_table, load_published


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
    assert bcm.worst_of == "pgd-margin, apgd-ce, apgd-dlr" and jpeg.worst_of == "pgd-margin, aa-standard"


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


def test_a_run_without_autoattack_shows_none_and_single_decisions_cost_one_evaluation(frame):
    """A margin-PGD-only run (an upper bound) has no AutoAttack figure: '-' with no version, not 'nan' under
    'apgd'; and the single scoring's decision is one evaluation, which the header says."""
    margin_only = frame[~frame.threat.isin(["apgd-ce", "apgd-dlr", "aa-standard"])]
    for scoring in ("single", "vote"):
        table = frontier_table(margin_only, 8, scoring)
        assert table.autoattack.isna().all() and set(table.autoattack_version) == {""}
        md = bench.frontier.markdown(table)
        assert "nan" not in md and re.search(r"\| +- +\| +\| +2", md)
    assert "one evaluation; `pareto`" in bench.frontier.markdown(frontier_table(frame, 8, "single"))
    assert "times the N = 10 evaluations a vote takes" in bench.frontier.markdown(frontier_table(frame, 8, "vote"))


def test_cli_writes_csv_markdown_and_png_and_rejects_missing_results(frame, tmp_path, capsys):
    results = tmp_path / "adaptive.csv"
    frame.assign(bf16=frame.bf16.map({True: "true", False: "false"}), t_star="", eps_inv="", restarts=1,
                 wall_s=0, s_per_image=0, steps=20, eot=4, attack_seed=0, eval_seed=1).to_csv(results, index=False)
    out = tmp_path / "frontier" / "f.csv"
    bench.frontier.main(["--results", str(results), "--out", str(out)])
    assert len(pd.read_csv(out)) == 4 and out.with_suffix(".png").stat().st_size > 0
    md = out.with_suffix(".md").read_text()
    assert "val split (200 images of CIFAR-10 (JPEG q75 copy), seed 0)" in md
    assert "`cpu` protocol, white-box L-inf eps = 8/255, suite v2" in md
    assert re.search(r"\| preact:bcm-fgsm +\|", md) and not re.search(r"\| run +\|", md)
    assert "| standard " in md and "| apgd " in md  # which AutoAttack each row took
    assert "**Published anchors**" in md
    assert re.search(r"\| DiffPure, majority of 10-128 +\| vote +\| 39-48 +\| 1,000-12,800 +\|", md)
    # runs of other sizes on one plane: each row names its run; no anchors when asked for none
    other = tmp_path / "other.csv"
    pd.read_csv(results).assign(data_seed=1).to_csv(other, index=False)  # the same settings on other images
    bench.frontier.main(["--results", str(results), str(other), "--out", str(out), "--published", "none"])
    md = out.with_suffix(".md").read_text()
    assert "runs as in the `run` column" in md
    assert re.search(r"\| val n=200 seed 1, `cpu` +\|", md) and re.search(r"\| val n=200 seed 0, `cpu` +\|", md)
    assert "Published anchors" not in md
    with pytest.raises(SystemExit) as exit_info:  # one configuration from two files: which one counts?
        bench.frontier.main(["--results", str(results), str(results), "--out", str(out)])
    assert exit_info.value.code == 2 and "is in more than one of the results files" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("- name: x\n")
    with pytest.raises(SystemExit) as exit_info:
        bench.frontier.main(["--results", str(results), "--out", str(out), "--published", str(tmp_path / "bad.yaml")])
    assert exit_info.value.code == 2 and "entry 1: missing source" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench.frontier.main(["--results", str(tmp_path / "nothing.csv")])
    assert exit_info.value.code == 2 and "run `python -m bench.adaptive` first" in capsys.readouterr().err


def test_published_anchors_load_and_bad_entries_are_named(tmp_path):
    shipped = load_published(PUBLISHED)
    assert len(shipped) >= 3 and set(shipped.scoring) <= {"single", "worst", "vote"}
    assert (shipped.robust_low <= shipped.robust_high).all() and (shipped.nfe_low >= 1).all()
    vote = shipped[shipped.scoring == "vote"].iloc[0]
    assert (vote.robust_low, vote.robust_high, vote.nfe_low) == pytest.approx((0.39, 0.48, 1000))
    good = dict(name="a", source="b", attack="c", scoring="vote", robust=[0.3, 0.4], nfe_per_decision=[10, 20])
    path = tmp_path / "anchors.yaml"
    path.write_text(yaml.safe_dump([good]))
    assert load_published(path).iloc[0][["robust_low", "nfe_high"]].tolist() == [0.3, 20]
    for change, message in ((dict(scoring=None), "entry 1: missing scoring"),
                            (dict(scoring="best"), "scoring must be one of"),
                            (dict(robust=[0.4, 0.3]), "range of accuracies"),
                            (dict(robust=[30, 40]), "range of accuracies"),
                            (dict(robust=0.4), "pair of numbers"),
                            (dict(nfe_per_decision=[0, 20]), "positive range")):
        entry = {k: v for k, v in {**good, **change}.items() if v is not None}
        path.write_text(yaml.safe_dump([entry]))
        with pytest.raises(ValueError, match=message):
            load_published(path)
