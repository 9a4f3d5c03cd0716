"""A tiny random-weight Llama with a tokenizer trained here: vLLM tests without a model hub.

2 layers, hidden 128, 2 heads of 64 (vLLM's CPU attention needs head_dim >= 32), a
512-token byte-level BPE vocabulary and a plain chat template. Needs torch,
transformers and tokenizers (the vLLM environment has them). ``build_model(dir)``
writes it with ``save_pretrained`` once (an existing ``dir`` is reused);
``python tests/tiny_model.py DIR`` does the same. ``build_lora(dir, seed)`` writes a
rank-8 LoRA adapter for it in PEFT's file layout (no peft needed), and
``python tests/tiny_model.py DIR --lora NAME=SEED ...`` writes adapters beside the model.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_WORDS = (
    "the a fabric queue worker gateway token stream model engine request answer job "
    "nats jet stream slot busy free latency throughput benchmark please hello world "
    "user assistant system llama tiny random weights vector matrix cache page block "
    "say count one two three four five six seven eight nine ten"
).split()


def build_model(out: Path, *, max_positions: int = 2048) -> Path:
    """Write the model and tokenizer into ``out`` (idempotent: reuses a finished build)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if out.exists():
        return out
    # Built beside, renamed at the end: a half-written directory is never taken as done.
    tmp = out.with_name(out.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 24))) for _ in range(4000)]
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    # What vLLM's hermes tool-call parser looks for in the vocabulary (else it refuses).
    specials += ["<tool_call>", "</tool_call>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(tmp)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(tmp)
    tmp.rename(out)
    return out


def build_lora(out: Path, base: Path, *, seed: int, rank: int = 8) -> Path:
    """A LoRA adapter on the attention projections, large enough to change the answers."""
    import torch
    from safetensors.torch import save_file

    if out.exists():
        return out
    config = json.loads((base / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for i in range(layers):
        for proj in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            weights[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen)
            weights[f"{key}.lora_B.weight"] = torch.randn(hidden, rank, generator=gen)
    tmp = out.with_name(out.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(tmp / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    tmp.rename(out)
    return out


if __name__ == "__main__":
    model = build_model(Path(sys.argv[1]))
    print(model)
    if "--lora" in sys.argv:
        for spec in sys.argv[sys.argv.index("--lora") + 1 :]:
            name, _, seed = spec.partition("=")
            print(build_lora(model.parent / name, model, seed=int(seed)))
