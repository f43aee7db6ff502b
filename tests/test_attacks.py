import pytest
import torch
from torch import nn

import attacks
from attacks import EPS_GRID, craft, make_attack, paper_pgd, pgd_steps


class TemplateClassifier(nn.Module):
    """Scores class c by the correlation of ``x - 0.5`` with a fixed +-1 pattern: exact on ``template_data``,
    whose images carry their class pattern at small amplitudes (2..20 / 255), so L-inf PGD flips more images
    the larger eps is. A tiny, deterministic stand-in for an undefended CIFAR classifier."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randint(0, 2, (10, 3 * 32 * 32), generator=g).float() * 2 - 1
        self.linear = nn.Linear(3 * 32 * 32, 10, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(patterns / 100)

    def forward(self, x):
        return self.linear((x - 0.5).flatten(1))


def template_data(model: TemplateClassifier, n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    amplitude = torch.linspace(2, 20, n)[torch.randperm(n, generator=g)] / 255
    patterns = model.linear.weight.detach()[labels].view(n, 3, 32, 32) * 100
    noise = 0.01 * torch.randn(n, 3, 32, 32, generator=g)
    return (0.5 + amplitude.view(n, 1, 1, 1) * patterns + noise).clamp(0, 1), labels


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_step_count_is_five_quarters_of_k():
    assert [pgd_steps(k) for k in EPS_GRID] == [0, 5, 10, 15, 20, 30, 40]
    assert pgd_steps(2) == 3 and pgd_steps(1) == 1  # round(2.5) and round(1.25), half up
    attack = paper_pgd(nn.Linear(1, 1), 12)
    assert attack.steps == 15 and attack.eps == pytest.approx(12 / 255) and attack.alpha == pytest.approx(2 / 255)
    assert attack.random_start  # the paper does not say; torchattacks' default


def test_eps_zero_returns_the_input_unchanged():
    model = TemplateClassifier()
    x, y = template_data(model)
    assert torch.equal(paper_pgd(model, 0)(x, y), x)
    assert torch.equal(craft(paper_pgd(model, 0), (x * 255).round().to(torch.uint8), y, progress=False),
                       (x * 255).round() / 255)


def test_pgd_stays_in_the_eps_ball_and_lowers_white_box_accuracy_as_eps_grows():
    torch.manual_seed(0)
    model = TemplateClassifier().eval()
    x, y = template_data(model)
    accs = []
    for k in (0, 4, 8, 16, 32):
        adv = craft(paper_pgd(model, k), x, y, batch_size=16, seed=0, progress=False)
        assert (adv - x).abs().max() <= k / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        accs.append(accuracy(model, adv, y))
    assert accs[0] == 1.0
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] == 0.0 and accs[1] > accs[3], accs


def test_craft_is_seeded_and_leaves_the_global_rng_alone():
    """torchattacks' own PGD draws its random start from the global RNG: ``craft`` seeds it per batch and
    restores the caller's state afterwards."""
    model = TemplateClassifier()
    x, y = template_data(model, n=12)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    pgd = make_attack("PGD", model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True)
    a = craft(pgd, x, y, batch_size=5, seed=1, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, craft(pgd, x, y, batch_size=5, seed=1, progress=False))
    assert not torch.equal(a, craft(pgd, x, y, batch_size=5, seed=2, progress=False))


def test_paper_pgd_is_torchattacks_pgd_from_a_random_start_drawn_per_image():
    """Without a random start ``paper_pgd`` is torchattacks' PGD step for step; its start (0 steps) is uniform
    in the eps-ball, depends on the seed and on the image's id and not on the batch it is drawn in, and the whole
    attack does not depend on the batch size either (its predictions; a few pixels of a linear model's gradient
    are zero up to rounding, and their sign may differ between batch shapes)."""
    import torchattacks

    model = TemplateClassifier().eval()
    x, y = template_data(model, n=12)
    ours = paper_pgd(model, 8, random_start=False)
    reference = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=False)
    assert torch.equal(ours(x, y), reference(x, y))

    start = paper_pgd(model, 8, seed=3)
    start.steps = 0
    by_5, by_3 = (craft(start, x, y, batch_size=b, progress=False) for b in (5, 3))
    assert torch.equal(by_5, by_3)
    delta = (by_5 - x)[(x > 8 / 255) & (x < 1 - 8 / 255)]  # away from the clamp
    assert delta.abs().max() <= 8 / 255 + 1e-6 and delta.abs().mean() == pytest.approx(4 / 255, rel=0.05)
    # the start follows the image's id, not its row in the batch
    assert torch.equal(craft(start, x[1:], y[1:], batch_size=5, ids=torch.arange(1, 12), progress=False),
                          by_5[1:])
    start.seed = 4
    assert not torch.equal(craft(start, x, y, batch_size=5, progress=False), by_5)

    attack = paper_pgd(model, 8, seed=3)
    by_12, by_5 = (craft(attack, x, y, batch_size=b, progress=False) for b in (12, 5))
    assert torch.equal(model(by_12).argmax(1), model(by_5).argmax(1))
    assert accuracy(model, by_12, y) < accuracy(model, x, y)


def test_other_torchattacks_attacks_by_name():
    model = TemplateClassifier()
    x, y = template_data(model, n=10)
    adv = make_attack("FGSM", model, eps=8 / 255)(x, y)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6
    assert "PGD" in attacks.ATTACKS and "APGD" in attacks.ATTACKS


def test_unknown_attack_or_eps_fails_clearly():
    with pytest.raises(ValueError, match="unknown attack 'PDG'.*PGD"):
        make_attack("PDG", nn.Linear(1, 1))
    for bad in (2.5, -4, 300, "8"):
        with pytest.raises(ValueError, match="eps = k/255"):
            paper_pgd(nn.Linear(1, 1), bad)


def test_craft_enters_the_noise_context_with_each_batchs_dataset_ids():
    """``noise(ids_of_batch, 0)`` is entered around each batch with the images' dataset indices (default: their
    positions), so the fixed-randomness ablation attacks image i with image i's noise."""
    import contextlib

    model = TemplateClassifier()
    x, y = template_data(model, n=10)
    seen = []

    @contextlib.contextmanager
    def noise(batch_ids, draw):
        seen.append((batch_ids.tolist(), draw))
        yield

    craft(paper_pgd(model, 0), x, y, batch_size=4, ids=torch.arange(100, 110), noise=noise, progress=False)
    assert seen == [(list(range(100, 104)), 0), (list(range(104, 108)), 0), ([108, 109], 0)]
    seen.clear()
    craft(paper_pgd(model, 0), x, y, batch_size=6, noise=noise, progress=False)
    assert seen == [(list(range(0, 6)), 0), (list(range(6, 10)), 0)]
