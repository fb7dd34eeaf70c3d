"""`gain`: the command line.

Every command takes Hydra-style ``key=value`` overrides after its options. User errors print
one line and exit with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from gain_cli import interrupts
from gain_cli.errors import GainError, unknown_choice

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="gain: adapt a pretrained LLM to a sequence of text domains and measure forgetting.")
data_app = typer.Typer(no_args_is_help=True, help="Domain data: list the domains of a config, build local data.")
app.add_typer(data_app, name="data")

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
console = Console(stderr=False)
err_console = Console(stderr=True)
_state = {"debug": bool(os.environ.get("GAIN_DEBUG"))}


def user_errors(fn):
    """Turn GainError (and Ctrl-C) into one line and exit code 2 (130), unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GainError as exc:
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except BaseException as exc:  # Ctrl-C, even where a library turned it into another error on its way up
            if isinstance(exc, (typer.Exit, SystemExit)) or not interrupts.received(exc):
                raise
            err_console.print("interrupted: finished stages are saved; continue with the same command and resume=true")
            raise typer.Exit(130) from None

    return wrapper


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("gain-cli")
    except md.PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        console.print(f"gain {_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print gain's version and exit."),
) -> None:
    if debug:
        _state["debug"] = True


def _config_groups_help() -> str:
    """The recipes and config groups with their options, from the files themselves (for `gain run --help`)."""
    from gain_cli.config import GROUPS, group_choices, recipe_choices

    lines = ["\b", "Recipes (recipe=NAME):", f"  {', '.join(recipe_choices())}", "Config groups (GROUP=NAME):"]
    lines += [f"  {g:9s} {', '.join(group_choices(g))}" for g in GROUPS]
    lines.append("Any key: KEY=VALUE (see `gain info config`); new keys +KEY=VALUE.")
    return "\n".join(lines)


def _compose(overrides: list[str], default_recipe: str | None = None):
    from gain_cli.config import compose_config, split_recipe

    recipe, rest = split_recipe(overrides or [], default_recipe)
    return compose_config(_expand_model_path(rest), recipe)


def _expand_model_path(overrides: list[str]) -> list[str]:
    """`model=/some/dir` (a saved HF model) means the `local` model config with that path."""
    out = []
    for o in overrides:
        if o.startswith("model=") and ("/" in o or Path(o[6:]).is_dir()):
            path = o.split("=", 1)[1]
            if not Path(path).expanduser().is_dir():
                raise GainError(f"model path '{path}' is not a directory")
            out += ["model=local", f"model.path={Path(path).expanduser().resolve()}"]
        else:
            out.append(o)
    return out


# --- run ------------------------------------------------------------------------------------

def complete_override(incomplete: str) -> list[str]:
    """Shell completion of ``recipe=NAME`` and ``GROUP=NAME`` overrides (from the config files)."""
    from gain_cli.config import GROUPS, group_choices, recipe_choices

    if "=" in incomplete:
        key, _ = incomplete.split("=", 1)
        names = recipe_choices() if key == "recipe" else group_choices(key) if key in GROUPS else []
        return [f"{key}={n}" for n in names if f"{key}={n}".startswith(incomplete)]
    return [f"{k}=" for k in ("recipe", *GROUPS) if k.startswith(incomplete)]


@app.command(context_settings=OVERRIDES, epilog=_config_groups_help())
@user_errors
def run(
    overrides: Optional[list[str]] = typer.Argument(None, help="recipe=NAME and key=value overrides",
                                                    autocompletion=complete_override),
    multirun: bool = typer.Option(False, "--multirun", "-m", help="Sweep: comma lists run every combination."),
) -> None:
    """Run a sequential-domain experiment: base eval, then train + evaluate every domain per stage.

    \b
    Examples:
      gain run recipe=tiny_8domains method=lora train.steps=20 run_name=try1
      gain run recipe=smollm2_8domains method=gain_ffn method.lr=3e-3
      gain run recipe=tiny_8domains resume=true run_name=try1      (continue a stopped run)
      gain run -m recipe=tiny_8domains method=lora,gain_ffn method.lr=1e-4,1e-3   (a sweep)
    """
    from gain_cli.config import DEFAULT_RECIPE

    jobs = [("", list(overrides or []))]
    if multirun:
        from gain_cli.sweep import expand_sweep

        jobs = expand_sweep(overrides or [])
        console.print(f"multirun: {len(jobs)} run(s)", highlight=False)
    # every combination is composed and checked before the first one runs: a bad value fails now, not hours in
    from gain_cli.preflight import check_run

    runs = []
    for suffix, job in jobs:
        cfg = _compose(job, DEFAULT_RECIPE)
        if suffix and not cfg.run_dir:
            cfg.run_name = f"{cfg.run_name}-{suffix}" if cfg.run_name else suffix
        check_run(cfg)
        runs.append((suffix, job, cfg))
    failed: list[str] = []
    finished: list[Path] = []
    for suffix, job, cfg in runs:
        try:
            finished.append(_run_one(cfg, job))
        except (GainError, typer.Exit) as exc:
            if not multirun or _state["debug"]:
                raise
            # one failed combination (say, a learning rate that diverges) does not stop the others
            if isinstance(exc, GainError):
                err_console.print(f"[bold red]error[/bold red] in run {suffix}: {exc}", highlight=False, soft_wrap=True)
            failed.append(suffix)
    if multirun and len(finished) > 1 and os.environ.get("RANK", "0") == "0":
        _compare_sweep(finished, runs[0][2])
    if failed:
        others = "the others finished; " if len(failed) < len(runs) else ""
        raise GainError(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)} (errors above); {others}"
                        "the same command with resume=true re-runs only what is unfinished")


def _compare_sweep(run_dirs: list[Path], cfg) -> None:
    """The end of a sweep: its runs' metrics side by side in the terminal, and their comparison report."""
    from datetime import datetime

    from gain_cli.outputs import claim_output_dir, mark_output_dir
    from gain_cli.reporting.matrices import load_run
    from gain_cli.reporting.report import write_report
    from gain_cli.reporting.tables import print_metric_table

    try:
        print_metric_table([load_run(rd) for rd in run_dirs], console)
        out = claim_output_dir(Path(str(cfg.output_root)) / str(cfg.recipe or "custom") /
                               f"sweep-{datetime.now().strftime('%Y%m%d-%H%M%S')}", "gain run -m")
        path = write_report(run_dirs, out, "md")
    except GainError as exc:  # e.g. a sweep over domain sequences: the runs stand, only the comparison is skipped
        err_console.print(f"no sweep comparison: {exc}", highlight=False, soft_wrap=True)
        return
    mark_output_dir(out, "gain run -m", runs=[str(rd) for rd in run_dirs])
    console.print(f"sweep comparison: {path}", highlight=False)


def _run_one(cfg, job: list[str]) -> Path:
    """One experiment, in this process or in launched processes (launcher.num_processes > 1); its run directory."""
    from gain_cli.launcher import maybe_relaunch
    from gain_cli.rundir import resolve_run_dir
    from gain_cli.runner import run_experiment

    rc = maybe_relaunch(cfg, [*(["--debug"] if _state["debug"] else []), "run", *job], console)
    if rc is not None:  # ran in launched processes
        if rc:
            raise typer.Exit(rc)
        return resolve_run_dir(cfg)
    main = os.environ.get("RANK", "0") == "0"  # under accelerate launch / torchrun: print once
    if main:
        from gain_cli.memory import summary_line

        console.print(f"recipe [bold]{cfg.recipe}[/bold] · model {cfg.model.name} · method {cfg.method.name} · "
                      f"{len(cfg.domains.sequence)} domains · {cfg.train.steps} steps/stage", highlight=False)
        line = summary_line(cfg)
        if line:
            console.print(line, highlight=False, markup=False)
    run_dir = run_experiment(cfg, console)
    if main:
        _print_run(run_dir)
        console.print(f"results: {run_dir}", highlight=False)
    return run_dir


def _print_run(run_dir: Path) -> None:
    try:
        from gain_cli.reporting.matrices import load_run
        from gain_cli.reporting.tables import print_run
    except ImportError:
        return
    print_run(load_run(run_dir), console)


@app.command(context_settings=OVERRIDES)
@user_errors
def demo(
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides applied to every run"),
    methods: str = typer.Option("gain_ffn,lora", "--methods", help="Comma-separated methods to compare."),
) -> None:
    """The main job on the embedded default: SmolLM2-135M on 8 local domains, GAIN-FFN vs LoRA, then a report."""
    from gain_cli.demo import run_demo

    run_demo(console, [m.strip() for m in methods.split(",") if m.strip()], overrides or [])


@app.command(context_settings=OVERRIDES)
@user_errors
def study(
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides applied to every run"),
    size: str = typer.Option("default", "--size", help="default (SmolLM2-135M, recipe smollm2_study) or tiny "
                                                      "(tiny model, recipe tiny_study, < 3 min)."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="lr-select (the learning-rate rule) or lora-lr (the "
                                                              "paper's Figure 2) instead of the study itself."),
    output_root: Path = typer.Option(Path("runs"), "--output-root", help="Where the study's runs and report go."),
    report_only: bool = typer.Option(False, "--report-only", help="Only write the report, from the finished runs."),
) -> None:
    """The study: GAIN-attn, GAIN-FFN, LoRA, full FT and (IA)3 under one budget and protocol, several seeds, one
    report with 95 % intervals and a verdict per claim of the paper. Resumes where it stopped.

    Example: gain study                      (make study; runs/smollm2_study/report/report.md)
    Example: gain study --size tiny          (the same pipeline on a tiny model)
    Example: gain study --sweep lr-select    (re-derive the recipe's learning rates)
    """
    from gain_cli.study import run_study

    run_study(console, size=size, sweep=sweep, overrides=overrides or [], output_root=output_root,
              run_missing=not report_only)


@app.command()
@user_errors
def bench(
    size: str = typer.Option("smollm2", "--size", help="smollm2: the real figures (about 15 min on 2 cores); "
                                                       "tiny: a one-minute sanity run (its times mean nothing)."),
    out: Path = typer.Option(Path("bench"), "--out", help="Directory for bench.json."),
    repeats: int = typer.Option(4, "--repeats", help="Runs per measurement, order alternating (use an even number); "
                                "ratios combine (A,B),(B,A) pairs, medians are reported."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into --out even when it is a non-empty "
                                   "directory gain did not write."),
    section: Optional[str] = typer.Option(None, "--section", help="Run one section alone: busy (training and "
                                          "perplexity under a synthetic load, old vs adaptive threads; ~6 min) or "
                                          "default (a 200-step stage, train.compile=auto vs the Trainer's default)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="With --section default: methods, comma-separated "
                                          "(default gain_ffn,lora,full_ft)."),
    runs: Optional[list[Path]] = typer.Option(None, "--runs", help="Instead of the benchmarks: where the time of "
                                              "these runs went (training, perplexity, lm-eval, other) and their "
                                              "end-to-end MFU against this machine's matmul peak (repeatable)."),
) -> None:
    """Training and evaluation speed against the standard stack (HF Trainer + PEFT, lm-eval), in one process.

    Writes <out>/bench.json and prints the table. Example: gain bench --size tiny --repeats 1;
    gain bench --runs runs/smollm2_8domains/gain_ffn/<run> (end_to_end.json)
    """
    from gain_cli.outputs import claim_output_dir, mark_output_dir

    out = claim_output_dir(out, "gain bench", overwrite)
    if runs:
        from gain_cli.bench.end_to_end import end_to_end

        end_to_end(list(runs), out, console)
        mark_output_dir(out, "gain bench", size="runs")
        return
    from gain_cli.bench import run_bench, run_section

    if section is not None:
        changes = {"default_methods": tuple(m.strip() for m in methods.split(","))} if methods else {}
        run_section(section, size, out, repeats, console, threads=threads, **changes)
        mark_output_dir(out, "gain bench", size=size, section=section)
        return
    run_bench(size, out, repeats, console=console, threads=threads)
    mark_output_dir(out, "gain bench", size=size)


# --- eval -----------------------------------------------------------------------------------

@app.command("eval", context_settings=OVERRIDES)
@user_errors
def eval_(
    overrides: Optional[list[str]] = typer.Argument(None, help="model=NAME|PATH domains=NAME eval.max_blocks=N ..."),
    run_dir: Optional[Path] = typer.Option(None, "--run", help="Evaluate a stage of this run (its model and method)."),
    stage: Optional[int] = typer.Option(None, "--stage", help="Stage of --run to evaluate (default: the last finished)."),
) -> None:
    """Validation perplexity of a model (config, saved directory, or a run's stage) on a domain set, and the lm-eval
    tasks of eval.harness when enabled (as in a run's rows)."""
    import time

    from gain_cli.data.domains import DomainData, ensure_domains
    from gain_cli.evaluation.perplexity import evaluate_blocks

    cfg, model, tokenizer, label = _model_for_eval(overrides or [], run_dir, stage)
    domains = ensure_domains(cfg.domains, cfg.cache_dir, log=console.print)
    data = DomainData(domains, tokenizer, cfg.cache_dir)
    table = Table(title=f"validation perplexity · {label}")
    for col in ("domain", "PPL", "loss", "tokens"):
        table.add_column(col, justify="right" if col != "domain" else "left")
    from gain_cli.models.compiling import decide_compile

    # one sweep: auto stays eager (a compile pays for itself only over many sweeps: docs/performance.md)
    compiled = decide_compile(cfg.eval.compile, "eval.compile", None, 1, next(model.parameters()).device,
                              refused="gain eval runs one sweep").enabled
    t0 = time.perf_counter()
    for d in domains:
        r = evaluate_blocks(model, data.blocks(d.name, "validation", int(cfg.eval.block_size), cfg.eval.max_blocks),
                            int(cfg.eval.batch_size), compile=compiled)
        table.add_row(d.name, f"{r.ppl:.3f}", f"{r.loss:.4f}", str(r.tokens))
    console.print(table)
    harness_cfg = cfg.eval.harness
    if harness_cfg is not None and harness_cfg.enabled:
        _print_harness(model, tokenizer, harness_cfg, label)
    console.print(f"{time.perf_counter() - t0:.1f} s", highlight=False)


def _print_harness(model, tokenizer, harness_cfg, label: str) -> None:
    """The lm-eval tasks (BoolQ) of a model, scored as a run scores its rows (eval.harness.enabled=false skips)."""
    import tempfile

    from omegaconf import OmegaConf

    from gain_cli.evaluation.harness import run_harness

    with tempfile.TemporaryDirectory(prefix="gain-eval-harness-") as work:
        results = run_harness(model, tokenizer, OmegaConf.to_container(harness_cfg, resolve=True), work)
    table = Table(title=f"lm-eval · {label}")
    for col in ("task", "acc %", "± stderr", "items"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for task, row in results.items():
        stderr = row.get("acc_stderr")
        table.add_row(task, f"{100 * row['acc']:.1f}" if "acc" in row else "-",
                      f"{100 * stderr:.1f}" if stderr is not None else "-", str(row.get("n", "-")))
    console.print(table)


def _model_for_eval(overrides: list[str], run_dir: Path | None, stage: int | None):
    from gain_cli.models.loading import load_model
    from gain_cli.rundir import RunDir

    if run_dir is None:
        from gain_cli.preflight import check_eval

        cfg = _compose(overrides, None)
        check_eval(cfg)
        model, tok = load_model(cfg.model, cfg.cache_dir)
        saved_dir = cfg.model.path if cfg.model.name == "local" else None  # e.g. written by `gain merge`
        return cfg, model, tok, str(saved_dir) if saved_dir else f"{cfg.model.name} (no adaptation)"
    rd = RunDir(run_dir)
    cfg = rd.require_run()
    total = len(cfg.domains.sequence)  # the run's stages (an override below may evaluate other domains)
    if overrides:
        from gain_cli.config import compose_config

        extra = compose_config(_expand_model_path(overrides), cfg.recipe)
        for key in ("domains", "eval"):
            if any(o.startswith(key) for o in overrides):
                cfg[key] = extra[key]
    done = rd.finished_stages()
    k = done[-1] if stage is None and done else (stage or 0)
    rd.check_stage(k, total, done, base=True)
    model, tok, _ = rd.model_after(cfg, k)
    return cfg, model, tok, f"{run_dir.name} after stage {k}"


# --- merge ----------------------------------------------------------------------------------

@app.command()
@user_errors
def merge(
    run_dir: Path = typer.Argument(..., help="A run directory written by `gain run`."),
    out: Path = typer.Option(..., "--out", help="Where to write the merged Hugging Face model."),
    stage: Optional[int] = typer.Option(None, "--stage", help="Merge up to this stage (default: the last finished)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even when it is a directory gain did "
                                   "not write (its files are deleted)."),
) -> None:
    """Absorb the adaptation into the weights and save a plain Hugging Face model (safetensors + tokenizer).

    --out must be new, empty or an earlier `gain merge` output; anything else is refused unless --overwrite."""
    from gain_cli.merging import merge_run

    path = merge_run(run_dir, out, stage, overwrite=overwrite, say=lambda m: console.print(m, highlight=False))
    console.print(f"merged model written to {path}", highlight=False)


@app.command()
@user_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run directory written by `gain run`."),
    out: Path = typer.Option(..., "--out", help="Where to write the adapter directory."),
    stage: Optional[int] = typer.Option(None, "--stage", help="Stage K's own adapter (its base: the model after "
                                        "stage K-1, i.e. `gain merge RUN --stage K-1`; K=1: the pretrained model)."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Stages A..B as one adapter, e.g. 1..3 (its base: "
                                         "the model after stage A-1; 1..K: the pretrained model)."),
    fmt: str = typer.Option("peft", "--format", help="peft: adapter_config.json + adapter_model.safetensors."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even when it is a directory gain did "
                                   "not write (its files are deleted)."),
) -> None:
    """Write trained stages as a stock PEFT adapter (LoRA; (IA)³; GAIN as (IA)³), loadable with
    `PeftModel.from_pretrained(base, OUT)` without gain (docs/export.md). IMSM and full FT are refused.

    --out must be new, empty or an earlier `gain export` output; anything else is refused unless --overwrite."""
    from gain_cli.export import export_run, stage_range

    first, last = stage_range(stage, stages)
    path = export_run(run_dir, out, last, first, fmt=fmt, overwrite=overwrite,
                      say=lambda m: console.print(m, highlight=False))
    console.print(f"PEFT adapter written to {path}", highlight=False)


# --- report ---------------------------------------------------------------------------------

REPORT_KINDS = {
    "pareto": "forgetting–adaptation points of many runs (a sweep) with the Pareto front (figure 2)",
    "tokens": "per-token loss change on the other domains after one stage (figure 1)",
    "interpolate": "loss from the base to the adapted weights, in-domain and cross-domain (figure 3)",
    "combine": "two stages' weight changes scaled by α, β: loss grid (figure 4)",
}


@app.command()
@user_errors
def report(
    args: list[str] = typer.Argument(..., help="[pareto|tokens|interpolate|combine] RUN_DIR..."),
    fmt: str = typer.Option("md", "--format", help="Table format: md, latex or csv."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory."),
    stage: int = typer.Option(1, "--stage", help="tokens / interpolate: the adapted stage."),
    stages: str = typer.Option("1,2", "--stages", help="combine: two stages, e.g. 1,2."),
    points: int = typer.Option(11, "--points", help="interpolate: number of α values in [0, 1]."),
    max_blocks: Optional[int] = typer.Option(None, "--max-blocks", help="Validation blocks per domain (default: the run's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into --out even when it is a non-empty "
                                   "directory gain did not write."),
) -> None:
    """Tables of a run's matrices; with --out or several runs, the comparison report (tables, heatmaps,
    BoolQ curves, report.md). Sub-reports: pareto, tokens, interpolate, combine (the paper's figures)."""
    from gain_cli.outputs import claim_output_dir, mark_output_dir

    kind = args[0] if args[0] in REPORT_KINDS else None
    run_dirs = [Path(a) for a in (args[1:] if kind else args)]
    if not run_dirs:
        raise GainError(f"give at least one run directory after '{kind}'")
    for rd in run_dirs:
        if rd.is_file():
            raise GainError(f"'{rd}' is a file, not a run directory")
        if not rd.is_dir():
            raise GainError(f"run directory '{rd}' does not exist (report kinds: {', '.join(REPORT_KINDS)})")
    if kind is None:
        from gain_cli.reporting.matrices import load_run
        from gain_cli.reporting.report import write_report
        from gain_cli.reporting.tables import print_run

        if fmt not in ("md", "latex", "csv"):
            raise GainError(f"unknown --format '{fmt}' (valid: md, latex, csv)")
        writes = out is not None or len(run_dirs) > 1
        target = claim_output_dir(out or Path("report"), "gain report", overwrite) if writes else None
        loaded = [load_run(rd) for rd in run_dirs]
        for r in loaded:
            print_run(r, console)
        if len(loaded) > 1:
            from gain_cli.reporting.tables import print_metric_table

            print_metric_table(loaded, console)
        from gain_cli.reporting.study_report import groups_of_runs, print_intervals

        groups = groups_of_runs(loaded)
        if groups is not None:
            print_intervals(groups, console)
        if target is not None:
            path = write_report(run_dirs, target, fmt)
            mark_output_dir(target, "gain report", runs=[str(rd.absolute()) for rd in run_dirs])
            console.print(f"report written to {path}", highlight=False)
        return
    if kind == "combine":  # its arguments checked before anything is claimed or computed
        try:
            a, b = (int(x) for x in stages.split(","))
        except ValueError:
            raise GainError(f"--stages takes two stage numbers like 1,2, not '{stages}'") from None
        if len(run_dirs) != 1:
            raise GainError("combine takes exactly one run directory")
    out = claim_output_dir(out or Path("report"), f"gain report {kind}", overwrite)
    if kind == "pareto":
        from gain_cli.reporting.pareto import write_pareto

        path = write_pareto(run_dirs, out)
    elif kind == "tokens":
        from gain_cli.analysis.token_shift import token_shift

        path = token_shift(run_dirs, out, stage=stage, max_blocks=max_blocks)
    elif kind == "interpolate":
        from gain_cli.analysis.interpolation import interpolation

        path = interpolation(run_dirs, out, stage=stage, points=points, max_blocks=max_blocks)
    else:
        from gain_cli.analysis.combination import combination

        path = combination(run_dirs[0], out, stages=(a, b), max_blocks=max_blocks)
    mark_output_dir(out, f"gain report {kind}", runs=[str(rd.absolute()) for rd in run_dirs])
    console.print(f"{kind} written to {path}", highlight=False)


# --- data -----------------------------------------------------------------------------------

@data_app.command("list", context_settings=OVERRIDES)
@user_errors
def data_list(overrides: Optional[list[str]] = typer.Argument(None, help="domains=NAME (default: the default recipe's)")) -> None:
    """Show the domains of a config: sizes on disk and sources."""
    import json

    from gain_cli.config import DEFAULT_RECIPE

    cfg = _compose(overrides or [], DEFAULT_RECIPE if not any(o.startswith("domains=") for o in overrides or []) else None)
    root = Path(cfg.domains.root)
    sources = {}
    if (root / "sources.json").is_file():
        sources = {s["domain"]: s for s in json.loads((root / "sources.json").read_text())}
    table = Table(title=f"domains '{cfg.domains.name}' (source: {cfg.domains.source}) · {root}")
    for col in ("#", "domain", "train", "validation", "source"):
        table.add_column(col)
    for i, d in enumerate(cfg.domains.sequence, 1):
        sizes = []
        for split in ("train", "validation"):
            p = root / d / f"{split}.jsonl"
            sizes.append(f"{p.stat().st_size / 1e3:,.0f} KB" if p.is_file() else "not built")
        s = sources.get(d, {})
        src = f"{s.get('registry', '')} {s.get('package', '')} {s.get('version', '')}".strip() or cfg.domains.source
        table.add_row(str(i), d, *sizes, src)
    console.print(table)


@data_app.command("build", context_settings=OVERRIDES)
@user_errors
def data_build(
    name: str = typer.Argument(..., help="A domain set (configs/domains/NAME.yaml), e.g. tiny8 or demo8 (alias: demo)."),
    overrides: Optional[list[str]] = typer.Argument(None),
    overwrite: bool = typer.Option(False, "--overwrite", help="Build into domains.root even when it is a non-empty "
                                                              "directory that gain did not build."),
) -> None:
    """Build (once) the local data of a domain set into its domains.root (a new or empty directory, or one gain
    built before; files already there are kept)."""
    from gain_cli.data.domains import ensure_domains

    name = {"demo": "demo8", "tiny": "tiny8"}.get(name, name)
    cfg = _compose([f"domains={name}", *(overrides or [])], None)
    domains = ensure_domains(cfg.domains, cfg.cache_dir, log=console.print, overwrite=overwrite)
    console.print(f"{len(domains)} domains ready in {cfg.domains.root}", highlight=False)


# --- info -----------------------------------------------------------------------------------

INFO_TOPICS = ("config", "params", "memory", "keys", "method")


def _print_fields(title: str, rows, values: dict | None = None) -> None:
    """A table of config fields: key, type, default (or the composed value), help."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", show_lines=False)
    for col in ("key", "type", "value" if values is not None else "default", "help"):
        table.add_column(col, overflow="fold")
    for key, kind, default, help_ in rows:
        shown = default if values is None else values.get(key, default)
        table.add_row(*(Text(str(c)) for c in (key, kind, shown, help_)))  # no rich markup: [attn] is text
    console.print(table)


def _flat(node: dict, prefix: str = "") -> dict[str, str]:
    """``{dotted key: shown value}`` of a plain nested mapping."""
    from gain_cli.schemas.typed import show

    out: dict[str, str] = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": show(v)})
    return out


def _info_keys(args: list[str]) -> None:
    """``gain info keys [GROUP]``: every key of the run config's sections (or one group's), with type, default and
    help; ``gain info method NAME``: a method's keys, with the values its YAML sets."""
    from gain_cli.schemas import GROUPS, RunConfig

    if not args:
        rows = [r for r in RunConfig.describe() if r[1] != "section" and r[0].split(".")[0] not in GROUPS]
        _print_fields("run", rows)
        for name, cls in GROUPS.items():
            _print_fields(name, cls.describe())
        console.print("method: gain info method NAME (its keys depend on the method)", highlight=False)
        return
    group = args[0]
    if group == "method":
        raise GainError("gain info keys method: use gain info method NAME (e.g. gain info method lora)")
    if group not in GROUPS:
        raise unknown_choice("config group", group, [*GROUPS, "method"])
    _print_fields(group, GROUPS[group].describe())


def _info_method(args: list[str]) -> None:
    from omegaconf import OmegaConf

    from gain_cli.config import group_choices
    from gain_cli.methods import method_class

    names = group_choices("method")
    if len(args) != 1 or "=" in args[0]:
        raise GainError(f"gain info method NAME: name one method config (valid: {', '.join(names)})")
    if args[0] not in names:
        raise unknown_choice("method", args[0], names)
    cfg = _compose([f"method={args[0]}"], None)
    cls = method_class(cfg.method).config
    values = _flat(OmegaConf.to_container(cfg.method), "method.")
    _print_fields(f"method {args[0]} ({cls.__name__}; value: configs/method/{args[0]}.yaml)", cls.describe(), values)


@app.command(context_settings=OVERRIDES)
@user_errors
def info(args: Optional[list[str]] = typer.Argument(None, help="[config|params|memory|keys [GROUP]|method NAME] then "
                                                               "key=value overrides")) -> None:
    """Print the composed config (default), the trainable-parameter count, a memory estimate, the config's keys
    with their types, defaults and help (keys [GROUP]), or a method's keys (method NAME)."""
    from gain_cli.config import DEFAULT_RECIPE, to_yaml

    args = list(args or [])
    topic = "config"
    if args and "=" not in args[0]:
        topic = args.pop(0)
        if topic not in INFO_TOPICS:
            raise GainError(f"unknown info topic '{topic}' (valid: {', '.join(INFO_TOPICS)})")
    if topic == "keys":
        return _info_keys(args)
    if topic == "method":
        return _info_method(args)
    recipe_default = DEFAULT_RECIPE if topic == "config" else None
    cfg = _compose(args, recipe_default)
    if topic == "config":
        console.print(to_yaml(cfg), highlight=False, markup=False)
    elif topic == "params":
        from omegaconf import OmegaConf

        from gain_cli.methods.params import count_method_params

        res = count_method_params(OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.method))
        console.print(f"model {cfg.model.name} · method {cfg.method.name}", highlight=False)
        for k, v in res.items():
            console.print(f"  {k}: {v:,}" if isinstance(v, int) else f"  {k}: {v}", highlight=False)
    else:
        from gain_cli.memory import estimate_for_config, format_estimate

        for line in format_estimate(estimate_for_config(cfg)):
            console.print(line, highlight=False, markup=False)


def main() -> None:
    if "--debug" in sys.argv:
        _state["debug"] = True
    from gain_cli.threads import apply_at_start

    apply_at_start()  # the OpenMP wait policy from the machine's load: before anything imports torch
    interrupts.install()
    app(prog_name="gain")


if __name__ == "__main__":
    main()
