"""A bare JSONL file as an lm-eval task: ``eval.harness.tasks: [path/to/my_task.jsonl]``.

lm-eval's own way to evaluate local data is a task YAML whose ``dataset_path: json`` points at the file (any of
lm-eval's output types and templates; give its path in ``eval.harness.tasks``). For the two common cases a JSONL file
alone is enough; gain writes the task YAML for it (from ``tasks/local_multiple_choice.yaml`` or
``tasks/local_loglikelihood.yaml``) into the run's harness work directory. The task is named after the file's stem
(``my_task.jsonl`` → ``my_task``: the name of its matrix column, curve and table rows). Every line is one of:

* multiple choice (lm-eval's ``output_type: multiple_choice``), the fields of lm-eval's processed HellaSwag docs:
  ``{"query": "...", "choices": ["...", "...", ...], "gold": 0}``: the context is ``query`` as written, each choice is
  scored as ``" " + choice`` after it (lm-eval's default ``target_delimiter``, so write choices without a leading
  space), ``gold`` is the index of the right choice (``label`` is accepted in its place). Metrics ``acc`` and
  ``acc_norm`` (the log-likelihood divided by the choice's length in characters), with lm-eval's standard errors.
* log-likelihood (``output_type: loglikelihood``): ``{"query": "...", "target": "..."}``: ``target`` is scored as
  written right after ``query`` (so it usually starts with a space). Metrics ``acc`` (lm-eval's is_greedy: greedy
  decoding gives exactly the target) and ``perplexity`` of the target.

All lines of a file are of one kind; other fields are kept (available to a task YAML of your own). Few-shot examples
(``eval.harness.num_fewshot``) come from the same file, the evaluated item excluded (lm-eval's sampler).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gain_cli.errors import GainError
from gain_cli.io import read_jsonl_objects

TEMPLATES = Path(__file__).resolve().parent / "tasks"
KINDS = {"multiple_choice": "local_multiple_choice.yaml", "loglikelihood": "local_loglikelihood.yaml"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def jsonl_task_name(path: str | Path) -> str:
    """The task name of a JSONL task file: its stem; GainError when the stem is not a plain name."""
    stem = Path(path).stem
    if not _NAME.match(stem):
        raise GainError(f"eval.harness.tasks: a JSONL task file is named after its stem, and '{stem}' (from {path}) "
                        "is not a plain name (letters, digits, _ . -)")
    return stem


def _kind(where: str, obj: dict[str, Any]) -> str:
    if "choices" in obj:
        return "multiple_choice"
    if "target" in obj:
        return "loglikelihood"
    raise GainError(f"{where}: a JSONL task line needs 'query' and 'choices' + 'gold' (multiple choice) or 'query' "
                    "and 'target' (log-likelihood); see docs/downstream-tasks.md")


def load_task_jsonl(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """Read and check a JSONL task file; ``(kind, items)`` with kind ``multiple_choice`` or ``loglikelihood``.

    Multiple-choice items come back with ``gold`` (an int; from ``label`` where the line has no ``gold``). GainError
    naming the file, line and problem on any malformed line or a file that mixes the two kinds."""
    kind: str | None = None
    first = ""
    items: list[dict[str, Any]] = []
    for where, obj in read_jsonl_objects(path, "JSONL task file", "fields query + choices + gold, or query + target"):
        k = _kind(where, obj)
        if kind is None:
            kind, first = k, where
        elif k != kind:
            raise GainError(f"{where}: a {k.replace('_', ' ')} line in a {kind.replace('_', ' ')} file (line 1 of the "
                            f"kind: {first}); one kind per file")
        query = obj.get("query")
        if not isinstance(query, str) or not query.strip():
            raise GainError(f"{where}: field 'query' must be a non-empty string")
        if kind == "multiple_choice":
            choices = obj["choices"]
            if (not isinstance(choices, list) or len(choices) < 2
                    or not all(isinstance(c, str) and c.strip() for c in choices)):
                raise GainError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
            gold = obj.get("gold", obj.get("label"))
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise GainError(f"{where}: field 'gold' (or 'label') must be the index of the right choice, an "
                                f"integer in 0..{len(choices) - 1}, got {gold!r}")
            obj = {**obj, "gold": gold}
            obj.pop("label", None)
        else:
            target = obj["target"]
            if not isinstance(target, str) or not target.strip():
                raise GainError(f"{where}: field 'target' must be a non-empty string (scored as written after "
                                "'query', so usually with a leading space)")
        items.append(obj)
    assert kind is not None  # read_jsonl_objects refuses an empty file
    return kind, items


def write_jsonl_task(source: Path, work_dir: Path, write: Callable[[Path, str], None]) -> Path:
    """Check ``source``, copy it normalised to ``work_dir/local_tasks/<name>.jsonl`` and write the task YAML
    ``work_dir/tasks/<name>.yaml`` for it; returns the YAML's path. ``write(path, text)`` writes a file only when its
    content changed (datasets then reuses its cache across stages)."""
    import yaml

    name = jsonl_task_name(source)
    kind, items = load_task_jsonl(source)
    work_dir = Path(work_dir).resolve()
    data_dir, task_dir = work_dir / "local_tasks", work_dir / "tasks"
    data_dir.mkdir(parents=True, exist_ok=True)
    task_dir.mkdir(parents=True, exist_ok=True)
    data_file = data_dir / f"{name}.jsonl"
    write(data_file, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    task = yaml.safe_load((TEMPLATES / KINDS[kind]).read_text(encoding="utf-8"))
    task["task"] = name
    task["dataset_kwargs"] = {"data_files": {"validation": str(data_file)},
                              "cache_dir": str(work_dir / "hf_datasets_cache")}
    out = task_dir / f"{name}.yaml"
    write(out, f"# written by gain from {source} ({kind})\n"
          + yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return out
