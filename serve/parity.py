"""Chat-template parity: what vLLM will feed the served model must be what the SFT stage trained it on.

    python -m serve.parity --domain finance          # the check `serve` runs before starting vLLM

Sample conversations (one and several turns, and a few rows of the pack's SFT data, each with the pack's
system prompt put first as the SFT stage and the arena do) are rendered twice: by the SFT formatter
(core/chat.py's tokenize_conversation, as the SFT stage renders, with the tokenizer of the model the SFT stage trained from) and
the way vLLM's chat endpoint does it (the served folder's chat template, then tokenised without adding
special tokens). The token ids must agree for the whole conversation, and the prompt vLLM sends before the
answer must be exactly the prefix training put before it. Then the token that ends an assistant turn in
the served template must be one of the generation config's EOS ids, or generation runs past the answer.
Any difference raises PackError naming the conversation, the first differing token and the fix.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from core import cli
from core.chat import tokenize_conversation, with_system
from core.errors import PackError, show_path
from core.layout import model_dir, run_dir
from core.pack import load_pack
from core.rows import load_rows

SENTINEL = "PARITY_SENTINEL_7f3"


def sample_conversations(system_prompt: str, extra: list[list[dict]] = ()) -> list[list[dict]]:
    """Built-in samples plus `extra`, each with the system prompt first unless it brings its own."""
    convs = [
        [{"role": "user", "content": "What is compound interest?"},
         {"role": "assistant", "content": "Interest earned on interest: 100 at 5% for 2 years is 110.25."}],
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Say hello."},
         {"role": "assistant", "content": "Hello!"}],
        [{"role": "user", "content": "Define a bond."},
         {"role": "assistant", "content": "A loan to an issuer that pays interest."},
         {"role": "user", "content": "And its yield?"},
         {"role": "assistant", "content": "The return implied by its price,\nper year."}],
    ]
    return [with_system(c, system_prompt) for c in convs + [list(c) for c in extra]]


def served_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """As vLLM's /v1/chat/completions: render the template to text, tokenise with add_special_tokens=False."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def training_ids(train_tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation exactly as the SFT stage builds its training examples."""
    return list(tokenize_conversation(train_tokenizer, messages)["input_ids"])


def end_of_turn_id(tokenizer) -> int:
    """The first token the served template emits after an assistant message's content."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}], tokenize=False)
    if SENTINEL not in text:
        raise PackError("the served chat template drops the assistant's message; it cannot be used to chat")
    after = text.split(SENTINEL, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PackError("the served chat template ends an assistant turn with nothing; the model could not stop")
    return ids[0]


def generation_eos_ids(model_dir: Path, tokenizer) -> list[int]:
    path = model_dir / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    if eos is None:
        eos = tokenizer.eos_token_id  # what vLLM falls back to without a generation config
    return [eos] if isinstance(eos, int) else list(eos or [])


def _first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _snippet(tokenizer, ids: list[int], at: int) -> str:
    return repr(tokenizer.decode(ids[max(0, at - 6): at + 6]))


def check(served_dir: Path, train_tokenizer_dir: Path, conversations: list[list[dict]],
          domain: str = "<domain>") -> dict:
    """Raise PackError listing every mismatch; return a summary when the served folder is in parity."""
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(served_dir)
    train = AutoTokenizer.from_pretrained(train_tokenizer_dir)
    if not served.chat_template:
        raise PackError(f"{show_path(served_dir)} has no chat template; vLLM could not serve chat completions")
    problems = []
    for n, conv in enumerate(conversations, 1):
        want = training_ids(train, conv)
        got = served_ids(served, conv, add_generation_prompt=False)
        if want != got:
            i = _first_difference(want, got)
            problems.append(f"conversation {n}: token {i} differs: training has {_snippet(train, want, i)}, "
                            f"the served template gives {_snippet(served, got, i)}")
            continue
        last_user = max(i for i, m in enumerate(conv) if m["role"] != "assistant")
        prompt = served_ids(served, conv[: last_user + 1], add_generation_prompt=True)
        if want[: len(prompt)] != prompt:
            i = _first_difference(want, prompt)
            problems.append(f"conversation {n}: the prompt vLLM sends (generation prompt included) is not what "
                            f"training put before the answer: at token {i} training has "
                            f"{_snippet(train, want, i)}, the server sends {_snippet(served, prompt, i)}")
    eot = end_of_turn_id(served)
    eos = generation_eos_ids(served_dir, served)
    if eot not in eos:
        problems.append(f"the served template ends an assistant turn with {served.convert_ids_to_tokens(eot)!r} "
                        f"(id {eot}) but generation_config.json's eos_token_id is {eos}: generation would run "
                        "past the end of the answer")
    if problems:
        raise PackError(problems + [f"fix: the served folder {show_path(served_dir)} must carry the chat template "
                                    "and generation config training used; rebuild it with "
                                    f"`make domain={domain} merge FORCE=1`"],
                        f"chat-template parity check failed for {show_path(served_dir)}")
    return {"conversations": len(conversations), "end_of_turn": served.convert_ids_to_tokens(eot), "eos_ids": eos}


def check_run(pack, run: Path, served_dir: Path) -> dict:
    """The check for a domain: samples from the pack, the training tokenizer from the run."""
    extra = []
    try:
        rows = load_rows(pack, pack.sources("sft"), "chat", "sft")
        extra = [r["messages"] for r in rows[:3] if r.get("messages") and r["messages"][-1]["role"] == "assistant"]
    except Exception:  # the data is the training stages' to validate; the built-in samples still run
        extra = []
    # The SFT stage trains with its input model's tokenizer (cpt's output, or base's when cpt never ran).
    try:
        train_dir = model_dir(run, "cpt")
    except PackError:
        train_dir = model_dir(run, "base")
    return check(served_dir, train_dir, sample_conversations(pack.system_prompt, extra), pack.name)


def main(argv: list[str] | None = None) -> int:
    args = cli.domain_parser("python -m serve.parity", __doc__.split("\n")[0]).parse_args(argv)

    def check_domain() -> None:
        pack = load_pack(args.domain, args.overrides)
        run = run_dir(pack.name)
        print(f"parity ok: {check_run(pack, run, model_dir(run, 'merge'))}")

    return cli.run(check_domain)


if __name__ == "__main__":
    sys.exit(main())
