"""Whole-sequence forwards (training, perplexity, lm-eval scoring) run without Hugging Face's key/value cache."""

from __future__ import annotations

import torch

from gain_cli.models.kv_cache import no_kv_cache


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_no_cache_inside_same_logits_and_config_restored():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    ids = torch.randint(0, 64, (2, 9))
    assert model.config.use_cache is True
    with torch.no_grad():
        cached = model(input_ids=ids)
        assert cached.past_key_values is not None          # what every forward builds by default
        with no_kv_cache(model):
            assert model.get_base_model().config.use_cache is False
            plain = model(input_ids=ids)
    assert plain.past_key_values is None
    torch.testing.assert_close(plain.logits, cached.logits, rtol=0, atol=0)
    assert model.config.use_cache is True


def test_train_stage_builds_no_cache_and_restores_the_config():
    from types import SimpleNamespace

    from accelerate import Accelerator

    from gain_cli.training.loop import train_stage

    model = _llama()
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(out.past_key_values))
    method = SimpleNamespace(name="all", optimizer_groups=lambda m: [{"params": list(m.parameters()), "lr": 1e-3,
                                                                      "weight_decay": 0.0}],
                             regularization=lambda m: None)
    blocks = torch.randint(0, 64, (4, 16))
    train_stage(model, method, blocks, {"steps": 2, "batch_size": 2}, seed=0, stage=1, accelerator=Accelerator())
    assert seen == [None, None]
    assert model.config.use_cache is True
