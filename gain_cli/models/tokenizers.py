"""A deterministic byte-level tokenizer for models built from configs (no training, no files).

256 byte tokens (GPT-2's byte-to-unicode alphabet) plus <|endoftext|> (bos/eos) and <|pad|>.
"""

from __future__ import annotations

from functools import lru_cache

from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@lru_cache(maxsize=1)
def _byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, PAD])
    return tok.to_str()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json()))
    tok.eos_token = EOS
    tok.bos_token = EOS
    tok.pad_token = PAD
    tok.model_max_length = 1 << 20
    return tok
