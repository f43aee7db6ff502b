import argparse
from pathlib import Path

import pandas as pd
import pytest
import torch

import bench.batches
import bench.grid
import bench.transfer
import classifiers
from attacks import EPS_GRID
from bench import report, tables
from bench.batches import purify_images
from bench.common import Entry, ResultTable, numeric
from bench.grid import TransferGrid, run_cells
from classifiers.config import ArchConfig, Archs, TrainConfig
from purify import BCMPurifier
from purify.base import Defence
from purify.defences import JPEG, Vote
from purify.infra.checkpoint import save_checkpoint
from purify.infra.config import to_dict
from conftest import tiny_preset, write_image_folder
from test_attacks import TemplateClassifier, template_data

TINY = TrainConfig(archs=Archs(preact=ArchConfig(width=0.0625), wrn=ArchConfig(width=1, depth=10),
                               vgg=ArchConfig(width=0.0625), mobilenet=ArchConfig(width=0.1, stage2_stride=2)))
META = dict(preset="small", split="test", n=30, seed=0)


def tiny_classifier(arch: str, seed: int):
    torch.manual_seed(seed)
    return classifiers.build_classifier(arch, config=TINY).eval()


@pytest.fixture
def models():
    """``preact`` is a white-box-breakable template classifier, the rest tiny untrained architectures."""
    out = {arch: tiny_classifier(arch, i) for i, arch in enumerate(classifiers.ARCHS)}
    out["preact"] = TemplateClassifier().eval()
    return out


@pytest.fixture
def data(models):
    return template_data(models["preact"], n=30)


@pytest.fixture
def purifier(tiny_bcm):
    return BCMPurifier(tiny_bcm, t_star=0.5, seed=0)


@pytest.fixture
def checkpoints(tmp_path, tiny_bcm):
    """Throwaway classifier checkpoints (all four, tiny), a tiny BCM checkpoint and a 30-image ImageFolder."""
    for i, arch in enumerate(classifiers.ARCHS):
        model = tiny_classifier(arch, i)
        save_checkpoint({"arch": arch, "preset": "small", "config": to_dict(TINY), "model": model.state_dict()},
                        tmp_path / "cls" / f"{arch}-small.pt")
    preset = tiny_preset()
    preset.purifier.t_star = 0.5
    save_checkpoint({"kind": "bcm", "config": to_dict(preset), "ema": tiny_bcm.state_dict()}, tmp_path / "bcm.pt")
    write_image_folder(tmp_path / "data")
    return ["--classifier-dir", str(tmp_path / "cls"), "--bcm", str(tmp_path / "bcm.pt"),
            "--data-root", str(tmp_path / "data"), "--no-progress", "--batch-size", "16", "--no-bf16"]


def grid_of(models, data, **kwargs) -> TransferGrid:
    sources = {name: models[name] for name in ("preact", "wrn")}
    return TransferGrid(sources, models, *data, batch_size=16, progress=False, **kwargs)


def test_a_blocks_adversarial_images_are_those_of_its_images_in_any_batch(models, data):
    """PGD's random start is drawn per image id: the images at positions 10..19 crafted as one block (in batches
    of 4) are those crafted with all 30 (in batches of 16), up to the sign of a few gradients that are zero up to
    rounding."""
    sources = {"wrn": models["wrn"]}
    ids = torch.arange(100, 130)
    whole = TransferGrid(sources, models, *data, ids=ids, batch_size=16, progress=False).adversarial("wrn", 8)
    part = TransferGrid(sources, models, *data, ids=ids, batch_size=4, progress=False).adversarial("wrn", 8, 10, 20)
    assert (part - whole[10:20]).abs().gt(1e-6).float().mean() < 0.01
    assert (whole - data[0]).abs().max() > 7 / 255


def test_accuracy_before_purification_at_eps_0_is_the_clean_accuracy(models, data):
    grid = grid_of(models, data)
    clean = {t: classifiers.accuracy(m, *data, progress=False) for t, m in models.items()}
    assert grid.before("preact", 0, list(models)) == clean
    assert grid.before("wrn", 0, list(models)) == clean
    assert clean["preact"] == 1.0


def test_undefended_source_accuracy_falls_as_eps_grows(models, data):
    grid = grid_of(models, data)
    accs = [grid.before("preact", eps, ["preact"])["preact"] for eps in EPS_GRID]
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[0] == 1.0 and accs[-1] == 0.0 and accs[1] > accs[4], accs


def test_each_cell_crafts_once_and_clean_work_is_shared(models, data, purifier, monkeypatch, tmp_path):
    calls = {"craft": 0, "purify": 0}  # images crafted and purified (block by block)

    def counting(name, func, images_at):
        def wrapped(*args, **kwargs):
            calls[name] += len(args[images_at])
            return func(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(bench.grid, "craft", counting("craft", bench.grid.craft, 1))
    monkeypatch.setattr(bench.batches, "purify_images", counting("purify", bench.batches.purify_images, 1))
    table = ResultTable(tmp_path / "t.csv")
    cells = [(s, e) for s in ("preact", "wrn") for e in (0, 4)]
    run_cells(grid_of(models, data), table, cells, [Entry(purifier)], list(models), META)
    n = len(data[0])
    assert calls == {"craft": 3 * n, "purify": 3 * n}  # eps 0 once for both sources, eps 4 once per source
    frame = numeric(table.frame())
    assert len(frame) == 4 * 4
    clean = frame[frame.eps == 0].set_index(["source", "target"])
    assert (clean.loc["preact"] == clean.loc["wrn"]).all().all()


def test_resumed_grid_gives_the_same_csv(models, data, purifier, monkeypatch, tmp_path):
    cells = [(s, e) for s in ("preact", "wrn") for e in (0, 4, 8)]
    defences = [Entry(purifier), Entry(Defence())]
    run_cells(grid_of(models, data), ResultTable(tmp_path / "full.csv"), cells, defences, list(models), META)

    outputs, calls = TransferGrid.outputs, []

    def interrupted(self, *args):
        calls.extend([args] if args[4] is not None else [])  # a cell's computation (named unit), not a look-up
        if len(calls) == 3:
            raise KeyboardInterrupt
        return outputs(self, *args)

    monkeypatch.setattr(TransferGrid, "outputs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cells(grid_of(models, data), ResultTable(tmp_path / "resumed.csv"), cells, defences, list(models), META)
    monkeypatch.setattr(TransferGrid, "outputs", outputs)
    assert 0 < len(ResultTable(tmp_path / "resumed.csv").rows) < 2 * 6 * 4
    run_cells(grid_of(models, data), ResultTable(tmp_path / "resumed.csv"), cells, defences, list(models), META)
    timings = ["defence_s_per_image", "step_s_per_image"]  # measured wall times differ from run to run
    resumed, full = (pd.read_csv(tmp_path / f"{name}.csv").drop(columns=timings) for name in ("resumed", "full"))
    pd.testing.assert_frame_equal(resumed, full)


def test_rows_of_other_checkpoints_are_recomputed(models, data, purifier, tmp_path):
    table = ResultTable(tmp_path / "t.csv")
    run_cells(grid_of(models, data), table, [("wrn", 4)], [Entry(purifier, "old")], ["vgg"], META)
    old = table.frame()
    run_cells(grid_of(models, data), table, [("wrn", 4)], [Entry(purifier, "new")], ["vgg"], META)
    new = table.frame()
    assert len(new) == 1 and new.checkpoints[0] != old.checkpoints[0]


def test_transfer_cli_end_to_end_and_resume(checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "res" / "transfer" / "small-bcm.csv"
    bench.transfer.main(["--source", "wrn", "--eps", "0", "4", "--n", "20", "--out", str(out), *checkpoints])
    printed = capsys.readouterr().out
    frame = numeric(ResultTable(out).frame())
    assert len(frame) == 2 * 4 and set(frame.target) == set(classifiers.ARCHS)
    assert (frame.t_star == 0.5).all() and (frame.n == 20).all() and (frame.nfe == 2).all()
    assert (frame.defence == "bcm(eps_inv=0.11, t_star=0.5)").all() and (frame.family == "bcm(eps_inv=0.11)").all()
    assert (frame.defence_s_per_image > 0).all() and (frame.step_s_per_image > 0).all()
    assert "| Source | eps/255 | preact | wrn | vgg | mobilenet |" in printed and " -> " in printed
    assert out.with_suffix(".md").read_text().strip() == printed.strip()
    # eps 0 before purification is each target's clean accuracy on the same 20 images
    images, labels, _ = bench.common.load_split("test", tmp_path / "data", 20, 0)
    vgg = classifiers.load_classifier("vgg", "small", tmp_path / "cls")
    assert frame[(frame.eps == 0) & (frame.target == "vgg")].acc_before.item() == \
        classifiers.accuracy(vgg, images, labels, progress=False)

    monkeypatch.setattr(bench.grid, "craft", lambda *a, **k: pytest.fail("finished cells were recomputed"))
    before = out.read_text()
    bench.transfer.main(["--source", "wrn", "--eps", "4", "0", "--n", "20", "--out", str(out), *checkpoints])
    assert out.read_text() == before

    monkeypatch.undo()
    bench.transfer.main(["--source", "wrn", "--eps", "4", "--n", "20", "--defence", "denoise:t_star=2", "none",
                         "jpeg:quality=50", "--targets", "vgg", "--out", str(tmp_path / "more.csv"), *checkpoints])
    rows = numeric(ResultTable(tmp_path / "more.csv").frame()).set_index("defence")
    assert set(rows.index) == {"denoise(t_star=2)", "none", "jpeg(quality=50)"}
    assert rows.t_star["denoise(t_star=2)"] == 2 and rows.nfe["denoise(t_star=2)"] == 1
    assert rows.acc_after["none"] == rows.acc_before["none"] and rows.nfe["none"] == 0
    assert pd.isna(rows.t_star["jpeg(quality=50)"]) and rows.step_s_per_image["jpeg(quality=50)"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--source", "resnet"], "unknown source 'resnet'; valid names are preact, wrn, vgg, mobilenet"),
    (["--targets", "wrn", "vit"], "unknown target 'vit'"),
    (["--eps", "5"], "invalid eps '5'"),
    (["--eps", "eight"], "invalid eps 'eight'"),
    (["--defence", "nosuch"], "unknown defence 'nosuch'"),
    (["--defence", "jpeg:quality"], "write key=value"),
])
def test_cli_rejects_unknown_names_and_eps(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.transfer.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_bcm_checkpoint_names_the_commands_that_make_it(checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.transfer.main([*checkpoints, "--bcm", str(tmp_path / "nope.pt"), "--n", "4"])
    err = capsys.readouterr().err
    assert "python -m purify.train --config cifar10-small" in err and "python -m purify.export" in err


def test_tradeoff_cli_and_report_rebuild(checkpoints, tmp_path, capsys):
    from bench import tradeoff

    out = tmp_path / "res" / "tradeoff" / "small-preact.csv"
    tradeoff.main(["--source", "preact", "--eps", "0", "4", "--targets", "preact", "vgg", "--t-stars", "0.1", "2",
                   "--defence", "bcm", "denoise", "median", "--n", "12", "--out", str(out), *checkpoints])
    frame = numeric(ResultTable(out).frame())
    assert len(frame) == (2 * 2 + 1) * 2 * 2  # bcm and denoise at both t*, median once
    bcm = frame[frame.family == "bcm(eps_inv=0.11)"]
    # the effective eps_inv (capped at t*/2) is part of the defence's settings
    assert set(bcm.defence) == {"bcm(eps_inv=0.05, t_star=0.1)", "bcm(eps_inv=0.11, t_star=2)"}
    assert set(frame[frame.family == "denoise"].t_star) == {0.1, 2.0}
    assert frame[frame.family == "median(size=3)"].t_star.isna().all()
    printed = capsys.readouterr().out
    assert "Best t* for `bcm(eps_inv=0.11)`" in printed and "Best t* for `median" not in printed
    best = tables.best_t_star(frame, "bcm(eps_inv=0.11)")
    vgg = bcm[(bcm.target == "vgg") & (bcm.t_star == best)].set_index("eps")
    ratio = tables.transfer_ratio(bcm, best)  # preact is the source: only vgg is a transfer target
    assert list(ratio.index) == [4] and ratio.after[4] == vgg.acc_after[4] and ratio.clean[4] == vgg.acc_before[0]
    assert ratio.ratio[4] == pytest.approx(vgg.acc_after[4] / vgg.acc_before[0])
    assert tables.transfer_ratio(bcm[bcm.eps != 0], best).empty
    md, png = out.with_suffix(".md").read_text(), out.with_suffix(".png")
    assert png.stat().st_size > 10_000
    bench.transfer.main(["--source", "wrn", "--eps", "4", "--n", "12", "--targets", "vgg",
                         "--out", str(tmp_path / "res" / "transfer" / "small-bcm.csv"), *checkpoints])
    transfer_md = (tmp_path / "res" / "transfer" / "small-bcm.md").read_text()
    for path in (out.with_suffix(".md"), png, tmp_path / "res" / "transfer" / "small-bcm.md"):
        path.unlink()
    report.main(["--results", str(tmp_path / "res")])
    assert out.with_suffix(".md").read_text() == md and png.is_file()
    assert (tmp_path / "res" / "transfer" / "small-bcm.md").read_text() == transfer_md


def test_purified_images_do_not_depend_on_batch_size(purifier, data):
    images, _ = data
    ids = torch.arange(500, 500 + len(images))
    cpu = torch.device("cpu")
    by_4 = purify_images(purifier, images, ids, seed=3, device=cpu, batch_size=4, progress=False)
    by_16 = purify_images(purifier, images, ids, seed=3, device=cpu, batch_size=16, progress=False)
    assert torch.allclose(by_4, by_16, atol=1e-5)  # convolutions may sum in another order per batch size
    other_seed = purify_images(purifier, images, ids, seed=4, device=cpu, batch_size=16, progress=False)
    assert not torch.allclose(by_16, other_seed)
    other_draw = purify_images(purifier, images, ids, seed=3, device=cpu, batch_size=16, progress=False, draw=1)
    assert not torch.allclose(by_16, other_draw)


def test_a_vote_in_the_grid_is_the_majority_of_its_draws_by_hand(models, data, tiny_bcm, tmp_path):
    """The grid's accuracy after ``vote`` equals the majority of the target's labels on n purifications drawn
    with draws 0..n-1, computed here from purify_images; a deterministic transform is evaluated once."""
    labels = data[1]
    purifier = BCMPurifier(tiny_bcm, t_star=2.0, eps_inv=1.0)  # strong enough for the draws to disagree
    vote = Entry(Vote(purifier, n=3))
    table, grid = ResultTable(tmp_path / "t.csv"), grid_of(models, data)
    run_cells(grid, table, [("wrn", 0)], [vote, Entry(JPEG(60))], ["preact"], META)
    rows = numeric(table.frame()).set_index("defence")
    x = grid.adversarial("wrn", 0)  # the clean images as floats
    with torch.no_grad():
        predictions = torch.stack([models["preact"](purify_images(purifier, x, torch.arange(len(x)), 0,
                                                                  torch.device("cpu"), progress=False,
                                                                  draw=d)).argmax(1) for d in range(3)])
    assert len(predictions.unique()) > 3 and (predictions != predictions[0]).any()  # a non-trivial vote
    majority = torch.nn.functional.one_hot(predictions, 10).sum(0).argmax(1)
    spec = "vote(base=bcm(eps_inv=1, t_star=2), how=majority, n=3)"
    assert rows.acc_after[spec] == pytest.approx((majority == labels).float().mean().item())
    assert rows.nfe[spec] == 6 and rows.family[spec] == "vote(base=bcm(eps_inv=1), how=majority, n=3)"
    jpeg = (models["preact"](JPEG(60)(x)).argmax(1) == labels).float().mean().item()
    assert rows.acc_after["jpeg(quality=60)"] == pytest.approx(jpeg)


def test_defence_comparison_by_hand():
    rows = []
    for defence, nfe, cost, step, after in (("bcm(t_star=1)", 2, 0.01, 0.04, 0.6), ("jpeg(quality=75)", 0, 0.001,
                                                                                   0.003, 0.3)):
        for source, eps, target, before in (("preact", 0, "preact", 0.9), ("preact", 0, "wrn", 0.8),
                                            ("preact", 8, "preact", 0.0), ("preact", 8, "wrn", 0.2),
                                            ("preact", 16, "preact", 0.0), ("preact", 16, "wrn", 0.1)):
            rows.append(dict(preset="small", split="test", defence=defence, n=10, seed=0, bf16=True, source=source,
                             eps=eps, target=target, family=defence, t_star=1.0, nfe=nfe, acc_before=before,
                             acc_after=after + (0.1 if target == "wrn" else 0.0) + (0.2 if eps == 0 else 0.0),
                             # the eps-16 cell ran slowed down (another job): the median over cells ignores it
                             defence_s_per_image=cost * (5 if eps == 16 else 1), step_s_per_image=step,
                             checkpoints=""))
    table = tables.defence_comparison(pd.DataFrame(rows), eps_values=(8,)).set_index("defence")
    assert list(table.index) == ["none", "bcm(t_star=1)", "jpeg(quality=75)"]
    # clean: mean over both targets at eps 0; transfer: the targets other than the source (wrn only)
    assert table.loc["none", "clean %"] == pytest.approx(85.0)
    assert table.loc["none", "from preact, eps 8 %"] == pytest.approx(20.0)
    assert table.loc["bcm(t_star=1)", "clean %"] == pytest.approx(100 * (0.8 + 0.9) / 2)
    assert table.loc["bcm(t_star=1)", "from preact, eps 8 %"] == pytest.approx(70.0)
    assert table.loc["jpeg(quality=75)", "from preact, eps 8 %"] == pytest.approx(40.0)
    assert (table.loc["bcm(t_star=1)", "NFE"], table.loc["bcm(t_star=1)", "ms/image"],
            table.loc["bcm(t_star=1)", "attack step ms/image"]) == pytest.approx((2, 10.0, 40.0))
    assert "defences side by side" in tables.transfer_markdown(numeric(pd.DataFrame(rows)))


def test_rows_of_the_two_splits_never_mix_and_older_files_read_as_test(tmp_path):
    row = dict(META, defence="bcm(t_star=1)", bf16=True, source="preact", eps=8, target="vgg", family="bcm",
               t_star=1.0, nfe=2, acc_before=0.1, acc_after=0.5, defence_s_per_image=0.01, step_s_per_image=0.04,
               checkpoints="ab")
    table = ResultTable(tmp_path / "t.csv")
    table.add([row, dict(row, split="val", acc_after=0.6)])
    frame = numeric(ResultTable(tmp_path / "t.csv").frame()).set_index("split")
    assert frame.acc_after.to_dict() == {"test": 0.5, "val": 0.6}
    # a file written before the split column existed holds test-set rows
    legacy = tmp_path / "legacy.csv"
    pd.DataFrame([row])[[c for c in bench.common.COLUMNS if c != "split"]].to_csv(legacy, index=False)
    assert ResultTable(legacy).frame().split.tolist() == ["test"]
    assert "validation images" in tables.transfer_markdown(numeric(pd.DataFrame([dict(row, split="val", eps=0)])))
    with pytest.raises(ValueError, match="has columns"):  # any other mismatch is still an error
        pd.DataFrame([row]).drop(columns=["split", "nfe"]).to_csv(legacy, index=False)
        ResultTable(legacy)


def test_validation_runs_get_their_own_default_files(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench.transfer, "transfer", lambda args: seen.update(vars(args)))
    bench.transfer.main(["--split", "val"])
    assert seen["split"] == "val" and bench.common.split_suffix(argparse.Namespace(split="val")) == "-val"
    assert bench.common.split_suffix(argparse.Namespace(split="test")) == ""


def test_perf_measures_the_attack_step_memory_with_and_without_recomputed_activations(tmp_path):
    """bench.perf --only memory: both settings of one attack step through a BCM preset's purifier, each in a
    fresh process, and their ratios, written next to the CPU figures (not over them)."""
    import yaml

    import bench.perf

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_preset())))
    bench.perf.main(["--config", str(config), "--only", "memory", "--threads", "1", "--compare-step-batch", "2",
                     "--device", "cpu", "--out", str(tmp_path / "perf")])
    table = pd.read_csv(tmp_path / "perf" / "perf-tiny-memory.csv").set_index(["measurement", "layout"])
    step = table.loc[("attack step time (batch 2, t*=0.5, wrn)", "recompute"), "value"]
    kept = table.loc[("attack step time (batch 2, t*=0.5, wrn)", "keep activations"), "value"]
    assert step > 0 and kept > 0 and set(table.device) == {"cpu"}
    ratio = table.loc[("recompute / keep: time", "recompute"), "value"]
    assert ratio == pytest.approx(step / kept, rel=0.02)
    memory = {kind: table.loc[("attack step memory (batch 2, t*=0.5, wrn)", kind), "value"]
              for kind in ("keep activations", "recompute")}
    assert 0 < memory["recompute"] < memory["keep activations"]
    assert table.loc[("recompute / keep: memory", "recompute"), "value"] == pytest.approx(
        memory["recompute"] / memory["keep activations"], rel=0.02)


def test_perf_measures_torch_compile_against_eager(tmp_path, monkeypatch):
    """bench.perf --only compile: eager and compiled per-image times of purify + classify and of an attack step,
    and their ratio. ``torch.compile`` stands replaced by a wrapper that runs the defended model twice, and the
    clock counts the defended model's forward calls (one tick each), so the "compiled" model takes exactly twice
    the eager time whatever the machine's load: the speed-up must come out at 0.5, and the per-image times at one
    tick over the batch size."""
    import yaml

    import bench.perf

    class Twice(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            self.model(x)
            return self.model(x)

    ticks = []

    def tick(module, args, output):
        if isinstance(module, torch.nn.Sequential) and isinstance(module[0], BCMPurifier):
            ticks.append(1)

    monkeypatch.setattr(torch, "compile", Twice)
    monkeypatch.setattr(bench.perf, "device_clock", lambda device: float(len(ticks)))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_preset())))
    handle = torch.nn.modules.module.register_module_forward_hook(tick)
    try:
        bench.perf.main(["--config", str(config), "--only", "compile", "--threads", "1", "--compare-batch", "4",
                         "--compare-step-batch", "2", "--repeats", "2", "--device", "cpu", "--no-bf16",
                         "--out", str(tmp_path / "perf")])
    finally:
        handle.remove()
    table = pd.read_csv(tmp_path / "perf" / "perf-tiny-compile.csv")
    for what, size in (("defend + classify", 4), ("attack step", 2)):
        times = table[table.measurement == f"{what}: BCM purifier + classifier (batch {size})"].set_index("note")
        assert times.value["eager"] == pytest.approx(1000 / size)
        assert times.value["torch.compile"] == pytest.approx(2000 / size)
        assert table[table.measurement == f"torch.compile speed-up, {what}"].value.item() == pytest.approx(0.5)


def test_cpu_allocated_peak_is_what_a_function_holds_at_once():
    """4 MiB and 2 MiB held together, then 1 MiB after the 4 are freed: a peak of 6 MiB over what was held
    before (the 1 MiB tensor allocated earlier does not count), whatever the process's resident memory does."""
    import bench.perf

    before = torch.ones(1 << 18)

    def function():
        a, b = torch.ones(1 << 20), torch.ones(1 << 19)
        del a
        c = torch.ones(1 << 18)
        return b, c

    peak = bench.perf.cpu_allocated_peak(function)
    assert 6 * 2**20 <= peak < 6 * 2**20 + 2**16 and before.sum() > 0


def test_bench_transfer_under_torchrun_writes_what_one_process_writes(checkpoints, tmp_path):
    """2 ranks (gloo) in blocks of 3 against one process in blocks of 2: the same accuracies for PGD crafted on
    the source (random starts drawn per image), a randomized purifier, a vote of two of its draws and a
    deterministic transform; one CSV, written by rank 0, and no leftover block files. The attack-step costs are
    timed by the ranks in turn and every row gets its own."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    frames = {}
    for world, batch_size in ((1, "2"), (2, "3")):
        out = tmp_path / f"world{world}" / "transfer.csv"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                   "-m", "bench.transfer", "--", *checkpoints, "--source", "preact", "--eps", "0", "8",
                   "--n", "7", "--batch-size", batch_size, "--targets", "preact", "vgg",
                   "--defence", "bcm", "vote:n=2", "jpeg:quality=50", "none", "--threads", "1", "--out", str(out)]
        result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600,
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        frames[world] = pd.read_csv(out)
        assert not any((out.parent / ".blocks").rglob("*.pt"))
        assert list(out.parent.glob("*.csv")) == [out]
    columns = ["source", "eps", "target", "defence", "acc_before", "acc_after"]
    one, two = frames[1][columns], frames[2][columns]
    assert len(one) == 2 * 2 * 4 and one.acc_after.nunique() > 2  # not all equal: the comparison means something
    pd.testing.assert_frame_equal(one, two)
    for frame in frames.values():
        assert (frame.step_s_per_image > 0).all()
        by_pair = frame.groupby(["defence", "target"]).step_s_per_image
        assert (by_pair.nunique() == 1).all() and by_pair.first().nunique() > 4  # once per pair, each measured
