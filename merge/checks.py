"""Checks around a merge: the inputs must be compatible, the output must be a working model.

Before (reads configs and tokenizers, no weights): same architecture and shapes, same vocabulary size,
same special tokens, same chat template. A mismatch is a PackError naming the differing models, never a
silent truncation. After: every tensor finite, config vocab size equal to the embedding rows (and not
smaller than the tokenizer), the folder loads in transformers, and a short greedy answer to a pack prompt
stops at EOS (recorded as a warning when it does not: a random or undertrained model may ramble).
"""
from __future__ import annotations

import json
from pathlib import Path

from core.errors import PackError, show_path

# Config keys that decide whether two checkpoints' tensors line up one to one.
SHAPE_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
TOKENIZER_KEY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                       "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
DEFAULT_PROMPT = "What can you help me with?"
# Asked after the pack prompt so that a working model's answer ends within a short budget: a full answer
# of a verbose small model runs past 160 tokens, which would make the EOS check mean nothing.
SHORT_ANSWER = "\n\nAnswer in one short sentence."


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def describe_inputs(folders: dict[str, Path]) -> dict[str, dict]:
    """What the pre-merge comparison looks at, for each input (named by stage)."""
    from transformers import AutoTokenizer

    out, loaded = {}, {}
    for name, folder in folders.items():
        if not (folder / "config.json").is_file():
            raise PackError(f"merge input '{name}' ({show_path(folder)}) is not a model folder (no config.json); "
                            f"rerun that stage with FORCE=1")
        cfg = _config(folder)
        # Loading a 49k-token tokenizer takes seconds; byte-identical tokenizer files load once.
        key = tuple((folder / f).read_bytes() if (folder / f).is_file() else None for f in TOKENIZER_KEY_FILES)
        tok = loaded[key] if key in loaded else loaded.setdefault(key, AutoTokenizer.from_pretrained(folder))
        special = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
        out[name] = {
            "architecture": {k: cfg.get(k) for k in SHAPE_KEYS if k in cfg},
            "vocab_size": cfg.get("vocab_size"),
            "tokenizer_size": len(tok),
            "special_tokens": special | {"ids": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]},
            "chat_template": tok.chat_template,
        }
    return out


def pre_merge(folders: dict[str, Path]) -> dict:
    """Compare every input with the first; raise PackError listing every difference, by model name."""
    info = describe_inputs(folders)
    names = list(info)
    ref = names[0]
    problems = []
    labels = {"architecture": "architecture", "vocab_size": "vocabulary size (config vocab_size)",
              "tokenizer_size": "tokenizer size", "special_tokens": "special tokens",
              "chat_template": "chat template"}
    for key, label in labels.items():
        for other in names[1:]:
            a, b = info[ref][key], info[other][key]
            if a == b:
                continue
            if isinstance(a, dict) and isinstance(b, dict):
                diff = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
                shown = "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(diff))
            elif key == "chat_template":
                shown = "the templates' texts differ"
            else:
                shown = f"{a!r} vs {b!r}"
            problems.append(f"{label} differs between '{ref}' ({show_path(folders[ref])}) and '{other}' "
                            f"({show_path(folders[other])}): {shown}")
    if problems:
        raise PackError(problems + ["merging needs models of one family with one tokenizer: merge stages "
                                    "trained from the same base model, or change merge.config"],
                        "the models to merge are not compatible")
    first = info[ref]
    return {"inputs": {n: show_path(p) for n, p in folders.items()}, "same_architecture": True,
            "same_vocab": True, "same_special_tokens": True, "same_chat_template": True,
            "vocab_size": first["vocab_size"], "architecture": first["architecture"].get("architectures")}


def nonfinite_tensors(folder: Path) -> list[str]:
    """Names of tensors holding NaN or inf, read file by file from the safetensors shards."""
    import torch
    from safetensors import safe_open

    bad = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    bad.append(name)
    return bad


def post_merge(folder: Path, prompt: str, system_prompt: str = "", max_new_tokens: int = 96) -> dict:
    """Check the merged folder; raise PackError for NaN/inf, size mismatches or load errors.

    Returns the check results; 'warnings' lists soft failures (no EOS within max_new_tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not list(folder.glob("*.safetensors")):
        raise PackError(f"the merged model {show_path(folder)} has no safetensors weights")
    bad = nonfinite_tensors(folder)
    if bad:
        raise PackError(f"the merged model has NaN or inf in {len(bad)} tensors ({', '.join(bad[:5])}); "
                        "check the inputs for NaN and the merge weights in merge.config")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        # float32 on CPU: bfloat16 matmuls are slow on many CPUs, and the check is about values, not speed.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    except Exception as e:  # the output of a merge that transformers cannot read is a failed merge
        raise PackError(f"the merged model {show_path(folder)} does not load in transformers: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    saved = _config(folder)
    vocab = model.config.vocab_size
    rows = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings()
    head_rows = head.weight.shape[0] if head is not None else rows
    if not (vocab == rows == head_rows) or len(tok) > rows:
        raise PackError(f"the merged model's sizes disagree: config vocab_size {vocab}, embedding rows {rows}, "
                        f"output rows {head_rows}, tokenizer {len(tok)} tokens")

    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": prompt + SHORT_ANSWER}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(device) for k, v in ids.items()}
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) - {None}
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    stops = any(t in eos for t in new)
    result = {"finite": True, "loads": True, "vocab_size": vocab, "embedding_rows": rows,
              "tokenizer_size": len(tok), "saved_dtype": saved.get("dtype") or saved.get("torch_dtype"),
              "prompt": prompt + SHORT_ANSWER, "generated_tokens": len(new), "stops_at_eos": stops,
              "answer": tok.decode(new, skip_special_tokens=True)[:400], "warnings": []}
    if not stops:
        result["warnings"].append(f"greedy answer did not reach EOS {sorted(eos)} within {max_new_tokens} "
                                  "tokens (expected for a random or undertrained model; a problem for a served one)")
    return result
