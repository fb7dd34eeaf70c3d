"""A rich progress bar for one training stage: step, loss, tokens/s."""

from __future__ import annotations


class StageProgress:
    def __init__(self, console, stage: int, n_stages: int, domain: str, steps: int):
        self.console, self.steps = console, steps
        self.label = f"stage {stage}/{n_stages} [bold]{domain}[/bold]"
        self._progress = None

    def __enter__(self) -> "StageProgress":
        if self.console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                      TimeRemainingColumn(), console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.steps, loss="-", tps="-")
        return self

    def update(self, step: int, total: int, loss: float, tokens_per_s: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=f"{loss:.3f}", tps=f"{tokens_per_s:,.0f}")

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
