"""gain's local ``cloze`` task for lm-eval: a LAMBADA-style last-word cloze on a JSONL file.

One ``{"text": ...}`` object per line (lm-eval's LAMBADA format; an integer ``idx`` is kept): the context is the text
minus its last space-separated word, the target is ``" " + last word``, scored by lm-eval's ``loglikelihood``
(``acc``: the greedy continuation is exactly the target; ``perplexity`` of the target). The demo's file is built
from Debian ``fortunes`` by ``gain data build demo`` (gain_cli/data/cloze.py); ``cloze_path: builtin`` is the
packaged 16-item ``gain_cli/data/cloze_tiny.jsonl`` (hand-written sentences, for tests and offline defaults).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gain_cli.errors import GainError
from gain_cli.io import read_jsonl_objects
from gain_cli.schemas.run import HarnessConfig

BUILTIN_CLOZE = Path(__file__).resolve().parents[1] / "data" / "cloze_tiny.jsonl"
CLOZE_TEMPLATE = Path(__file__).resolve().parent / "tasks" / "cloze_local.yaml"
BUILTIN_NAMES = ("builtin", "tiny")


def cloze_split(text: str) -> tuple[str, str]:
    """(context, target) as the task's doc_to_text / doc_to_target compute them."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def load_cloze_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a cloze JSONL file: one object per line with a ``text`` of at least two words whose last
    space-separated word is non-empty. Blank lines are skipped. Returns ``{"text", "idx"}`` dicts (``idx`` from the
    file when it is an integer, else the item's position). Raises GainError naming the file, line and problem."""
    items: list[dict[str, Any]] = []
    for where, obj in read_jsonl_objects(path, "cloze file", "a field 'text'"):
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise GainError(f"{where}: field 'text' must be a non-empty string")
        context, target = cloze_split(text)
        if not context.strip() or not target.strip():
            raise GainError(f"{where}: field 'text' needs a context and a last word separated by a space, "
                            f"got {text[-40:]!r}")
        idx = obj.get("idx")
        items.append({"text": text, "idx": idx if isinstance(idx, int) and not isinstance(idx, bool) else len(items)})
    return items


def cloze_source(cfg: dict[str, Any]) -> Path:
    """The cloze file of the harness config: ``cloze_path`` (null/"builtin": the packaged file)."""
    path = HarnessConfig.of(cfg).cloze_path
    if path is None or str(path).strip().lower() in BUILTIN_NAMES:
        return BUILTIN_CLOZE
    p = Path(os.path.expanduser(str(path))).resolve()
    if not p.is_file():
        raise GainError(f"eval.harness.cloze_path '{path}' is not a file (the demo's is built by: gain data build demo)")
    return p


def write_cloze_task(source: Path, work_dir: Path, write) -> Path:
    """Normalise ``source`` into ``work_dir/cloze.jsonl`` and write the ``cloze`` task YAML into ``work_dir/tasks``.

    ``write(path, text)`` writes a file only when its content changed (datasets then reuses its cache). Returns the
    directory holding the YAML.
    """
    import yaml

    items = load_cloze_jsonl(source)
    work_dir = Path(work_dir).resolve()
    task_dir = work_dir / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    data_file = work_dir / "cloze.jsonl"
    write(data_file, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    task = yaml.safe_load(CLOZE_TEMPLATE.read_text(encoding="utf-8"))
    task["dataset_kwargs"] = {"data_files": {"validation": str(data_file)},
                              "cache_dir": str(work_dir / "hf_datasets_cache")}
    write(task_dir / "cloze.yaml", f"# written by gain from {source}\n"
          + yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return task_dir
