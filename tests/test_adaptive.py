"""The adaptive (white-box) harness: scorings, per-image noise, EOT, BPDA, AutoAttack-rand, bench.adaptive."""
import pandas as pd
import pytest
import torch
from torch import nn

import bench.adaptive
from attacks import (BPDA, autoattack_rand, autoattack_standard, correct_by_scoring, craft, eot_pgd, predict_draws,
                     run_autoattack, score)
from purify import BCMPurifier, image_noise
from test_attacks import TemplateClassifier, template_data
from test_bench import checkpoints  # noqa: F401 (fixture)


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


def test_eot_pgd_averages_every_step_over_the_draws_and_stays_in_the_ball():
    model = CountingModel(TemplateClassifier().eval())
    images, labels = template_data(model.model, n=20)
    adversarial = eot_pgd(model, eps=4 / 255, steps=3, step_size=1 / 255, eot=5)(images, labels)
    assert model.calls == 3 * 5
    assert (adversarial - images).abs().max() <= 4 / 255 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with pytest.raises(ValueError, match="eot >= 1"):
        eot_pgd(model, eps=4 / 255, steps=3, step_size=1 / 255, eot=0)


def test_white_box_attacks_break_an_undefended_linear_classifier():
    model = TemplateClassifier().eval()
    images, labels = template_data(model, n=20)
    pgd = eot_pgd(model, eps=32 / 255, steps=20, step_size=4 / 255, eot=1)(images, labels)
    adversary = autoattack_rand(model, eps=32 / 255, iters=10, eot=1)
    assert adversary.apgd.n_iter == 10 and adversary.apgd.eot_iter == 1
    assert adversary.attacks_to_run == ["apgd-ce", "apgd-dlr"]
    auto = run_autoattack(adversary, images, labels, batch_size=20)
    for adversarial in (pgd, auto):
        assert (adversarial - images).abs().max() <= 32 / 255 + 1e-5
        assert (model(adversarial).argmax(1) == labels).float().mean() == 0


def adaptive_args(checkpoints, out, *extra):  # noqa: F811
    return [*checkpoints, "--n", "6", "--batch-size", "6", "--t-stars", "0.5", "1", "--out", str(out), *extra]


def test_bench_adaptive_grid_scores_and_resumes(checkpoints, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "adaptive.csv"
    bench.adaptive.main(adaptive_args(checkpoints, out))
    frame = pd.read_csv(out)
    assert len(frame) == 2 * (len(bench.adaptive.THREATS) - 1) * 3  # 2 t*, every threat but aa-standard, 3 scorings
    wide = frame.pivot_table(index=["t_star", "threat"], columns="scoring", values="accuracy")
    assert (wide["worst"] <= wide["single"] + 1e-9).all() and (wide["single"] <= 1).all()
    for t_star in (0.5, 1.0):
        cell = wide.loc[t_star]
        assert (cell.loc["worst"] <= cell.loc[["pgd-eot", "aa-rand"]].min() + 1e-9).all()
    assert set(frame.protocol) == {"cpu"} and set(frame.evals) == {10}
    assert frame.loc[frame.threat == "pgd-eot", "eot"].eq(4).all()
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()

    def no_attack(self, threat):
        raise AssertionError(f"resumed run recomputed {threat}")

    monkeypatch.setattr(bench.adaptive.Setting, "adversarial", no_attack)
    before = out.read_text()
    bench.adaptive.main(adaptive_args(checkpoints, out))
    assert out.read_text().splitlines()[0] == before.splitlines()[0]
    after = pd.read_csv(out).drop(columns=["wall_s", "s_per_image", "purify_s_per_image", "step_s_per_image"])
    assert after.equals(frame.drop(columns=["wall_s", "s_per_image", "purify_s_per_image", "step_s_per_image"]))


def test_retime_rewrites_only_the_selected_settings_costs(checkpoints, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "adaptive.csv"
    bench.adaptive.main(adaptive_args(checkpoints, out))
    before = pd.read_csv(out)
    monkeypatch.setattr(bench.adaptive, "measure_costs",
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
    # AutoAttack's standard version for the deterministic defence, its rand version for the randomized one
    assert set(jpeg.threat) == set(bench.adaptive.THREATS) - {"pgd-fixed", "aa-rand"}
    assert set(denoise.threat) == set(bench.adaptive.THREATS) - {"aa-standard"}
    assert jpeg[jpeg.threat == "aa-standard"].attack.str.contains("BPDA").all()
    assert jpeg[jpeg.threat == "worst"].attack.str.contains("AutoAttack standard").all()
    accuracy = jpeg[jpeg.scoring == "single"].set_index("threat").accuracy
    assert accuracy["worst"] <= min(accuracy["pgd-eot"], accuracy["aa-standard"]) + 1e-9
    assert jpeg[jpeg.threat == "pgd-eot"].eot.eq(1).all() and denoise[denoise.threat == "pgd-eot"].eot.eq(4).all()
    assert jpeg[jpeg.threat == "pgd-eot"].attack.str.contains("BPDA").all()
    assert jpeg.nfe.eq(0).all() and denoise.nfe.eq(1).all() and jpeg.t_star.isna().all()
    # a deterministic defence scores the same under every scoring
    wide = jpeg.pivot_table(index="threat", columns="scoring", values="accuracy")
    assert (wide["single"] == wide["worst"]).all() and (wide["single"] == wide["vote"]).all()
    md = out.with_suffix(".md").read_text()
    sections = {("jpeg" if "`jpeg(quality=60)`" in part else "denoise"): part for part in md.split("**small preset")[1:]}
    jpeg_md, denoise_md = sections["jpeg"], sections["denoise"]
    assert "defence `jpeg(quality=60)`" in jpeg_md and "AutoAttack standard (APGD-CE, APGD-T" in jpeg_md
    assert "no EOT" in jpeg_md and "x 4 EOT draws" in denoise_md and "AutoAttack-rand" in denoise_md


def test_threats_option_runs_only_the_chosen_threats(checkpoints, tmp_path):  # noqa: F811
    out = tmp_path / "some.csv"
    bench.adaptive.main([*checkpoints, "--n", "4", "--batch-size", "4", "--t-stars", "0.5", "--out", str(out),
                         "--threats", "clean", "pgd-eot"])
    assert set(pd.read_csv(out).threat) == {"clean", "pgd-eot"}  # no AutoAttack, hence no worst case
    bench.adaptive.main([*checkpoints, "--n", "4", "--batch-size", "4", "--t-stars", "0.5", "--out", str(out),
                         "--threats", "pgd-eot", "aa-rand"])
    assert set(pd.read_csv(out).threat) == {"clean", "pgd-eot", "aa-rand", "worst"}  # worst once both ran


def test_bench_adaptive_rejects_bad_input(checkpoints, tmp_path, capsys):  # noqa: F811
    for bad in (["--eps", "0"], ["--target", "resnet"], ["--protocol", "gpu"], ["--split", "train"],
                ["--convergence", "5y4"], ["--convergence", "0x4"], ["--n", "0"], ["--defence", "vote"],
                ["--defence", "nosuch"], ["--threats", "worst"], ["--threats", "pgd"]):
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
    assert "| 3 x 2 | 6 |" in (tmp_path / "convergence.md").read_text()


def test_sanity_check_fails_without_gradients(tiny_bcm, monkeypatch):
    """A defence that hides its gradient (a hard quantizer without BPDA) must fail the gradient check."""

    class Args:
        batch_size, attack_seed, eval_seed, bf16_on = 10, 0, 1, False

    monkeypatch.setattr(bench.adaptive, "SANITY_BUDGETS", [(2, 1), (3, 1), (4, 2), (5, 2)])  # fast
    classifier = TemplateClassifier().eval()
    images, labels = template_data(classifier, n=10)
    purifier = BCMPurifier(tiny_bcm, t_star=0.5)
    masked = nn.Sequential(BPDA(lambda x: x, lambda x: torch.round(x * 4) / 4), classifier).eval()
    checks = dict((name, ok) for name, ok, _ in bench.adaptive.sanity_checks(
        masked, purifier, (images * 255).to(torch.uint8), labels, torch.arange(10), 8, Args()))
    assert checks["gradients through the purifier are finite and non-zero"] is False


def test_validation_split_is_the_classifiers_held_out_training_images(monkeypatch):
    import bench.common
    from purify.data import train_val_split

    images = torch.arange(50_000).view(-1, 1, 1, 1)
    monkeypatch.setattr(bench.common, "load_cifar10", lambda split, root: (images, images.flatten() % 10))
    x, y, ids = bench.common.load_split("val", None, n=200, seed=3)
    train, held_out = train_val_split(50_000, 1000, seed=0)
    assert len(ids) == 200 and set(ids.tolist()) <= set(held_out.tolist())
    assert torch.equal(x.flatten(), ids) and torch.equal(y, ids % 10)
    with pytest.raises(ValueError, match="--n must be in"):
        bench.common.load_split("val", None, n=1001, seed=3)


def test_eot_pgd_takes_steps_of_the_given_size():
    """PGD: x <- clip(x + step_size * sign(grad)); without random start one step moves every pixel by exactly
    step_size (the images are kept away from 0 and 1, and step_size < eps, so neither clip binds)."""
    model = TemplateClassifier().eval()
    images, labels = template_data(model, n=10)
    images = images.clamp(0.1, 0.9)
    attack = eot_pgd(model, eps=8 / 255, steps=1, step_size=2 / 255, eot=1, random_start=False)
    delta = attack(images, labels) - images
    torch.testing.assert_close(delta.abs(), torch.full_like(delta, 2 / 255), rtol=0, atol=1e-6)
    # three such steps inside an eps = 4/255 ball end on its boundary
    delta = eot_pgd(model, eps=4 / 255, steps=3, step_size=2 / 255, eot=1, random_start=False)(images, labels) - images
    assert delta.abs().max() <= 4 / 255 + 1e-6 and (delta.abs() > 3.9 / 255).float().mean() > 0.5


def test_protocol_step_sizes_are_fractions_of_eps():
    """Spec §9 (Lee & Kim): 200 steps of 0.007 at eps 8/255 with 20 EOT draws, N = 10; the step scales with eps."""
    from attacks import get_protocol

    paper, cpu = get_protocol("paper"), get_protocol("cpu")
    assert (paper.pgd_steps, paper.eot, paper.apgd_iters, paper.evals) == (200, 20, 100, 10)
    assert paper.step_size(8 / 255) == pytest.approx(0.007)
    for eps in (4 / 255, 16 / 255):
        assert paper.step_size(eps) == pytest.approx(0.007 * eps / (8 / 255))
        assert cpu.step_size(eps) == pytest.approx(0.25 * eps)


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
    adversarial = run_autoattack(adversary, images, labels, batch_size=20)
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


def test_autoattack_rand_uses_the_given_iterations_and_draws():
    adversary = autoattack_rand(TemplateClassifier().eval(), eps=8 / 255, iters=7, eot=3)
    assert adversary.apgd.n_iter == 7 and adversary.apgd.eot_iter == 3
    assert adversary.version == "rand" and adversary.norm == "Linf" and adversary.epsilon == pytest.approx(8 / 255)


def test_an_attack_through_the_defence_leaves_the_classifier_in_eval_mode(tiny_bcm):
    """A fresh nn.Sequential is in training mode and torchattacks restores its model's mode after attacking:
    the wrapped classifier's batch norm would then update its running statistics on every later evaluation
    (this corrupted every setting after the first one of an adaptive grid)."""
    from test_bench import tiny_classifier

    classifier = tiny_classifier("preact", 0)
    stats = {k: v.clone() for k, v in classifier.state_dict().items() if "running" in k}
    defended = BCMPurifier(tiny_bcm, t_star=0.5).wrap(classifier)
    assert not defended.training
    images = torch.rand(4, 3, 32, 32)
    craft(eot_pgd(defended, 8 / 255, 2, 2 / 255, 2), images, torch.arange(4), progress=False)
    assert not classifier.training
    predict_draws(defended, images, torch.arange(4), 2)
    assert all(torch.equal(v, classifier.state_dict()[k]) for k, v in stats.items())
    with pytest.raises(ValueError, match="eval mode"):
        predict_draws(defended.train(), images, torch.arange(4), 1)
