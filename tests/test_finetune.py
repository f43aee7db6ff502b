"""classifiers.finetune: training inputs through a defence, recipes, the variant checkpoint, resume, bench names."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from torch import nn

import bench.common
import classifiers
from classifiers.finetune import RECIPE_DIR, Recipe, finetune, load_recipe, main, training_inputs
from purify import Defence, make_defence
from purify.infra.checkpoint import load_checkpoint, save_checkpoint
from purify.infra.config import to_dict
from test_classifiers import tiny_config
from conftest import tiny_preset

torch.set_num_threads(1)


class Recording(Defence):
    """The identity as a differentiable defence that records whether each call needed gradients."""
    name = "recording"

    def __init__(self):
        super().__init__()
        self.calls: list[bool] = []

    def purify(self, x):
        self.calls.append(torch.is_grad_enabled() and x.requires_grad)
        return x * 1.0


def _images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _classifier():
    torch.manual_seed(0)
    return classifiers.build_classifier("preact", config=tiny_config()).eval()


def test_fgsm_inputs_stay_in_the_eps_ball_and_raise_the_loss():
    x, y = _images()
    model = _classifier()
    recipe = Recipe(defence="none", attack="fgsm", eps=8)
    torch.manual_seed(1)
    adv = training_inputs(recipe, make_defence("none"), model, x, y)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() > 7 / 255  # the step 1.25 eps reaches the ball's edge
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(adv), y) > loss(model(x), y) + 0.01


def test_pgd_inputs_take_the_recipe_steps():
    x, y = _images(8)
    model = _classifier()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    training_inputs(Recipe(defence="none", attack="pgd", eps=4, steps=3, step_size=1.0), make_defence("none"),
                    model, x, y)
    assert len(calls) == 3  # one forward per PGD step (the defence "none" adds no classifier call)


def test_the_attack_goes_through_the_defence_and_the_output_is_defended():
    x, y = _images(8)
    defence = Recording()
    training_inputs(Recipe(defence="none", attack="fgsm"), defence, _classifier(), x, y)
    # FGSM differentiates through the defence once, then the result is defended once more without gradients
    assert defence.calls == [True, False]


def test_without_attack_the_classifier_sees_the_defended_images():
    x, y = _images(8)
    bits = make_defence("bits", bits=1)
    torch.testing.assert_close(training_inputs(Recipe(defence="bits", attack="none"), bits, _classifier(), x, y),
                               bits(x), rtol=0, atol=0)


def test_recipes_are_validated_and_shipped_ones_load(tmp_path):
    shipped = sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))
    assert {"bcm-fgsm", "bcm-clean", "adv-fgsm", "bcm-fgsm-from-adv"} <= set(shipped)
    for name in shipped:
        assert isinstance(load_recipe(name), Recipe)
    with pytest.raises(ValueError, match="attack must be one of"):
        Recipe(attack="cw")
    with pytest.raises(ValueError, match="unknown recipe 'nosuch'; known recipes: adv-fgsm"):
        load_recipe("nosuch")


@pytest.fixture
def setup(tmp_path, tiny_bcm):
    """A tiny base preact checkpoint and a tiny BCM release file."""
    torch.manual_seed(0)
    model = classifiers.build_classifier("preact", config=tiny_config())
    save_checkpoint({"arch": "preact", "preset": "small", "config": dataclasses.asdict(tiny_config()),
                     "model": model.state_dict()}, tmp_path / "ck" / "preact-small.pt")
    save_checkpoint({"kind": "bcm", "config": to_dict(tiny_preset()), "ema": tiny_bcm.state_dict(), "step": 1},
                    tmp_path / "bcm.pt")
    return tmp_path


def _recipe(root, **settings):
    path = root / f"{settings.pop('name', 'tiny')}.yaml"
    path.write_text(yaml.safe_dump({"defence": "bcm:t_star=1", "attack": "fgsm", "epochs": 2, "val_n": 8,
                                    "val_steps": 1, **settings}))
    return str(path)


def _finetune(root, recipe, out="out", **options):
    """Fine-tune the tiny base of ``root`` into ``root/out`` (checkpoint, run state and logs)."""
    return finetune("preact", recipe, bcm=str(root / "bcm.pt"), checkpoint_dir=root / "ck", out_dir=root / out,
                    device="cpu", bf16=False, run_dir=root / out / "run", results_dir=root / out / "res", threads=1,
                    progress=False, train_subset=64, test_subset=8, **options)


def test_a_non_differentiable_defence_is_refused_for_adversarial_fine_tuning(setup):
    with pytest.raises(ValueError, match="not differentiable"):
        _finetune(setup, _recipe(setup, defence="jpeg", name="jpeg"))


def test_cli_reports_bad_input_in_one_line(setup, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--arch", "preact", "--recipe", "nosuch", "--checkpoint-dir", str(setup / "ck")])
    assert exit_info.value.code == 2
    assert "unknown recipe 'nosuch'" in capsys.readouterr().err


def test_finetune_writes_a_variant_that_bench_loads_and_resumes_identically(setup, data_root):
    recipe = _recipe(setup)
    straight = _finetune(setup, recipe, "a", data_root=data_root)
    assert straight["finished"] and straight["step"] == 2  # 64 images, one batch per epoch, 2 epochs
    state = load_checkpoint(setup / "a" / "preact-small-tiny.pt")
    assert state["finetune"]["defence"] == "bcm(eps_inv=0.11, t_star=1)"
    assert state["finetune"]["recipe"]["attack"] == "fgsm"
    base = load_checkpoint(setup / "ck" / "preact-small.pt")["model"]
    assert any(not torch.equal(base[k].half(), v) for k, v in state["model"].items() if v.is_floating_point())

    # bench loads it by name ARCH:VARIANT, and a missing variant names the fine-tuning command
    models = bench.common.load_classifiers(["preact:tiny"], "small", setup / "a", torch.device("cpu"))
    assert set(models) == {"preact:tiny"} and not models["preact:tiny"].training
    assert bench.common.check_names(["preact:tiny", "preact"], "target") == ["preact:tiny", "preact"]
    with pytest.raises(ValueError, match="unknown target 'resnet:tiny'"):
        bench.common.check_names(["resnet:tiny"], "target")
    with pytest.raises(FileNotFoundError, match="classifiers.finetune --arch preact --preset small --recipe other"):
        bench.common.load_classifiers(["preact:other"], "small", setup / "a", torch.device("cpu"))

    stopped = _finetune(setup, recipe, "b", data_root=data_root, max_minutes=0.0)
    assert not stopped["finished"] and stopped["step"] == 1
    resumed = _finetune(setup, recipe, "b", data_root=data_root, resume=True)
    a = load_checkpoint(setup / "a" / "run" / "preact-small-tiny-state.pt")
    b = load_checkpoint(setup / "b" / "run" / "preact-small-tiny-state.pt")
    for key in a["model"]:  # the purifier's noise and FGSM's start come from the saved RNG state
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    assert resumed["test_acc"] == straight["test_acc"]


def test_a_recipe_base_starts_from_that_variant_and_a_missing_one_names_its_command(setup, data_root):
    standard = load_checkpoint(setup / "ck" / "preact-small.pt")
    torch.manual_seed(1)
    start = classifiers.build_classifier("preact", config=tiny_config()).state_dict()
    save_checkpoint({**standard, "model": start}, setup / "ck" / "preact-small-robust.pt")
    recipe = _recipe(setup, name="warm", base="robust", lr=1e-9)  # a step this small leaves the start in place
    _finetune(setup, recipe, "w", data_root=data_root)
    state = load_checkpoint(setup / "w" / "preact-small-warm.pt")
    assert state["finetune"]["base"].endswith("preact-small-robust.pt")
    conv = next(k for k, v in start.items() if v.dim() == 4)
    torch.testing.assert_close(state["model"][conv].float(), start[conv], atol=1e-2, rtol=0)
    assert not torch.allclose(state["model"][conv].float(), standard["model"][conv], atol=1e-2)

    with pytest.raises(FileNotFoundError, match="classifiers.finetune --arch preact --preset small --recipe nosuch"):
        _finetune(setup, _recipe(setup, name="cold", base="nosuch"), "c", data_root=data_root)
