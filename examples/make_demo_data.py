"""Regenerate the demo data and the tiny tokenizer shipped in examples/ (deterministic).

    python examples/make_demo_data.py

Data: templated arithmetic question/answer pairs (made up here, no licence issues), as
prompt/response SFT rows and as chat `messages` rows. Tokenizer: a 512-token byte-level BPE
trained on that data, with a chat template, so tiny models train fast on a CPU.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
OPS = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        name, fn = rng.choice(OPS)
        rows.append({"prompt": f"What is {a} {name} {b}?", "response": f" {a} {name} {b} is {fn(a, b)}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def main() -> None:
    data = HERE / "data"
    data.mkdir(exist_ok=True)
    train, evals = make_rows(4000, seed=1), make_rows(200, seed=2)
    write_jsonl(data / "arith-train.jsonl", train)
    write_jsonl(data / "arith-eval.jsonl", evals)
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in make_rows(400, seed=3)]
    write_jsonl(data / "arith-chat.jsonl", chat)
    make_tokenizer([r["prompt"] + r["response"] for r in train], HERE / "tiny-tokenizer")
    print(f"wrote {data} and {HERE / 'tiny-tokenizer'}")


if __name__ == "__main__":
    main()
