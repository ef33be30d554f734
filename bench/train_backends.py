"""Training backends on a CUDA GPU: the pipeline's cpt -> sft -> pref stages run a few steps with
`backend=hf` (transformers + PEFT) and with `backend=unsloth`, then pref with ORPO and sft with QLoRA;
prints tokens/s per stage and backend and the unsloth/hf ratio (read from each stage's stage.json).

    .venv/bin/python bench/train_backends.py                                # finance pack, runs/ untouched
    .venv/bin/python bench/train_backends.py --base runs/finance/base/model --steps 60 --json out.json
    .venv/bin/python bench/train_backends.py --base CONFIG_DIR --random-weights   # no weights at hand

Every run is `python -m pipeline run <stage> --domain <pack> <overrides>` in its own process (Unsloth patches
transformers and TRL when imported, so the two backends cannot share one) with RUNS_DIR set to a scratch
folder. `--random-weights` builds the model from CONFIG_DIR's config.json with random weights (the tokenizer
files are copied): speed does not depend on the weights, losses then mean nothing. Needs a CUDA GPU;
on a CPU Unsloth is refused by the pipeline (the point of `backend: auto`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.layout import read_stage  # noqa: E402
from core.stages import TRAIN_STAGES  # noqa: E402


def random_model(config_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.bfloat16)
    model.save_pretrained(out)
    for f in config_dir.iterdir():
        if f.is_file() and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out


def run(stage: str, domain: str, overrides: list[str], runs: Path, log: Path, timeout: int) -> tuple[int, float]:
    env = dict(os.environ, RUNS_DIR=str(runs), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pipeline", "run", stage, "--domain", domain, *overrides]
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ RUNS_DIR={runs} {' '.join(cmd[1:])}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="finance")
    p.add_argument("--base", default="embedded", help="base model: 'embedded', a model folder, or a config "
                   "folder with --random-weights")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of cpt and sft (pref: half)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per pipeline command")
    p.add_argument("--backends", default="unsloth,hf")
    p.add_argument("--no-extras", action="store_true", help="skip the ORPO and QLoRA runs")
    p.add_argument("--json", help="write the table here too")
    p.add_argument("--log", default=None, help="the pipeline's output (default: <scratch>/log.txt)")
    args = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("train_backends: needs a CUDA GPU (Unsloth is the CUDA backend)", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="train_backends_"))
    log = Path(args.log) if args.log else scratch / "log.txt"
    base = args.base
    if args.random_weights:
        base = str(random_model(Path(args.base).resolve(), scratch / "random_base"))
    elif base != "embedded":
        base = str(Path(base).resolve())
    print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}; pipeline log: {log}", flush=True)

    half = max(1, args.steps // 2)
    chain = [f"base.model={base}", f"cpt.max_steps={args.steps}", f"sft.max_steps={args.steps}",
             f"pref.max_steps={half}", "cpt.save_steps=1000", "sft.save_steps=1000", "pref.save_steps=1000"]
    plans = [("chain", "pref", [], list(TRAIN_STAGES))]
    if not args.no_extras:
        plans += [("orpo", "pref", ["pref.method=orpo"], ["pref"]),
                  ("qlora", "sft", ["sft.tuning=qlora"], ["sft"])]
    rows = []
    for name, target, extra, stages in plans:
        for backend in args.backends.split(","):
            runs = scratch / backend
            over = chain + extra + [f"{s}.backend={backend}" for s in TRAIN_STAGES]
            rc, wall = run(target, args.domain, over, runs, log, args.timeout)
            for stage in stages:
                m = ((read_stage(runs / args.domain, stage) or {}).get("metrics") or {}) if rc == 0 else {}
                label = stage if name == "chain" else f"{stage} ({name})"
                rows.append({"stage": label, "backend": backend, "rc": rc, "tokens_per_s": m.get("tokens_per_s"),
                             "train_loss": m.get("train_loss"), "used": m.get("backend"),
                             "runtime_s": m.get("train_runtime_s"), "command_s": round(wall, 1)})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'stage':<14}{'hf tok/s':>10}{'unsloth tok/s':>15}{'ratio':>8}")
    for label in dict.fromkeys(r["stage"] for r in rows):
        by = {r["backend"]: r for r in rows if r["stage"] == label}
        hf, us = (by.get(b, {}).get("tokens_per_s") for b in ("hf", "unsloth"))
        ratio = f"{us / hf:.2f}x" if hf and us else "-"
        print(f"{label:<14}{hf or '-':>10}{us or '-':>15}{ratio:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
