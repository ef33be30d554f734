"""SFT training throughput on SmolLM2-135M (LoRA r=16, sequences of 512): our SFT setup against a naive run,
and against the FLOP bound of this machine's CPU.

    .venv/bin/python bench/train_throughput.py                   # a few steps each, prints the numbers
    .venv/bin/python bench/train_throughput.py --steps 6 --json /tmp/train_bench.json

- ours:  what pipeline/sft.py does: conversations tokenized with the assistant-only mask, packed into
         512-token rows by TRL's best-fit-decreasing packer (padding-free), with pipeline/fastpath.py's
         per-conversation attention and LM head over the labelled tokens; LoRA r=16 on every linear layer
         (the pack's default dropout 0), no gradient checkpointing (the CPU default), float32.
- naive: the same model, LoRA, data and settings with no packing and no fast path: one conversation per
         row, every batch padded to 512 tokens, float32.
- ours+compile: ours with the decoder layers compiled (`sft.compile: true`); the compile is in the first,
         untimed step, whose time is printed.
- bound: LoRA training costs about 4 x parameters FLOPs per token (forward 2N, backward through the frozen
         weights 2N; the adapters' own cost is small); this CPU's fp32 matmul GFLOP/s, measured here with
         torch, divided by that gives the tokens/s no implementation can beat.
Tokens counted are real (non-padding) tokens; the first `--warmup` steps of each run are not timed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Best-of fp32 GEMM throughput with torch's threads on this CPU."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def load_model(model: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == "embedded":
        from pipeline.base import load_base

        m, tok, _ = load_base("embedded", REPO)
    else:
        m, tok = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), AutoTokenizer.from_pretrained(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return m.to(torch.float32), tok


def conversations(path: Path, tok, system_prompt: str) -> list[dict]:
    from core.chat import tokenize_conversation, with_system

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for r in rows:
        msgs = r.get("messages") or [{"role": "user", "content": r["instruction"]},
                                     {"role": "assistant", "content": r["output"]}]
        out.append(tokenize_conversation(tok, with_system(msgs, system_prompt)))
    return out


def run(name: str, model, tok, data: list[dict], args, packed: bool, compiled: bool = False) -> dict:
    import copy

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from pipeline import fastpath

    counted = {"tokens": 0}

    def count_tokens(module, a, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        counted["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())  # padding-free: all real

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.start = [], [], 0.0

        def on_step_begin(self, a, state, control, **kw):
            counted["tokens"] = 0
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self.start)
            self.tokens.append(counted["tokens"])
            print(f"  {name} step {state.global_step}: {counted['tokens']} tokens in {self.times[-1]:.1f}s", flush=True)

    torch.manual_seed(0)
    model = copy.deepcopy(model)
    hook = model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    timer = Timer()
    config = SFTConfig(
        output_dir=str(Path(args.tmp) / name), max_steps=args.steps + args.warmup,
        per_device_train_batch_size=args.batch, learning_rate=2e-4, max_length=args.max_length,
        packing=packed, packing_strategy="bfd", pad_to_multiple_of=None if packed else args.max_length,
        logging_steps=1000, save_strategy="no", report_to="none", seed=0, dataloader_pin_memory=False,
        disable_tqdm=True, assistant_only_loss=False, shuffle_dataset=True, bf16=False,  # fp32 on CPU
        gradient_checkpointing=args.gradient_checkpointing, use_cpu=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, processing_class=tok, train_dataset=Dataset.from_list(data),
                         peft_config=lora, callbacks=[timer])
    if packed:  # what pipeline/training.py does on the CPU
        fastpath.enable(trainer)
    if compiled:  # sft.compile: true
        fastpath.compile_decoder_layers(fastpath.inner_model(trainer))
    trainer.train()
    hook.remove()
    times, tokens = timer.times[args.warmup:], timer.tokens[args.warmup:]
    return {"tokens_per_s": sum(tokens) / sum(times), "tokens": sum(tokens), "seconds": sum(times),
            "steps": len(times), "tokens_per_step": sum(tokens) / len(times), "first_step_s": timer.times[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct) or a model folder")
    parser.add_argument("--data", default=str(REPO / "domains/finance/data/sft.jsonl"), help="SFT jsonl")
    parser.add_argument("--system-prompt", default="You are a careful financial education assistant.")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lora-dropout", type=float, default=None, help="default: the pack's (0.0)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (off on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the run with compiled decoder layers")
    parser.add_argument("--tmp", default="/tmp/train_throughput")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    if args.lora_dropout is None:
        from core.schema import Lora

        args.lora_dropout = Lora().lora_dropout

    import torch

    gflops = matmul_gflops()
    model, tok = load_model(args.model)
    params = sum(p.numel() for p in model.parameters())
    bound = gflops * 1e9 / (4 * params)
    data = conversations(Path(args.data), tok, args.system_prompt)
    mean_len = sum(len(d["input_ids"]) for d in data) / len(data)
    print(f"CPU: {torch.get_num_threads()} threads, fp32 matmul {gflops:.1f} GFLOP/s; model {params / 1e6:.1f}M "
          f"parameters; {len(data)} conversations, mean {mean_len:.0f} tokens", flush=True)

    ours = run("ours", model, tok, data, args, packed=True)
    compiled = None if args.no_compile else run("ours+compile", model, tok, data, args, packed=True, compiled=True)
    naive = run("naive", model, tok, data, args, packed=False)
    result = {
        "gflops_fp32": round(gflops, 1), "parameters": params, "flop_bound_tokens_per_s": round(bound, 1),
        "ours": ours, "naive": naive,
        "speedup_vs_naive": round(ours["tokens_per_s"] / naive["tokens_per_s"], 2),
        "fraction_of_bound": round(ours["tokens_per_s"] / bound, 3),
        "naive_fraction_of_bound": round(naive["tokens_per_s"] / bound, 3),
        "ours_compiled": compiled,
        "config": {"lora_r": 16, "lora_dropout": args.lora_dropout, "gradient_checkpointing": args.gradient_checkpointing,
                   "max_length": args.max_length, "batch": args.batch, "steps": args.steps,
                   "dtype": "float32", "threads": torch.get_num_threads()},
    }
    print(f"\nSFT tokens/s, SmolLM2-135M, LoRA r=16, seq {args.max_length}, batch {args.batch}, fp32:")
    print(f"  ours (packed, padding-free) {ours['tokens_per_s']:8.1f}   ({ours['tokens_per_step']:.0f} real tokens/step)")
    if compiled:
        result["compiled_fraction_of_bound"] = round(compiled["tokens_per_s"] / bound, 3)
        print(f"  ours + compile (sft.compile) {compiled['tokens_per_s']:7.1f}   (first step {compiled['first_step_s']:.0f} s "
              f"with the compile, vs {ours['first_step_s']:.0f} s)")
    print(f"  naive (padded to {args.max_length})     {naive['tokens_per_s']:8.1f}   "
          f"({naive['tokens_per_step']:.0f} real tokens/step)")
    print(f"  FLOP bound (4 x params)     {bound:8.1f}   ({gflops:.1f} GFLOP/s / {4 * params / 1e9:.2f} GFLOP/token)")
    print(f"  speed-up vs naive {result['speedup_vs_naive']}x (target >= 1.5x); "
          f"{100 * result['fraction_of_bound']:.0f}% of the bound (target >= 50%)"
          + (f"; with compile {100 * result['compiled_fraction_of_bound']:.0f}%" if compiled else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
