"""Randomness drawn per image: an image's attack and its purifier noise do not depend on the batch it runs in,
so a data set split across batches or processes gives the same adversarial images as one run."""
import hashlib

import pytest
import torch
import torchattacks
from torch import nn

from attacks import BestIteratePGD, BestLossAPGD, DrawAverage, craft
from purify import BCMPurifier, image_noise
from test_attacks import TemplateClassifier, template_data


def small_classifier() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 10)).eval()


def test_evaluation_noise_keeps_its_key_and_streams_and_uniform_draws_are_separate():
    """The empty stream's key is the one every committed prediction cache was drawn with."""
    key = hashlib.blake2b(b"5:2:7", digest_size=8).digest()
    expected = torch.randn((3, 2, 2), generator=torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1))
    assert torch.equal(image_noise(torch.tensor([7]), (3, 2, 2), seed=5, draw=2)[0], expected)
    streamed = image_noise(torch.tensor([7]), (3, 2, 2), seed=5, draw=2, stream="attack")
    uniform = image_noise(torch.tensor([7]), (3, 2, 2), seed=5, draw=2, uniform=True)
    assert not torch.equal(streamed[0], expected) and uniform.min() >= 0 and uniform.max() < 1


def test_a_noise_stream_draws_per_image_per_call_and_per_copy(tiny_bcm):
    purifier = BCMPurifier(tiny_bcm, t_star=1.0, eps_inv=0.3)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([11, 3, 8, 20])
    with purifier.noise_stream(ids, seed=1):
        first, second = purifier(x.repeat(2, 1, 1, 1)), purifier(x)   # call 0: 2 copies; call 1: 1 copy
    with purifier.noise_stream(ids[2:], seed=1):                     # a smaller batch: the same noise
        part = purifier(x[2:].repeat(2, 1, 1, 1))
    torch.testing.assert_close(part, first.view(2, 4, 3, 32, 32)[:, 2:].reshape(4, 3, 32, 32), rtol=0, atol=1e-6)
    assert not torch.allclose(first[:4], first[4:])    # each copy has its own noise
    assert not torch.allclose(first[:4], second)       # and each call
    with purifier.noise_stream(ids, seed=1), pytest.raises(ValueError, match="cannot serve a batch of 3"):
        purifier(x[:3])


@pytest.mark.parametrize("make", [
    lambda model: BestIteratePGD(model, 8 / 255, steps=3, draws=2, restarts=2, seed=4),
    lambda model: BestLossAPGD(model, 8 / 255, iters=3, draws=2, restarts=2, seed=4),
], ids=["pgd", "apgd"])
def test_an_attack_through_a_purifier_gives_each_image_the_same_result_in_any_batch(tiny_bcm, make):
    """Random starts and the purifier's noise at every step are drawn per image: attacking 6 images in batches
    of 6, or of 2 and 4 with the images in another order, gives the same adversarial images."""
    purifier = BCMPurifier(tiny_bcm, t_star=1.0, eps_inv=0.3)
    model = purifier.wrap(small_classifier())
    attack = make(model)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels, ids = torch.arange(6), torch.tensor([40, 2, 17, 5, 33, 9])
    stream = lambda batch_ids, draw: purifier.noise_stream(batch_ids, seed=7)  # noqa: E731
    whole = craft(attack, images, labels, batch_size=6, ids=ids, noise=stream, progress=False)
    order = torch.tensor([4, 1, 5, 0, 2, 3])
    parts = craft(attack, images[order], labels[order], batch_size=2, ids=ids[order], noise=stream, progress=False)
    torch.testing.assert_close(parts, whole[order], rtol=0, atol=1e-6)
    assert not torch.equal(whole, images)


def test_craft_seeds_each_batch_by_its_first_image_so_a_shard_reproduces_its_batches():
    """torchattacks PGD draws its random start from the global RNG: seeded per batch, the second half of a run
    is what a process given only that half computes, and the seed still changes the result."""
    model = TemplateClassifier().eval()
    images, labels = template_data(model, n=8)
    ids = torch.arange(100, 108)
    attack = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=2, random_start=True)
    whole = craft(attack, images, labels, batch_size=4, ids=ids, progress=False)
    half = craft(attack, images[4:], labels[4:], batch_size=4, ids=ids[4:], progress=False)
    assert torch.equal(half, whole[4:])
    assert not torch.equal(craft(attack, images, labels, batch_size=4, ids=ids, seed=1, progress=False), whole)


def test_draw_average_lays_out_its_draws_as_copies_of_the_batch():
    """The layout the noise stream relies on: draw k of image i is row k * batch + i."""
    seen = []
    model = nn.Identity()
    model.forward = lambda x: seen.append(x) or torch.zeros(len(x), 10)
    x = torch.arange(3.0).view(3, 1, 1, 1)
    DrawAverage(model, draws=2)(x)
    assert seen[0].flatten().tolist() == [0, 1, 2, 0, 1, 2]
