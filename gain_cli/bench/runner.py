"""``run_bench``: every benchmark section in one process on the same model, data and settings → bench.json + a table.

Sections (bench.json keys): ``training`` (+ ``training_bf16``, ``training_compiled``), ``perplexity``, ``boolq``,
``inference``, ``threads`` (forward time per OpenMP wait policy × thread count, ``thread_probe``) and
``busy_machine`` (``busy_probe``, ``bench/busy.py``: train and perplexity tok/s idle and under ``busy_loops``
busy-loop processes the bench starts and kills itself, with the old fixed ACTIVE + every core setting vs the
adaptive choice of ``gain_cli/threads.py``, and each as a fraction of the idle speed).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gain_cli.bench.busy import bench_busy
from gain_cli.bench.default_mode import bench_default_mode
from gain_cli.bench.evaluation import bench_boolq, bench_perplexity
from gain_cli.bench.inference import bench_inference
from gain_cli.bench.probes import MatmulProbe
from gain_cli.bench.settings import BenchSettings, bench_settings
from gain_cli.bench.threads import bench_threads
from gain_cli.bench.timing import rel_diff
from gain_cli.bench.training import bench_training
from gain_cli.config import compose_config, group_choices
from gain_cli.data.domains import DomainData, ensure_domains
from gain_cli.errors import GainError
from gain_cli.models.compiling import compile_unavailable
from gain_cli.models.flops import flops_per_token
from gain_cli.models.loading import load_model, model_spec

TARGETS = {"training_ratio_min": 1.2, "perplexity_ratio_min": 1.5, "merged_inference_ratio_max": 1.02,
           "busy_adaptive_of_idle_min": 1 / 3}
SMOLLM2_INLINE = {"name": "smollm2-135m", "source": "smollm2", "path": None, "revision": None, "tokenizer": None,
                  "dtype": "float32", "trust_remote_code": False, "arch_overrides": {}, "hf_config": {"model_type": "llama"}}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _configs(s: BenchSettings) -> tuple[dict, dict, dict[str, dict], str]:
    """(model config, domains config, {method: config}, cache dir) from the project's configs."""
    from omegaconf import OmegaConf

    model_over = [f"model={s.model}", *s.model_overrides] if s.model in group_choices("model") else []
    cfg = compose_config([*model_over, "domains=tiny8"], None)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if model_over else dict(SMOLLM2_INLINE)
    if not model_over and s.model != SMOLLM2_INLINE["name"]:
        raise GainError(f"unknown model config '{s.model}' for the benchmark")
    domains_cfg = OmegaConf.to_container(cfg.domains, resolve=True)
    methods = {}
    for m in s.methods:
        mc = compose_config([f"method={m}"], None)
        methods[m] = OmegaConf.to_container(mc.method, resolve=True)
    return model_cfg, domains_cfg, methods, str(cfg.cache_dir)


def run_bench(size: str = "tiny", out: str | Path = "bench", repeats: int = 4, *, console=None,
              settings: BenchSettings | None = None, log=None, **changes: Any) -> dict[str, Any]:
    """Run every section, write ``<out>/bench.json``, print the table; returns the bench dict."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if repeats < 1:
        raise GainError(f"repeats must be >= 1, got {repeats}")
    s = settings or bench_settings(size, **changes)
    if log is None:
        log = (lambda msg: console.print(msg, highlight=False)) if console is not None else print
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(int(s.threads))
    try:
        return _run(s, out, repeats, console, log)
    finally:
        torch.set_num_threads(threads_before)


def _run(s: BenchSettings, out: Path, repeats: int, console, log) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    s, why = skip_uncompilable(s, log)
    model_cfg, domains_cfg, method_cfgs, cache_dir = _configs(s)
    domains_cfg["sequence"] = [s.domain]
    domains = ensure_domains(domains_cfg, cache_dir, log=log)
    log(f"bench {s.size}: loading {model_cfg['name']}")
    model, tokenizer = load_model(model_cfg, cache_dir)
    spec = model_spec(model_cfg, model.config.model_type)
    data = DomainData(domains, tokenizer, cache_dir)
    train_blocks = data.blocks(s.domain, "train", s.train_seq)
    heldout = data.blocks(s.domain, "validation", s.train_seq)[: s.train_batch]
    if train_blocks.shape[0] < s.train_batch:
        raise GainError(f"domain '{s.domain}' has only {train_blocks.shape[0]} training blocks")

    result: dict[str, Any] = {
        "size": s.size, "repeats": repeats, "settings": s.to_dict(),
        "machine": {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
                    "loadavg_start": [round(x, 2) for x in load_before]},
        "model": {"name": model_cfg["name"], "parameters": sum(p.numel() for p in model.parameters()),
                  "model_type": model.config.model_type},
        "targets": TARGETS,
        "compiled_rows_skipped": why,
    }
    probe_dtype = torch.bfloat16 if s.mixed_precision == "bf16" else torch.float32
    probe = MatmulProbe(model, s.train_batch * s.train_seq, probe_dtype, seed=s.seed)
    result["probe"] = probe.describe()

    log("training: our loop vs the Hugging Face Trainer")
    result["training"] = bench_training(model, spec, method_cfgs, train_blocks, heldout, s, repeats, probe, log=log)
    eager = result["training"]["methods"]
    bf16_methods = {m: c for m, c in method_cfgs.items() if m in s.train_bf16_methods}
    if bf16_methods:
        log("training under bf16 autocast (both sides)")
        probe16 = MatmulProbe(model, s.train_batch * s.train_seq, torch.bfloat16, seed=s.seed)
        result["training_bf16"] = bench_training(model, spec, bf16_methods, train_blocks, heldout,
                                                 replace(s, mixed_precision="bf16"), repeats, probe16, log=log)
        _compare_to_eager(result["training_bf16"], eager)
    compile_methods = {m: c for m, c in method_cfgs.items() if m in s.train_compile_methods}
    if compile_methods:
        log("training with the model compiled (both sides: train.compile / the Trainer's torch_compile)")
        result["training_compiled"] = bench_training(model, spec, compile_methods, train_blocks, heldout,
                                                     replace(s, train_compile=True), repeats, probe, log=log)
        _compare_to_eager(result["training_compiled"], eager)
    default_methods = {m: c for m, c in method_cfgs.items() if m in s.default_methods}
    if s.default_steps and default_methods:
        seq = s.default_seq or s.train_seq
        log(f"default mode: a {s.default_steps}-step stage, ours with train.compile=auto vs the Trainer's default")

        result["default_mode"] = bench_default_mode(model, spec, default_methods, data.blocks(s.domain, "train", seq),
                                                    s, repeats, log=log)
    log("evaluation: perplexity sweep vs lm-eval rolling log-likelihood")
    val_stream = data.stream(s.domain, "validation")
    result["perplexity"] = bench_perplexity(model, tokenizer, val_stream, s, repeats, log=log)
    ev_fpt = flops_per_token(model, s.eval_seq, training=False)["total"]
    for key in ("fp32", "bf16", "fp32_compiled"):
        row = result["perplexity"].get(key)
        if row:
            row["ours_gflops_per_s"] = round(row["ours_tokens_per_s"] * ev_fpt / 1e9, 2)
    log("evaluation: BoolQ")
    result["boolq"] = bench_boolq(model, tokenizer, s, repeats, out, log=log)
    log("inference after merge")
    gain_cfg = method_cfgs.get("gain_ffn") or _configs(BenchSettings(size=s.size, model=s.model, methods=("gain_ffn",),
                                                                     model_overrides=s.model_overrides))[2]["gain_ffn"]
    ids = data.blocks(s.domain, "validation", s.infer_seq)[: s.infer_batch]
    result["inference"] = bench_inference(model, spec, gain_cfg, ids, s, repeats, log=log)

    if s.thread_probe:
        log("thread settings (subprocesses)")

        result["threads"] = bench_threads(model_cfg, cache_dir, s, log=log)
    if s.busy_probe:
        log(f"busy machine: train and perplexity under {s.busy_loops} busy loops, old vs adaptive threads")

        result["busy_machine"] = bench_busy(model_cfg, cache_dir, s, log=log)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["targets_met"] = targets_met(result)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(markdown_table(result), encoding="utf-8")
    print_bench(result, console)
    return result


SECTIONS = ("busy", "default")  # what `gain bench --section` runs alone


def run_section(section: str, size: str, out: str | Path, repeats: int, console=None, **changes: Any) -> dict[str, Any]:
    """One section alone (``gain bench --section``): ``busy`` (the busy-machine section) or ``default`` (the
    default-mode stage, ``default_steps`` 200 unless changed); writes ``<out>/<section>.json`` and prints its rows."""
    from rich.console import Console

    if section not in SECTIONS:
        raise GainError(f"unknown bench section '{section}' (valid: {', '.join(SECTIONS)})")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    if section == "default":
        changes.setdefault("default_steps", 200)
    s = bench_settings(size, **changes)
    if s.threads:
        torch.set_num_threads(int(s.threads))
    console = console or Console()
    log = lambda msg: console.print(msg, highlight=False)  # noqa: E731
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg, domains_cfg, method_cfgs, cache_dir = _configs(s)
    result: dict[str, Any] = {"size": s.size, "settings": s.to_dict(), "repeats": repeats,
                              "machine": {"cpu": _cpu_name(), "torch_threads": torch.get_num_threads(),
                                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
                                          "loadavg_start": [round(x, 2) for x in os.getloadavg()]}}
    if section == "busy":
        result["busy_machine"] = bench_busy(model_cfg, cache_dir, s, log=log)
        rows = busy_rows(result)
    else:
        domains_cfg["sequence"] = [s.domain]
        domains = ensure_domains(domains_cfg, cache_dir, log=log)
        model, tokenizer = load_model(model_cfg, cache_dir)
        blocks = DomainData(domains, tokenizer, cache_dir).blocks(s.domain, "train", s.default_seq or s.train_seq)
        methods = {m: c for m, c in method_cfgs.items() if m in s.default_methods}
        result["default_mode"] = bench_default_mode(model, model_spec(model_cfg, model.config.model_type), methods,
                                                    blocks, s, repeats, log=log)
        rows = default_rows(result)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / f"{section}.json").write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
    md = ["| what | ours | standard stack | ours / standard | check |", "|---|---:|---:|---:|---|"]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    (out / f"{section}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    console.print("\n".join(md), highlight=False, markup=False)
    return result


def skip_uncompilable(s: BenchSettings, log) -> tuple[BenchSettings, str | None]:
    """(settings, None), or without torch.compile's CPU toolchain the settings minus the compiled rows and why:
    the benchmark is still worth running without them."""
    why = compile_unavailable("cpu") if (s.train_compile_methods or s.eval_compile) else None
    if why is None:
        return s, None
    log(f"bench {s.size}: compiled rows skipped: torch.compile cannot build CPU kernels here ({why})")
    return replace(s, train_compile_methods=(), eval_compile=False), why


def _compare_to_eager(variant: dict[str, Any], eager: dict[str, Any]) -> None:
    """Add to each row of a training variant (bf16, compiled) its speed and loss against our eager fp32 run, and for
    a variant that costs more up front (compiling) the number of steps after which it has paid for itself."""
    for m, row in variant["methods"].items():
        base = eager[m]
        row["speedup_over_eager_ours"] = round(row["ours_tokens_per_s"] / base["ours_tokens_per_s"], 3)
        row["steady_speedup_over_eager_ours"] = round(row["steady_ours_tokens_per_s"] / base["steady_ours_tokens_per_s"], 3)
        row["final_loss_rel_diff_vs_eager"] = rel_diff(row["ours_final_loss"], base["ours_final_loss"])
        row["heldout_rel_diff_vs_eager"] = rel_diff(row["heldout_loss_ours"], base["heldout_loss_ours"])
        # the one-off cost is what the first run in a process pays (the warm-up run: compiling, kernel choice)
        tokens_per_step = variant["batch"] * variant["seq_len"]
        saved = tokens_per_step / base["steady_ours_tokens_per_s"] - tokens_per_step / row["steady_ours_tokens_per_s"]
        extra = (row["ours_warmup_seconds"] or 0.0) - (base["ours_warmup_seconds"] or 0.0)
        row["first_run_extra_seconds"] = round(extra, 2)
        row["break_even_steps"] = max(0, round(extra / saved)) if saved > 0 else None


def targets_met(r: dict[str, Any]) -> dict[str, bool]:
    met = {f"training_{m}": v["ratio"] >= TARGETS["training_ratio_min"] for m, v in r["training"]["methods"].items()}
    met["perplexity_fp32"] = r["perplexity"]["fp32"]["ratio"] >= TARGETS["perplexity_ratio_min"]
    met["merged_inference"] = r["inference"]["merged_over_base"] <= TARGETS["merged_inference_ratio_max"]
    for w, v in _busy_workloads(r):  # adaptive threads under the synthetic load keep a third of the idle speed
        met[f"busy_{w}"] = (v["adaptive_of_idle"] or 0.0) >= TARGETS["busy_adaptive_of_idle_min"]
    return met


def _flops(x: float) -> str:
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x:.0f} FLOP"


def bench_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(what, ours, standard stack, ratio, check) rows of the summary table."""
    rows = []
    tr = r["training"]
    for m, v in tr["methods"].items():
        rows.append((f"train {m} tok/s", f"{v['ours_tokens_per_s']:,.0f}", f"{v['trainer_tokens_per_s']:,.0f}",
                     f"{v['ratio']:.2f}×",
                     f"loss {v['ours_final_loss']:.4f} vs {v['trainer_final_loss']:.4f} (rel Δ ≤ {v['loss_max_rel_diff']:.0e}); "
                     f"steady state {v['steady_ratio']:.2f}×"))
    for m, v in (r.get("training_bf16") or {}).get("methods", {}).items():
        rows.append((f"train {m} bf16 tok/s", f"{v['ours_tokens_per_s']:,.0f}", f"{v['trainer_tokens_per_s']:,.0f}",
                     f"{v['ratio']:.2f}×", f"{v['speedup_over_eager_ours']:.2f}× our fp32; loss vs fp32 rel Δ "
                                           f"{v['final_loss_rel_diff_vs_eager']:.0e}"))
    for m, v in (r.get("training_compiled") or {}).get("methods", {}).items():
        pays = "never pays here" if v["break_even_steps"] is None else f"pays after {v['break_even_steps']} steps"
        rows.append((f"train {m} compiled tok/s, steady", f"{v['steady_ours_tokens_per_s']:,.0f}",
                     f"{v['steady_trainer_tokens_per_s']:,.0f}", f"{v['steady_ratio']:.2f}×",
                     f"both compiled; {v['steady_speedup_over_eager_ours']:.2f}× our eager steps; first compile in "
                     f"the process +{v['first_run_extra_seconds']:.0f} s, {pays}; "
                     f"loss vs eager rel Δ {v['final_loss_rel_diff_vs_eager']:.0e}"))
    rows += default_rows(r)
    for m, v in tr["methods"].items():
        fpt = v["flops_per_token"]
        rows.append((f"MFU {m}", f"{100 * v['ours_mfu']:.0f}%", f"{100 * v['trainer_mfu']:.0f}%", "",
                     f"{_flops(fpt['total'])}/token; weight-grads skipped for "
                     f"{100 * fpt['weight_grad_skipped_fraction']:.0f}% of matmul weights"))
    ms = tr["methods"]
    if "gain_ffn" in ms and "full_ft" in ms:
        g, f = ms["gain_ffn"], ms["full_ft"]
        rows.append(("gain_ffn / full_ft tok/s (ours)", f"{g['ours_tokens_per_s']:,.0f}", f"{f['ours_tokens_per_s']:,.0f}",
                     f"{g['ours_tokens_per_s'] / f['ours_tokens_per_s']:.2f}×",
                     f"FLOP/token ratio {f['flops_per_token']['total'] / g['flops_per_token']['total']:.2f}× "
                     "(frozen weights: no weight-grads, tiny optimiser)"))
    pp = r["perplexity"]
    for key in ("fp32", "bf16", "fp32_compiled"):
        if key in pp:
            v = pp[key]
            check = (f"NLL per window Δ ≤ {pp['nll_max_abs_diff_per_window']:.0e}" if key == "fp32"
                     else f"NLL vs fp32 rel Δ {v['nll_rel_diff_vs_fp32']:.0e}")
            if key == "fp32_compiled":
                check += f"; lm-eval eager (it has no compile option); one-off {v['ours_compile_seconds']:.0f} s"
            rows.append((f"perplexity {key.replace('_', ' ')} tok/s", f"{v['ours_tokens_per_s']:,.0f}",
                         f"{v['lm_eval_tokens_per_s']:,.0f}", f"{v['ratio']:.2f}×", check))
    b = r["boolq"]
    rows.append(("BoolQ tok/s", f"{b['ours_tokens_per_s']:,.0f}", f"{b['lm_eval_tokens_per_s']:,.0f}",
                 f"{b['ratio']:.2f}×", f"same choices: {b['choices_equal']} ({b['items']} items)"))
    inf = r["inference"]
    rows.append(("merged GAIN / base fwd", f"{inf['merged_ms']:.1f} ms", f"{inf['base_ms']:.1f} ms",
                 f"{inf['merged_over_base']:.3f}", f"logits = wrapped ± {inf['merged_vs_wrapped_max_abs_logit_diff']:.0e}"))
    rows.append(("wrapped GAIN / base fwd", f"{inf['wrapped_ms']:.1f} ms", f"{inf['base_ms']:.1f} ms",
                 f"{inf['wrapped_over_base']:.3f}", "unmerged overhead"))
    th = r.get("threads")
    if th and th.get("active_over_passive"):
        cores = max(int(k.split("/")[1][:-1]) for k in th["forward_ms"])
        fm = th["forward_ms"]
        rows.append((f"fwd {cores} threads, OMP sleep/spin", f"{fm[f'PASSIVE/{cores}t']:.1f} ms",
                     f"{fm[f'ACTIVE/{cores}t']:.1f} ms", f"{th['active_over_passive']:.2f}×",
                     f"OMP_WAIT_POLICY=PASSIVE vs default, load {th['loadavg'][0]:.1f}"))
    return rows + busy_rows(r)


def _busy_workloads(r: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    bm = r.get("busy_machine") or {}
    return [(w, bm[w]) for w in ("train", "perplexity") if w in bm]


def _rate(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _frac(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def default_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows of the default-mode section (ours with train.compile=auto vs the Trainer's default, one whole stage)."""
    rows = []
    dm = r.get("default_mode") or {}
    for m, v in dm.get("methods", {}).items():
        rows.append((f"train {m} default mode, {dm['steps']}-step stage tok/s", f"{v['ours_tokens_per_s']:,.0f}",
                     f"{v['trainer_tokens_per_s']:,.0f}", f"{v['ratio']:.2f}×",
                     f"ours {'compiled' if v['compiled'] else 'eager'} by train.compile=auto, compile included; the "
                     f"Trainer's default eager; {dm['batch']} × {dm['seq_len']} tokens per step; loss rel Δ ≤ "
                     f"{v['loss_max_rel_diff']:.0e}"))
    return rows


def busy_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows of the busy-machine section: what | adaptive tok/s | old tok/s | adaptive / old | fractions of idle
    and the choice (the "ours" column is the adaptive setting, the "standard" one the fixed setting before)."""
    bm = r.get("busy_machine") or {}
    rows = []
    for w, v in _busy_workloads(r):
        ada, old = bm["settings"]["adaptive"], bm["settings"]["old"]
        loops = f"{bm['busy_loops']} busy loop{'' if bm['busy_loops'] == 1 else 's'}"
        what = f"{'train gain_ffn' if w == 'train' else 'perplexity'} tok/s, {loops}: adaptive vs old"
        rows.append((what, _rate(v["adaptive"]["tokens_per_s"]), _rate(v["old"]["tokens_per_s"]),
                     "—" if v["adaptive_over_old"] is None else f"{v['adaptive_over_old']:.2f}×",
                     f"{_frac(v['adaptive_of_idle'])} of idle vs {_frac(v['old_of_idle'])} of idle "
                     f"(idle {_rate(v['idle']['tokens_per_s'])}); choice {ada['policy']} {ada['threads']}t vs "
                     f"{old['policy']} {old['threads']}t; load average {bm['loadavg']['busy_end'][0]:.1f}"))
    return rows


def markdown_table(r: dict[str, Any]) -> str:
    """The summary table as Markdown (written next to bench.json as bench.md; pasted into docs/performance.md)."""
    m = r["machine"]
    head = (f"{r['model']['name']} · median of {r['repeats']} · {m['torch_threads']} threads · "
            f"fp32 matmul peak {r['training']['peak_gflops']:.0f} GFLOP/s · load {m['loadavg_start'][0]:.1f} → "
            f"{m['loadavg_end'][0]:.1f} · {m['cpu']}")
    lines = [head, "", "| what | ours | standard stack | ours / standard | check |", "|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in bench_rows(r)]
    return "\n".join(lines) + "\n"


def print_bench(r: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = r["machine"]
    t = Table(title=f"gain bench · {r['model']['name']} · median of {r['repeats']} · {m['torch_threads']} threads · "
                    f"fp32 matmul peak {r['training']['peak_gflops']:.0f} GFLOP/s")
    for col in ("what", "ours", "standard stack", "ours / standard", "check"):
        t.add_column(col, justify="right" if col in ("ours", "standard stack", "ours / standard") else "left")
    for row in bench_rows(r):
        t.add_row(*row)
    console.print(t)
    console.print(f"standard stack: HF Trainer (+PEFT) · lm-eval HFLM.loglikelihood_rolling · lm-eval simple_evaluate"
                  f" · the base model.  Load average {m['loadavg_start'][0]:.1f} → {m['loadavg_end'][0]:.1f}; "
                  f"{r['seconds']:.0f} s.", highlight=False)
