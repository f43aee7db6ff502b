"""The adaptive (white-box) harness: scorings, per-image noise, the attacks on the averaged prediction
(best iterate per image), BPDA, AutoAttack, bench.adaptive, the sealed test subset and its ledger."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import bench.adaptive
import bench.common
import bench.intervals
import bench.ledger
import bench.whitebox.retime
import bench.whitebox.sanity
import bench.whitebox.setting
from attacks import (BPDA, SCORINGS, BestIteratePGD, BestLossAPGD, BestMarginSquare, DrawAverage, attack_loss,
                     autoattack_standard, correct_by_scoring, craft, predict_draws, run_autoattack, score)
from attacks.eot import step_size
from purify import BCMPurifier, image_noise
from test_attacks import TemplateClassifier, template_data
from test_bench import checkpoints  # noqa: F401 (fixture)
from test_shards import FakeClock


def test_scorings_match_a_hand_computation():
    predictions = torch.tensor([[0, 1, 2, 3],
                                [0, 1, 0, 3],
                                [0, 2, 0, 1]])  # N = 3 evaluations of 4 images
    labels = torch.tensor([0, 1, 2, 3])
    # image 0: 3/3 correct; image 1: 2/3 (vote right); image 2: 1/3 (vote 0: wrong); image 3: 2/3 (vote right)
    assert score(predictions, labels) == pytest.approx({"single": (1 + 2 / 3 + 1 / 3 + 2 / 3) / 4,
                                                        "worst": 1 / 4, "vote": 3 / 4})
    per_image = correct_by_scoring(predictions, labels)
    assert per_image["worst"].tolist() == [1, 0, 0, 0] and per_image["vote"].tolist() == [1, 1, 0, 1]


def test_a_tied_vote_counts_as_wrong_whatever_the_labels():
    """N = 4: the true label with 2 of 4 votes against another label's 2 is a tie, wrong for the smaller and the
    larger true label alike; 2 of 4 against 1 + 1 is a strict majority, right."""
    predictions = torch.tensor([[0, 5, 3, 3], [0, 5, 3, 3], [5, 0, 1, 3], [5, 0, 2, 7]])
    labels = torch.tensor([0, 5, 3, 7])
    assert correct_by_scoring(predictions, labels)["vote"].tolist() == [0, 0, 1, 0]


def test_image_noise_depends_only_on_seed_draw_and_index():
    everything = image_noise(torch.arange(10), (3, 4, 4), seed=5)
    assert torch.equal(image_noise(torch.tensor([7, 3]), (3, 4, 4), seed=5), everything[[7, 3]])
    assert not torch.equal(image_noise(torch.arange(10), (3, 4, 4), seed=5, draw=1), everything)
    assert not torch.equal(image_noise(torch.arange(10), (3, 4, 4), seed=6), everything)


def test_fixed_noise_replaces_the_purifiers_draws(tiny_bcm):
    purifier = BCMPurifier(tiny_bcm, t_star=0.5)
    x = torch.rand(4, 3, 32, 32)
    z = image_noise(torch.arange(4), (3, 32, 32), seed=0)
    with torch.no_grad():
        with purifier.fixed_noise(z):
            first, second = purifier(x), purifier(x)
        with purifier.fixed_noise(-z):
            other = purifier(x)
        fresh_1, fresh_2 = purifier(x), purifier(x)
    assert torch.equal(first, second) and not torch.allclose(first, other)
    assert not torch.allclose(fresh_1, fresh_2)  # outside the block the noise is drawn again
    with pytest.raises(ValueError, match="does not match"), purifier.fixed_noise(z[:2]):
        purifier(x)


def test_predictions_do_not_depend_on_batch_size(tiny_bcm):
    purifier = BCMPurifier(tiny_bcm, t_star=0.5)
    model = purifier.wrap(TemplateClassifier().eval())
    images, _ = template_data(model[1], n=10)
    ids = torch.arange(100, 110)

    def noise(batch_ids, draw):
        return purifier.fixed_noise(image_noise(batch_ids, (3, 32, 32), seed=1, draw=draw))

    by_3 = predict_draws(model, images, ids, evals=3, noise=noise, batch_size=3)
    by_7 = predict_draws(model, images, ids, evals=3, noise=noise, batch_size=7)
    assert by_3.shape == (3, 10) and torch.equal(by_3, by_7)


def test_bpda_runs_the_transform_forward_and_the_approximation_backward():
    quantize = lambda x: torch.round(x * 4) / 4  # noqa: E731 (zero gradient almost everywhere)
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    weights = torch.randn(2, 3, 4, 4)
    out = BPDA(quantize)(x)
    assert torch.equal(out, quantize(x.detach()))
    grad, = torch.autograd.grad((out * weights).sum(), x)
    assert torch.allclose(grad, weights)  # identity backward
    grad, = torch.autograd.grad((BPDA(quantize, lambda v: 2 * v)(x) * weights).sum(), x)
    assert torch.allclose(grad, 2 * weights)


class CountingModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


class NoisyTemplate(nn.Module):
    """``TemplateClassifier`` on ``x + sigma z`` with fresh noise per call: a toy randomized defence."""

    def __init__(self, sigma=0.05):
        super().__init__()
        self.classifier, self.sigma = TemplateClassifier(), sigma

    def forward(self, x):
        return self.classifier(x + self.sigma * torch.randn_like(x))


class Recorder(nn.Module):
    """Records every input and output of ``model`` (the attacks' calls of their averaged prediction)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        out = self.model(x)
        self.calls.append((x.detach().clone(), out.detach().clone()))
        return out


def test_draw_average_is_the_log_of_the_mean_probability_over_draws():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])  # draw 0, draw 1 of one image

    class TwoDraws(nn.Module):
        def forward(self, x):  # the batch holds draw 0's copy, then draw 1's
            return logits

    got = DrawAverage(TwoDraws(), draws=2)(torch.zeros(1, 3, 2, 2))
    expected = ((logits.softmax(1)[0] + logits.softmax(1)[1]) / 2).log()
    torch.testing.assert_close(got[0], expected)
    model = TemplateClassifier()
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(DrawAverage(model, 1)(x), model(x).log_softmax(1))


def test_attack_losses_match_a_hand_computation():
    scores = torch.tensor([[-0.1, -2.0, -3.0], [-2.5, -0.2, -1.0]])
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(attack_loss(scores, labels, "ce"), torch.tensor([0.1, 1.0]))
    torch.testing.assert_close(attack_loss(scores, labels, "margin"), torch.tensor([-2.0 + 0.1, -0.2 + 1.0]))
    with pytest.raises(ValueError, match="loss must be"):
        attack_loss(scores, labels, "hinge")


def test_pgd_steps_decay_from_a_quarter_to_a_sixteenth_of_eps():
    eps = 8 / 255
    sizes = [step_size(eps, k, 100) for k in (0, 49, 50, 74, 75, 99)]
    assert sizes == pytest.approx([2 / 255, 2 / 255, 1 / 255, 1 / 255, 0.5 / 255, 0.5 / 255])


def test_pgd_takes_steps_of_the_scheduled_size_and_stays_in_the_ball():
    """Without random start one step moves every pixel by exactly eps/4 (images kept away from 0 and 1; the CE
    loss, whose gradient has no zero entries on this model, unlike the margin of two +-1 patterns)."""
    model = TemplateClassifier().eval()
    images, labels = template_data(model, n=10)
    images = images.clamp(0.1, 0.9)
    recorder = Recorder(DrawAverage(model))
    attack = BestIteratePGD(model, eps=8 / 255, steps=1, loss="ce", random_start=False)
    attack.scores = recorder
    attack(images, labels)
    delta = recorder.calls[1][0] - images  # the iterate after the first step
    torch.testing.assert_close(delta.abs(), torch.full_like(delta, 2 / 255), rtol=0, atol=1e-6)
    saturated = images.clone()  # pixels at 0 and at 1, where a start or a step could leave the image range
    saturated[..., :3], saturated[..., -3:] = 0, 1
    attack = BestIteratePGD(model, eps=4 / 255, steps=10, restarts=2)
    attack.scores = recorder = Recorder(attack.scores)
    adversarial = attack(saturated, labels)
    iterates = torch.stack([x for x, _ in recorder.calls])  # every random start and step of both restarts
    assert (iterates - saturated).abs().max() <= 4 / 255 + 1e-6 and iterates.min() >= 0 and iterates.max() <= 1
    start = iterates[0] - saturated  # uniform on the ball: both signs, out to its edge, where the image allows
    inside = (saturated > 4 / 255) & (saturated < 1 - 4 / 255)
    assert start[inside].min() < -3.5 / 255 and start[inside].max() > 3.5 / 255
    assert (adversarial - saturated).abs().max() <= 4 / 255 + 1e-6 and adversarial.min() >= 0
    with pytest.raises(ValueError, match="restarts >= 1"):
        BestIteratePGD(model, eps=4 / 255, steps=3, restarts=0)


@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_pgd_returns_the_iterate_with_the_highest_loss_over_draws_not_the_last_or_the_clean_one(loss):
    """On a noisy toy model the returned image of every image is the iterate (over steps and restarts) whose
    loss, measured on the prediction averaged over that step's draws, was the highest."""
    torch.manual_seed(0)
    model = NoisyTemplate(sigma=0.2).eval()
    images, labels = template_data(model.classifier, n=12)
    attack = BestIteratePGD(model, eps=8 / 255, steps=6, draws=3, loss=loss, restarts=2)
    attack.scores = recorder = Recorder(attack.scores)
    adversarial = attack(images, labels)
    inputs = torch.stack([x for x, _ in recorder.calls])                       # (calls, n, ...)
    losses = torch.stack([attack_loss(out, labels, loss) for _, out in recorder.calls])  # (calls, n)
    best = losses.argmax(0)
    assert len(recorder.calls) == 2 * (6 + 1)  # both restarts: each its start, 6 steps, the final measurement
    torch.testing.assert_close(adversarial, inputs[best, torch.arange(len(images))])
    assert not torch.equal(adversarial, images)
    assert (best != len(recorder.calls) - 1).any()  # somewhere the best is not the last iterate


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_returns_the_highest_loss_iterate_over_draws_not_the_clean_input(loss):
    """AutoAttack keeps the clean image wherever one noisy evaluation found no adversarial example; ours keeps
    the iterate whose loss on the averaged prediction was the highest (APGD's own x_best)."""
    torch.manual_seed(0)
    model = NoisyTemplate(sigma=0.2).eval()
    images, labels = template_data(model.classifier, n=12)
    attack = BestLossAPGD(model, eps=4 / 255, iters=8, draws=3, loss=loss)
    attack.apgd.model = recorder = Recorder(attack.apgd.model)
    adversarial = attack(images, labels)
    calls = recorder.calls  # every call is an iterate (no look at the clean input: the start is drawn per image)
    inputs = torch.stack([x for x, _ in calls])
    criterion = (lambda o, y: nn.functional.cross_entropy(o, y, reduction="none")) if loss == "ce" \
        else attack.apgd.dlr_loss
    losses = torch.stack([criterion(out, labels) for _, out in calls])
    torch.testing.assert_close(adversarial, inputs[losses.argmax(0), torch.arange(len(images))])
    assert not torch.equal(adversarial, images)


def test_apgd_starts_each_restart_on_the_balls_edge_and_keeps_each_images_best_restart():
    """APGD's own L-inf start (x + eps t / max|t|: some pixel at distance eps) drawn per image, one per restart;
    per image the restart whose loss was the highest, the first of equal ones (APGD's runs stubbed)."""
    model = TemplateClassifier().eval()
    images, labels = template_data(model, n=4)
    attack = BestLossAPGD(model, eps=8 / 255, iters=5, restarts=2)
    runs = iter([(images + 0.01, torch.tensor([1.0, 0.0, 3.0, -1.0])),
                 (images - 0.01, torch.tensor([0.0, 2.0, 3.0, -2.0]))])
    starts = []

    def single_run(x, y, x_init):
        starts.append(x_init)
        adversarial, loss = next(runs)
        return adversarial, None, loss, None

    attack.apgd.attack_single_run = single_run
    adversarial = attack(images, labels)
    assert len(starts) == 2 and not torch.equal(starts[0], starts[1])
    for start in starts:
        torch.testing.assert_close((start - images).flatten(1).abs().amax(1), torch.full((4,), 8 / 255))
    torch.testing.assert_close(adversarial, images + torch.tensor([0.01, -0.01, 0.01, 0.01]).view(-1, 1, 1, 1))


@pytest.mark.parametrize("iters, checkpoints", [(20, (4, 1, 1)), (100, (22, 6, 3))])
def test_apgd_is_built_with_its_budget_so_its_step_size_checkpoints_follow_it(iters, checkpoints):
    apgd = BestLossAPGD(TemplateClassifier().eval(), eps=8 / 255, iters=iters, draws=4).apgd
    assert (apgd.n_iter, apgd.eot_iter) == (iters, 1)  # the draws are inside the averaged prediction
    assert (apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr) == checkpoints
    assert apgd.model.draws == 4


def test_white_box_attacks_break_an_undefended_linear_classifier():
    model = TemplateClassifier().eval()
    images, labels = template_data(model, n=20)
    attacks = [BestIteratePGD(model, 32 / 255, 20, loss="margin"), BestIteratePGD(model, 32 / 255, 20, loss="ce"),
               BestLossAPGD(model, 32 / 255, 10, loss="ce"), BestLossAPGD(model, 32 / 255, 10, loss="dlr")]
    for attack in attacks:
        adversarial = attack(images, labels)
        assert (adversarial - images).abs().max() <= 32 / 255 + 1e-5
        assert (model(adversarial).argmax(1) == labels).float().mean() == 0, type(attack).__name__


def test_square_is_gradient_free_and_lowers_the_margin_inside_the_ball():
    model = TemplateClassifier().eval()
    images, labels = template_data(model, n=10)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    adversarial = BestMarginSquare(model, eps=16 / 255, queries=50, draws=2)(images, labels)
    assert (adversarial - images).abs().max() <= 16 / 255 + 1e-5
    before = attack_loss(DrawAverage(model)(images), labels, "margin")
    after = attack_loss(DrawAverage(model)(adversarial), labels, "margin")
    assert (after >= before - 1e-6).all() and (after > before).any()


def test_square_spends_its_whole_budget_on_every_image():
    """AutoAttack's Square stops attacking an image at its first query with a negative margin: on a randomized
    defence one noisy evaluation. Ours queries every image every time and keeps its lowest-margin query. Both
    draw the same square per query from the same seed, so on a deterministic model ours ends at or below
    AutoAttack's margin on every image, and below it on the images AutoAttack gave up on early."""
    from purify.infra.optional import import_autoattack_part

    class Counting(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.batches = model, []

        def forward(self, x):
            self.batches.append(len(x))
            return self.model(x)

    model = TemplateClassifier().eval()
    images, labels = template_data(model, n=10)
    counting = Counting(model)
    ours = BestMarginSquare(counting, eps=32 / 255, queries=100)
    ours.square.init_hyperparam(images)
    torch.manual_seed(0)
    adversarial = ours.square.attack_single_run(images, labels)[1]
    assert counting.batches == [10] * 101  # the initial stripes and 100 queries, each on all 10 images
    square = import_autoattack_part("square").SquareAttack(DrawAverage(model), p_init=0.8, n_queries=100,
                                                             eps=32 / 255, norm="Linf", n_restarts=1, seed=0,
                                                             loss="margin", resc_schedule=True)
    square.init_hyperparam(images)
    torch.manual_seed(0)
    early = square.attack_single_run(images, labels)[1]
    margin = {name: -attack_loss(DrawAverage(model)(x), labels, "margin") for name, x in
              (("ours", adversarial), ("autoattack", early))}
    assert (margin["ours"] <= margin["autoattack"] + 1e-6).all()
    stopped = margin["autoattack"] < 0
    assert stopped.any() and (margin["ours"][stopped] < margin["autoattack"][stopped] - 1e-4).any()


def adaptive_args(checkpoints, out, *extra):  # noqa: F811
    return [*checkpoints, "--n", "6", "--batch-size", "6", "--t-stars", "0.5", "1", "--out", str(out), *extra]


def test_bench_adaptive_grid_scores_and_resumes(checkpoints, tmp_path, monkeypatch, capsys):  # noqa: F811
    from purify.infra import shards

    out = tmp_path / "adaptive.csv"
    monkeypatch.setattr(shards, "time", FakeClock(3.0))  # every unit is one block of 6 images, 3 s each
    bench.adaptive.main(adaptive_args(checkpoints, out))
    frame = pd.read_csv(out)
    units = frame[frame.threat != "worst"]
    assert (units.wall_s == 3).all() and (units.s_per_image == 0.5).all()
    threats = {"clean", "transfer", "pgd-margin", "pgd-ce", "apgd-ce", "apgd-dlr", "worst", "pgd-fixed"}
    assert set(frame.threat) == threats and len(frame) == 2 * len(threats) * 3  # 2 t*, 3 scorings; cpu: no Square
    wide = frame.pivot_table(index=["t_star", "threat"], columns="scoring", values="accuracy")
    assert (wide["worst"] <= wide["single"] + 1e-9).all() and (wide["single"] <= 1).all()
    for t_star in (0.5, 1.0):
        cell = wide.loc[t_star]
        white_box = ["pgd-margin", "pgd-ce", "apgd-ce", "apgd-dlr"]
        assert (cell.loc["worst"] <= cell.loc[white_box].min() + 1e-9).all()
    assert set(frame.protocol) == {"cpu"} and set(frame.evals) == {10} and set(frame.suite) == {"v2"}
    assert frame.loc[frame.threat.isin(["pgd-margin", "apgd-dlr"]), "eot"].eq(4).all()
    assert (frame.ci_low <= frame.accuracy + 1e-9).all() and (frame.accuracy <= frame.ci_high + 1e-9).all()
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()

    def no_attack(self, threat):
        raise AssertionError(f"resumed run recomputed {threat}")

    monkeypatch.setattr(bench.whitebox.setting.Setting, "adversarial", no_attack)
    before = out.read_text()
    bench.adaptive.main(adaptive_args(checkpoints, out))
    assert out.read_text().splitlines()[0] == before.splitlines()[0]
    after = pd.read_csv(out).drop(columns=["wall_s", "s_per_image", "purify_s_per_image", "step_s_per_image"])
    assert after.equals(frame.drop(columns=["wall_s", "s_per_image", "purify_s_per_image", "step_s_per_image"]))

    # another precision or seed is another experiment: refused, not passed off as the stored cells or mixed in
    final = out.read_text()
    capsys.readouterr()
    for flag, column in (("--bf16", "bf16"), ("--attack-seed=1", "attack_seed"), ("--eval-seed=2", "eval_seed")):
        with pytest.raises(SystemExit) as exit_info:
            bench.adaptive.main(adaptive_args(checkpoints, out, flag))
        assert exit_info.value.code == 2 and f"with {column} = " in capsys.readouterr().err
    assert out.read_text() == final


def test_compare_pairs_two_results_files_image_by_image(checkpoints, tmp_path, capsys):  # noqa: F811
    """A second file that is the first with another attack seed and two images' margin-PGD predictions turned
    around: per threat and scoring, the paired difference of the stored per-image correctness is exactly what
    those two images make it (0 elsewhere), and `worst` is recomputed from both files' threats."""
    import shutil

    from attacks import correct_by_scoring
    from bench.whitebox.compare import compare
    from bench.whitebox.config import Run

    args = [*checkpoints, "--n", "6", "--batch-size", "6", "--t-stars", "1", "--threats", "clean", "pgd-margin",
            "pgd-ce"]
    bench.adaptive.main([*args, "--out", str(tmp_path / "a.csv")])
    shutil.copytree(tmp_path / "a-predictions", tmp_path / "b-predictions")
    frame = pd.read_csv(tmp_path / "a.csv")
    frame.assign(attack_seed=1).to_csv(tmp_path / "b.csv", index=False)
    labels = bench.common.load_split("test", checkpoints[checkpoints.index("--data-root") + 1], 6, 0)[1]
    stored = {}
    for name in "ab":
        for f in (tmp_path / f"{name}-predictions").glob("*.pt"):
            unit = torch.load(f, weights_only=True)
            stored[name, unit["row"]["threat"]] = (f, unit)
    worst_a = torch.minimum(*(correct_by_scoring(stored["a", t][1]["predictions"].long(), labels)["vote"]
                              for t in ("pgd-margin", "pgd-ce")))
    for threat in ("pgd-margin", "pgd-ce"):
        path, unit = stored["b", threat]
        for i in (0, 1):  # all N evaluations right where the first file's worst was wrong, and vice versa
            unit["predictions"][:, i] = int(labels[i] + 1) % 10 if worst_a[i] else int(labels[i])
        torch.save(unit, path)

    argv = [*args, "--out", str(tmp_path / "a.csv"), "--compare", str(tmp_path / "b.csv")]
    rows = compare(Run.from_args(bench.adaptive.build_parser().parse_args(argv), argv))
    by = {(r["threat"], r["scoring"]): r for r in rows}
    assert set(by) == {(t, s) for t in ("clean", "pgd-margin", "pgd-ce", "worst") for s in SCORINGS}
    per = {(name, threat): correct_by_scoring(stored[name, threat][1]["predictions"].long(), labels)
           for name in "ab" for threat in ("clean", "pgd-margin", "pgd-ce")}
    for scoring in SCORINGS:
        assert by["clean", scoring]["difference"] == 0
        for threat in ("pgd-margin", "pgd-ce"):
            change = per["a", threat][scoring] - per["b", threat][scoring]
            assert change[2:].eq(0).all()
            assert by[threat, scoring]["difference"] == pytest.approx(change.mean().item())
        worst = {name: torch.minimum(per[name, "pgd-margin"][scoring], per[name, "pgd-ce"][scoring]) for name in "ab"}
        assert (worst["a"] - worst["b"])[:2].ne(0).all()
        assert by["worst", scoring]["this"] == pytest.approx(worst["a"].mean().item())
        assert by["worst", scoring]["difference"] == pytest.approx((worst["a"] - worst["b"]).mean().item())
    for r in rows:
        assert r["ci_low"] <= r["difference"] <= r["ci_high"]
    assert "attack_seed 0" in rows[0]["this_run"] and "attack_seed 1" in rows[0]["other_run"]
    assert "pgd-margin | vote" in (tmp_path / "a-vs-b.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        bench.adaptive.main([*args, "--out", str(tmp_path / "a.csv"), "--compare", str(tmp_path / "none.csv")])
    assert exit_info.value.code == 2 and "no results at" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench.adaptive.main([*argv, "--retime"])
    assert exit_info.value.code == 2 and "--retime and --compare are separate modes" in capsys.readouterr().err


def test_unfinished_blocks_are_named_by_precision_and_seeds_finished_units_are_not():
    """A unit's unfinished blocks must not be picked up by a run with another precision or seed; its finished
    predictions keep the name they had before the run columns existed (the results file refuses the mixing)."""
    from bench.whitebox.schema import KEY, unit_id

    row = {column: "x" for column in KEY} | {"checkpoints": "c", "bf16": False, "attack_seed": 0, "eval_seed": 1}
    for change in ({"bf16": True}, {"attack_seed": 1}, {"eval_seed": 2}):
        assert unit_id(row | change) == unit_id(row)
        assert unit_id(row | change, run_columns=True) != unit_id(row, run_columns=True)
    assert unit_id(row | {"t_star": "y"}) != unit_id(row)


def test_retime_rewrites_only_the_selected_settings_costs(checkpoints, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "adaptive.csv"
    bench.adaptive.main(adaptive_args(checkpoints, out))
    before = pd.read_csv(out)
    monkeypatch.setattr(bench.whitebox.retime, "measure_costs",
                        lambda setting, batch_size, bf16: {"purify_s_per_image": 0.25, "step_s_per_image": 0.75})
    bench.adaptive.main([*checkpoints, "--n", "6", "--batch-size", "6", "--t-stars", "1", "2", "--out", str(out),
                         "--retime"])
    after = pd.read_csv(out)
    costs = ["purify_s_per_image", "step_s_per_image"]
    assert after.drop(columns=costs).equals(before.drop(columns=costs))  # accuracies and keys untouched
    retimed = after.t_star == 1
    assert (after.loc[retimed, costs] == [0.25, 0.75]).all().all()
    assert after.loc[~retimed, costs].equals(before.loc[~retimed, costs])
    assert "no rows" in capsys.readouterr().err  # t* = 2 was never evaluated: skipped, not invented
    with pytest.raises(SystemExit) as exit_info:
        bench.adaptive.main(adaptive_args(checkpoints, tmp_path / "none.csv", "--retime"))
    assert exit_info.value.code == 2 and "no results" in capsys.readouterr().err


def test_bench_adaptive_evaluates_registry_defences_with_bpda_where_needed(checkpoints, tmp_path):  # noqa: F811
    """A deterministic, non-differentiable defence (jpeg) is attacked through BPDA with one draw per step and
    has no fixed-noise ablation; a randomized one keeps its EOT draws; each row names its full settings."""
    out = tmp_path / "defences.csv"
    bench.adaptive.main([*checkpoints, "--n", "6", "--batch-size", "6", "--out", str(out),
                         "--defence", "jpeg:quality=60", "denoise:t_star=0.3"])
    frame = pd.read_csv(out)
    jpeg, denoise = frame[frame.defence == "jpeg(quality=60)"], frame[frame.defence == "denoise(t_star=0.3)"]
    # AutoAttack's standard version and PGD with restarts for the deterministic defence, APGD on the averaged
    # prediction for the randomized one
    assert set(jpeg.threat) == {"clean", "transfer", "pgd-margin", "pgd-ce", "aa-standard", "worst"}
    assert set(denoise.threat) == {"clean", "transfer", "pgd-margin", "pgd-ce", "apgd-ce", "apgd-dlr", "worst",
                                   "pgd-fixed"}
    assert jpeg[jpeg.threat == "aa-standard"].attack.str.contains("BPDA").all()
    assert jpeg[jpeg.threat == "worst"].attack.str.contains("aa-standard").all()
    accuracy = jpeg[jpeg.scoring == "single"].set_index("threat").accuracy
    assert accuracy["worst"] <= min(accuracy["pgd-margin"], accuracy["pgd-ce"], accuracy["aa-standard"]) + 1e-9
    assert jpeg[jpeg.threat == "pgd-margin"].eot.eq(1).all() and jpeg[jpeg.threat == "pgd-margin"].restarts.eq(5).all()
    assert denoise[denoise.threat == "pgd-margin"].eot.eq(4).all()
    assert jpeg[jpeg.threat == "pgd-margin"].attack.str.contains("BPDA").all()
    assert jpeg.nfe.eq(0).all() and denoise.nfe.eq(1).all() and jpeg.t_star.isna().all()
    # a deterministic defence scores the same under every scoring
    wide = jpeg.pivot_table(index="threat", columns="scoring", values="accuracy")
    assert (wide["single"] == wide["worst"]).all() and (wide["single"] == wide["vote"]).all()
    md = out.with_suffix(".md").read_text()
    sections = {("jpeg" if "`jpeg(quality=60)`" in part else "denoise"): part for part in md.split("**small preset")[1:]}
    jpeg_md, denoise_md = sections["jpeg"], sections["denoise"]
    assert "defence `jpeg(quality=60)`" in jpeg_md and "AutoAttack standard (APGD-CE, APGD-T" in jpeg_md
    assert "one evaluation decides" in jpeg_md and "x 5 restarts" in jpeg_md
    assert "averaged over 4 draws" in denoise_md and "APGD-DLR" in denoise_md


def test_threats_option_runs_only_the_chosen_threats(checkpoints, tmp_path):  # noqa: F811
    out = tmp_path / "some.csv"
    bench.adaptive.main([*checkpoints, "--n", "4", "--batch-size", "4", "--t-stars", "0.5", "--out", str(out),
                         "--threats", "clean", "pgd-margin"])
    frame = pd.read_csv(out)
    assert set(frame.threat) == {"clean", "pgd-margin", "worst"}
    assert frame[frame.threat == "worst"].attack.str.endswith("of pgd-margin").all()
    bench.adaptive.main([*checkpoints, "--n", "4", "--batch-size", "4", "--t-stars", "0.5", "--out", str(out),
                         "--threats", "pgd-margin", "apgd-dlr"])
    frame = pd.read_csv(out)
    assert set(frame.threat) == {"clean", "pgd-margin", "apgd-dlr", "worst"}  # worst now of both
    assert frame[frame.threat == "worst"].attack.str.endswith("of pgd-margin, apgd-dlr").all()
    # the classifier alone under one white-box threat: its table names the deterministic suite it ran
    alone = tmp_path / "alone.csv"
    bench.adaptive.main([*checkpoints, "--n", "4", "--batch-size", "4", "--defence", "none", "--out", str(alone),
                         "--threats", "clean", "pgd-margin"])
    md = alone.with_suffix(".md").read_text()
    assert "one evaluation decides" in md and "averaged over" not in md


def test_clean_only_run_still_gets_its_table(checkpoints, tmp_path):  # noqa: F811
    """``--threats clean`` (a cheap screen of a slow defence's clean accuracy) writes its table, not an empty file."""
    out = tmp_path / "clean.csv"
    bench.adaptive.main([*checkpoints, "--n", "4", "--batch-size", "4", "--t-stars", "0.5", "--out", str(out),
                         "--threats", "clean"])
    frame = pd.read_csv(out)
    assert set(frame.threat) == {"clean"}
    md = out.with_suffix(".md").read_text()
    acc = 100 * frame.set_index("scoring").accuracy
    assert "no attack (clean images only)" in md
    cell = f"{acc['single']:.1f} / {acc['worst']:.1f} / {acc['vote']:.1f}"
    assert f"| 0.5 | {frame.eps_inv.iloc[0]:g} | {cell} | - | - |" in md


def test_bench_adaptive_rejects_bad_input(checkpoints, tmp_path, capsys):  # noqa: F811
    for bad in (["--eps", "0"], ["--target", "resnet"], ["--protocol", "fast"], ["--split", "train"],
                ["--convergence", "5y4"], ["--convergence", "0x4"], ["--convergence", "square:0x4"],
                ["--convergence", "square:4"], ["--convergence", "pgd:4x4"], ["--convergence", "aa-standard:1x1"],
                ["--convergence", "clean:1x1"], ["--n", "0"], ["--defence", "vote:n=3"],
                ["--defence", "vote:how=logits"], ["--defence", "nosuch"], ["--threats", "worst"],
                ["--threats", "pgd"], ["--escalate"], ["--votes", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.adaptive.main(adaptive_args(checkpoints, tmp_path / "x.csv", *bad))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip()
    assert not (tmp_path / "x.csv").exists()


def test_convergence_study_writes_one_row_group_per_budget(checkpoints, tmp_path):  # noqa: F811
    out = tmp_path / "grid.csv"
    bench.adaptive.main(adaptive_args(checkpoints, out, "--convergence", "2x1", "3x2"))
    frame = pd.read_csv(tmp_path / "convergence.csv")
    assert sorted(set(zip(frame.steps, frame.eot))) == [(2, 1), (3, 2)] and len(frame) == 2 * 3
    md = (tmp_path / "convergence.md").read_text()
    assert "| 3 x 2 | 6 |" in md and "with next" in md
    small = frame[(frame.steps == 2) & (frame.scoring == "vote")].accuracy.item()
    with_next = float(next(line for line in md.splitlines() if line.startswith("| 2 x 1 |")).split("|")[6])
    assert with_next <= 100 * small + 1e-6  # the worst of two budgets is never above either


def decided(setting, rule, agree: int = 10) -> torch.Tensor:
    """Scripted (10, n) predicted labels of ``setting``'s images: those whose id ``rule`` accepts are right in the
    first ``agree`` evaluations and wrong in the rest, the others the reverse (``agree`` > 5: the majority follows
    ``rule``)."""
    right = torch.tensor([rule(int(i)) for i in setting.ids], dtype=torch.bool)
    wrong = (setting.labels + 1) % 10
    return torch.stack([torch.where(right if d < agree else ~right, setting.labels, wrong) for d in range(10)])


def test_a_convergence_studys_with_next_is_the_per_image_worst_of_two_budgets(checkpoints, tmp_path,  # noqa: F811
                                                                             monkeypatch):
    """Scripted majority decisions per image id that the larger budget does not nest in the smaller one's (budget 1
    leaves the ids not divisible by 3 right, budget 2 the even ones): `with next` is the accuracy of their per-image
    minimum, not budget 2's alone, and `drop` budget 1's accuracy minus it."""
    rules, calls = [lambda i: i % 3 != 0, lambda i: i % 2 == 0], []

    def scripted(self, threat, images):
        calls.append(threat)
        return decided(self, rules[len(calls) - 1])

    monkeypatch.setattr(bench.whitebox.setting.Setting, "predictions", scripted)
    ids = bench.common.load_split("test", checkpoints[checkpoints.index("--data-root") + 1], 12, 0)[2]
    first, second = (torch.tensor([rule(int(i)) for i in ids]).float() for rule in rules)
    both = torch.minimum(first, second)
    assert both.mean() < second.mean() and both.mean() < first.mean()
    bench.adaptive.main([*checkpoints, "--n", "12", "--batch-size", "12", "--t-stars", "1", "--out",
                         str(tmp_path / "grid.csv"), "--convergence", "2x1", "3x1"])
    row = next(line for line in (tmp_path / "convergence.md").read_text().splitlines() if line.startswith("| 2 x 1 |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[6] == f"{100 * both.mean():.1f}" and cells[7].startswith(f"{100 * (first - both).mean():.1f} (")


def test_convergence_at_the_protocol_budget_reproduces_the_grids_margin_pgd(checkpoints, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    """Its random starts and the purifier's noise are drawn per image from the attack seed, as in the grid: the
    study's 20 x 4 (the cpu protocol) makes the grid's margin-PGD examples and predictions."""
    import bench.whitebox.convergence as conv

    made = {}
    for module in (conv, bench.whitebox.setting):
        def recording(*args, real=module.craft, **kwargs):
            made[kwargs["desc"]] = real(*args, **kwargs)
            return made[kwargs["desc"]]

        monkeypatch.setattr(module, "craft", recording)
    args = [*checkpoints, "--n", "6", "--batch-size", "6", "--t-stars", "1", "--out", str(tmp_path / "grid.csv")]
    bench.adaptive.main([*args, "--threats", "pgd-margin"])
    bench.adaptive.main([*args, "--convergence", "20x4"])
    assert torch.equal(made["pgd-margin"], made["margin-PGD 20x4"])
    grid = [torch.load(f, weights_only=True) for f in (tmp_path / "grid-predictions").glob("*.pt")]
    study = [torch.load(f, weights_only=True) for f in (tmp_path / "convergence-predictions").glob("*.pt")]
    assert len(grid) == len(study) == 1 and torch.equal(grid[0]["ids"], study[0]["ids"])
    assert torch.equal(grid[0]["predictions"], study[0]["predictions"])


def test_an_interrupted_convergence_study_keeps_its_finished_blocks(checkpoints, tmp_path, monkeypatch):  # noqa: F811
    """Killed in its second block, the study resumes from the first: only the second is attacked again, the
    result is an uninterrupted run's, and its time is that of both blocks (6 s before the kill, 12 s after it),
    not the resumed run's alone."""
    import bench.whitebox.convergence as conv
    from purify.infra import shards

    real_craft, attacked = conv.craft, []

    def failing_second_block(attack, images, labels, *args, ids=None, **kwargs):
        if int(ids[0]) != int(first_ids[0]):
            raise KeyboardInterrupt
        return real_craft(attack, images, labels, *args, ids=ids, **kwargs)

    def recording(attack, images, labels, *args, ids=None, **kwargs):
        attacked.append(ids.clone())
        return real_craft(attack, images, labels, *args, ids=ids, **kwargs)

    first_ids = bench.common.load_split("test", checkpoints[checkpoints.index("--data-root") + 1], 12, 0)[2][:6]
    args = [*checkpoints, "--n", "12", "--batch-size", "6", "--t-stars", "1", "--convergence", "2x2"]
    monkeypatch.setattr(conv, "craft", failing_second_block)
    monkeypatch.setattr(shards, "time", FakeClock(6.0))
    with pytest.raises(KeyboardInterrupt):
        bench.adaptive.main([*args, "--out", str(tmp_path / "a" / "grid.csv")])
    assert len(list((tmp_path / "a").rglob(".blocks/*/*.pt"))) == 1
    monkeypatch.setattr(conv, "craft", recording)
    monkeypatch.setattr(shards, "time", FakeClock(12.0))
    bench.adaptive.main([*args, "--out", str(tmp_path / "a" / "grid.csv")])
    assert len(attacked) == 1 and int(attacked[0][0]) != int(first_ids[0])  # only the second block again
    timing = pd.read_csv(tmp_path / "a" / "convergence.csv")[["wall_s", "s_per_image"]]
    assert len(timing) and (timing.wall_s == 18).all() and (timing.s_per_image == 1.5).all()
    assert not list((tmp_path / "a").rglob(".blocks"))
    bench.adaptive.main([*args, "--out", str(tmp_path / "b" / "grid.csv")])
    resumed, whole = (torch.load(next((tmp_path / d / "convergence-predictions").glob("*.pt")), weights_only=True)
                      for d in "ab")
    assert torch.equal(resumed["predictions"], whole["predictions"])


def test_an_escalated_study_attacks_only_the_images_every_earlier_budget_left_right(checkpoints, tmp_path,  # noqa: F811
                                                                                    monkeypatch):
    """Budget 2 attacks exactly the images budget 1 left right under the majority; the worst so far is, per
    image, the minimum of the budgets' majority decisions (an image not attacked again counts as broken); the
    drop is the paired difference of the worst so far. The decisions are scripted per image id: budget 1 leaves
    the ids not divisible by 3 right, budget 2 the even ones (7 of 10 evaluations right: a majority). A rerun
    reuses every cached budget, unless an earlier budget's survivors changed: then the later one attacks again."""
    import bench.whitebox.convergence as conv

    attacked_ids, rules = {}, [lambda i: i % 3 != 0, lambda i: i % 2 == 0]
    real_craft, real_costs = conv.craft, conv.measure_costs

    def recording_craft(attack, images, labels, *args, ids=None, desc="", **kwargs):
        attacked_ids[desc] = torch.cat([attacked_ids.get(desc, torch.zeros(0, dtype=ids.dtype)), ids])
        return real_craft(attack, images, labels, *args, ids=ids, desc=desc, **kwargs)

    def scripted(self, threat, images):  # per block, on the images the budget being run attacked
        return decided(self, rules[len(attacked_ids) - 1], agree=7)

    monkeypatch.setattr(conv, "craft", recording_craft)
    monkeypatch.setattr(bench.whitebox.setting.Setting, "predictions", scripted)
    ids = bench.common.load_split("test", checkpoints[checkpoints.index("--data-root") + 1], 12, 0)[2]
    first = torch.tensor([rules[0](int(i)) for i in ids])
    final = first & torch.tensor([rules[1](int(i)) for i in ids])
    assert 0 < final.sum() < first.sum() < 12
    argv = [*checkpoints, "--n", "12", "--batch-size", "6", "--t-stars", "1", "--out", str(tmp_path / "grid.csv"),
            "--convergence", "2x1", "3x2", "--escalate"]
    bench.adaptive.main(argv)
    assert list(attacked_ids) == ["margin-PGD 2x1", "margin-PGD 3x2"]
    assert torch.equal(attacked_ids["margin-PGD 2x1"], ids) and torch.equal(attacked_ids["margin-PGD 3x2"], ids[first])
    stored = {f.name.rsplit("-", 1)[1]: torch.load(f, weights_only=True)
              for f in (tmp_path / "convergence-escalated-predictions").glob("*.pt")}
    assert torch.equal(stored["3x2.pt"]["ids"], ids[first])
    frame = pd.read_csv(tmp_path / "convergence-escalated.csv")
    assert set(frame.scoring) == {"vote"}
    acc = dict(zip(zip(frame.steps, frame.eot), frame.accuracy))
    assert acc[2, 1] == pytest.approx(first.float().mean().item())
    assert acc[3, 2] == pytest.approx(final.float().mean().item())
    drop = 100 * (first.float().mean() - final.float().mean()).item()
    md = (tmp_path / "convergence-escalated.md").read_text()
    assert f"| 3 x 2 | 6 | {int(first.sum())} | {100 * acc[3, 2]:.1f} | {drop:.1f} (" in md

    def no_attack(*args, **kwargs):
        raise AssertionError("a resumed study attacked again")

    monkeypatch.setattr(conv, "craft", no_attack)  # resumed from its cached budgets: the same study
    monkeypatch.setattr(conv, "measure_costs", no_attack)  # and the costs stored with them, not measured again
    csv = (tmp_path / "convergence-escalated.csv").read_text()
    bench.adaptive.main(argv)
    assert (tmp_path / "convergence-escalated.md").read_text() == md
    assert (tmp_path / "convergence-escalated.csv").read_text() == csv
    timed = pd.read_csv(tmp_path / "convergence-escalated.csv", dtype=str)  # times as written, e.g. by hand or
    timed["wall_s"], timed["s_per_image"] = "7.0", "0.333"  # an older version: kept, not recomputed from wall_s
    timed.to_csv(tmp_path / "convergence-escalated.csv", index=False)
    csv = (tmp_path / "convergence-escalated.csv").read_text()
    bench.adaptive.main(argv)
    assert (tmp_path / "convergence-escalated.csv").read_text() == csv

    # budget 1's cache now says it left every image right: budget 2's cache holds other images, so budget 2 attacks
    # again, exactly the new survivors, instead of reusing it
    cache = next((tmp_path / "convergence-escalated-predictions").glob("*-2x1.pt"))
    unit = torch.load(cache, weights_only=True)
    labels = bench.common.load_split("test", checkpoints[checkpoints.index("--data-root") + 1], 12, 0)[1]
    unit["predictions"] = labels.expand(10, 12).to(torch.int8)
    torch.save(unit, cache)
    attacked_ids.clear()
    monkeypatch.setattr(conv, "craft", recording_craft)
    monkeypatch.setattr(conv, "measure_costs", real_costs)
    bench.adaptive.main(argv)
    assert list(attacked_ids) == ["margin-PGD 3x2"] and torch.equal(attacked_ids["margin-PGD 3x2"], ids)
    assert torch.equal(torch.load(next((tmp_path / "convergence-escalated-predictions").glob("*-3x2.pt")),
                                  weights_only=True)["ids"], ids)


def test_sanity_check_fails_without_gradients(tiny_bcm, monkeypatch):
    """A defence that hides its gradient (a hard quantizer without BPDA) must fail the gradient check."""

    class Args:
        batch_size, attack_seed, eval_seed, bf16 = 10, 0, 1, False

    monkeypatch.setattr(bench.whitebox.sanity, "SANITY_BUDGETS", [(2, 1), (3, 1), (4, 2), (5, 2)])  # fast
    classifier = TemplateClassifier().eval()
    images, labels = template_data(classifier, n=10)
    purifier = BCMPurifier(tiny_bcm, t_star=0.5)
    masked = nn.Sequential(BPDA(lambda x: x, lambda x: torch.round(x * 4) / 4), classifier).eval()
    checks = dict((name, ok) for name, ok, _ in bench.whitebox.sanity.sanity_checks(
        masked, purifier, (images * 255).to(torch.uint8), labels, torch.arange(10), 8, Args()))
    assert checks["gradients through the purifier are finite and non-zero"] is False


def test_finite_difference_check_passes_exact_gradients_and_fails_wrong_ones(tiny_bcm):
    class Args:
        attack_seed, eval_seed = 0, 1

    classifier = TemplateClassifier().eval()
    images, labels = template_data(classifier, n=4)
    images = (images * 255).round().to(torch.uint8)
    images[:, :, 0, 0], images[:, :, 0, 1] = 0, 255  # saturated pixels: the probes must stay in [0, 1]
    purifier = BCMPurifier(tiny_bcm, t_star=0.5)
    shape = purifier.noise_shape((3, 32, 32))
    name, ok, detail = bench.whitebox.sanity.finite_difference_check(purifier.wrap(classifier), purifier, images,
                                                                     labels, torch.arange(4), shape, Args())
    assert ok, detail
    doubled = nn.Sequential(BPDA(lambda x: x, lambda x: 2 * x), purifier.wrap(classifier)).eval()  # gradient x2
    assert not bench.whitebox.sanity.finite_difference_check(doubled, purifier, images, labels, torch.arange(4),
                                                             shape, Args())[1]


def test_validation_split_is_the_classifiers_held_out_training_images(monkeypatch):
    import bench.common
    from purify.infra.data import train_val_split

    images = torch.arange(50_000).view(-1, 1, 1, 1)
    monkeypatch.setattr(bench.common, "cifar10_labels", lambda split, root: images.flatten() % 10)
    monkeypatch.setattr(bench.common, "load_cifar10",
                        lambda split, root, ids: (images[ids], images.flatten()[ids] % 10) if split == "train" else None)
    x, y, ids = bench.common.load_split("val", None, n=200, seed=3)
    train, held_out = train_val_split(50_000, 1000, seed=0)
    assert len(ids) == 200 and set(ids.tolist()) <= set(held_out.tolist())
    assert torch.equal(x.flatten(), ids) and torch.equal(y, ids % 10)
    with pytest.raises(ValueError, match="--n must be in"):
        bench.common.load_split("val", None, n=1001, seed=3)


def test_protocols_name_their_budgets():
    """cpu 20 x 4; gpu 100 x 10 with Square (the sealed headline's budget); paper 200 x 20 (Lee & Kim); N = 10."""
    from attacks import get_protocol

    budgets = {name: (p.steps, p.eot, p.square_queries, p.evals)
               for name, p in ((n, get_protocol(n)) for n in ("cpu", "gpu", "paper"))}
    assert budgets == {"cpu": (20, 4, 0, 10), "gpu": (100, 10, 1000, 10), "paper": (200, 20, 5000, 10)}
    assert "2 -> 1 -> 0.5/255" in get_protocol("gpu").describe(8 / 255)


class _DrawModel(nn.Module):
    """Predicts (id + draw) % 10: a stand-in for a randomized defence whose noise is set by the context below."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # predict_draws reads the device from a parameter
        self.ids, self.draw = None, None

    def forward(self, x):
        return nn.functional.one_hot((self.ids + self.draw) % 10, 10).float() + 0 * self.anchor


def test_each_row_of_predict_draws_is_one_evaluation_with_that_draws_noise():
    import contextlib

    model = _DrawModel().eval()

    @contextlib.contextmanager
    def noise(batch_ids, draw):
        model.ids, model.draw = batch_ids, draw
        yield

    ids = torch.arange(100, 107)
    got = predict_draws(model, torch.rand(7, 3, 4, 4), ids, evals=4, noise=noise, batch_size=3)
    assert torch.equal(got, (torch.arange(4)[:, None] + ids[None]) % 10)


def test_autoattack_standard_is_the_published_version_and_breaks_a_linear_classifier():
    model = TemplateClassifier().eval()
    adversary = autoattack_standard(model, eps=32 / 255)
    assert adversary.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (adversary.apgd.n_iter, adversary.apgd_targeted.n_target_classes, adversary.square.n_queries) == \
        (100, 9, 5000)
    images, labels = template_data(model, n=20)
    state = torch.get_rng_state()
    adversarial = run_autoattack(adversary, images, labels, batch_size=20)
    assert torch.equal(torch.get_rng_state(), state)  # AutoAttack reseeds the global RNG; the caller's is kept
    assert (adversarial - images).abs().max() <= 32 / 255 + 1e-5
    assert (model(adversarial).argmax(1) == labels).float().mean() == 0
    with pytest.raises(ValueError, match="eps > 0"):
        autoattack_standard(model, eps=0)


def test_autoattack_square_runs_under_bf16_autocast():
    """Square (the last attack of the standard version, run on the points the gradient attacks left robust)
    stores its losses in buffers of the logits' dtype: bf16 logits under autocast used to crash it."""
    model = TemplateClassifier().eval()
    images, labels = template_data(model, n=8)
    adversary = autoattack_standard(model, eps=2 / 255)
    adversary.attacks_to_run, adversary.square.n_queries = ["square"], 20
    adversarial = run_autoattack(adversary, images, labels, batch_size=8, bf16=True)
    assert adversarial.dtype == torch.float32 and (adversarial - images).abs().max() <= 2 / 255 + 1e-5


def test_an_attack_through_the_defence_leaves_the_classifier_in_eval_mode(tiny_bcm):
    """A classifier in training mode would update its batch norm's running statistics on every later
    evaluation (this once corrupted every setting after the first one of an adaptive grid)."""
    from test_bench import tiny_classifier

    classifier = tiny_classifier("preact", 0)
    stats = {k: v.clone() for k, v in classifier.state_dict().items() if "running" in k}
    defended = BCMPurifier(tiny_bcm, t_star=0.5).wrap(classifier)
    assert not defended.training
    images = torch.rand(4, 3, 32, 32)
    craft(BestIteratePGD(defended, 8 / 255, 2, draws=2), images, torch.arange(4), progress=False)
    assert not classifier.training
    predict_draws(defended, images, torch.arange(4), 2)
    assert all(torch.equal(v, classifier.state_dict()[k]) for k, v in stats.items())
    with pytest.raises(ValueError, match="eval mode"):
        predict_draws(defended.train(), images, torch.arange(4), 1)


def test_a_vote_is_evaluated_as_its_base_with_n_evaluations_and_a_paired_comparison(checkpoints, tmp_path,  # noqa: F811
                                                                                    capsys):
    out = tmp_path / "robust.csv"
    bench.adaptive.main([*checkpoints, "--n", "4", "--batch-size", "4", "--out", str(out), "--threats", "clean",
                         "pgd-margin", "--defence", "none", "bcm-robust"])
    frame = pd.read_csv(out)
    defences = set(frame.defence) - {"none"}  # bcm-robust: a vote of 10 purifications at t* = 0.5
    assert "none" in set(frame.defence) and len(defences) == 1
    assert defences.pop().startswith("bcm(") and set(frame.evals) == {10}
    assert set(frame[frame.defence != "none"].t_star) == {0.5}
    printed = capsys.readouterr().out
    assert "Paired comparison with the classifier alone" in printed
    assert "Paired comparison" in out.with_suffix(".md").read_text()


def test_every_evaluation_of_test_images_is_ledgered_once(checkpoints, tmp_path, monkeypatch):  # noqa: F811
    ledger = bench.ledger.LEDGER_PATH  # conftest's ledger_in_tmp points it into the test's folder
    assert tmp_path in ledger.parents
    args = [*checkpoints, "--n", "4", "--batch-size", "4", "--t-stars", "0.5", "--threats", "clean", "pgd-margin"]
    bench.adaptive.main([*args, "--out", str(tmp_path / "a.csv")])
    rows = pd.read_csv(ledger)
    assert len(rows) == 1 and rows.split.item() == "test" and rows.n.item() == 4
    assert rows.command.item().startswith("python -m bench.adaptive") and rows.suite.item() == "v2"
    bench.adaptive.main([*args, "--out", str(tmp_path / "a.csv")])  # resumed, nothing evaluated again
    assert len(pd.read_csv(ledger)) == 1
    # every other way bench.adaptive evaluates test images is recorded too, each as a configuration of its own
    bench.adaptive.main([*args[:-2], "clean", "--out", str(tmp_path / "clean.csv"), "--defence", "jpeg"])
    rules = iter([lambda i: i % 3 != 0, lambda i: i % 2 == 0])  # budget 2 breaks images budget 1 left right

    def scripted(self, threat, images):
        return decided(self, next(rules))

    with monkeypatch.context() as patch:
        patch.setattr(bench.whitebox.setting.Setting, "predictions", scripted)
        for _ in range(2):  # the second run resumes from the caches: still one line
            bench.adaptive.main([*args[:-3], "--convergence", "2x1", "3x1", "--escalate", "--out",
                                 str(tmp_path / "b.csv")])
    monkeypatch.setattr(bench.whitebox.sanity, "sanity_checks", lambda *a: [("a check", True, "")])
    bench.adaptive.main([*args[:-3], "--sanity", "--out", str(tmp_path / "c.csv")])
    rows = pd.read_csv(ledger, dtype=str, keep_default_na=False)
    assert list(rows.protocol) == ["cpu", "cpu", "cpu; convergence margin-PGD 2x1, margin-PGD 3x1, escalated",
                                   "cpu; sanity checks"]
    clean_only = rows.iloc[1]
    assert clean_only.defence == "jpeg(quality=75)" and clean_only.clean_vote and not clean_only.robust_vote
    ids = bench.common.load_split("test", checkpoints[checkpoints.index("--data-root") + 1], 4, 0)[2]
    survivors = [int(i) % 3 != 0 and int(i) % 2 == 0 for i in ids]
    assert 0 < sum(survivors) < sum(int(i) % 3 != 0 for i in ids)  # the worst of both is not budget 1's alone
    assert rows.robust_vote.iloc[2] == f"{100 * sum(survivors) / 4:.1f}"
    assert rows.robust_vote.iloc[3] == rows.clean_vote.iloc[3] == ""


def test_sealed_subset_avoids_every_used_test_id_and_is_drawn_once(tmp_path):
    results = tmp_path / "results"
    (results / "x-predictions").mkdir(parents=True)
    pd.DataFrame({"split": ["test", "val"], "n": ["30", "500"], "seed": ["7", "0"]}).to_csv(results / "a.csv",
                                                                                             index=False)
    torch.save({"ids": torch.tensor([9998, 9999]), "row": {"split": "test"}}, results / "x-predictions" / "u.pt")
    used = bench.ledger.used_test_ids(results)
    from purify.infra.data import seeded_subset
    expected = set(seeded_subset(10_000, 30, 7).tolist()) | {9998, 9999} | set(seeded_subset(10_000, 2000, 0).tolist())
    assert used == expected  # the val row is not a test image
    path = tmp_path / "sealed.json"
    record = bench.ledger.draw_sealed(100, seed=1, results_dir=results, path=path)
    ids = set(json.loads(path.read_text())["ids"])
    assert len(ids) == 100 == record["n"] and not ids & used
    assert torch.equal(bench.ledger.sealed_ids(path), torch.tensor(sorted(ids)))
    with pytest.raises(ValueError, match="drawn once"):
        bench.ledger.draw_sealed(100, seed=2, results_dir=results, path=path)


def test_bootstrap_interval_brackets_the_mean_and_collapses_for_constant_values():
    values = torch.tensor([1.0] * 30 + [0.0] * 70)
    mean, low, high = bench.intervals.bootstrap_interval(values)
    assert mean == pytest.approx(0.3) and low < 0.3 < high
    assert (high - low) == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 100), abs=0.03)  # the normal approximation
    assert bench.intervals.bootstrap_interval(torch.ones(10))[1:] == (1.0, 1.0)


def test_cost_clock_waits_for_the_cuda_queue_and_not_on_the_cpu(monkeypatch):
    from bench.common import device_clock

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    device_clock(torch.device("cpu"))
    assert waited == []
    device_clock(torch.device("cuda", 0))
    assert waited == [torch.device("cuda", 0)]


def test_adversarial_images_are_exported_for_rescoring(checkpoints, tmp_path):  # noqa: F811
    folder = tmp_path / "adv"
    bench.adaptive.main([*checkpoints, "--n", "4", "--batch-size", "4", "--t-stars", "0.5", "--out",
                         str(tmp_path / "a.csv"), "--threats", "clean", "pgd-margin", "--export-adversarial", str(folder)])
    files = sorted(folder.glob("*.pt"))
    assert [f.name.endswith("-eps8-pgd-margin.pt") for f in files] == [True]  # clean and worst are not attacks
    state = torch.load(files[0], weights_only=True)
    images, labels, ids = bench.common.load_split("test", str(tmp_path / "data"), 4, 0)
    assert torch.equal(state["ids"], ids) and torch.equal(state["labels"], labels)
    assert (state["images"] - images.float() / 255).abs().max() <= 8 / 255 + 1e-6
    assert state["row"]["threat"] == "pgd-margin" and state["row"]["suite"] == "v2"


def test_a_resumed_evaluation_is_one_ledger_line(tmp_path):
    row = dict(date="2026-01-01", split="sealed", n=500, data_seed=0, suite="v2", protocol="gpu", defence="none",
               target="preact", eps=8, clean_vote="70.0", robust_vote="40.0", robust_ci="35.0-45.0", command="a")
    path = tmp_path / "ledger.csv"
    bench.ledger.append_ledger([row], path)
    bench.ledger.append_ledger([dict(row, date="2026-01-02", robust_vote="33.0", command="b")], path)
    bench.ledger.append_ledger([dict(row, defence="bcm", date="2026-01-02")], path)
    ledger = pd.read_csv(path, dtype=str)
    assert len(ledger) == 2
    first = ledger[ledger.defence == "none"].iloc[0]
    assert (first.robust_vote, first.command, first.date) == ("33.0", "b", "2026-01-01")


def test_the_paired_difference_is_defended_minus_alone_on_the_same_images():
    """Hand-computed: defended right on images 0-2 of 4 (vote), alone on 0 and 3: 75 - 50 = +25 points; every
    bootstrap resample of a constant difference gives the same value, so a difference of all 1s has the
    interval (+100, +100)."""
    from bench.whitebox.report import paired_differences
    right = lambda *values: {scoring: torch.tensor(values, dtype=torch.float) for scoring in SCORINGS}  # noqa: E731
    table = paired_differences({("preact", "bcm", 8): {"worst": right(1, 1, 1, 0)},
                                ("preact", "none", 8): {"worst": right(1, 0, 0, 1)},
                                ("wrn", "bcm", 8): {"worst": right(1, 1)}, ("wrn", "none", 8): {"worst": right(0, 0)}})
    rows = [line for line in table.splitlines() if line.startswith("| preact") and "| vote |" in line]
    assert len(rows) == 1 and "| 75.0 | 50.0 | +25.0 (" in rows[0]
    assert "| 100.0 | 0.0 | +100.0 (+100.0 to +100.0) |" in table
    assert paired_differences({("preact", "bcm", 8): {"worst": right(1)}}) == ""  # no reference, no table


def test_bench_adaptive_under_torchrun_writes_what_one_process_writes(checkpoints, tmp_path):  # noqa: F811
    """2 ranks (gloo) in blocks of 3 against one process in blocks of 2, attacks through a randomized purifier:
    the same adversarial images, predictions and accuracies, one CSV and no leftover blocks. (The command runs with its test ledger
    moved into the test's folder.)"""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    outputs = {}
    launch = (f"import sys, pathlib, bench.ledger, bench.adaptive; "
              f"bench.ledger.LEDGER_PATH = pathlib.Path({str(tmp_path / 'ledger.csv')!r}); bench.adaptive.main()")
    for world, batch_size in ((1, "2"), (2, "3")):
        out = tmp_path / f"world{world}" / "adaptive.csv"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                   "--no-python", "--", sys.executable, "-c", launch, *checkpoints, "--n", "6",
                   "--batch-size", batch_size, "--t-stars", "1", "--export-adversarial", str(out.parent / "adv"),
                   "--threats", "clean", "pgd-margin", "apgd-ce", "--threads", "1", "--out", str(out)]
        result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600,
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        caches = sorted(out.with_name("adaptive-predictions").glob("*.pt"))
        outputs[world] = (pd.read_csv(out), {p.name: torch.load(p, weights_only=True)["predictions"] for p in caches},
                          {p.name: torch.load(p, weights_only=True)["images"] for p in (out.parent / "adv").glob("*")})
        assert not (out.with_name("adaptive-predictions") / ".blocks").exists() or \
            not any((out.with_name("adaptive-predictions") / ".blocks").iterdir())
    (one, one_predictions, one_images), (two, two_predictions, two_images) = outputs[1], outputs[2]
    assert one_images.keys() == two_images.keys() and len(one_images) == 2  # the two attacks
    for name, images in one_images.items():  # every attack step's purifier noise is drawn per image
        torch.testing.assert_close(two_images[name], images, rtol=0, atol=1e-6)
    assert one_predictions.keys() == two_predictions.keys() and len(one_predictions) == 3  # clean and 2 attacks
    assert all(torch.equal(one_predictions[k], two_predictions[k]) for k in one_predictions)
    columns = ["threat", "scoring", "accuracy", "ci_low", "ci_high"]
    pd.testing.assert_frame_equal(one[columns], two[columns])


def test_a_vote_of_k_averages_the_majority_over_every_k_subset_of_the_evaluations():
    """N = 4 evaluations of one image with label 0 voting 0, 1, 2, 0. K = 2: of the 6 pairs only (0, 0) is a
    strict majority; K = 3: {0, 1, 0} and {0, 2, 0} are, {0, 1, 2} and {1, 2, 0} are ties (wrong): 2 of 4.
    K = 1 is the fraction right, K = N the vote scoring."""
    from bench.whitebox.votes import vote_of_k

    predictions = torch.tensor([[0, 3], [1, 3], [2, 3], [0, 1]])
    labels = torch.tensor([0, 3])
    assert vote_of_k(predictions, labels, 1).tolist() == pytest.approx([0.5, 0.75])
    assert vote_of_k(predictions, labels, 2).tolist() == pytest.approx([1 / 6, 0.5])
    assert vote_of_k(predictions, labels, 3).tolist() == pytest.approx([0.5, 1.0])
    assert vote_of_k(predictions, labels, 4).tolist() == correct_by_scoring(predictions, labels)["vote"].tolist()
    with pytest.raises(ValueError, match="1 <= K <= N = 4"):
        vote_of_k(predictions, labels, 5)


def test_votes_rescore_a_run_without_attacking_and_agree_with_its_scorings_at_1_and_n(  # noqa: F811
        checkpoints, tmp_path, monkeypatch, capsys):
    """Stored predictions replaced by seeded ones that vary between evaluations: K = N gives each threat's `vote`
    scoring and K = 1 its `single` one (worst included, as the per-image minimum over the white-box threats),
    K = 3 the mean over 3-subsets; nothing is attacked again and the deterministic `none` is skipped, but each K's
    worst case is compared with its worst case (seeded stored predictions too), image by image."""
    from bench.whitebox.votes import vote_of_k

    out = tmp_path / "run.csv"
    args = [*checkpoints, "--n", "6", "--batch-size", "6", "--threats", "clean", "pgd-margin", "pgd-ce", "--defence",
            "none", "bcm", "--out", str(out)]
    bench.adaptive.main([*args, "--t-stars", "0.5", "1"])
    args += ["--t-stars", "1"]
    labels = bench.common.load_split("test", checkpoints[checkpoints.index("--data-root") + 1], 6, 0)[1]
    generator = torch.Generator().manual_seed(0)
    per, alone = {}, {}
    masks = {"clean": [1, 1, 1, 1, 1, 1], "pgd-margin": [1, 1, 1, 0, 0, 1], "pgd-ce": [0, 1, 1, 1, 0, 1]}
    for path in sorted((tmp_path / "run-predictions").glob("*.pt")):  # sorted: the seeded draws go to fixed units
        unit = torch.load(path, weights_only=True)
        if unit["row"]["defence"] == "none":  # deterministic: the same labels in every evaluation
            right = torch.tensor(masks[unit["row"]["threat"]], dtype=torch.bool).expand(len(unit["predictions"]), 6)
            unit["predictions"] = torch.where(right, labels, (labels + 1) % 10)
            torch.save(unit, path)
            alone[unit["row"]["threat"]] = unit["predictions"]
        if unit["row"]["defence"] == "bcm(eps_inv=0.11, t_star=1)":
            right = torch.rand(10, 6, generator=generator) < 0.5
            unit["predictions"] = torch.where(right, labels, torch.randint(0, 10, (10, 6), generator=generator))
            torch.save(unit, path)
            per[unit["row"]["threat"]] = unit["predictions"]

    def no_attack(self, threat):
        raise AssertionError(f"--votes attacked ({threat})")

    monkeypatch.setattr(bench.whitebox.setting.Setting, "adversarial", no_attack)
    bench.adaptive.main([*args, "--votes", "1", "3", "10"])
    votes = pd.read_csv(tmp_path / "run-votes.csv").set_index(["threat", "votes"]).accuracy
    assert set(votes.index) == {(t, k) for t in ("clean", "pgd-margin", "pgd-ce", "worst") for k in (1, 3, 10)}
    scored = {t: correct_by_scoring(p, labels) for t, p in per.items()}
    for k, scoring in ((1, "single"), (10, "vote")):
        for threat in per:
            assert votes[threat, k] == pytest.approx(scored[threat][scoring].mean().item(), abs=1e-4)
        worst = torch.minimum(scored["pgd-margin"][scoring], scored["pgd-ce"][scoring])
        assert votes["worst", k] == pytest.approx(worst.mean().item(), abs=1e-4)
    three = {t: vote_of_k(p, labels, 3) for t, p in per.items()}
    assert votes["worst", 3] == pytest.approx(torch.minimum(three["pgd-margin"], three["pgd-ce"]).mean().item(),
                                              abs=1e-4)
    assert len({round(votes["pgd-margin", k], 4) for k in (1, 3, 10)}) == 3  # the replaced votes make K matter
    # the worst case minus the classifier alone's (deterministic: its first evaluation), image by image
    reference = torch.minimum(alone["pgd-margin"][0] == labels, alone["pgd-ce"][0] == labels).double()
    assert not torch.equal(alone["pgd-margin"][0] == labels, reference.bool())  # the worst case takes both
    paired = pd.read_csv(tmp_path / "run-votes.csv").set_index(["threat", "votes"])
    for k, per_image in ((1, torch.minimum(scored["pgd-margin"]["single"], scored["pgd-ce"]["single"])),
                         (3, torch.minimum(three["pgd-margin"], three["pgd-ce"]))):
        difference = (per_image.double() - reference).mean().item()
        assert paired.alone["worst", k] == pytest.approx(reference.mean().item(), abs=1e-4)
        assert paired["diff"]["worst", k] == pytest.approx(difference, abs=1e-4) and abs(difference) > 0.01
        assert paired.diff_low["worst", k] <= paired["diff"]["worst", k] <= paired.diff_high["worst", k]
    assert paired.loc["pgd-margin", "diff"].isna().all()  # only the worst case is compared
    assert "minus alone, paired" in (tmp_path / "run-votes.md").read_text()
    frame = pd.read_csv(tmp_path / "run-votes.csv")
    assert set(frame.defence) == {"bcm(eps_inv=0.11, t_star=1)"} and (frame.nfe == 2 * frame.votes).all()
    assert "| 3 | 6 |" in (tmp_path / "run-votes.md").read_text()
    bench.adaptive.main([*args[:-1], "0.5", "--votes", "5"])  # another setting's votes join the file
    frame = pd.read_csv(tmp_path / "run-votes.csv")
    assert frame.groupby("defence").votes.apply(set).to_dict() == {"bcm(eps_inv=0.11, t_star=1)": {1, 3, 10},
                                                                   "bcm(eps_inv=0.11, t_star=0.5)": {5}}
    bench.adaptive.main([*args, "--votes", "1"])  # and a setting re-scored replaces its own rows
    frame = pd.read_csv(tmp_path / "run-votes.csv")
    assert frame.groupby("defence").votes.apply(set).to_dict() == {"bcm(eps_inv=0.11, t_star=1)": {1},
                                                                   "bcm(eps_inv=0.11, t_star=0.5)": {5}}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        bench.adaptive.main([*args, "--votes", "11"])
    assert exit_info.value.code == 2 and "1 <= K <= N = 10" in capsys.readouterr().err


def test_a_convergence_study_runs_square_through_the_randomized_purifier(checkpoints, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    """A ``square:QxD`` budget runs the gradient-free Square through the randomized purifier under the per-image
    noise stream. AutoAttack's Square would query only the images it has not fooled yet (here most of them from
    its first query: the small test classifier gets most images wrong), subsets that a stream laid out for the
    whole batch refuses; ours queries every image every time. Its row, cache and Markdown name it and count its
    forward passes."""
    import bench.whitebox.convergence as conv

    crafted, real_craft = {}, conv.craft

    def recording(attack, images, labels, *args, ids=None, desc="", **kwargs):
        crafted[desc] = (images.clone(), real_craft(attack, images, labels, *args, ids=ids, desc=desc, **kwargs))
        return crafted[desc][1]

    monkeypatch.setattr(conv, "craft", recording)
    bench.adaptive.main([*checkpoints, "--n", "12", "--batch-size", "12", "--t-stars", "1", "--out",
                         str(tmp_path / "grid.csv"), "--convergence", "1x1", "square:40x2"])
    assert list(crafted) == ["margin-PGD 1x1", "Square 40x2"]
    images, adversarial = crafted["Square 40x2"]
    assert (adversarial - images.float() / 255).abs().amax() <= 8 / 255 + 1e-6
    assert not torch.equal(adversarial, images.float() / 255)
    frame = pd.read_csv(tmp_path / "convergence.csv")
    square = frame[frame.threat == "square"]
    assert len(frame) == 6 and len(square) == 3 and set(zip(square.steps, square.eot)) == {(40, 2)}
    assert square.attack.str.startswith("Square").all()
    assert len(list((tmp_path / "convergence-predictions").glob("*-40x2.pt"))) == 1
    md = (tmp_path / "convergence.md").read_text()
    assert "then Square" in md and "| Square 40 x 2 | 80 forwards |" in md


def test_convergence_budgets_name_their_threat():
    from bench.whitebox.config import Budget, budget
    assert budget("20x4") == Budget("pgd-margin", 20, 4) == budget("pgd-margin:20x4")
    assert budget("PGD-CE:100x10") == Budget("pgd-ce", 100, 10)
    assert budget("apgd-dlr:3x2") == Budget("apgd-dlr", 3, 2) and budget("square:1000x10").threat == "square"
    assert [b.label for b in map(budget, ("20x4", "apgd-ce:100x10", "square:5x2"))] == [
        "20 x 4", "APGD-CE 100 x 10", "Square 5 x 2"]
    assert budget("pgd-ce:7x3").desc == "CE-PGD 7x3" and budget("7x3").desc == "margin-PGD 7x3"


def test_a_convergence_study_runs_each_budgets_own_threat(checkpoints, tmp_path, monkeypatch):  # noqa: F811
    """Budgets naming CE-PGD, APGD-CE and APGD-DLR build those attacks (their loss, steps and draws), and a
    budget of the same size as margin-PGD's keeps its own rows and cache instead of reusing margin-PGD's."""
    import bench.whitebox.convergence as conv

    built, real_craft = [], conv.craft

    def recording(attack, *args, desc="", **kwargs):
        if hasattr(attack, "apgd"):
            built.append((desc, "apgd", attack.apgd.loss, attack.apgd.n_iter, attack.apgd.model.draws))
        else:
            built.append((desc, "pgd", attack.loss, attack.steps, attack.scores.draws))
        return real_craft(attack, *args, desc=desc, **kwargs)

    monkeypatch.setattr(conv, "craft", recording)
    bench.adaptive.main([*checkpoints, "--n", "4", "--batch-size", "4", "--t-stars", "1", "--out",
                         str(tmp_path / "grid.csv"), "--convergence", "1x1", "pgd-ce:1x1", "apgd-ce:2x2",
                         "apgd-dlr:1x3"])
    assert built == [("margin-PGD 1x1", "pgd", "margin", 1, 1), ("CE-PGD 1x1", "pgd", "ce", 1, 1),
                     ("APGD-CE 2x2", "apgd", "ce", 2, 2), ("APGD-DLR 1x3", "apgd", "dlr", 1, 3)]
    frame = pd.read_csv(tmp_path / "convergence.csv")
    assert len(frame) == 4 * 3
    assert set(zip(frame.threat, frame.steps, frame.eot)) == {("pgd-margin", 1, 1), ("pgd-ce", 1, 1),
                                                              ("apgd-ce", 2, 2), ("apgd-dlr", 1, 3)}
    assert frame[frame.threat == "apgd-dlr"].attack.str.startswith("APGD-DLR").all()
    assert len(list((tmp_path / "convergence-predictions").glob("*-1x1.pt"))) == 2
    md = (tmp_path / "convergence.md").read_text()
    assert "Margin-PGD budgets, then CE-PGD, APGD-CE, APGD-DLR on 4" in md
    assert "| CE-PGD 1 x 1 | 1 |" in md and "| APGD-CE 2 x 2 | 4 |" in md and "| APGD-DLR 1 x 3 | 3 |" in md


def test_a_convergence_study_under_torchrun_writes_what_one_process_writes(checkpoints, tmp_path):  # noqa: F811
    """An escalated study, margin-PGD then Square, on 2 ranks (gloo) against one process, in blocks of 2: each
    rank attacks its own blocks (disjoint, together every image), and the same per-budget predictions and
    accuracies come out, in one CSV, with no leftover blocks."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    launch = ("import os, pathlib, bench.adaptive, bench.ledger, bench.whitebox.convergence as conv\n"
              "bench.ledger.LEDGER_PATH = pathlib.Path(os.environ['LOG'] + '-ledger.csv')  # it studies test images\n"
              "real = conv.craft\n"
              "def craft(*args, ids=None, desc='', **kwargs):\n"
              "    with open(pathlib.Path(os.environ['LOG']) / os.environ['RANK'], 'a') as log:\n"
              "        log.write(desc + ':' + ','.join(str(int(i)) for i in ids) + '\\n')\n"
              "    return real(*args, ids=ids, desc=desc, **kwargs)\n"
              "conv.craft = craft\n"
              "bench.adaptive.main()")
    outputs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}" / "grid.csv"
        (tmp_path / f"log{world}").mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                   "--no-python", "--", sys.executable, "-c", launch, *checkpoints, "--n", "8", "--batch-size", "2",
                   "--t-stars", "1", "--threads", "1", "--out", str(out), "--convergence", "1x1", "square:5x2",
                   "--escalate"]
        result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600,
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1",
                                     "LOG": str(tmp_path / f"log{world}")})
        assert result.returncode == 0, result.stderr[-3000:]
        attacked = {}  # (budget, rank) -> the image ids that rank attacked
        for log in (tmp_path / f"log{world}").iterdir():
            for line in log.read_text().splitlines():
                budget, ids = line.split(":")
                attacked.setdefault(budget, {}).setdefault(log.name, []).extend(ids.split(","))
        for budget, by_rank in attacked.items():
            assert len(by_rank) == world or budget != "margin-PGD 1x1"  # 8 images: 4 blocks, 2 per rank
            every = [i for ids in by_rank.values() for i in ids]
            assert len(every) == len(set(every))  # no image attacked twice
        caches = out.with_name("convergence-escalated-predictions")
        outputs[world] = (pd.read_csv(out.with_name("convergence-escalated.csv")),
                          {p.name: torch.load(p, weights_only=True) for p in caches.glob("*.pt")})
        assert not (caches / ".blocks").exists() or not any((caches / ".blocks").iterdir())
        assert result.stdout.count("then Square, escalated") == 1  # rank 0 alone reports
    (one, one_predictions), (two, two_predictions) = outputs[1], outputs[2]
    assert one_predictions.keys() == two_predictions.keys() and len(one_predictions) == 2
    for name, stored in one_predictions.items():
        assert torch.equal(stored["ids"], two_predictions[name]["ids"])
        assert torch.equal(stored["predictions"], two_predictions[name]["predictions"])
    columns = ["threat", "steps", "eot", "scoring", "accuracy", "ci_low", "ci_high"]
    pd.testing.assert_frame_equal(one[columns], two[columns])
