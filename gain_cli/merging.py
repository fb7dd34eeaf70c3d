"""`gain merge`: rebuild a run's model after stage K and save it as a plain Hugging Face model."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from gain_cli.errors import GainError


def merge_run(run_dir: str | Path, out: str | Path, stage: int | None = None, overwrite: bool = False,
              say=None) -> Path:
    """Merge ``run_dir`` up to ``stage`` (default: its last finished stage) into ``out``.

    ``out`` follows gain_cli.outputs: a file, or a non-empty directory gain did not write, is refused unless
    ``overwrite``; the model is written beside it first and moved into place only when complete, and the
    temporary directory is removed on every failure. ``say`` receives what was merged (and a warning when the run
    is unfinished)."""
    from gain_cli.io import read_json
    from gain_cli.methods import build_method
    from gain_cli.models.loading import load_model, model_spec
    from gain_cli.outputs import claim_output_dir, write_output_dir
    from gain_cli.reporting.matrices import check_finished_stage, open_finished_run
    from gain_cli.runner import apply_saved_stages

    run_dir = Path(run_dir)
    cfg, done, total = open_finished_run(run_dir, "merge")
    k = done[-1] if stage is None else int(stage)
    check_finished_stage(run_dir, k, total, done)
    out = claim_output_dir(out, "gain merge", overwrite)
    model, tokenizer = load_model(cfg.model, cfg.cache_dir)
    method = build_method(OmegaConf.to_container(cfg.method), model_spec(cfg.model, model.config.model_type))
    if not method.mergeable:
        raise GainError(f"method '{method.name}' cannot be merged into a single plain model "
                        "(it evaluates two branches); use `gain eval --run` instead")
    model = apply_saved_stages(model, method, run_dir, k)
    model = method.merge(model)
    domain = str(cfg.domains.sequence[k - 1])

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_output_dir(out, "gain merge", write, "the merged model", run=str(run_dir.absolute()), stage=k,
                     domain=domain)
    if say is not None:
        info = read_json(run_dir / "run_info.json") if (run_dir / "run_info.json").is_file() else {}
        say(f"merged stage {k} of {total} ({domain}) of {method.name}")
        if info.get("status") != "complete" or len(done) < total:
            say(f"warning: the run is unfinished ({len(done)} of {total} stages finished, status "
                f"{info.get('status', 'unknown')}); the merged model is the one after stage {k}")
    return out
