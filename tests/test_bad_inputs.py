"""Bad inputs, corpus: every one ends in one clear line naming the problem (exit status 2 for a command), no
traceback and no partial file. The Python API raises ValueError/FileNotFoundError with the message instead.

Commands run in-process (``main([...])``, SystemExit caught) to stay fast; three run as real subprocesses.
"""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import bench.losscurve
import bench.perf
import bench.quality
import bench.report
import bench.tradeoff
import bench.transfer
import classifiers
import classifiers.finetune
import classifiers.train
import purify.export
import purify.train
from attacks import craft, make_attack, paper_pgd
from classifiers.config import ArchConfig, Archs, TrainConfig
from conftest import tiny_preset, write_image_folder
from purify import BCMPurifier
from purify.infra.checkpoint import save_checkpoint
from purify.infra.config import to_dict
from purify.network import NetworkConfig

REPO = Path(__file__).resolve().parent.parent
TINY = TrainConfig(archs=Archs(preact=ArchConfig(width=0.0625), wrn=ArchConfig(width=1, depth=10),
                               vgg=ArchConfig(width=0.0625), mobilenet=ArchConfig(width=0.1, stage2_stride=2)))


class Evil:
    """A pickle that would create a file when unpickled by a trusting loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def files(tmp_path, tiny_bcm, monkeypatch):
    """Inputs good and bad under ``tmp_path/in``: tiny classifiers, a tiny BCM release, a 30-image ImageFolder,
    corrupt, truncated, mismatched and malicious checkpoints. torchvision's download is disabled, so a missing
    data root fails at once."""
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    root = tmp_path / "in"
    for i, arch in enumerate(classifiers.ARCHS):
        torch.manual_seed(i)
        model = classifiers.build_classifier(arch, config=TINY)
        save_checkpoint({"arch": arch, "preset": "small", "config": to_dict(TINY), "model": model.state_dict()},
                        root / "cls" / f"{arch}-small.pt")
    preset = tiny_preset()
    preset.purifier.t_star = 0.5
    save_checkpoint({"kind": "bcm", "config": to_dict(preset), "weights": tiny_bcm.state_dict(),
                     "weights_from": "ema", "step": 1}, root / "bcm.pt")
    other = tiny_preset()
    other.model.network = NetworkConfig(channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    save_checkpoint({"kind": "bcm", "config": to_dict(other), "weights": tiny_bcm.state_dict(), "step": 1},
                    root / "mismatched-bcm.pt")
    save_checkpoint({"kind": "bcm", "config": {**to_dict(preset), "colour": 1}, "weights": tiny_bcm.state_dict(),
                     "step": 1}, root / "unknown-key-bcm.pt")
    (root / "corrupt.pt").write_bytes(b"this is not a checkpoint")
    data = (root / "bcm.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[:len(data) // 2])
    (root / "evil.pt").write_bytes(pickle.dumps(Evil(tmp_path / "pwned"), protocol=2))
    (root / "mismatched-cls").mkdir()
    (root / "mismatched-cls" / "preact-small.pt").write_bytes((root / "cls" / "wrn-small.pt").read_bytes())
    write_image_folder(root / "data")
    (root / "unknown-key.yaml").write_text(yaml.safe_dump({**to_dict(preset), "trian": {}}))
    (root / "broken.yaml").write_text("model:\n  network: [\n")  # a YAML syntax error on line 3
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "a-file").write_text("not a folder")
    (root / "bad.csv").write_text("a,b\n1,2\n")
    (root / "results" / "transfer").mkdir(parents=True)
    (root / "results" / "transfer" / "x.csv").write_text("a,b\n1,2\n")
    (tmp_path / "out").mkdir()
    return root


def snapshot(path: Path) -> set:
    return {p for p in path.rglob("*")}


# ------------------------------------------------------------------------------------------- Python API

IMAGES = torch.rand(2, 3, 32, 32)
API = {  # name: (call(tiny_bcm, root), exception, message)
    "purifier: 3-D image": (lambda bcm, r: BCMPurifier(bcm, 0.5)(IMAGES[0]), ValueError, "4-D"),
    "purifier: uint8 images": (lambda bcm, r: BCMPurifier(bcm, 0.5)((IMAGES * 255).byte()), ValueError, "dtype"),
    "purifier: values above 1": (lambda bcm, r: BCMPurifier(bcm, 0.5)(IMAGES * 3), ValueError, r"\[0, 1\]"),
    "purifier: NaN": (lambda bcm, r: BCMPurifier(bcm, 0.5)(IMAGES.clone().fill_(float("nan"))), ValueError, "NaN"),
    "purifier: inf": (lambda bcm, r: BCMPurifier(bcm, 0.5)(IMAGES.clone().fill_(float("inf"))), ValueError, "inf"),
    "purifier: empty batch": (lambda bcm, r: BCMPurifier(bcm, 0.5)(IMAGES[:0]), ValueError, "empty batch"),
    "purifier: channels last": (lambda bcm, r: BCMPurifier(bcm, 0.5)(IMAGES.permute(0, 2, 3, 1)), ValueError,
                                "channels"),
    "purifier: t* above T": (lambda bcm, r: BCMPurifier(bcm, t_star=100.0), ValueError, "t_star"),
    "purifier: t* <= 2 eps": (lambda bcm, r: BCMPurifier(bcm, t_star=0.003), ValueError, "below the model's eps"),
    "purifier: negative eps_inv": (lambda bcm, r: BCMPurifier(bcm, 1.0, eps_inv=-0.1), ValueError, "eps"),
    "purifier: truncated checkpoint": (lambda bcm, r: BCMPurifier.from_checkpoint(r / "truncated.pt"), ValueError,
                                       "corrupt"),
    "purifier: malicious pickle": (lambda bcm, r: BCMPurifier.from_checkpoint(r / "evil.pt"), ValueError, "corrupt"),
    "purifier: classifier checkpoint": (lambda bcm, r: BCMPurifier.from_checkpoint(r / "cls" / "wrn-small.pt"),
                                        ValueError, "lacks the entries"),
    "purifier: weights of another size": (lambda bcm, r: BCMPurifier.from_checkpoint(r / "mismatched-bcm.pt"),
                                          ValueError, "does not match"),
    "purifier: unknown config key": (lambda bcm, r: BCMPurifier.from_checkpoint(r / "unknown-key-bcm.pt"),
                                     ValueError, "unknown key"),
    "purifier: missing checkpoint": (lambda bcm, r: BCMPurifier.from_checkpoint(r / "nothing.pt"),
                                     FileNotFoundError, "not found"),
    "classifier: unknown arch": (lambda bcm, r: classifiers.load_classifier("resnet50", "small", r / "cls"),
                                 ValueError, "unknown architecture"),
    "classifier: unknown preset": (lambda bcm, r: classifiers.load_classifier("wrn", "huge", r / "cls"), ValueError,
                                   "unknown preset"),
    "classifier: missing checkpoint": (lambda bcm, r: classifiers.load_classifier("wrn", "small", r / "nothing"),
                                       FileNotFoundError, "no trained wrn/small classifier"),
    "classifier: mismatched checkpoint": (lambda bcm, r: classifiers.load_classifier("preact", "small",
                                                                                     r / "mismatched-cls"),
                                          ValueError, "holds a wrn/small classifier"),
    "classifier: accuracy on NaN": (lambda bcm, r: classifiers.accuracy(
        classifiers.load_classifier("wrn", "small", r / "cls"), IMAGES.clone().fill_(float("nan")),
        torch.zeros(2, dtype=torch.long), progress=False), ValueError, "NaN"),
    "classifier: accuracy on no images": (lambda bcm, r: classifiers.accuracy(
        classifiers.load_classifier("wrn", "small", r / "cls"), IMAGES[:0], torch.zeros(0, dtype=torch.long),
        progress=False), ValueError, "no images"),
    "attack: negative eps": (lambda bcm, r: paper_pgd(torch.nn.Identity(), -8), ValueError, "whole number"),
    "attack: fractional eps": (lambda bcm, r: paper_pgd(torch.nn.Identity(), 2.5), ValueError, "whole number"),
    "attack: unknown name": (lambda bcm, r: make_attack("PGDX", torch.nn.Identity()), ValueError, "unknown attack"),
    "attack: labels do not match images": (lambda bcm, r: craft(make_attack("VANILA", torch.nn.Identity()), IMAGES,
                                                                torch.zeros(3, dtype=torch.long), progress=False),
                                           ValueError, "2 images but 3 labels"),
}


@pytest.mark.parametrize("case", list(API))
def test_python_api_rejects_bad_input_clearly(case, files, tiny_bcm, tmp_path):
    call, error, message = API[case]
    with pytest.raises(error, match=message) as info:
        call(tiny_bcm, files)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()


# -------------------------------------------------------------------------------------------- commands

def T(r: Path) -> list[str]:
    """Options every bench command of the corpus shares: the tiny models and data under ``r``."""
    return ["--classifier-dir", str(r / "cls"), "--bcm", str(r / "bcm.pt"), "--data-root", str(r / "data"),
            "--no-progress", "--device", "cpu"]


TRAIN_OUT = ["--out", "{out}/run", "--device", "cpu"]
CLS_DIRS = ["--out-dir", "{out}/cls", "--run-dir", "{out}/run", "--results-dir", "{out}/res", "--device", "cpu",
            "--no-progress"]
CLI = {  # name: (main, argv (``{in}``/``{out}`` are filled in), message)
    "train: unknown preset": (purify.train.main, ["--config", "nosuch", *TRAIN_OUT], "no BCM preset 'nosuch'"),
    "train: unknown YAML key": (purify.train.main, ["--config", "{in}/unknown-key.yaml", *TRAIN_OUT],
                                "unknown key"),
    "train: broken YAML": (purify.train.main, ["--config", "{in}/broken.yaml", *TRAIN_OUT],
                           "broken.yaml, line 3: not valid YAML"),
    "train: YAML that is not a mapping": (purify.train.main, ["--config", "{in}/list.yaml", *TRAIN_OUT],
                                          "a config file is a mapping"),
    "transfer: broken defence file": (bench.transfer.main, ["--defence", "{in}/broken.yaml", "--out", "{out}/t.csv"],
                                      "not valid YAML"),
    "transfer: broken defence option value": (bench.transfer.main, ["--defence", "jpeg:quality=[", "--out",
                                                                    "{out}/t.csv"], "bad value '['"),
    "train: resume without checkpoint": (purify.train.main, ["--resume", *TRAIN_OUT], "does not exist"),
    "train: missing data root": (purify.train.main, [*TRAIN_OUT, "--data-root", "{in}/nothing"], "not found"),
    "train: malicious --init-from": (purify.train.main, [*TRAIN_OUT, "--init-from", "{in}/evil.pt",
                                                         "--data-root", "{in}/data"], "corrupt"),
    "train: classifier as --init-from": (purify.train.main, [*TRAIN_OUT, "--init-from", "{in}/cls/wrn-small.pt",
                                                             "--data-root", "{in}/data"], "holds no BCM weights"),
    "train: --out is a file": (purify.train.main, ["--out", "{in}/a-file", "--device", "cpu",
                                                   "--data-root", "{in}/data"], "a-file"),
    "train: zero threads": (purify.train.main, [*TRAIN_OUT, "--threads", "0"], "--threads must be positive"),
    "export: directory target": (purify.export.main, ["{in}/bcm.pt", "{out}"], "is a directory"),
    "export: truncated source": (purify.export.main, ["{in}/truncated.pt", "{out}/r.pt"], "corrupt"),
    "export: malicious source": (purify.export.main, ["{in}/evil.pt", "{out}/r.pt"], "corrupt"),
    "export: classifier source": (purify.export.main, ["{in}/cls/wrn-small.pt", "{out}/r.pt"], "lacks the entries"),
    "export: t* out of range": (purify.export.main, ["{in}/bcm.pt", "{out}/r.pt", "--t-star", "0"], "t_star"),
    "export: unwritable target": (purify.export.main, ["{in}/bcm.pt", "{in}/a-file/r.pt"], "a-file"),
    "classifiers.train: missing data root": (classifiers.train.main, ["--arch", "wrn", *CLS_DIRS, "--data-root",
                                                                       "{in}/nothing"], "not found"),
    "classifiers.train: unknown arch": (classifiers.train.main, ["--arch", "resnet", *CLS_DIRS], "invalid choice"),
    "classifiers.train: zero threads": (classifiers.train.main, ["--arch", "wrn", *CLS_DIRS, "--threads", "0"],
                                        "--threads must be positive"),
    "classifiers.finetune: zero threads": (classifiers.finetune.main, ["--arch", "wrn", "--recipe", "bcm-clean",
                                                                        *CLS_DIRS, "--threads", "0"],
                                           "--threads must be positive"),
    "transfer: eps off the grid": (bench.transfer.main, ["--eps", "7", "--out", "{out}/t.csv"], "invalid eps '7'"),
    "transfer: negative eps": (bench.transfer.main, ["--eps", "-8", "--out", "{out}/t.csv"], "invalid eps '-8'"),
    "transfer: n = 0": (bench.transfer.main, ["--n", "0", "--out", "{out}/t.csv"], "must be a positive integer"),
    "transfer: zero batch size": (bench.transfer.main, ["--batch-size", "0", "--out", "{out}/t.csv"],
                                  "must be a positive integer"),
    "transfer: unknown source": (bench.transfer.main, ["--source", "resnet", "--out", "{out}/t.csv"],
                                 "unknown source 'resnet'"),
    "transfer: missing BCM": (bench.transfer.main, [T, "--bcm", "{in}/nothing.pt", "--out", "{out}/t.csv"],
                              "no BCM checkpoint"),
    "transfer: corrupt BCM": (bench.transfer.main, [T, "--bcm", "{in}/corrupt.pt", "--out", "{out}/t.csv"],
                              "corrupt"),
    "transfer: t* out of range": (bench.transfer.main, [T, "--defence", "bcm:t_star=1000", "--out", "{out}/t.csv"],
                                  "t_star"),
    "transfer: unknown defence": (bench.transfer.main, ["--defence", "nosuch", "--out", "{out}/t.csv"],
                                  "unknown defence 'nosuch'"),
    "transfer: unknown defence option": (bench.transfer.main, [T, "--defence", "jpeg:qualty=5", "--out",
                                                               "{out}/t.csv"], "unknown option(s) qualty"),
    "transfer: missing defence file": (bench.transfer.main, ["--defence", "{in}/nothing.yaml", "--out",
                                                             "{out}/t.csv"], "does not exist"),
    "tradeoff: bad defence option": (bench.tradeoff.main, ["--defence", "jpeg:quality", "--out", "{out}/t.csv"],
                                     "write key=value"),
    "transfer: missing data root": (bench.transfer.main, [T, "--data-root", "{in}/nothing", "--out",
                                                          "{out}/t.csv"], "not found"),
    "transfer: mismatched classifier": (bench.transfer.main, [T, "--classifier-dir", "{in}/mismatched-cls",
                                                              "--out", "{out}/t.csv"], "holds a wrn/small"),
    "transfer: --out is a directory": (bench.transfer.main, [T, "--n", "4", "--out", "{out}"], "is a directory"),
    "tradeoff: negative t*": (bench.tradeoff.main, ["--t-stars", "-1", "--out", "{out}/t.csv"], "--t-stars"),
    "tradeoff: unknown source": (bench.tradeoff.main, ["--source", "resnet", "--out", "{out}/t.csv"],
                                 "invalid choice"),
    "tradeoff: eps off the grid": (bench.tradeoff.main, ["--eps", "5", "--out", "{out}/t.csv"], "invalid eps"),
    "quality: missing BCM": (bench.quality.main, ["--bcm", "{in}/nothing.pt", "--out", "{out}/q"],
                             "no BCM checkpoint"),
    "quality: corrupt BCM": (bench.quality.main, ["--bcm", "{in}/corrupt.pt", "--out", "{out}/q"], "corrupt"),
    "quality: n = 0": (bench.quality.main, ["--bcm", "{in}/bcm.pt", "--n", "0", "--out", "{out}/q"],
                       "--n: must be a positive integer"),
    "quality: t* out of range": (bench.quality.main, ["--bcm", "{in}/bcm.pt", "--t-stars", "0.001", "--device",
                                                      "cpu", "--out", "{out}/q"], "--t-stars must lie"),
    "report: missing results folder": (bench.report.main, ["--results", "{in}/nothing"], "is not a folder"),
    "report: CSV of another layout": (bench.report.main, ["--results", "{in}/results"], "has columns"),
    "perf: unknown preset": (bench.perf.main, ["--config", "nosuch", "--out", "{out}/p"], "no BCM preset"),
    "perf: zero threads": (bench.perf.main, ["--threads", "0", "--out", "{out}/p"],
                           "--threads: must be a positive integer"),
    "perf: --out is a file": (bench.perf.main, ["--out", "{in}/a-file"], "is a file"),
    "losscurve: missing log": (bench.losscurve.main, ["{in}/nothing.csv", "--out", "{out}/l.png"], "cannot read"),
    "losscurve: not a training log": (bench.losscurve.main, ["{in}/bad.csv", "--out", "{out}/l.png"],
                                      "not a purify.train log"),
    "losscurve: zero window": (bench.losscurve.main, ["{in}/bad.csv", "--window", "0", "--out", "{out}/l.png"],
                               "--window must be at least 1"),
    "losscurve: --out is a directory": (bench.losscurve.main, ["{in}/bad.csv", "--out", "{out}"], "is a directory"),
}


def fill(argv, root: Path, out: Path) -> list[str]:
    argv = [a for item in argv for a in (T(root) if item is T else [item])]
    return [a.replace("{in}", str(root)).replace("{out}", str(out)) for a in argv]


def check_error(err: str, message: str) -> str:
    """One line names the problem (after argparse's usage, when it prints one); no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), err
    assert message in lines[-1], err
    return lines[-1]


@pytest.mark.parametrize("case", list(CLI))
def test_commands_reject_bad_input_with_one_line_and_exit_2(case, files, tmp_path, capsys, monkeypatch):
    main, argv, message = CLI[case]
    if main is classifiers.train.main:  # keep it fast: no 50,000-image training set to read
        real = classifiers.train.load_cifar10
        monkeypatch.setattr(classifiers.train, "load_cifar10", lambda split, root=None: real(split, root) if str(
            root).endswith("nothing") else (torch.zeros(1100, 3, 32, 32, dtype=torch.uint8), torch.zeros(1100).long()))
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(fill(argv, files, tmp_path / "out"))
    assert info.value.code == 2
    check_error(capsys.readouterr().err, message)
    assert snapshot(tmp_path) == before, "a partial file was left behind"
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("argv, message", [
    (["purify.export", "{in}/bcm.pt", "{out}"], "is a directory"),
    (["purify.train", "--config", "nosuch", "--out", "{out}/run"], "no BCM preset"),
    (["bench.transfer", "--eps", "7", "--out", "{out}/t.csv"], "invalid eps"),
])
def test_commands_in_a_real_process(argv, message, files, tmp_path):
    module, *rest = fill(argv, files, tmp_path / "out")
    before = snapshot(tmp_path)
    run = subprocess.run([sys.executable, "-m", module, *rest], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert run.returncode == 2
    check_error(run.stderr, message)
    assert snapshot(tmp_path) == before
