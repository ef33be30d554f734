"""Preference stage: DPO (TRL DPOTrainer) or ORPO (trl.experimental.orpo) on prompt/chosen/rejected pairs.

    python -m pipeline run pref --domain finance                   # or: make domain=finance pref
    make domain=finance pref pref.method=orpo pref.beta=0.1

Pairs are strings or message lists; they become conversations (the pack's system prompt first, the prompt
as the user turn, chosen and rejected as assistant turns) rendered with the input model's chat template.
A pair whose prompt + answer is longer than max_length is dropped and counted (log.jsonl and stage.json),
never silently truncated. DPO's reference model is this stage's input model: with LoRA it is the same
weights with the adapter switched off, with a full fine-tune a frozen copy. ORPO needs no reference.
log.jsonl records the loss and the reward margins and accuracies (chosen beats rejected) as they move.
"""
from __future__ import annotations

from core.chat import as_messages, with_system
from core.errors import PackError, show_path
from core.rows import load_rows
from core.runlog import append_log
from pipeline import training
from pipeline.backend import load_model, lora_config, resolve_backend
from pipeline.distributed import is_main_rank


def render_len(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def prepare_pairs(rows: list[dict], tokenizer, system_prompt: str, max_length: int, where: str):
    """(conversational pairs that fit, number dropped as too long, tokens of one pass over the kept pairs)."""
    pairs, dropped, tokens, same = [], 0, 0, []
    for n, row in enumerate(rows, 1):
        pair = {"prompt": with_system(as_messages(row["prompt"], "user"), system_prompt),
                "chosen": as_messages(row["chosen"], "assistant"),
                "rejected": as_messages(row["rejected"], "assistant")}
        if pair["chosen"] == pair["rejected"]:
            same.append(n)
            continue
        lengths = [render_len(tokenizer, pair["prompt"] + pair[k]) for k in ("chosen", "rejected")]
        if max(lengths) > max_length:
            dropped += 1
            continue
        pairs.append(pair)
        tokens += sum(lengths)
    if same:
        raise PackError(f"{where}: pair(s) {', '.join(map(str, same[:10]))} have chosen identical to rejected; "
                        "a preference pair must differ. Fix or remove them.")
    if not pairs:
        raise PackError(f"{where}: all {len(rows)} pairs are longer than pref.max_length={max_length} tokens "
                        "(prompt + answer with the chat template); raise pref.max_length or shorten them")
    return pairs, dropped, tokens


def run(ctx) -> dict:
    section, pack = ctx.pack.pref, ctx.pack
    training.check_learning_rate(section, "pref")
    backend = resolve_backend(section, "pref")
    rows = load_rows(pack, pack.sources("pref"), "pref", "pref.datasets")

    from datasets import Dataset
    from transformers import set_seed

    set_seed(section.seed)
    input_dir = ctx.input_model()
    model, tokenizer = load_model(input_dir, section, backend)
    where = ", ".join(show_path(pack.dir / s.path) if s.path else s.label for s in pack.sources("pref"))
    pairs, dropped, tokens_all = prepare_pairs(rows, tokenizer, pack.system_prompt, section.max_length, where)
    log_path = ctx.out / "log.jsonl"
    if dropped:
        ctx.log(f"dropped {dropped} of {len(rows)} pairs longer than max_length={section.max_length}")
    if training.last_checkpoint(ctx) is None and is_main_rank():  # a resumed run has this line already
        append_log(log_path, {"step": 0, "dropped_too_long": dropped, "pairs": len(pairs)})
    train_pairs, eval_pairs = training.split_rows(pairs, section.eval_fraction, section.seed)
    tokens_per_epoch = round(tokens_all * len(train_pairs) / len(pairs))
    ctx.log(f"{section.method}: {len(train_pairs)} pairs for training, {len(eval_pairs)} held out; backend {backend}")

    common = dict(train_dataset=Dataset.from_list(train_pairs),
                  eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None,
                  processing_class=tokenizer, peft_config=lora_config(section, backend),
                  callbacks=[training.log_callback(log_path)])
    eval_strategy = "steps" if eval_pairs else "no"
    if section.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = training.training_args(DPOConfig, section, ctx, beta=section.beta, loss_type=[section.loss_type],
                                      max_length=section.max_length, eval_strategy=eval_strategy,
                                      dataset_num_proc=None)
        ref_model = None
        if common["peft_config"] is None and section.tuning == "full":
            ref_model = load_model(input_dir, section, "hf")[0]  # frozen input model
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, **common)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = training.training_args(ORPOConfig, section, ctx, beta=section.beta, max_length=section.max_length,
                                      eval_strategy=eval_strategy, dataset_num_proc=None,
                                      remove_unused_columns=False)  # its collator needs the pair columns
        trainer = ORPOTrainer(model=model, args=args, **common)

    metrics = {"backend": backend, "tuning": section.tuning, "method": section.method,
               "train_rows": len(train_pairs), "eval_rows": len(eval_pairs), "dropped_too_long": dropped,
               **training.trainable_summary(trainer.model)}
    epoch_before = trainer.state.epoch or 0.0
    trained = training.train(trainer, ctx)
    metrics.update(training.throughput(tokens_per_epoch, trained, epoch_before))
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        metrics["train_loss" if key == "loss" else key] = training.final_train_value(ctx, key)
    if eval_pairs:
        held = trainer.evaluate()  # logged to log.jsonl by the callback
        metrics["eval_loss"] = held.get("eval_loss")
        metrics["eval_rewards/accuracies"] = held.get("eval_rewards/accuracies")
        metrics["eval_rewards/margins"] = held.get("eval_rewards/margins")
    metrics.update(steps=trained["steps"], resumed_from_step=trained["resumed_from_step"],
                   train_loss_mean=trained["train_loss_mean"], train_runtime_s=round(trained["train_runtime"], 2))
    training.save_outputs(trainer, input_dir, ctx, f"{pack.name}: {section.method.upper()}")
    ctx.log(f"loss {metrics['train_loss']}, reward accuracy {metrics['rewards/accuracies']}, "
            f"margin {metrics['rewards/margins']}, {metrics['tokens_per_s']} tokens/s")
    return {k: v for k, v in metrics.items() if v is not None}
