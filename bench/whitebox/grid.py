"""Running and scoring the white-box grid: every (target, defence, eps) setting's threats, resumably, unit by
unit, with the costs measured once per setting and runs on test images entered in the test ledger.

Under ``torchrun`` the images of every unit are split across the ranks by blocks (``purify.infra.shards``);
every random draw is per image or per block, so the merged predictions are those of a single process, and
rank 0 writes every file. A unit's finished blocks survive an interruption, in the cache folder's
``.blocks/``, and a rerun continues from them."""
from __future__ import annotations

import datetime
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from attacks import SCORINGS, SUITE, correct_by_scoring
from purify.infra.checkpoint import atomic_write
from purify.infra.images import as_float
from purify.infra.runtime import autocast, leave_distributed, pick_device
from purify.infra.shards import Shard, map_timed_blocks, remove_blocks

from ..common import ResultTable, attack_step_cost, device_clock, write_text
from ..intervals import bootstrap_interval
from ..ledger import TEST_SPLITS, append_ledger
from .config import Run
from .report import markdown, paired_differences, plot
from .schema import COLUMNS, COST_COLUMNS, KEY, RUN_COLUMNS, numeric_adaptive, predictions_dir, unit_id, worst_per_image
from .setting import Setting, Workload


@dataclass
class SettingResult:
    """Per threat of a setting, the per-image correctness under each scoring; and whether any unit ran now."""
    correct: dict[str, dict[str, torch.Tensor]]
    ran: bool


def evaluate(run: Run) -> None:
    """The grid: every target x defence x eps setting's threats, written to ``run.out`` unit by unit (resumed
    where done), then its Markdown (with the paired comparison) and figure."""
    started = time.monotonic()
    shard, device = Shard.join(run.device)
    work = Workload.load(run, pick_device(device))
    out = run.out
    table = ResultTable(out, KEY, COLUMNS, writes=shard.main)
    cache_dir = predictions_dir(out)
    results, ledger = {}, []
    for target in run.targets:
        for entry in work.entries:
            costs = None
            for eps in run.eps:
                setting = work.setting(target, entry, eps)
                costs = costs or measure_costs(setting, run.batch_size, run.bf16)
                if shard.main:
                    print(f"{target}, {entry.defence.spec()}, eps = {eps}/255", file=sys.stderr)
                result = run_setting(setting, table, cache_dir, costs, shard)
                results[target, entry.defence.spec(), eps] = result.correct
                if result.ran and run.split in TEST_SPLITS:  # any unit evaluated on test images, clean alone too
                    ledger.append(ledger_row(setting, result.correct.get("clean", {}).get("vote"),
                                             result.correct.get("worst", {}).get("vote")))
    leave_distributed()
    if not shard.main:
        return
    append_ledger(ledger)
    paired = paired_differences(results)
    frame = numeric_adaptive(table.frame())
    write_text(out.with_suffix(".md"), markdown(frame) + paired)
    plot(frame, out.with_suffix(".png"))
    print(markdown(frame[frame.checkpoints.isin(set(work.checkpoint_ids.values()))
                         & frame.defence.isin([e.defence.spec() for e in work.entries])]) + paired)
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')} ({time.monotonic() - started:.0f} s)",
          file=sys.stderr)


def ledger_row(setting: Setting, clean: torch.Tensor | None = None, robust: torch.Tensor | None = None,
               study: str = "") -> dict:
    """The test ledger's line for a setting evaluated on test images in this run: per-image correctness under the
    majority of N on the clean images and under the worst attack, each where the run measured it; ``study``
    names a study other than the grid (a convergence study, the sanity checks), which is then part of the
    protocol column, so that it is a configuration of its own in the ledger."""
    run = setting.run
    robust_vote = robust_ci = ""
    if robust is not None:
        mean, low, high = bootstrap_interval(robust)
        robust_vote, robust_ci = f"{100 * mean:.1f}", f"{100 * low:.1f}-{100 * high:.1f}"
    return dict(date=datetime.date.today().isoformat(), split=run.split, n=len(setting.images),
                data_seed=run.seed, suite=SUITE, protocol=setting.protocol.name + (f"; {study}" if study else ""),
                defence=setting.defence.spec(), target=setting.target, eps=setting.eps,
                clean_vote="" if clean is None else f"{100 * clean.mean().item():.1f}",
                robust_vote=robust_vote, robust_ci=robust_ci, command=run.command)


def run_setting(setting: Setting, table: ResultTable, cache_dir: Path, costs: dict,
                shard: Shard = Shard()) -> SettingResult:
    """Every threat of ``setting`` not yet in ``table``; each unit's rows are written as soon as it is done
    (by rank 0). Returns per threat the per-image correctness under each scoring, and whether any unit ran
    now."""
    correct: dict[str, dict[str, torch.Tensor]] = {}
    ran = False
    for threat in setting.threats:  # before any work: a results file holds one precision and one pair of seeds
        table.refuse_mixing(dict(setting.row(threat), scoring="single"), RUN_COLUMNS)
    for threat in setting.threats:
        base = setting.row(threat)
        path = cache_dir / f"{unit_id(base)}.pt"
        rows = [dict(base, scoring=s) for s in SCORINGS]
        if threat == "worst":
            attacks = [t for t in setting.worst_of if t in correct]
            if not attacks:
                continue
            per_image = worst_per_image(correct, attacks, SCORINGS)
            wall = sum(float(table.rows[table.key(dict(setting.row(t), scoring="single"))]["wall_s"])
                       for t in attacks)
            if all(table.done(r) for r in rows) and not ran:
                correct[threat] = per_image
                continue
        elif path.is_file() and all(table.done(r) for r in rows):
            stored = torch.load(path, weights_only=True)
            correct[threat] = correct_by_scoring(stored["predictions"].long(), setting.labels)
            continue
        else:
            if threat == "clean" and setting.eps != setting.run.eps[0]:
                continue  # clean rows do not depend on eps: computed once, with the first eps
            blocks = cache_dir / ".blocks" / unit_id(base, run_columns=True)
            merged, seconds = map_timed_blocks(lambda start, stop: attack_block(setting.part(start, stop), threat),
                                               len(setting.images), setting.run.batch_size, blocks, shard,
                                               setting.run.progress, threat)
            predictions = merged["predictions"].T
            wall = seconds * len(setting.images)
            if shard.main:
                if "adversarial" in merged:
                    export_adversarial(setting, threat, merged["adversarial"], setting.run.export_adversarial)
                atomic_write(path, lambda tmp: torch.save({"predictions": predictions.to(torch.int8),
                                                            "ids": setting.ids, "row": base}, tmp))
            remove_blocks(blocks, shard)
            per_image = correct_by_scoring(predictions.long(), setting.labels)
            ran = True
        correct[threat] = per_image
        n = len(setting.images)
        cells = []
        for r in rows:
            mean, low, high = bootstrap_interval(per_image[r["scoring"]])
            cells.append(dict(r, accuracy=mean, ci_low=low, ci_high=high, wall_s=wall, s_per_image=wall / n, **costs))
        table.add(cells)
    return SettingResult(correct, ran)


def attack_block(part: Setting, threat: str) -> dict[str, torch.Tensor]:
    """One block's predictions (image-major: positions x evaluations) under ``threat``, with its adversarial
    images when the run exports them."""
    adversarial = part.adversarial(threat)
    block = {"predictions": part.predictions(threat, adversarial).T.contiguous()}
    if part.run.export_adversarial and threat not in ("clean", "worst"):
        block["adversarial"] = adversarial
    return block


def export_adversarial(setting: Setting, threat: str, adversarial: torch.Tensor, folder: Path) -> None:
    """One file per configuration and threat that a third party can re-score: the adversarial images (float32
    in [0, 1]) with their dataset ids, labels, split and the row describing the attack."""
    row = setting.row(threat)
    name = f"{setting.target}-{setting.defence.spec()}-eps{setting.eps}-{threat}".replace(":", "_")
    name = "".join(c if c.isalnum() or c in "-_.=," else "_" for c in name)
    atomic_write(folder / f"{name}.pt", lambda tmp: torch.save(
        {"images": adversarial.float(), "ids": setting.ids, "labels": setting.labels, "row": row}, tmp))


def measure_costs(setting: Setting, batch_size: int, bf16: bool) -> dict:
    """Seconds per image of one defend+classify forward pass and of one attack step (forward + backward, BPDA
    where needed), each on a batch of ``batch_size``, through the setting's defence and classifier."""
    device = next(setting.classifier.parameters()).device
    x = as_float(setting.images[:batch_size]).to(device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), setting.eval_noise(setting.ids[:batch_size], 0), autocast(device, bf16):
        setting.defended(x)  # warm-up at the timed batch
        started = device_clock(device)
        setting.defended(x)
        forward = (device_clock(device) - started) / len(x)
    step = attack_step_cost(setting.defence, setting.classifier, setting.images, device, bf16, batch_size)
    return dict(zip(COST_COLUMNS, (forward, step)))
