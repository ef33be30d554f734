"""CPT stage: continued pretraining on raw domain text, the first step of the domain-adaptation recipe.

    python -m pipeline run cpt --domain finance        # or: make domain=finance cpt

Rows are `text` (jsonl, .txt paragraphs, parquet or a hub dataset through the pack's column mapping). With
`packing: true` documents are packed into max_length sequences by TRL's best-fit-decreasing packer
("bfd_split": a document longer than max_length is split into pieces, never cut off), and each document
attends only to itself (position ids restart per document). LoRA by default; `train_embeddings: true` also
trains the token embeddings and the LM head in full, for adapting to a new language. A held-out share
of the text (eval_fraction) gives the loss before and after.
"""
from __future__ import annotations

from core.rows import load_rows
from pipeline import tracking, training
from pipeline.backend import load_model, lora_config, resolve_backend


def run(ctx) -> dict:
    section, pack = ctx.pack.cpt, ctx.pack
    training.check_learning_rate(section, "cpt")
    backend = resolve_backend(section, "cpt")
    rows = load_rows(pack, pack.sources("cpt"), "text", "cpt.datasets")

    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(section.seed)
    input_dir = ctx.input_model()
    model, tokenizer = load_model(input_dir, section, backend)
    train_rows, eval_rows = training.split_rows(rows, section.eval_fraction, section.seed)
    ctx.log(f"{len(train_rows)} documents for training, {len(eval_rows)} held out; backend {backend}")

    args = training.training_args(
        SFTConfig, section, ctx, max_length=section.max_length, packing=section.packing,
        packing_strategy="bfd_split", dataset_text_field="text",
        eval_strategy="steps" if eval_rows else "no", dataset_num_proc=None)
    trainer = SFTTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        peft_config=lora_config(section, backend, train_embeddings=section.train_embeddings),
        callbacks=[tracking.log_callback(ctx.out / "log.jsonl")],
    )
    metrics = {"backend": backend, "tuning": section.tuning, "train_rows": len(train_rows),
               "eval_rows": len(eval_rows), "train_embeddings": section.train_embeddings}
    metrics.update(training.fit_lm(trainer, ctx, input_dir, f"{pack.name}: continued pretraining"))
    return metrics
