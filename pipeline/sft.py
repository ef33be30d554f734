"""SFT stage: supervised fine-tuning on domain conversations, loss on the assistant's tokens only.

    python -m pipeline run sft --domain finance        # or: make domain=finance sft

Rows are chat `messages` (OpenAI format) or instruction/input/output (turned into messages by
core/rows.py), with the pack's system prompt put first when a conversation has none. Conversations are
rendered with the input model's own chat template (never replaced) and tokenized here by
core/chat.py's tokenize_conversation: SmolLM2's ChatML template has no `{% generation %}` markers, so TRL's
assistant_only_loss cannot find the assistant spans, and ours are the same spans held-out scoring uses. TRL's SFTTrainer then turns that mask into labels (-100 elsewhere),
truncates to max_length and packs if asked. LoRA by default; the adapter is merged into model/.
"""
from __future__ import annotations

from core.chat import tokenize_conversation, with_system
from core.errors import PackError
from core.rows import load_rows
from pipeline import tracking, training
from pipeline.backend import load_model, lora_config, resolve_backend


def run(ctx) -> dict:
    section, pack = ctx.pack.sft, ctx.pack
    training.check_learning_rate(section, "sft")
    backend = resolve_backend(section, "sft")
    rows = load_rows(pack, pack.sources("sft"), "chat", "sft.datasets")

    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(section.seed)
    input_dir = ctx.input_model()
    model, tokenizer = load_model(input_dir, section, backend)
    if not tokenizer.chat_template:
        raise PackError(f"the input model {input_dir} has no chat template; SFT renders conversations with it. "
                        "Set base.chat_template: chatml in the pack.")

    train_rows, eval_rows = training.split_rows(rows, section.eval_fraction, section.seed)

    def tokenized(part: list[dict]):
        encoded = [tokenize_conversation(tokenizer, with_system(r["messages"], pack.system_prompt))
                   for r in part]
        if not section.assistant_only_loss:
            encoded = [{"input_ids": e["input_ids"]} for e in encoded]
        return encoded

    train_enc = tokenized(train_rows)
    truncated = sum(len(e["input_ids"]) > section.max_length for e in train_enc)
    train_enc = [e for e in train_enc if 1 in e.get("assistant_masks", [1])[:section.max_length]]
    if not train_enc:
        raise PackError(f"sft.datasets: no conversation has an assistant answer within sft.max_length="
                        f"{section.max_length} tokens; raise sft.max_length or shorten the prompts")
    eval_enc = tokenized(eval_rows)
    ctx.log(f"{len(train_enc)} conversations for training, {len(eval_enc)} held out; "
            f"{truncated} longer than max_length={section.max_length} are truncated; backend {backend}")

    args = training.training_args(
        SFTConfig, section, ctx, max_length=section.max_length, packing=section.packing,
        packing_strategy="bfd", assistant_only_loss=False,  # our own assistant_masks carry the masking
        eval_strategy="steps" if eval_enc else "no", dataset_num_proc=None)
    trainer = SFTTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_enc),
        eval_dataset=Dataset.from_list(eval_enc) if eval_enc else None,
        peft_config=lora_config(section, backend),
        callbacks=[tracking.log_callback(ctx.out / "log.jsonl")],
    )
    metrics = {"backend": backend, "tuning": section.tuning, "train_rows": len(train_enc),
               "eval_rows": len(eval_enc), "truncated": truncated}
    metrics.update(training.fit_lm(trainer, ctx, input_dir, f"{pack.name}: SFT"))
    return metrics
