"""Tiny models built in-process, for tests and CPU benchmarks (no downloads); not part of the package.

- the family registry: tiny random models of every supported family (knowledge as data; each
  entry is the model_type and the config fields that exercise the family's quirks: biases, q/k
  norms, head_dim != hidden/heads, soft-capping, fused and grouped qkv, partial rotary, MoE FFN);
- `make_tokenizer` / `make_tiny_llama`: a byte-level BPE tokenizer trained on given texts and a
  random Llama saved with it.

Benchmarks import it with `sys.path.insert(0, "tests")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

import torch

COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=128, initializer_range=0.25, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip

FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=8),
    "mixtral": dict(model_type="mixtral", num_local_experts=2, num_experts_per_tok=1),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=8),
    "gemma": dict(model_type="gemma", head_dim=16),
    "gemma2": dict(
        model_type="gemma2",
        head_dim=16,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0,
        sliding_window=8,
    ),  # fmt: skip
    "phi3": dict(model_type="phi3", partial_rotary_factor=0.5),
    "olmo2": dict(model_type="olmo2"),
    "falcon": dict(
        model_type="falcon", num_kv_heads=4, new_decoder_architecture=True, bias=True, alibi=False, parallel_attn=True
    ),  # fmt: skip
    "starcoder2": dict(model_type="starcoder2", use_bias=True),
    "stablelm": dict(model_type="stablelm", use_qkv_bias=True, partial_rotary_factor=0.25),
    "granite": dict(model_type="granite", attention_multiplier=0.3),
}


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    fields = {**COMMON, **FAMILIES[family], **overrides}
    if family == "falcon":
        fields.pop("num_key_value_heads", None)
        fields.pop("intermediate_size", None)
        if "num_key_value_heads" in overrides:
            fields["num_kv_heads"] = overrides["num_key_value_heads"]
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random model of the family in eval mode."""
    torch.manual_seed(seed)
    return model_from_config(tiny_config(family, **overrides)).to(dtype)


def model_from_config(config):
    """A random model in eval mode: eager attention (softcapping honoured), eager MoE experts (float64-safe)."""
    from transformers import AutoModelForCausalLM

    extra = {"experts_implementation": "eager"} if getattr(config, "model_type", "") == "mixtral" else {}
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", **extra).eval()


def save_tiny(family: str, folder: Union[str, Path], seed: int = 0, **overrides) -> Path:
    """Save a tiny model as a safetensors checkpoint folder (float32)."""
    model = tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(folder)
    return Path(folder)


def make_tokenizer(texts: Iterable[str], vocab_size: int = 320):
    """A byte-level BPE fast tokenizer trained on `texts`; BOS `<s>` prepended, EOS `</s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_tiny_llama(
    folder: Union[str, Path],
    texts: Iterable[str],
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_pos: int = 512,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised float32 LlamaForCausalLM + tokenizer to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(texts)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
