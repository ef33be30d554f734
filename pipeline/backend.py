"""Which trainer backend a training stage uses, and the model it trains: transformers + PEFT or Unsloth,
LoRA, QLoRA (CUDA) or a full fine-tune.

    backend = resolve_backend(section, stage)     # before trl is imported (Unsloth patches it)
    model, tokenizer = load_model(input_dir, section, backend)
    peft_config = lora_config(section, backend)   # handed to the TRL trainer (None when Unsloth made it)
"""
from __future__ import annotations

import os
from pathlib import Path

from core.errors import PackError
from core.schema import TrainStage


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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under accelerate launch: Unsloth trains on one GPU
        if section.backend == "unsloth":
            raise PackError(f"{stage}.backend: unsloth trains on one GPU, and this stage runs on "
                            f"{os.environ['WORLD_SIZE']} processes; use {stage}.backend=auto (transformers + PEFT "
                            "under Accelerate) or drop NPROC/NNODES")
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
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
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
