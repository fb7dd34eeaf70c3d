"""`gain export`: a run's trained stages as a stock PEFT adapter directory (docs/export.md).

What is written: ``adapter_config.json`` (PEFT's own ``LoraConfig`` / ``IA3Config``, ``save_pretrained``),
``adapter_model.safetensors`` (under the keys ``PeftModel.from_pretrained`` loads: ``base_model.model.<module>.
lora_A.weight`` / ``.lora_B.weight`` / ``.ia3_l``), a short README.md and gain's marker file. Nothing of gain is
needed to load it. No model is loaded: the adapter is computed from the saved stage states alone.

Which stages, and on which base model (every stage of a run trains on the model with the earlier stages merged in):

  ``--stage K``       stage K's own adapter; its base is the model after stages 1..K-1 (K=1: the pretrained
                      model; K>1: ``gain merge RUN --stage K-1``).
  ``--stages A..B``   stages A..B as one adapter, on the model after stage A-1 (``--stages 1..K``: on the pretrained
                      model, the same function as ``gain merge RUN --stage K``). Exact, because the stages compose:
                      GAIN / (IA)³ vectors multiply (W·diag(s1)·diag(s2) = W·diag(s1⊙s2) on the input side;
                      diag(l2)·(diag(l1)·(Wx + b)) = diag(l1⊙l2)·(Wx + b) on the output side); LoRA deltas add
                      (W + c·B1A1 + c·B2A2 = W + c·[B1 B2]·[A1; A2]), so n LoRA stages of rank r are one adapter of
                      rank n·r with lora_alpha n·alpha (the same scale c = alpha/r).

GAIN is exported as (IA)³ with its target modules as *feedforward* modules (the vector scales the layer's input: the
same maths, tests/test_methods.py); ``parametrization: exp`` stores log s, the adapter holds s = exp(log s).
LoRA-family methods (lora, lora_replay, ewc / l2 with ``base: lora``) export their LoRA part. IMSM and full
fine-tuning (and ewc / l2 on full FT) are refused in one line: they are not an adapter on one model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from gain_cli.errors import GainError, unknown_choice
from gain_cli.methods import build_method
from gain_cli.methods.full_ft import FullFT
from gain_cli.methods.gain import Gain, module_paths
from gain_cli.methods.ia3 import IA3
from gain_cli.methods.imsm import Imsm
from gain_cli.methods.lora import Lora
from gain_cli.methods.penalties import Penalized
from gain_cli.models.loading import model_spec
from gain_cli.models.smollm2 import model_dir
from gain_cli.outputs import claim_output_dir, write_output_dir
from gain_cli.rundir import RunDir
from gain_cli.schemas.run import ModelConfig
from gain_cli.training.drift import is_drift

FORMATS = ("peft",)
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors (the adapter name is left out)


def parse_stages(text: str) -> tuple[int, int]:
    """``"A..B"`` (or ``"K"``) → (A, B)."""
    first, sep, last = str(text).strip().partition("..")
    try:
        a, b = int(first), int(last if sep else first)
    except ValueError:
        raise GainError(f"--stages {text}: give a range A..B of stage numbers, e.g. --stages 1..3") from None
    if a > b:
        raise GainError(f"--stages {text}: the range is empty (A..B needs A <= B)")
    return a, b


def stage_range(stage: int | None, stages: str | None) -> tuple[int, int]:
    """(first, last) from ``--stage K`` or ``--stages A..B`` (exactly one of them)."""
    if (stage is None) == (stages is None):
        raise GainError("give --stage K (stage K's own adapter, on the model after stage K-1) or --stages 1..K "
                        "(stages 1..K as one adapter, on the pretrained model)")
    return (int(stage), int(stage)) if stages is None else parse_stages(stages)


def _model_type(model_cfg, where: str) -> str:
    """The run's architecture (``hf_config.model_type``, else the model's config.json), without loading weights."""
    model_cfg = ModelConfig.of(model_cfg)
    model_type = model_cfg.hf_config.get("model_type")
    if model_type:
        return str(model_type)
    path = model_cfg.path
    if path and (Path(str(path)).expanduser() / "config.json").is_file():
        return str(json.loads((Path(str(path)).expanduser() / "config.json").read_text())["model_type"])
    if path:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(path), revision=model_cfg.revision).model_type
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise GainError(f"cannot tell the architecture of model.path '{path}' of {where}: {first}") from exc
    raise GainError(f"the run config of {where} has neither model.hf_config.model_type nor model.path")


def base_model_id(cfg) -> tuple[str | None, str]:
    """(``base_model_name_or_path`` for the adapter's stage-1 base, a note on how to get that model)."""
    model = cfg.model
    source = model.source
    if source == "pretrained" and model.path:
        rev = f" (revision {model.revision})" if model.revision else ""
        return str(model.path), f"the pretrained model {model.path}{rev} (model.path of the run)"
    if source == "smollm2":
        path = model_dir(cfg.cache_dir)
        return str(path), f"SmolLM2-135M as gain converted it ({path})"
    return None, ("the run's base model is built by gain from its model config (model.source=config), it has no "
                  "hub id or path: base_model_name_or_path is null; build it with "
                  "gain_cli.models.loading.load_model(cfg.model, cfg.cache_dir)")


def adapter_kind(method):
    """(``"gain"``, ``"ia3"`` or ``"lora"``, the method that holds the adapter: ``method`` or, for a method with a
    penalty (ewc / l2, ``method.penalty``), the method under it); a one-line GainError for a method that is not an
    adapter on one model."""
    inner = method.inner if isinstance(method, Penalized) else method
    for kind, cls in (("gain", Gain), ("ia3", IA3), ("lora", Lora)):
        if isinstance(inner, cls):
            return kind, inner
    if isinstance(inner, Imsm):
        raise GainError(f"method '{method.name}' (IMSM) cannot be exported as a PEFT adapter: it is a gated two-model "
                        "architecture (a frozen and a tuned copy mixed per token), not an adapter on one model")
    if isinstance(inner, FullFT):
        on = f" ({method.kind} on full FT)" if inner is not method else ""
        raise GainError(f"method '{method.name}'{on} cannot be exported as a PEFT adapter: full fine-tuning changes "
                        "every weight, there is no adapter; use `gain merge` for the model of a stage")
    raise GainError(f"method '{method.name}' (kind {method.kind}) has no PEFT export (exportable: gain, ia3, lora "
                    "and the LoRA-based lora_replay, ewc / l2 with base: lora)")


def _same_keys(states: list[dict[str, torch.Tensor]], stages: list[int]) -> None:
    for k, s in zip(stages[1:], states[1:]):
        if set(s) != set(states[0]):
            raise GainError(f"stage {k}'s saved state has other modules than stage {stages[0]}'s: they cannot be "
                            "combined into one adapter (export one stage at a time with --stage)")


def _product(states: list[dict[str, torch.Tensor]], transform=lambda t: t) -> dict[str, torch.Tensor]:
    out = {}
    for key in states[0]:
        v = transform(states[0][key].float())
        for s in states[1:]:
            v = v * transform(s[key].float())
        out[key] = v
    return out


def gain_adapter(method, states: list[dict[str, torch.Tensor]]):
    """GAIN stages → one (IA)³ adapter: its modules as feedforward (input-side) modules, the gains multiplied."""
    from peft import IA3Config

    bad = [k for k in states[0] if not k.endswith(".gain")]
    if bad:
        raise GainError(f"saved {method.name} state has keys that are not gain vectors (e.g. {bad[0]})")
    exp = torch.exp if method.parametrization == "exp" else (lambda t: t)
    vectors = _product(states, exp)
    tensors = {f"{PREFIX}{k[:-len('.gain')]}.ia3_l": v.reshape(1, -1) for k, v in vectors.items()}
    paths = module_paths(method.cfg.modules, method.spec)
    config = IA3Config(target_modules=list(paths), feedforward_modules=list(paths),
                       fan_in_fan_out=method.spec.transposed_weights, task_type="CAUSAL_LM")
    return config, tensors, f"(IA)³ (GAIN as feedforward modules: {', '.join(paths)})"


def ia3_adapter(method, states: list[dict[str, torch.Tensor]]):
    """(IA)³ stages → one (IA)³ adapter with the same modules, the vectors multiplied."""
    config = method.peft_config()
    bad = [k for k in states[0] if not (k.startswith(PREFIX) and k.endswith(".ia3_l"))]
    if bad:
        raise GainError(f"saved {method.name} state has keys that are not (IA)3 vectors (e.g. {bad[0]})")
    return config, _product(states), "(IA)³"


def lora_adapter(method, states: list[dict[str, torch.Tensor]]):
    """LoRA stages → one LoRA adapter: n stages of rank r side by side: rank n·r, lora_alpha n·alpha."""
    config = method.peft_config()
    states = [{k: v for k, v in s.items() if k.startswith(PREFIX)} for s in states]
    bad = [k for k in states[0] if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))]
    if bad or not states[0]:
        raise GainError(f"saved {method.name} state is not a plain LoRA adapter (e.g. {bad[0] if bad else 'no keys'})")
    n = len(states)
    if n == 1:
        tensors = dict(states[0])
    else:
        if config.use_rslora or config.rank_pattern or config.alpha_pattern:
            raise GainError("stages of an rsLoRA / per-module-rank adapter cannot be combined; export them one at a "
                            "time with --stage")
        tensors = {k: torch.cat([s[k] for s in states], dim=0 if k.endswith(".lora_A.weight") else 1)
                   for k in states[0]}
        config.r, config.lora_alpha = n * int(config.r), n * float(config.lora_alpha)
    rank = f"r={config.r}" + (f" = {n} stages × r {config.r // n}" if n > 1 else "")
    return config, tensors, f"LoRA ({rank}, lora_alpha={config.lora_alpha:g})"


BUILDERS = {"gain": gain_adapter, "ia3": ia3_adapter, "lora": lora_adapter}


def _readme(method_name: str, what: str, stages: list[int], domains: list[str], base_id: str | None, base_note: str,
            run_dir: Path, first: int) -> str:
    span = f"stage {stages[0]}" if len(stages) == 1 else f"stages {stages[0]}..{stages[-1]}"
    if first == 1:
        base = f"the pretrained model: {base_note}"
        load = f'base = AutoModelForCausalLM.from_pretrained("{base_id}")' if base_id else "base = ...  # " + base_note
    else:
        base = (f"the model after stage {first - 1} of the run (not the pretrained model): "
                f"`gain merge {run_dir} --stage {first - 1} --out BASE`")
        load = 'base = AutoModelForCausalLM.from_pretrained("BASE")'
    return (f"# PEFT adapter exported by `gain export`\n\n"
            f"- run: `{run_dir}`\n- method: {method_name}, exported as a PEFT adapter: {what}\n"
            f"- {span} ({', '.join(domains)})\n- base model: {base}\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n"
            f"{load}\nmodel = PeftModel.from_pretrained(base, \"path/to/this/directory\")\n```\n")


def export_run(run_dir: str | Path, out: str | Path, last: int, first: int | None = None, fmt: str = "peft",
               overwrite: bool = False, say=None) -> Path:
    """Export stages ``first``..``last`` (default: ``last`` alone) of ``run_dir`` as a PEFT adapter in ``out``.

    ``out`` follows gain_cli.outputs exactly as ``gain merge`` does (new, empty or gain's own directory unless
    ``overwrite``; written beside it and moved into place when complete). ``say`` receives what was exported and
    which base model the adapter belongs on."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise unknown_choice("--format", fmt, FORMATS)
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    cfg, done, total = rd.require_finished("export")
    first = last if first is None else int(first)
    if first != last and not 1 <= first <= last <= total:
        raise GainError(f"--stages {first}..{last}: stages are numbered 1..{total} "
                        f"(finished: {', '.join(map(str, done))})")
    for k in (first, last):
        rd.check_stage(k, total, done)
    method = build_method(OmegaConf.to_container(cfg.method), model_spec(cfg.model, _model_type(cfg.model, run_dir)))
    kind, adapter_method = adapter_kind(method)
    stages = list(range(first, last + 1))
    drift = is_drift(cfg)
    if drift:  # one continuous run (train.domain_schedule=drift): the state at segment K holds segments 1..K
        if first != last and first > 1:
            raise GainError(f"--stages {first}..{last}: {run_dir} is a drift run, whose state at segment K is the "
                            "whole run up to K, on the pretrained model: export --stage K or --stages 1..K")
        first, stages = 1, list(range(1, last + 1))
    states = [rd.load_state(k) for k in (stages[-1:] if drift else stages)]
    penalty = getattr(getattr(method, "penalty", None), "prefixes", ())  # a penalty's own state is not the adapter's
    states = [{k: v for k, v in st.items() if not k.startswith(tuple(penalty))} for st in states]
    _same_keys(states, stages)
    config, tensors, what = BUILDERS[kind](adapter_method, states)
    base_id, base_note = base_model_id(cfg)
    config.base_model_name_or_path = base_id if first == 1 else None
    config.revision = cfg.model.revision if first == 1 else None
    config.inference_mode = True
    domains = [str(cfg.domains.sequence[k - 1]) for k in stages]

    out = claim_output_dir(out, "gain export", overwrite)

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / "README.md").write_text(_readme(method.name, what, stages, domains, base_id, base_note,
                                               run_dir.absolute(), first))

    base_info: dict[str, Any] = ({"pretrained": base_id, "note": base_note} if first == 1 else
                                 {"after_stage": first - 1, "note": f"gain merge RUN --stage {first - 1}"})
    write_output_dir(out, "gain export", write, "the adapter", run=str(run_dir.absolute()), format=fmt,
                     method=method.name, stages=stages, domains=domains, adapter=what, base=base_info)
    if say is not None:
        span = f"stage {first}" if first == last else f"stages {first}..{last}"
        say(f"exported {span} of {total} ({', '.join(domains)}) of {method.name} as a PEFT adapter: {what}")
        if first == 1:
            say(f"base model: {base_note}")
        else:
            say(f"base model: the model after stage {first - 1}, not the pretrained one (`gain merge {run_dir} "
                f"--stage {first - 1}`); for an adapter on the pretrained model use --stages 1..{last}")
    return out
