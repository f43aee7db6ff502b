"""A job for tests/test_shards.py, run under torchrun: an attack through a purifier and its evaluation over 10
images, split by blocks across the ranks (``map_blocks``), the merged predictions saved by rank 0.

    python -m torch.distributed.run --nproc-per-node 2 tests/shard_worker.py OUT --batch-size 2 [--fail kill|raise]
        [--slow SECONDS]
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_network  # noqa: E402

from attacks import BestIteratePGD, craft, predict_draws  # noqa: E402
from purify import BCM, BCMConfig, BCMPurifier, image_noise  # noqa: E402
from purify.infra.shards import Shard, map_blocks, remove_blocks  # noqa: E402


def models() -> tuple[BCMPurifier, nn.Module]:
    torch.manual_seed(0)
    bcm = BCM(BCMConfig(network=tiny_network()))
    g = torch.Generator().manual_seed(1)
    for p in bcm.parameters():
        if not p.detach().any():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                               nn.Linear(16, 10))
    return BCMPurifier(bcm.eval(), t_star=1.0, eps_inv=0.3), classifier.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--fail", choices=["kill", "raise"])
    parser.add_argument("--slow", type=float, default=0.0, help="rank 1 sleeps this long before its first block")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shard, _ = Shard.join("cpu")
    purifier, classifier = models()
    model = purifier.wrap(classifier)
    images = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels, ids = torch.arange(10) % 10, torch.arange(50, 60)
    attack = BestIteratePGD(model, 8 / 255, steps=2, draws=2, seed=3)
    stream = lambda i, d: purifier.noise_stream(i, seed=5)  # noqa: E731
    evaluation = lambda i, d: purifier.fixed_noise(image_noise(i, (3, 32, 32), seed=9, draw=d))  # noqa: E731
    done = Path(args.out) / f"computed-rank{shard.rank}.txt"

    def compute(start: int, stop: int) -> torch.Tensor:
        if args.fail and shard.rank == 1 and done.is_file():  # rank 1 fails on its second block
            if args.fail == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError(f"block {start}-{stop} cannot be attacked on rank {shard.rank}")
        if shard.rank == 1 and not done.is_file():
            time.sleep(args.slow)
        adversarial = craft(attack, images[start:stop], labels[start:stop], batch_size=stop - start,
                            ids=ids[start:stop], noise=stream, progress=False)
        with done.open("a") as log:
            log.write(f"{start}-{stop}\n")
        return predict_draws(model, adversarial, ids[start:stop], evals=3, noise=evaluation).T

    predictions = map_blocks(compute, len(images), args.batch_size, Path(args.out) / "blocks", shard,
                             progress=False)
    remove_blocks(Path(args.out) / "blocks", shard)
    if shard.main:
        torch.save(predictions, Path(args.out) / "predictions.pt")
    if shard.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
