"""``--retime``: the costs of settings already evaluated, measured again one after another in one process, so
that costs first measured on different machines or under different load compare."""
from __future__ import annotations

import sys

import torch

from purify.infra.runtime import cpu_capability, cpu_name, pick_device

from ..common import ResultTable, text, write_text
from .config import Run
from .grid import measure_costs
from .report import markdown
from .schema import COLUMNS, KEY, SETTING_COLUMNS, numeric_adaptive
from .setting import Workload


def retime(run: Run) -> None:
    """The costs of every selected setting measured again, one after another in this process, and written into
    all of that setting's rows in ``run.out`` (its accuracies untouched)."""
    device = pick_device(run.device)
    out = run.out
    if not out.is_file():
        raise FileNotFoundError(f"--retime: no results at {out}; run the grid first")
    work = Workload.load(run, device)
    table = ResultTable(out, KEY, COLUMNS)
    machine = f"{cpu_name()} ({cpu_capability()}, {torch.get_num_threads()} thread(s))"
    for target in run.targets:
        for entry in work.entries:
            setting = work.setting(target, entry, run.eps[0])
            wanted = {c: text(setting.row("clean")[c]) for c in SETTING_COLUMNS}
            rows = [row for row in table.rows.values() if all(row[c] == v for c, v in wanted.items())]
            if not rows:
                print(f"{target}, {entry.defence.spec()}: no rows in {out} to retime; skipped", file=sys.stderr)
                continue
            costs = measure_costs(setting, run.batch_size, run.bf16)
            table.add([dict(row, **costs) for row in rows])
            print(f"{target}, {entry.defence.spec()}: defend + classify {1000 * costs['purify_s_per_image']:.1f} "
                  f"ms/image, attack step {1000 * costs['step_s_per_image']:.1f} ms/image ({len(rows)} rows)",
                  file=sys.stderr)
    write_text(out.with_suffix(".md"), markdown(numeric_adaptive(table.frame())))
    print(f"retimed on {machine}; wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
