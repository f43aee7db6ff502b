"""Throughput of the BCM toolkit on this machine: ``python -m bench.perf --config cifar10-small``.

Measures, for a BCM preset (untrained weights: speed does not depend on them):
- BCT training throughput (images/s) through the real trainer (data, loss, RAdam, EMA, CSV log, checkpoints),
  next to the bare cost of the network passes one BCT step needs (1 forward without gradient, 2 forward +
  backward, 1 forward + backward to the input through frozen weights), and their ratio;
- BCM forward throughput, purifier throughput (2 network evaluations) and each classifier's forward
  throughput, all without gradient;
- the same with ``channels_last`` off and on, and with bf16 autocast on the CPU;
- the defence comparison, in one run with the same network, classifier and batch: the BCM purifier (2 network
  evaluations) against the 100-step ``diffusion`` defence (DiffPure-style, same network) and against the bare
  cost of two network passes plus the classifier, each as purify + classify (no gradient) and as forward +
  backward to the input (one attack step).
Records the CPU and the capability torch detects on it (e.g. ``AVX2, native bf16 no``: there bf16 autocast is
emulated and slower than float32, and the bench commands default to float32). Writes ``results/perf/perf-<config>.csv`` and ``.md`` and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.func import functional_call

import classifiers
from classifiers import ARCHS, build_classifier
from purify import BCM, BCMPurifier, DiffusionPurifier, load_preset
from purify.infra.checkpoint import atomic_write
from purify.infra.paths import RESULTS_DIR
from purify.infra.runtime import cpu_capability, cpu_name, pick_device
from purify.train import Trainer

from .common import (
    BCM_PRESETS,
    add_preset_arguments,
    add_runtime_arguments,
    device_clock,
    from_args,
    positive_int,
    resolve_bf16,
)

CPU = torch.device("cpu")


def timed(fn, repeats: int, device: torch.device = CPU) -> float:
    """Seconds per call of ``fn`` (after one warm-up call), the best of ``repeats`` calls; on CUDA the clock is
    read after the queued kernels have finished (``device_clock``)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = device_clock(device)
        fn()
        best = min(best, device_clock(device) - start)
    return best


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def bare_bct_passes(bcm: BCM, batch: int, channels_last: bool, repeats: int, device: torch.device = CPU) -> float:
    """Seconds for the four network passes of one BCT step, without anything around them."""
    bcm = bcm.to(device)
    x = _layout(torch.randn(batch, 3, 32, 32, device=device), channels_last)
    t, u = torch.full((batch,), 1.0, device=device), torch.full((batch,), 0.002, device=device)
    frozen = {name: p.detach() for name, p in bcm.named_parameters()}

    def passes():
        with torch.no_grad():
            bcm(x, t, u)
        bcm(x, t, u).sum().backward()
        bcm(x, t, 2.0).sum().backward()
        x_u = x.clone().requires_grad_(True)
        functional_call(bcm, frozen, (x_u, t, u)).sum().backward()
        bcm.zero_grad(set_to_none=True)

    return timed(passes, repeats, device)


def training_throughput(preset, channels_last: bool, steps: int, device: torch.device = CPU) -> float:
    preset.train.channels_last = channels_last
    images = torch.randint(0, 256, (5000, 3, 32, 32), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(preset, out, images=images, device=str(device))
        trainer.run(max_steps=1, progress=False)  # warm-up
        start = device_clock(device)
        trainer.run(max_steps=steps, progress=False)
        return steps * preset.train.batch_size / (device_clock(device) - start)


def forward_throughput(model, batch: int, channels_last: bool, bf16: bool, repeats: int,
                       device: torch.device = CPU) -> float:
    x = _layout(torch.rand(batch, 3, 32, 32, device=device), channels_last)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(x)

    return batch / timed(run, repeats, device)


def step_time(model, batch: int, channels_last: bool, bf16: bool, repeats: int, device: torch.device = CPU) -> float:
    """Seconds per image of one attack step: forward and backward to the input, through frozen weights."""
    x = _layout(torch.rand(batch, 3, 32, 32, device=device), channels_last).requires_grad_(True)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().logsumexp(1).sum()
        torch.autograd.grad(loss, x)

    return timed(run, repeats, device) / batch


def defence_comparison(bcm: BCM, classifier: torch.nn.Module, batch: int, step_batch: int, bf16: bool,
                       repeats: int, add, device: torch.device = CPU) -> None:
    """The BCM purifier against the 100-step diffusion defence with the same network and classifier, and
    against two bare network passes plus the classifier; forward (purify + classify) and one attack step."""
    bcm = bcm.to(memory_format=torch.channels_last).eval().requires_grad_(False)
    classifier = classifier.eval().requires_grad_(False)
    kind = "channels_last" + ("+bf16" if bf16 else "")
    two_passes = _Call(bcm, lambda x: bcm(bcm(x * 2 - 1, 0.3, 1.0), 1.0, 0.002))
    defended = {
        "bare: 2 network passes + classifier": torch.nn.Sequential(two_passes, classifier),
        "BCM purifier (2 NFE) + classifier": BCMPurifier(bcm, t_star=1.0, eps_inv=0.3, seed=0).wrap(classifier),
        "diffusion defence (100 NFE, SDE) + classifier": DiffusionPurifier(bcm, t_star=1.0, steps=100, seed=0).wrap(
            classifier),
    }
    forward, step = {}, {}
    for what, model in defended.items():
        slow = "diffusion" in what  # one timed call after the warm-up: each takes minutes
        forward[what] = forward_throughput(model, batch, True, bf16, 1 if slow else repeats, device)
        step[what] = step_time(model, step_batch, True, bf16, 1 if slow else repeats, device)
        add(f"defend + classify: {what} (batch {batch})", kind, 1000 / forward[what], "ms/image")
        add(f"attack step: {what} (batch {step_batch})", kind, 1000 * step[what], "ms/image", "forward + backward")
    bcm_name, diffusion = "BCM purifier (2 NFE) + classifier", "diffusion defence (100 NFE, SDE) + classifier"
    bare = "bare: 2 network passes + classifier"
    add("diffusion / BCM purifier cost, defend + classify", kind, forward[bcm_name] / forward[diffusion], "x",
        "target >= 40")
    add("diffusion / BCM purifier cost, attack step", kind, step[diffusion] / step[bcm_name], "x", "target >= 40")
    add("BCM purifier / bare passes, defend + classify", kind, forward[bare] / forward[bcm_name], "x",
        "target <= 1.10")
    add("BCM purifier / bare passes, attack step", kind, step[bcm_name] / step[bare], "x", "target <= 1.10")


def compile_comparison(bcm: BCM, classifier: torch.nn.Module, batch: int, step_batch: int, bf16: bool,
                       repeats: int, add, device: torch.device = CPU) -> None:
    """The BCM purifier + classifier eager against ``torch.compile`` (inductor, default mode): purify + classify
    and one attack step per image, their speed-ups, and the seconds the first compiled call of each took."""
    bcm = bcm.to(memory_format=torch.channels_last).eval().requires_grad_(False)
    model = BCMPurifier(bcm, t_star=1.0, eps_inv=0.3, seed=0).wrap(classifier.eval().requires_grad_(False))
    kind = "channels_last" + ("+bf16" if bf16 else "")
    for what, measure, size in (("defend + classify", forward_throughput, batch), ("attack step", step_time,
                                                                                     step_batch)):
        def per_image(m: torch.nn.Module, measure=measure, size=size) -> float:
            value = measure(m, size, True, bf16, repeats, device)  # images/s, or seconds per image
            return 1 / value if measure is forward_throughput else value

        eager, compiled = per_image(model), torch.compile(model)
        start = device_clock(device)
        measure(compiled, size, True, bf16, 0, device)  # only the warm-up call, which compiles
        compiling = device_clock(device) - start
        fast = per_image(compiled)
        add(f"{what}: BCM purifier + classifier (batch {size})", kind, 1000 * eager, "ms/image", "eager")
        add(f"{what}: BCM purifier + classifier (batch {size})", kind, 1000 * fast, "ms/image", "torch.compile")
        add(f"torch.compile speed-up, {what}", kind, eager / fast, "x", f"first call {compiling:.0f} s")


def _attack_step_memory(config: str, classifier_preset: str, batch: int, recompute: bool, threads: int,
                        device: str = "cpu") -> tuple:
    """One attack step (forward + backward to the input through the purifier, t* = 0.5, and the ``wrn``
    classifier) after a no-gradient forward pass of the same batch: its seconds, the peak of the bytes the
    allocator holds for it above what it held before (CUDA: the caching allocator's peak; CPU: the CPU
    allocator's, from torch's profiler in a second, untimed step), and on the CPU the growth of the process's
    peak resident memory (run it in a fresh process), all in MiB; None where not measured."""
    import resource  # noqa: PLC0415 (Unix only; this measurement runs in its own process)

    device = torch.device(device)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    purifier = BCMPurifier(BCM(load_preset(config).model).to(device), t_star=0.5, eps_inv=0.25, seed=0,
                           recompute=recompute)
    model = purifier.wrap(build_classifier("wrn", classifier_preset).to(device).eval().requires_grad_(False))
    x = torch.rand(batch, 3, 32, 32, device=device)
    with torch.no_grad():
        model(x)
    cuda = device.type == "cuda"

    def step() -> None:
        point = x.clone().requires_grad_(True)
        torch.autograd.grad(model(point).logsumexp(1).sum(), point)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
    resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = device_clock(device)
    step()
    seconds = device_clock(device) - start
    if cuda:
        return (torch.cuda.max_memory_allocated(device) - allocated) / 2**20, None, seconds
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - resident
    return cpu_allocated_peak(step) / 2**20, grown / 2**20, seconds


def cpu_allocated_peak(function: Callable[[], None]) -> int:
    """The peak, while ``function`` runs, of the bytes torch's CPU allocator holds above what it held when it
    started (from the memory events of torch's profiler)."""
    with tempfile.TemporaryDirectory() as folder, quiet_stderr():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            function()
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    cpu = [e for e in events if e.get("Device Type") == 0]
    if not cpu:
        return 0
    before = cpu[0]["Total Allocated"] - cpu[0]["Bytes"]
    return max(e["Total Allocated"] for e in cpu) - before


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """The process's standard error (file descriptor 2, where the profiler's C++ side logs its start and stop)
    sent to /dev/null within the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def attack_memory(config: str, classifier_preset: str, batch: int, threads: int, add,
                  device: torch.device = CPU) -> None:
    """Peak memory and time of one attack step through the purifier, keeping the network's activations and
    recomputing them in the backward pass (``recompute=True``): on the CPU each in a fresh process."""
    import multiprocessing  # noqa: PLC0415

    results = {}
    if device.type == "cuda":
        for recompute in (False, True):
            results[recompute] = _attack_step_memory(config, classifier_preset, batch, recompute, threads, str(device))
    else:
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            for recompute in (False, True):
                results[recompute] = pool.apply(_attack_step_memory,
                                                (config, classifier_preset, batch, recompute, threads))
    what = f"(batch {batch}, t*=0.5, wrn)"
    for recompute, (allocated, resident, seconds) in results.items():
        kind = "recompute" if recompute else "keep activations"
        add(f"attack step memory {what}", kind, allocated / batch, "MiB/image", "allocator peak over no-grad")
        if resident is not None:
            add(f"attack step resident memory {what}", kind, resident / batch, "MiB/image", "peak RSS over no-grad")
        add(f"attack step time {what}", kind, 1000 * seconds / batch, "ms/image")
    add("recompute / keep: memory", "recompute", results[True][0] / results[False][0], "x",
        "allocator peaks; target <= 0.25")
    add("recompute / keep: time", "recompute", results[True][2] / results[False][2], "x", "target <= 1.4")


@dataclass(frozen=True)
class PerfRequest:
    """The command's arguments, ``config`` resolved to the BCM preset or YAML path it measures."""
    config: str
    train_steps: int
    eval_batch: int
    repeats: int
    compare_batch: int
    compare_step_batch: int
    only: str
    out: str
    preset: str
    bf16: bool | None
    device: str
    threads: int | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="BCM preset name or YAML path (default: the --preset's, e.g. cifar10-small)")
    parser.add_argument("--train-steps", type=positive_int, default=10, help="BCT steps timed through the trainer")
    parser.add_argument("--eval-batch", type=positive_int, default=256,
                        help="batch size of the forward measurements")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (the best is kept)")
    parser.add_argument("--compare-batch", type=positive_int, default=64,
                        help="batch of the defence comparison's forward measurements (default: 64)")
    parser.add_argument("--compare-step-batch", type=positive_int, default=8,
                        help="batch of its attack-step measurements; 100 steps of activations are kept for the "
                             "backward pass of the diffusion defence (default: 8)")
    parser.add_argument("--only", choices=("all", "training", "defences", "memory", "compile"), default="all",
                        help="measure everything, only the training/throughput part, only the defence "
                             "comparison, only the attack step's memory with and without recomputed "
                             "activations, or only torch.compile's speed-up of the purifier and classifier "
                             "(minutes of compilation: not part of all) (default: all)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "perf"), help="output folder")
    # untrained weights (speed does not depend on them): no checkpoint or batch-size options
    add_preset_arguments(parser, bcm=False, classifier_dir=False)
    add_runtime_arguments(parser, batch_size=None, device=True, progress=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    request = from_args(PerfRequest, args, config=args.config or BCM_PRESETS[args.preset])
    if Path(request.out).exists() and not Path(request.out).is_dir():
        parser.error(f"--out {request.out} is a file; give the folder to write perf-<config>.csv/.md into")
    if request.threads:
        torch.set_num_threads(request.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)

    try:
        preset = load_preset(request.config)
        classifiers.load_preset(request.preset)
    except (OSError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    device = pick_device(request.device)
    compare_bf16 = resolve_bf16(request, device)  # the defence comparison's precision
    rows = []

    def add(what, layout, value, unit, note=""):
        rows.append({"measurement": what, "layout": layout, "value": round(value, 2), "unit": unit, "note": note})
        print(f"{what:<44} {layout:<14} {value:10.2f} {unit} {note}", flush=True)

    if request.only in ("all", "training"):
        throughput(request, preset, add, device)
    if request.only in ("all", "memory"):
        attack_memory(request.config, request.preset, request.compare_step_batch, threads, add, device)
    if request.only in ("all", "defences"):
        defence_comparison(BCM(preset.model), build_classifier("wrn", request.preset), request.compare_batch,
                           request.compare_step_batch, compare_bf16, request.repeats, add, device)
    if request.only == "compile":
        compile_comparison(BCM(preset.model), build_classifier("wrn", request.preset), request.compare_batch,
                           request.compare_step_batch, compare_bf16, request.repeats, add, device)
    write_results(request, pd.DataFrame(rows), threads, device, compare_bf16)


def throughput(request: PerfRequest, preset, add, device: torch.device = CPU) -> None:
    """Training throughput against the bare passes, and the forward throughput of the BCM, the purifier and each
    classifier, with ``channels_last`` off and on, float32 and bf16."""
    batch = preset.train.batch_size
    for channels_last in (False, True):
        layout = "channels_last" if channels_last else "contiguous"
        bcm = BCM(preset.model).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        bare = bare_bct_passes(bcm, batch, channels_last, request.repeats, device)
        train = training_throughput(load_preset(request.config), channels_last, request.train_steps, device)
        add(f"BCT training (batch {batch})", layout, train, "images/s", "real trainer: data, EMA, log")
        add("bare BCT network passes (4 fwd, 3 bwd)", layout, batch / bare, "images/s")
        add("trainer step time / bare passes time", layout, (batch / train) / bare, "x", "target <= 1.25")
        for bf16 in (False, True):
            kind = layout + ("+bf16" if bf16 else "")
            bcm_forward = lambda x, m=bcm: m(x * 2 - 1, 1.0, 0.002)  # noqa: E731
            add("BCM forward (1 NFE)", kind,
                forward_throughput(_Call(bcm, bcm_forward), request.eval_batch, channels_last, bf16, request.repeats,
                                   device),
                "images/s")
            add("BCMPurifier (2 NFE, t*=80)", kind,
                forward_throughput(BCMPurifier(bcm, seed=0), request.eval_batch, channels_last, bf16, request.repeats,
                                   device),
                "images/s")
            for arch in ARCHS:
                add(f"classifier forward: {arch} ({request.preset})", kind,
                    forward_throughput(build_classifier(arch, request.preset), request.eval_batch,
                                       channels_last, bf16, request.repeats, device), "images/s")


def write_results(request: PerfRequest, table: pd.DataFrame, threads: int, device: torch.device,
                  compare_bf16: bool) -> None:
    """``perf-<config>[-<part>][-<device>].csv`` and ``.md`` in ``--out``."""
    name = Path(request.config).stem
    table.insert(0, "threads", threads)
    table.insert(1, "cpu_capability", cpu_capability())
    table.insert(2, "device", str(device))
    out = Path(request.out)
    suffix = ("" if request.only == "all" else f"-{request.only}") + ("" if device.type == "cpu" else f"-{device.type}")
    atomic_write(out / f"perf-{name}{suffix}.csv", lambda tmp: table.to_csv(tmp, index=False))
    header = (f"# Throughput, preset `{name}`, {threads} thread(s)\n\n"
              f"CPU: {cpu_name()} ({cpu_capability()}); load average at the end: {os.getloadavg()[0]:.2f}. "
              + (f"Device: {torch.cuda.get_device_name(device)}. " if device.type == "cuda" else "")
              + f"Command: `python -m bench.perf --config {request.config} --threads {threads} --only {request.only} "
                f"--device {device} --compare-batch {request.compare_batch} "
                f"--compare-step-batch {request.compare_step_batch}`."
              + (f" The defence comparison uses the `{request.preset}` `wrn` classifier and runs "
                 f"{'under bf16 autocast' if compare_bf16 else 'in float32'}."
                 if request.only in ("all", "defences", "compile")
                 else "")
              + (" The attack-step memory runs in float32 (on the CPU each setting in a fresh process)."
                 if request.only in ("all", "memory") else "") + "\n\n")
    atomic_write(out / f"perf-{name}{suffix}.md",
                 lambda tmp: Path(tmp).write_text(header + table.to_markdown(index=False) + "\n"))
    print(f"wrote {out}/perf-{name}{suffix}.csv and .md")


class _Call(torch.nn.Module):
    """Wrap a function of images in [0, 1] as a module (for the forward-throughput helper)."""

    def __init__(self, owner: torch.nn.Module, fn):
        super().__init__()
        self.owner, self.fn = owner, fn

    def forward(self, x):
        return self.fn(x)


if __name__ == "__main__":
    main()
