"""`gain merge`: rebuild a run's model after stage K and save it as a plain Hugging Face model."""

from __future__ import annotations

from pathlib import Path

from gain_cli.errors import GainError
from gain_cli.outputs import claim_output_dir, write_output_dir
from gain_cli.rundir import RunDir


def merge_run(run_dir: str | Path, out: str | Path, stage: int | None = None, overwrite: bool = False,
              say=None) -> Path:
    """Merge ``run_dir`` up to ``stage`` (default: its last finished stage) into ``out``.

    ``out`` follows gain_cli.outputs: a file, or a non-empty directory gain did not write, is refused unless
    ``overwrite``; the model is written beside it first and moved into place only when complete, and the
    temporary directory is removed on every failure. ``say`` receives what was merged (and a warning when the run
    is unfinished)."""
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    cfg, done, total = rd.require_finished("merge")
    k = done[-1] if stage is None else int(stage)
    rd.check_stage(k, total, done)
    out = claim_output_dir(out, "gain merge", overwrite)
    model, tokenizer, method = rd.model_after(cfg, k)
    if not method.mergeable:
        raise GainError(f"method '{method.name}' cannot be merged into a single plain model "
                        "(it evaluates two branches); use `gain eval --run` instead")
    model = method.merge(model)
    domain = str(cfg.domains.sequence[k - 1])

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_output_dir(out, "gain merge", write, "the merged model", run=str(run_dir.absolute()), stage=k,
                     domain=domain)
    if say is not None:
        info = rd.info()
        say(f"merged stage {k} of {total} ({domain}) of {method.name}")
        if info.get("status") != "complete" or len(done) < total:
            say(f"warning: the run is unfinished ({len(done)} of {total} stages finished, status "
                f"{info.get('status', 'unknown')}); the merged model is the one after stage {k}")
    return out
