"""bf16 autocast is on by default only where the hardware runs it natively; --bf16/--no-bf16 still force it."""
import argparse

import pytest
import torch

import classifiers
from bench.common import add_common_arguments, resolve_bf16
from purify.infra.runtime import cpu_capability, native_bf16


@pytest.fixture(params=[False, True], ids=["avx2-like", "amx-like"])
def native_cpu(request, monkeypatch):
    """Make torch report a CPU without (AVX2-only) or with (AMX / AVX-512-BF16) native bf16."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: request.param, raising=False)
    return request.param


def test_native_bf16_follows_what_torch_reports(native_cpu, monkeypatch):
    assert native_bf16("cpu") is native_cpu
    assert native_bf16(torch.device("cpu")) is native_cpu
    assert cpu_capability().endswith("native bf16 " + ("yes" if native_cpu else "no"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, s=supported, **k: s)
        assert native_bf16("cuda") is supported


def _bench_args(*argv):
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    return parser.parse_args(["--device", "cpu", *argv])


def test_bench_default_is_native_support_and_flags_force_it(native_cpu):
    assert resolve_bf16(_bench_args()) is native_cpu                 # small preset: bf16 null = native only
    assert resolve_bf16(_bench_args("--bf16")) is True
    assert resolve_bf16(_bench_args("--no-bf16")) is False
    assert resolve_bf16(_bench_args("--preset", "paper")) is False   # the paper recipe is float32 everywhere


def test_classifier_training_default_is_native_support(native_cpu):
    small = classifiers.load_preset("small")
    assert small.bf16 is None and small.use_bf16(torch.device("cpu")) is native_cpu
    assert classifiers.load_preset("paper").use_bf16(torch.device("cpu")) is False


def test_classifier_training_flag_forces_bf16(monkeypatch, tmp_path):
    """``classifiers.train --bf16/--no-bf16`` reaches the training loop's autocast, whatever the CPU."""
    from classifiers import train as train_module

    seen = []
    monkeypatch.setattr(train_module, "autocast", lambda device, enabled: seen.append(enabled) or
                        torch.autocast("cpu", enabled=False))
    monkeypatch.setattr(train_module, "load_cifar10", lambda split, root=None: (
        torch.randint(0, 256, (1100, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (1100,))))
    common = ["--arch", "preact", "--device", "cpu", "--train-subset", "8", "--max-minutes", "0", "--no-progress",
              "--out-dir", str(tmp_path), "--run-dir", str(tmp_path), "--results-dir", str(tmp_path)]
    for flag, expected in (("--bf16", True), ("--no-bf16", False)):
        seen.clear()
        train_module.main(common + [flag])
        assert seen and set(seen) == {expected}
