"""``python -m eval tasks``: the registry as a table a researcher reads before anything runs.

Kept apart from ``eval.tasks`` because it shows each task's prompt source, and ``eval.prompts``
itself builds on the registry.
"""

from __future__ import annotations

from pathlib import Path

from eval.prompts import describe_prompts
from eval.tasks import (
    DATACOMP_EXTRA_TASKS,
    DATACOMP_GROUPS,
    METRIC_DESCRIPTIONS,
    PAPER_TASKS,
    RETRIEVAL_TASKS,
    TESTBED_TASKS,
    Task,
    looked_for,
)


def where_looked(task: Task, root: Path) -> str:
    """Every path looked at for ``task``, with its split folders; a refused builder folder is marked."""
    parts = [
        str(p) + ("/" + "{" + ",".join(task.splits) + "}" if p.name in task.wds_dirs else "")
        for p in looked_for(task, root)
    ]
    if task.refuse_folder and not task.local_path:
        parts.append(f"(refused: {root / task.refuse_folder})")
    return " | ".join(parts)


def format_registry(dataset_root: str | Path | None = None, prompts: str = "metaclip") -> str:
    """The registry as a fixed-width table: name, paper column, metric, split, expected count, prompts, paths."""
    root = Path(dataset_root) if dataset_root else Path("$DATASET_ROOT")
    head = ("#", "name", "column", "metric", "split", "expected", "prompts")
    sections = [
        ("paper26", PAPER_TASKS),
        ("retrieval (DataComp's Retrieval group)", RETRIEVAL_TASKS),
        ("datacomp extras", DATACOMP_EXTRA_TASKS),
        ("testbed", TESTBED_TASKS),
    ]
    lines: list[str] = [f"prompts: {prompts} (--prompts); expected = size of the standard test split"]
    for title, tasks in sections:
        body = []
        for i, t in enumerate(tasks, 1):
            split = f"{t.source_split} (as {t.paper_split}/)" if t.source_split else t.paper_split
            expected = f"{t.expected_samples:,}" if t.expected_samples else "-"
            cells = (
                str(i),
                t.name,
                t.title,
                METRIC_DESCRIPTIONS[t.metric],
                split,
                expected,
                describe_prompts(t, prompts),
            )
            body.append((cells, where_looked(t, root), t.note))
        widths = [max(len(r[c]) for r in [head, *(b[0] for b in body)]) for c in range(len(head))]
        lines.append(f"== {title} ({len(tasks)} tasks) ==")
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + "  looked for  [note]")
        for cells, where, note in body:
            row = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
            lines.append(f"{row}  {where}" + (f"  [{note}]" if note else ""))
        lines.append("")
    groups = "; ".join(f"{g}: {', '.join(m)}" for g, m in DATACOMP_GROUPS.items())
    lines.append(f"DataComp groups: {groups}")
    return "\n".join(lines)
