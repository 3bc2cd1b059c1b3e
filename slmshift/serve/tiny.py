"""A tiny random Llama (or Gemma-3) with an offline tokenizer, for tests and benchmarks (no hub, < 3 s to build).

The model is random, so its text is gibberish; what it is good for is exercising the real HF code
paths (chat template, left padding, batching, sampling, log-probs, adapters, saving/loading).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

PAD, BOS, EOS = "<pad>", "<|im_start|>", "<|im_end|>"

# ChatML, as SmolLM2 uses, so that prompts built for the tiny model look like real ones.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to and in is it that for on with as was at by be this from or have not are but what "
    "when where who which how why can will would should could get set call function tool user assistant "
    "system answer question json code error fix test value name type list dict string number true false "
    "null return def class import print if else elif for while try except raise yield lambda async await "
    "weather city temperature book flight hotel order price date time search query result status id"
).split()


def _corpus() -> list[str]:
    """A few hundred lines covering every printable ASCII character plus common words and JSON/code."""
    lines = [string.printable, string.ascii_letters, string.digits + string.punctuation]
    for i, w in enumerate(_WORDS):
        nxt = _WORDS[(i * 7 + 3) % len(_WORDS)]
        lines.append(f"{w} {nxt} {w.capitalize()} {i} {i * 13 % 1000}.")
        lines.append(f'{{"{w}": "{nxt}", "n": {i}, "ok": {str(i % 2 == 0).lower()}}}')
        lines.append(f"def {w}_{nxt}(x):\n    return x + {i}  # {w}?")
    return lines


def build_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained in-process: every byte is in the alphabet, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _start(path: str | Path, vocab_size: int) -> tuple[Path, Any, dict[str, int]]:
    """(the created dir, the tokenizer, ids of its pad/bos/eos tokens) for a tiny model."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    return path, tokenizer, {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS)}


def _save(model: Any, tokenizer: Any, ids: dict[str, int], path: Path) -> Path:
    """Write `model` with a generation config of the tokenizer's special ids, and the tokenizer, to `path`."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_llama(
    path: str | Path,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
) -> Path:
    """Write a random LlamaForCausalLM + tokenizer + generation config to `path`; returns the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path, tokenizer, ids = _start(path, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=4096,  # BFCL prompts run to ~2k tokens with the tiny character-level tokenizer
        # A wide init gives peaked logits, so greedy argmax is not decided by float noise
        # (otherwise batched-vs-alone comparisons would flip on near-ties).
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
    )
    torch.manual_seed(seed)
    return _save(LlamaForCausalLM(config).eval(), tokenizer, ids, path)


def build_tiny_gemma3(
    path: str | Path,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    sliding_window: int = 16,
) -> Path:
    """Write a random Gemma3ForCausalLM + tokenizer to `path`: Gemma-3's shape (sliding-window layers interleaved
    with global ones, here alternating, with a window of `sliding_window` tokens) at a size tests build in
    seconds. Like the packaged Gemma-3-270M it is a base model: its tokenizer has no chat template, so prompts
    take `platform.artifacts.plain_prompt`'s format."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    path, tokenizer, ids = _start(path, vocab_size)
    tokenizer.chat_template = None
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        head_dim=hidden_size // num_heads,
        sliding_window=sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        max_position_embeddings=4096,
        initializer_range=0.2,  # peaked logits: greedy comparisons are not decided by float noise
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
    )
    torch.manual_seed(seed)
    return _save(Gemma3ForCausalLM(config).eval(), tokenizer, ids, path)
