"""Parameter counts from the model config alone (meta-device skeleton; no weights, no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import one_thread

from gain_cli.architectures import arch_for
from gain_cli.errors import GainError
from gain_cli.methods import build_method
from gain_cli.methods.params import FALLBACK_VOCAB, build_meta_model, count_method_params
from gain_cli.models.tokenizers import byte_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def model_cfg(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{name}.yaml"))


def method_cfg(name: str, **extra) -> dict:
    """The shipped method config ``name`` as composed (its YAML over its kind's defaults), with ``extra``."""
    from gain_cli.config import compose_config

    return {**OmegaConf.to_container(compose_config([f"method={name}"], None).method), **extra}


def test_gpt2_large_counts_from_the_skeleton():
    attn = count_method_params(model_cfg("gpt2-large"), method_cfg("gain_attn"))
    ffn = count_method_params(model_cfg("gpt2-large"), method_cfg("gain_ffn"))
    assert attn["trainable"] == attn["method"] == 46_080 == 36 * 1280
    assert ffn["trainable"] == ffn["method"] == 230_400 == 36 * (1280 + 5120)
    assert attn["model"] == ffn["model"] == 774_030_080  # GPT-2 Large, tied embeddings counted once
    assert attn["total"] == 774_030_080 + 46_080 and ffn["total"] == 774_030_080 + 230_400
    assert attn["formula"] == "36 layers × 1,280 (attn) = 46,080"
    assert ffn["formula"] == "36 layers × (1,280 (attn) + 5,120 (ffn)) = 230,400"
    assert "note" not in attn


def test_meta_skeleton_has_no_storage():
    model = build_meta_model(model_cfg("gpt2-large"))
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.config.n_layer == 36 and model.config.vocab_size == 50257


# published totals of the real checkpoints: the hf_config blocks carry the real architecture
PUBLISHED = {
    "gpt2-large": (774_030_080, "float32"),
    "qwen2.5-7b": (7_615_616_512, "bfloat16"),
    "mistral-7b": (7_241_732_096, "bfloat16"),
    "llama-3.1-70b": (70_553_706_496, "bfloat16"),
    "llama-2-13b": (13_015_864_320, "bfloat16"),
    "pythia-1b": (1_011_781_632, "bfloat16"),
    "phi-3-mini": (3_821_079_552, "bfloat16"),
    "gemma-2b": (2_506_172_416, "bfloat16"),
}
# GAIN-attn: layers × (heads·head_dim); GAIN-FFN adds layers × intermediate size
GAIN = {
    "gpt2-large": (36, 1280, 5120), "qwen2.5-7b": (28, 3584, 18944), "mistral-7b": (32, 4096, 14336),
    "llama-3.1-70b": (80, 8192, 28672), "llama-2-13b": (40, 5120, 13824), "pythia-1b": (16, 2048, 8192), "phi-3-mini": (32, 3072, 8192),
    "gemma-2b": (18, 8 * 256, 16384),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_real_model_configs_build_offline_with_published_sizes(name):
    cfg = model_cfg(name)
    assert cfg["source"] == "pretrained" and cfg["tokenizer"] is None and "/" in cfg["path"]
    total, dtype = PUBLISHED[name]
    assert cfg["dtype"] == dtype
    n_layers, attn_in, ffn_in = GAIN[name]
    res = count_method_params(cfg, method_cfg("gain_ffn"))
    assert res["model"] == total
    assert res["trainable"] == n_layers * (attn_in + ffn_in)
    assert count_method_params(cfg, method_cfg("gain_attn"))["trainable"] == n_layers * attn_in


def test_real_model_configs_keep_the_tiny_config_keys():
    keys = set(model_cfg("tiny-llama"))
    for name in PUBLISHED:
        assert set(model_cfg(name)) == keys, name


def test_tiny_counts_match_hand_formulas():
    tiny = model_cfg("tiny-llama")  # hidden 64, FFN 176, 2 layers, 4 heads / 2 kv heads (head_dim 16), no vocab_size
    assert "vocab_size" not in tiny["hf_config"]
    d, f, kv, L = 64, 176, 32, 2
    lora = L * 8 * ((d + d) + (d + kv) + (d + kv) + (d + d))  # r=8 on q, k, v, o
    ia3 = L * (kv + kv + f)  # PEFT llama default: k, v outputs; down_proj input
    expected = {
        "gain_attn": L * d,
        "gain_ffn": L * (d + f),
        "lora": lora,
        "ia3": ia3,
        "imsm": lora + 5 * d * 8,  # adapter + gate 5·d·r
    }
    vocab = len(byte_tokenizer())  # tokenizer: bytes -> the built-in byte tokenizer's size (258)
    assert vocab == 258
    embed = vocab * d  # tied with the LM head
    layer = (d * d + d * kv + d * kv + d * d) + 3 * d * f + 2 * d
    n_model = embed + L * layer + d
    for name, n in expected.items():
        res = count_method_params(tiny, method_cfg(name))
        assert res["trainable"] == res["method"] == n, name
        assert res["model"] == n_model
        assert res["note"].startswith("hf_config has no vocab_size; used 258")
    ft = count_method_params(tiny, method_cfg("full_ft"))
    assert ft["trainable"] == ft["model"] == ft["total"] == n_model
    im = count_method_params(tiny, method_cfg("imsm"))
    assert im["total"] == 2 * n_model + expected["imsm"]  # frozen copy + tuned branch + adapter + gate


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-qwen2", "tiny-llama"])
@pytest.mark.parametrize("method", ["gain_attn", "gain_ffn", "lora", "ia3", "imsm"])
def test_meta_count_equals_count_on_real_weights(name, method):
    from gain_cli.models.loading import hf_config_from
    from transformers import AutoModelForCausalLM

    cfg = model_cfg(name)
    res = count_method_params(cfg, method_cfg(method))
    real = AutoModelForCausalLM.from_config(hf_config_from(cfg, vocab_size=len(byte_tokenizer())))
    m = build_method(method_cfg(method), arch_for(real.config.model_type))
    real = m.attach(real)
    assert m.count_trainable(real) == res["trainable"]
    assert sum(p.numel() for p in real.parameters()) == res["total"]


def test_vocab_fallback_without_byte_tokenizer_is_said():
    cfg = {"name": "x", "tokenizer": None, "hf_config": {"model_type": "llama", "hidden_size": 16,
                                                         "intermediate_size": 16, "num_hidden_layers": 1,
                                                         "num_attention_heads": 2}}
    res = count_method_params(cfg, method_cfg("full_ft"))
    assert FALLBACK_VOCAB == 260 and "assumed 260" in res["note"]
    assert build_meta_model(cfg).config.vocab_size == 260


def test_missing_model_type_is_a_clear_error():
    with pytest.raises(GainError, match="hf_config.model_type"):
        build_meta_model({"name": "x", "hf_config": {"hidden_size": 8}})
    with pytest.raises(GainError):
        count_method_params({"name": "x", "hf_config": {"model_type": "no_such_type"}}, method_cfg("gain_ffn"))
    assert isinstance(build_meta_model({"name": "x", "hf_config": {"model_type": "llama", "hidden_size": 16,
                                        "intermediate_size": 16, "num_hidden_layers": 1,
                                        "num_attention_heads": 2}}).model.embed_tokens.weight, torch.Tensor)


def test_the_13b_recipe_trains_the_papers_counts():
    """Llama-2-13B, the paper's fifth model: GAIN-attn 40 × 5120, GAIN-FFN + 40 × 13824 (from the recipe)."""
    from omegaconf import OmegaConf

    from gain_cli.config import compose_config

    for method, expected in (("gain_attn", 40 * 5120), ("gain_ffn", 40 * 5120 + 40 * 13824)):
        cfg = compose_config([f"method={method}"], "llama-2-13b_8domains")
        res = count_method_params(OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.method))
        assert res["trainable"] == expected == {"gain_attn": 204_800, "gain_ffn": 757_760}[method]
