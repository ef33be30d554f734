"""Preference stage on prompt/chosen/rejected pairs: DPO (TRL DPOTrainer; IPO is loss_type=ipo), ORPO, CPO and
SimPO (trl.experimental), or KTO (TRL KTOTrainer) on pairs and/or single answers rated thumbs-up or down.

    python -m pipeline run pref --domain finance                   # or: make domain=finance pref
    make domain=finance pref pref.method=orpo pref.beta=0.1
    make domain=finance pref pref.method=simpo pref.simpo_gamma=0.5

Pairs are strings or message lists; they become conversations (the pack's system prompt first, the prompt
as the user turn, chosen and rejected as assistant turns) rendered with the input model's chat template.
A pair whose prompt + answer is longer than max_length is dropped and counted (log.jsonl and stage.json),
never silently truncated. DPO's and KTO's reference model is this stage's input model: with LoRA it is the
same weights with the adapter switched off, with a full fine-tune a frozen copy. ORPO, CPO and SimPO need no
reference (SimPO is TRL's CPOTrainer with loss_type=simpo and cpo_alpha=0, as TRL's docs give it).
KTO learns from unpaired rows {prompt, completion, label}: a pair gives one of each (chosen true, rejected
false), placed next to each other so that a batch holds both kinds (TRL's KTO samples batches in order).
log.jsonl records the loss and the reward margins and accuracies (chosen beats rejected) as they move.
DPO's and KTO's rewards are relative to the reference, so they start at 0; ORPO's, CPO's and SimPO's are the
model's own log-probabilities (SimPO's per token), which start wherever the input model ranks the pairs: for
those the held-out pairs are also scored before training, and the closing line gives both.
"""
from __future__ import annotations

from core.chat import as_messages, with_system
from core.errors import PackError, show_path
from core.rows import load_rows, stage_kind
from core.runlog import append_log
from pipeline import tracking, training
from pipeline.backend import load_model, lora_config, resolve_backend
from pipeline.distributed import is_main_rank

REFERENCE_FREE = ("orpo", "cpo", "simpo")  # their rewards do not start at 0


def render_len(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def prepare_pairs(rows: list[dict], tokenizer, system_prompt: str, max_length: int, where: str,
                  unpaired: bool = False):
    """(conversational pairs that fit, number dropped as too long, tokens of one pass over the kept pairs).

    With unpaired (KTO; rows of kind kto) each kept item is a list of unpaired rows {prompt, completion, label}:
    two for a pair, one for a rated answer; the split into train and held-out keeps a pair's two rows together."""
    pairs, dropped, tokens, same = [], 0, 0, []
    for n, row in enumerate(rows, 1):
        prompt = with_system(as_messages(row["prompt"], "user"), system_prompt)
        if "completion" in row:  # one rated answer (KTO)
            answers = {row["label"]: as_messages(row["completion"], "assistant")}
        else:
            answers = {True: as_messages(row["chosen"], "assistant"), False: as_messages(row["rejected"], "assistant")}
            if answers[True] == answers[False]:
                same.append(n)
                continue
        lengths = [render_len(tokenizer, prompt + a) for a in answers.values()]
        if max(lengths) > max_length:
            dropped += 1
            continue
        if unpaired:
            pairs.append([{"prompt": prompt, "completion": a, "label": label} for label, a in answers.items()])
        else:
            pairs.append({"prompt": prompt, "chosen": answers[True], "rejected": answers[False]})
        tokens += sum(lengths)
    if same:
        raise PackError(f"{where}: pair(s) {', '.join(map(str, same[:10]))} have chosen identical to rejected; "
                        "a preference pair must differ. Fix or remove them.")
    if not pairs:
        raise PackError(f"{where}: all {len(rows)} pairs are longer than pref.max_length={max_length} tokens "
                        "(prompt + answer with the chat template); raise pref.max_length or shorten them")
    return pairs, dropped, tokens


def held_out_line(metrics: dict) -> str:
    """Held-out reward accuracy and margin, 'before -> after' where the rewards did not start at 0."""
    parts = []
    for name, key in (("reward accuracy", "rewards/accuracies"), ("margin", "rewards/margins")):
        after, before = metrics.get(f"eval_{key}"), metrics.get(f"eval_{key}_before")
        if after is not None:
            parts.append(f"{name} {after:.3g}" if before is None else f"{name} {before:.3g} -> {after:.3g}")
    return ", ".join(parts)


def run(ctx) -> dict:
    section, pack = ctx.pack.pref, ctx.pack
    training.check_learning_rate(section, "pref")
    method = section.method
    if method == "kto" and section.per_device_train_batch_size < 2:  # TRL's KL estimate pairs rows within a batch
        raise PackError("pref.method=kto needs pref.per_device_train_batch_size of at least 2 (its KL term is "
                        f"estimated from the other rows of a batch; got {section.per_device_train_batch_size})")
    backend = resolve_backend(section, "pref")
    rows = load_rows(pack, pack.sources("pref"), stage_kind(pack, "pref"), "pref.datasets")

    from datasets import Dataset
    from transformers import set_seed

    set_seed(section.seed)
    input_dir = ctx.input_model()
    model, tokenizer = load_model(input_dir, section, backend)
    where = ", ".join(show_path(pack.dir / s.path) if s.path else s.label for s in pack.sources("pref"))
    pairs, dropped, tokens_all = prepare_pairs(rows, tokenizer, pack.system_prompt, section.max_length, where,
                                               unpaired=method == "kto")
    log_path = ctx.out / "log.jsonl"
    if dropped:
        ctx.log(f"dropped {dropped} of {len(rows)} pairs longer than max_length={section.max_length}")
    if training.last_checkpoint(ctx) is None and is_main_rank():  # a resumed run has this line already
        append_log(log_path, {"step": 0, "dropped_too_long": dropped, "pairs": len(pairs)})
    train_pairs, eval_pairs = training.split_rows(pairs, section.eval_fraction, section.seed)
    tokens_per_epoch = round(tokens_all * len(train_pairs) / len(pairs))
    if method == "kto":  # a pair's two rows next to each other
        train_pairs, eval_pairs = [r for unit in train_pairs for r in unit], [r for unit in eval_pairs for r in unit]
    ctx.log(f"{method}: {len(train_pairs)} {'rows' if method == 'kto' else 'pairs'} for training, "
            f"{len(eval_pairs)} held out; backend {backend}")

    common = dict(train_dataset=Dataset.from_list(train_pairs),
                  eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None,
                  processing_class=tokenizer, peft_config=lora_config(section, backend),
                  callbacks=[tracking.log_callback(log_path)])
    settings = dict(beta=section.beta, max_length=section.max_length, dataset_num_proc=None,
                    eval_strategy="steps" if eval_pairs else "no")
    # the reference model of DPO and KTO: with LoRA the adapter switched off, else a frozen copy of the input
    frozen = common["peft_config"] is None and section.tuning == "full"
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = training.training_args(DPOConfig, section, ctx, loss_type=[section.loss_type], **settings)
        ref_model = load_model(input_dir, section, "hf")[0] if frozen else None
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, **common)
    elif method == "kto":
        from trl import KTOConfig, KTOTrainer

        args = training.training_args(KTOConfig, section, ctx, desirable_weight=section.desirable_weight,
                                      undesirable_weight=section.undesirable_weight, **settings)
        ref_model = load_model(input_dir, section, "hf")[0] if frozen else None
        trainer = KTOTrainer(model=model, ref_model=ref_model, args=args, **common)
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = training.training_args(ORPOConfig, section, ctx, remove_unused_columns=False,  # its collator
                                      **settings)                                             # needs the pairs
        trainer = ORPOTrainer(model=model, args=args, **common)
    else:  # cpo, simpo
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        loss = dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=section.simpo_gamma) if method == "simpo" else {}
        args = training.training_args(CPOConfig, section, ctx, remove_unused_columns=False, **loss, **settings)
        trainer = CPOTrainer(model=model, args=args, **common)

    metrics = {"backend": backend, "tuning": section.tuning, "method": method,
               "train_rows": len(train_pairs), "eval_rows": len(eval_pairs), "dropped_too_long": dropped,
               **training.trainable_summary(trainer.model)}
    # DPO and KTO score answers through TRL's chunked LM head; on the CPU the plain one (pipeline/fastpath.py)
    restore = training.speed_up_on_cpu(trainer, ctx) if method in ("dpo", "kto") else (lambda: None)
    epoch_before = trainer.state.epoch or 0.0
    # before training the adapter is fresh (also when resuming: the checkpoint loads in train), i.e. the input model;
    # not under FSDP or DeepSpeed, whose Trainer must prepare the model for training first
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    start = trainer.evaluate() if eval_pairs and method in REFERENCE_FREE and not sharded else {}
    metrics["eval_rewards/accuracies_before"] = start.get("eval_rewards/accuracies")
    metrics["eval_rewards/margins_before"] = start.get("eval_rewards/margins")
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
    restore()
    training.save_outputs(trainer, input_dir, ctx, f"{pack.name}: {method.upper()}")
    accuracy = metrics["rewards/accuracies"]  # KTO's rows are unpaired: no accuracy
    ctx.log(f"loss {metrics['train_loss']}" + (f", reward accuracy {accuracy}" if accuracy is not None else "")
            + f", margin {metrics['rewards/margins']}, {metrics['tokens_per_s']} tokens/s")
    if held_out := held_out_line(metrics):
        ctx.log(f"held-out pairs: {held_out}")
    return {k: v for k, v in metrics.items() if v is not None}
