"""What the three training stages (cpt, sft, pref) share: backend and model setup, LoRA/QLoRA/full,
checkpoint resume, log.jsonl, the loss curve, merging the adapter and writing the stage's outputs.

Each stage module (pipeline/cpt.py, sft.py, pref.py) reads top to bottom and calls these in order:

    backend = resolve_backend(section)            # before trl is imported (Unsloth patches it)
    model, tokenizer = load_model(input_dir, section, backend)
    trainer = <TRL trainer>(..., args=training_args(Config, section, ctx), peft_config=lora_config(...))
    result = train(trainer, ctx)                  # resumes from ctx.out/checkpoints when a run was killed
    save_outputs(trainer, input_dir, ctx)         # model/ (merged), adapter/, loss.png; checkpoints deleted

Outputs of every training stage: ctx.out/model (full weights, adapter merged, tokenizer and chat template of
the input model, its generation_config.json), ctx.out/adapter (absent for a full fine-tune), log.jsonl,
loss.png.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

from pipeline.pack import PackError, TrainStage

ARGS_COMMON = dict(report_to="none", save_strategy="steps", save_total_limit=2, dataloader_num_workers=0,
                   disable_tqdm=False, dataloader_pin_memory=False)


# ------------------------------------------------------------------------------------- backend, model


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(section: TrainStage, stage: str) -> str:
    """'hf' or 'unsloth'. Unsloth must be imported before trl/transformers so that its patches apply."""
    has_cuda = cuda_available()
    if section.tuning == "qlora" and not has_cuda:
        raise PackError(f"{stage}.tuning: qlora needs a CUDA GPU (4-bit bitsandbytes kernels); this machine has "
                        f"none. Use {stage}.tuning=lora (the default) or {stage}.tuning=full.")
    if section.backend == "hf":
        return "hf"
    if section.backend == "unsloth" and not has_cuda:
        raise PackError(f"{stage}.backend: unsloth needs a CUDA GPU and this machine has none; "
                        f"use {stage}.backend=auto (falls back to transformers + PEFT) or hf.")
    if not has_cuda:
        return "hf"
    try:
        import unsloth  # noqa: F401
    except Exception as e:  # ImportError, or unsloth's own checks failing on an unsupported GPU
        if section.backend == "unsloth":
            raise PackError(f"{stage}.backend: unsloth does not import here ({str(e).splitlines()[0]}); "
                            f"install it (`make setup` with GPU=1) or use {stage}.backend=hf")
        return "hf"
    return "unsloth"


def import_unsloth_first(sections: list[TrainStage]) -> None:
    """Unsloth patches transformers and TRL when it is imported, and applies fewer of its optimisations (with a
    warning) when they were imported first, as the base stage does. The runner calls this before any stage."""
    if any(getattr(s, "enabled", True) and s.backend != "hf" for s in sections) and cuda_available():
        try:
            import unsloth  # noqa: F401
        except Exception:  # resolve_backend reports it (backend: unsloth) or falls back to hf (auto)
            pass


def load_model(model_dir: Path, section: TrainStage, backend: str):
    """(model, tokenizer) from a full-weight folder. float32 on CPU; bf16 (or 4-bit for QLoRA) on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(model_dir), max_seq_length=section.max_length, dtype=None,
            load_in_4bit=section.tuning == "qlora", full_finetuning=section.tuning == "full")
        if section.tuning != "full":
            lora = section.lora
            model = FastLanguageModel.get_peft_model(
                model, r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                target_modules=_unsloth_targets(lora.target_modules), use_gradient_checkpointing="unsloth",
                random_state=section.seed)
        return model, tokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs: dict = {"dtype": torch.float32}
    if cuda_available():
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if section.tuning == "qlora":
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise PackError("tuning: qlora needs the bitsandbytes package; `pip install bitsandbytes` "
                            "or use tuning: lora")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if section.tuning == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _unsloth_targets(targets):
    if targets == "all-linear":
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return targets


def lora_config(section: TrainStage, backend: str, train_embeddings: bool = False):
    """The PEFT LoraConfig handed to the TRL trainer; None for a full fine-tune or when Unsloth made it."""
    if section.tuning == "full" or backend == "unsloth":
        return None
    from peft import LoraConfig

    lora = section.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM",
                      # language adaptation (new vocabulary use) trains the embeddings and the LM head in full;
                      # a model with tied embeddings (SmolLM2) keeps them tied, so the architecture is unchanged
                      modules_to_save=["embed_tokens", "lm_head"] if train_embeddings else None,
                      ensure_weight_tying=train_embeddings)


def training_args(config_cls, section: TrainStage, ctx, **extra):
    """A TRL config (SFTConfig, DPOConfig, ORPOConfig) from the pack section's TrainingArguments fields."""
    import torch

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


def with_system(messages: list[dict], system_prompt: str) -> list[dict]:
    """The pack's system prompt first, unless the conversation brings its own."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


def check_learning_rate(section: TrainStage, stage: str) -> None:
    # pack.py already rejects <= 0; an override may still sneak in a NaN
    if not section.learning_rate > 0 or math.isinf(section.learning_rate):
        raise PackError(f"{stage}.learning_rate must be a positive number (got {section.learning_rate})")


# ------------------------------------------------------------------------------------------ logging


def log_callback(path: Path, extra_keys=()):
    """A TrainerCallback writing one JSON line per log event: step, loss, learning rate, eval loss,
    and whatever the trainer reports (reward margins and accuracies for the preference stages)."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:  # the final loss and rewards are always logged
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
            if "learning_rate" in row:
                row["lr"] = row["learning_rate"]
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, default=float) + "\n")

    return JsonlLog()


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_log(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=float) + "\n")


def plot_loss(log_path: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    # our own measurement before and after (token-weighted, the stage.json numbers); the trainer's
    # eval_loss above averages batch means, so the two differ a little
    heldout = [(r["step"], r["heldout_loss"]) for r in rows if "heldout_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o--", label="eval loss (trainer)")
    if heldout:
        ax.plot(*zip(*heldout), "s", label="held-out loss before / after")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- training


def last_checkpoint(ctx) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = ctx.out / "checkpoints"
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def train(trainer, ctx) -> dict:
    """trainer.train(), resuming from the newest checkpoint a killed run left in ctx.out/checkpoints."""
    resume = last_checkpoint(ctx)
    log_path = ctx.out / "log.jsonl"
    resumed_step = 0
    if resume:
        resumed_step = int(Path(resume).name.split("-")[-1])
        ctx.log(f"resuming from {Path(resume).name} (a previous run of this stage was interrupted)")
        # the killed run logged past its last checkpoint; those steps run again, so drop their lines
        kept = [r for r in read_log(log_path) if r.get("step", 0) <= resumed_step and "train_runtime" not in r]
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
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

    if trainer.eval_dataset is None:
        return None
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
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
    device = next(trainer.model.parameters()).device
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    loss = held_out_loss(model, trainer)
    del model
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
    plot_loss(ctx.out / "log.jsonl", ctx.out / "loss.png", title)
    shutil.rmtree(ctx.out / "checkpoints", ignore_errors=True)


def trainable_summary(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_parameters": trainable, "parameters": total}
