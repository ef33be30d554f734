"""What the three training stages (cpt, sft, pref) share once the model is loaded: the TRL config, the
train/held-out split, checkpoint resume, log.jsonl, held-out loss before and after, merging the adapter and
writing the stage's outputs.

Each stage module (pipeline/cpt.py, sft.py, pref.py) reads top to bottom and calls these in order
(the backend and the model come from pipeline/backend.py):

    backend = resolve_backend(section, stage)     # before trl is imported (Unsloth patches it)
    model, tokenizer = load_model(input_dir, section, backend)
    trainer = <TRL trainer>(..., args=training_args(Config, section, ctx), peft_config=lora_config(...))
    result = train(trainer, ctx)                  # resumes from ctx.out/checkpoints when a run was killed
    save_outputs(trainer, input_dir, ctx)         # model/ (merged), adapter/, loss.png; checkpoints deleted

Outputs of every training stage: ctx.out/model (full weights, adapter merged, tokenizer and chat template of
the input model, its generation_config.json), ctx.out/adapter (absent for a full fine-tune), log.jsonl,
loss.png, and with `tracking: tensorboard` (the default) ctx.out/tensorboard (event files).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

from core.errors import PackError
from core.runlog import append_log, plot_logs, read_log
from core.schema import TrainStage
from pipeline.backend import cuda_available
from pipeline.distributed import is_main_rank
from pipeline.tracking import point_tensorboard, tracking

# ddp_find_unused_parameters: every trainable weight (LoRA or full) takes part in each forward; searching the
# graph for unused ones (the Trainer's default for a PEFT model) is an extra traversal per step
ARGS_COMMON = dict(save_strategy="steps", save_total_limit=2, dataloader_num_workers=0,
                   disable_tqdm=False, dataloader_pin_memory=False, ddp_find_unused_parameters=False)


def training_args(config_cls, section: TrainStage, ctx, **extra):
    """A TRL config (SFTConfig, DPOConfig, KTOConfig, ...) from the pack section's TrainingArguments fields."""
    import torch

    report_to = tracking(ctx.pack, ctx.run_dir)

    on_cuda = torch.cuda.is_available()
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    return config_cls(
        output_dir=str(ctx.out / "checkpoints"),
        learning_rate=section.learning_rate,
        num_train_epochs=section.num_train_epochs,
        max_steps=section.max_steps,
        per_device_train_batch_size=section.per_device_train_batch_size,
        per_device_eval_batch_size=section.per_device_train_batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        warmup_steps=section.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        lr_scheduler_type=section.lr_scheduler_type,
        weight_decay=section.weight_decay,
        seed=section.seed,
        data_seed=section.seed,
        logging_steps=section.logging_steps,
        logging_first_step=True,
        save_steps=section.save_steps,
        eval_steps=section.save_steps,
        # recomputing activations saves GPU memory; on the CPU memory is plentiful and it costs ~25% of a step
        gradient_checkpointing=on_cuda if section.gradient_checkpointing is None else section.gradient_checkpointing,
        bf16=bf16, fp16=on_cuda and not bf16,
        report_to=report_to,
        **ARGS_COMMON,
        **extra,
    )


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) with a fixed shuffle; at least one held-out row when fraction > 0."""
    if fraction <= 0 or len(rows) < 2:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    held = sorted(order[:n_eval])
    keep = sorted(order[n_eval:])
    return [rows[i] for i in keep], [rows[i] for i in held]


def check_learning_rate(section: TrainStage, stage: str) -> None:
    # pack.py already rejects <= 0; an override may still sneak in a NaN
    if not section.learning_rate > 0 or math.isinf(section.learning_rate):
        raise PackError(f"{stage}.learning_rate must be a positive number (got {section.learning_rate})")


# ----------------------------------------------------------------------------------------- training


def last_checkpoint(ctx, delete_cut_short: bool = False) -> str | None:
    """The newest complete checkpoint in ctx.out/checkpoints.

    The Trainer writes trainer_state.json last (after weights, optimizer, scheduler and RNG state), so a
    checkpoint whose trainer_state.json parses is whole; one killed mid-write has none, or a truncated one,
    and resuming from it fails ("Can't find a valid checkpoint"). The runner deletes such leftovers
    (delete_cut_short) before the stage starts; a training process only skips them, since under a
    multi-process launch another rank may be writing that very checkpoint at that moment."""
    folder = ctx.out / "checkpoints"
    if not folder.is_dir():
        return None
    found = sorted((int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[-1].isdigit())
    for step, path in reversed(found):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return str(path)
        except (OSError, ValueError):
            if delete_cut_short:
                ctx.log(f"{path.name} was cut short by the interruption: deleting it")
                shutil.rmtree(path)
    return None


def train(trainer, ctx) -> dict:
    """trainer.train(), resuming from the newest checkpoint a killed run left in ctx.out/checkpoints."""
    resume = last_checkpoint(ctx)
    log_path = ctx.out / "log.jsonl"
    resumed_step = 0
    if resume:
        resumed_step = int(Path(resume).name.split("-")[-1])
        ctx.log(f"resuming from {Path(resume).name} (a previous run of this stage was interrupted)")
    if resume and is_main_rank():
        # the killed run logged past its last checkpoint; those steps run again, so drop their lines
        kept = [r for r in read_log(log_path) if r.get("step", 0) <= resumed_step and "train_runtime" not in r]
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    point_tensorboard(trainer, ctx)
    epoch_start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    state = trainer.state
    return {"steps": state.global_step, "epoch": state.epoch, "train_runtime": result.metrics["train_runtime"],
            "wall": time.time() - epoch_start, "resumed_from_step": resumed_step,
            "train_loss_mean": result.metrics.get("train_loss")}


def final_train_value(ctx, key: str):
    """The last logged training value of a metric (e.g. loss, rewards/margins)."""
    rows = [r for r in read_log(ctx.out / "log.jsonl") if key in r]
    return rows[-1][key] if rows else None


def throughput(tokens_per_epoch: int, trained: dict, epoch_before: float) -> dict:
    """Tokens processed (this run and any resumed part) and tokens/s of this run's training."""
    epochs = trained["epoch"] or 0.0
    tokens = int(round(tokens_per_epoch * epochs))
    this_run = tokens_per_epoch * max(epochs - epoch_before, 0.0)
    return {"tokens": tokens, "tokens_per_s": round(this_run / max(trained["train_runtime"], 1e-9), 1)}


def held_out_loss(model, trainer) -> float | None:
    """Token-weighted mean loss of `model` on the trainer's held-out set (same batches for every model)."""
    import torch
    from torch.utils.data import DataLoader

    if trainer.eval_dataset is None:
        return None
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    # the whole held-out set on every rank: get_eval_dataloader would give each rank its shard, and with FSDP
    # every rank must run the same forward passes
    batches = DataLoader(trainer._remove_unused_columns(trainer.eval_dataset, description="evaluation"),
                         batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator)
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            batch.pop("seq_lengths", None)
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            # use_cache=False: with a cache transformers skips the packed-sequence mask, and packed
            # documents would attend to each other (a fresh from_pretrained model has use_cache on)
            loss = model(**batch, use_cache=False).loss
            total += float(loss) * n
            count += n
    model.train()
    return total / count if count else None


def base_model_loss(ctx, input_dir: Path, trainer) -> float | None:
    """Held-out loss of the original base model (equal to eval_loss_before when the stage starts from it)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        base = ctx.model_dir("base")
    except PackError:
        return None
    if not is_main_rank():  # a plain model, no collective: rank 0 alone scores it
        return None
    device = next(trainer.model.parameters()).device
    # on a GPU in the dtype training computes in: a 7B base in float32 (30 GB) beside a QLoRA model would not fit
    dtype = torch.float32
    if cuda_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    loss = held_out_loss(model, trainer)
    del model
    if cuda_available():
        torch.cuda.empty_cache()
    return loss


def fit_lm(trainer, ctx, input_dir: Path, title: str) -> dict:
    """cpt and sft: held-out loss of the base and input models, train (resuming), held-out loss after,
    throughput, then save the outputs. Returns the metrics."""
    log_path = ctx.out / "log.jsonl"
    metrics = trainable_summary(trainer.model)
    restore = speed_up_on_cpu(trainer, ctx)
    has_eval = trainer.eval_dataset is not None
    if has_eval:
        metrics["eval_loss_base"] = base_model_loss(ctx, input_dir, trainer)
        if last_checkpoint(ctx) is None:  # before any step the LoRA model equals the input model
            metrics["eval_loss_before"] = held_out_loss(trainer.model, trainer)
            if is_main_rank():
                append_log(log_path, {"step": 0, "heldout_loss": metrics["eval_loss_before"]})
        else:  # resuming: the interrupted run measured it
            metrics["eval_loss_before"] = next((r["heldout_loss"] for r in read_log(log_path)
                                                if r.get("step") == 0 and "heldout_loss" in r), None)
    tokens_per_epoch = sum(len(ids) for ids in trainer.train_dataset["input_ids"])  # after truncation/packing
    epoch_before = trainer.state.epoch or 0.0
    uncompile = compile_for_training(trainer, ctx)
    trained = train(trainer, ctx)
    uncompile()  # held-out loss and saving run the plain layers
    metrics.update(throughput(tokens_per_epoch, trained, epoch_before))
    if has_eval:
        metrics["eval_loss"] = held_out_loss(trainer.model, trainer)
        if is_main_rank():
            append_log(log_path, {"step": trained["steps"], "heldout_loss": metrics["eval_loss"]})
    metrics.update(steps=trained["steps"], resumed_from_step=trained["resumed_from_step"],
                   train_loss=final_train_value(ctx, "loss"), train_loss_mean=trained["train_loss_mean"],
                   train_runtime_s=round(trained["train_runtime"], 2))
    restore()
    save_outputs(trainer, input_dir, ctx, title)
    ctx.log(f"train loss {metrics['train_loss']}, held-out loss {metrics.get('eval_loss_before')} -> "
            f"{metrics.get('eval_loss')}, {metrics['tokens_per_s']} tokens/s")
    return {k: v for k, v in metrics.items() if v is not None}


def compile_for_training(trainer, ctx):
    """`<stage>.compile: true` on the CPU: compiled decoder layers for the training steps; returns the undo."""
    if cuda_available() or not getattr(getattr(ctx.pack, ctx.stage, None), "compile", False):
        return lambda: None
    from pipeline import fastpath

    ctx.log("compiling the decoder layers (torch.compile; the first step takes 7-35 s longer)")
    return fastpath.compile_decoder_layers(fastpath.inner_model(trainer))


def speed_up_on_cpu(trainer, ctx):
    """pipeline/fastpath.py's per-conversation attention and plain LM head when training on the CPU.
    Returns what puts the model's attention implementation back before it is saved."""
    if cuda_available():
        return lambda: None
    from pipeline import fastpath

    restore, plain_head = fastpath.enable(trainer)
    ctx.log("CPU fast path: per-conversation attention" + (", LM head over labelled tokens only" if plain_head else ""))
    return restore


# ------------------------------------------------------------------------------------------- saving


def save_outputs(trainer, input_dir: Path, ctx, title: str) -> None:
    """model/ (adapter merged into full weights), adapter/, loss.png; then the checkpoints are deleted."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    model = trainer.model
    if trainer.accelerator.num_processes > 1:
        model = gathered_model(trainer, input_dir)  # every rank takes part; rank 0 alone gets the model
        if model is None:
            return
    if isinstance(model, PeftModel):
        model.save_pretrained(ctx.out / "adapter")
        ctx.log("merging the adapter into full weights")
        model = model.merge_and_unload()
    if not torch.cuda.is_available():
        model = model.to(torch.float32)
    model.save_pretrained(ctx.out / "model", safe_serialization=True)
    # the input model's tokenizer and chat template, untouched by the trainer (which may set a pad token)
    AutoTokenizer.from_pretrained(input_dir).save_pretrained(ctx.out / "model")
    gen = Path(input_dir) / "generation_config.json"
    if gen.is_file():  # the base stage's EOS ids (end-of-turn included) must survive every stage
        shutil.copy(gen, ctx.out / "model" / "generation_config.json")
    plot_logs({title: read_log(ctx.out / "log.jsonl")}, ctx.out / "loss.png")
    shutil.rmtree(ctx.out / "checkpoints", ignore_errors=True)


def gathered_model(trainer, input_dir: Path):
    """Several processes: the trained weights gathered whole (FSDP and ZeRO-3 shards included; a collective, so
    every rank calls it) into a fresh copy of the model on rank 0, which returns it; other ranks get None."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    accelerator = trainer.accelerator
    state = accelerator.get_state_dict(trainer.deepspeed or trainer.model_wrapped)
    if not accelerator.is_main_process:
        return None
    model = AutoModelForCausalLM.from_pretrained(input_dir, dtype=next(iter(state.values())).dtype)
    if isinstance(trainer.model, PeftModel):
        model = get_peft_model(model, trainer.model.peft_config["default"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and model.config.get_text_config().tie_word_embeddings}
    assert not unexpected and set(missing) == tied, (missing[:5], unexpected[:5])
    model.tie_weights()
    return model


def trainable_summary(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_parameters": trainable, "parameters": total}
