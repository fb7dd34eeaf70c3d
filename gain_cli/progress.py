"""What a long piece of work is doing: a rich progress bar on a terminal, one line per phase elsewhere.

``Phase(console, "stage 2/8 code · train", total=40, unit="steps")`` is a context manager: on a terminal it shows a
transient bar (done/total, elapsed, time left, and any ``fields`` such as the loss) while the phase runs; in a log
file or a CI job it prints nothing until the phase ends. Either way the phase ends with one line::

    stage 2/8 code · train: 40 steps in 12.3 s (loss 1.234, 310 tok/s)

``RunClock`` keeps what each kind of phase cost so far (a training step, a perplexity sweep, an lm-eval pass) and
turns it into the time left of a run, printed after every row.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console


def default_console() -> Console:
    return Console(stderr=True)


class Phase:
    def __init__(self, console: Console | None, description: str, total: int | None = None, unit: str = "",
                 overall: tuple[str, int, int] | None = None, **fields: str):
        """``overall``: (text, done, total) of the whole run, drawn as a second bar above the phase's own."""
        self.console, self.description, self.total, self.unit = console, description, total, unit
        self.overall = overall
        self.fields = dict(fields)
        self.completed = 0
        self.seconds = 0.0
        self._bar = None

    def __enter__(self) -> "Phase":
        self._t0 = time.perf_counter()
        if self.console is not None and self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            extra = [TextColumn(f"{k} {{task.fields[{k}]}}") for k in self.fields]
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True)
            self._bar.start()
            if self.overall is not None:
                text, done, total = self.overall
                self._bar.add_task(text, total=total, completed=done, **{k: "" for k in self.fields})
            self._task = self._bar.add_task(self.description, total=self.total, **self.fields)
        return self

    def update(self, completed: int | None = None, advance: int = 0, **fields: Any) -> None:
        self.completed = completed if completed is not None else self.completed + advance
        self.fields.update({k: str(v) for k, v in fields.items()})
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, **self.fields)

    def __exit__(self, exc_type, *_) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self._bar is not None:
            self._bar.stop()
        if self.console is not None and exc_type is None:
            done = f"{self.completed} {self.unit} in " if self.unit else ""
            shown = ", ".join(f"{k} {v}" for k, v in self.fields.items() if v not in ("", "-"))
            self.console.print(f"{self.description}: {done}{self.seconds:.1f} s" + (f" ({shown})" if shown else ""),
                               highlight=False, markup=False)


class RunClock:
    """Measured cost of a run's phases so far, and the time left that they imply."""

    def __init__(self, steps_per_stage: int, step_guess: float | None = None, sweep_guess: float | None = None):
        """``*_guess``: a training step's and a perplexity sweep's seconds as estimated before anything ran (from
        one timed forward), used until the first one is measured."""
        self.steps_per_stage = steps_per_stage
        self.t0 = time.perf_counter()
        self.spent: dict[str, list[float]] = {"train": [], "perplexity": [], "lm-eval": []}
        self.step_seconds: list[float] = []
        self.guess = {"step": step_guess, "perplexity": sweep_guess}

    def record(self, kind: str, seconds: float, steps: int | None = None) -> None:
        self.spent[kind].append(seconds)
        if kind == "train" and steps:
            self.step_seconds.append(seconds / steps)

    def _mean(self, values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    def seconds_left(self, stages_left: int, rows_left: int, harness: bool) -> float | None:
        """None until every kind of phase still ahead was measured once."""
        step = self._mean(self.step_seconds) or self.guess["step"]
        sweep = self._mean(self.spent["perplexity"]) or self.guess["perplexity"]
        lm_eval = self._mean(self.spent["lm-eval"]) if harness else 0.0
        if rows_left and (sweep is None or lm_eval is None) or stages_left and step is None:
            return None
        return stages_left * self.steps_per_stage * (step or 0.0) + rows_left * ((sweep or 0.0) + (lm_eval or 0.0))

    def eta(self, rows_done: int, rows_total: int, stages_left: int, harness: bool) -> str:
        """``3/9 rows · ~3.4 min left`` (or ``done``, or when it can be told)."""
        left = self.seconds_left(stages_left, rows_total - rows_done, harness)
        return f"{rows_done}/{rows_total} rows · " + ("done" if rows_done >= rows_total else (
            f"~{left / 60:.1f} min left" if left is not None else "time left: after the first row"))

    def line(self, rows_done: int, rows_total: int, stages_left: int, harness: bool) -> str:
        elapsed = time.perf_counter() - self.t0
        parts = []
        if self.step_seconds:
            parts.append(f"train {self._mean(self.step_seconds):.2f} s/step")
        if self.spent["perplexity"]:
            parts.append(f"perplexity {self._mean(self.spent['perplexity']):.1f} s/row")
        if harness and self.spent["lm-eval"]:
            parts.append(f"lm-eval {self._mean(self.spent['lm-eval']):.1f} s/row")
        done, _, eta = self.eta(rows_done, rows_total, stages_left, harness).rpartition(" · ")
        return f"run: {done} · {elapsed / 60:.1f} min · {eta}" + (f" ({', '.join(parts)}, measured)" if parts else "")
