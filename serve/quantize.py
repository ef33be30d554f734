"""int8 copies of the served models, for `serve.quantization: int8`.

W8A8: int8 weights with one scale per output channel, and int8 activations with one scale per token computed
while serving, written in the compressed-tensors format vLLM loads (on a CPU its oneDNN int8 kernels, which
use AVX-512 VNNI where the CPU has it). A float32 135M model's decoding step is bound by its matrix multiplies
on a small CPU (see bench/serve_throughput.py); int8 weights are a quarter of the bytes.

Quantizing activations per token costs accuracy where a few channels carry outliers, so SmoothQuant (Xiao et
al., 2023) first moves them into the weights: each linear input that follows a norm (q/k/v, gate/up) or a
product (down, after up) has its channels divided by s = max|x|^a / max|W|^(1-a), measured on the pack's own
conversations, and the weights' matching columns multiplied by s. In float32 that rewrite changes nothing;
it makes the int8 rounding of the activations kinder. The copy is made once per source model and reused;
its quantization.json records the held-out perplexity before and after (int8 emulated in PyTorch).

    python -m serve.quantize --domain finance          # make the copies `make serve serve.quantization=int8` uses
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from core import cli
from core.chat import with_system
from core.errors import PackError, show_path
from core.layout import model_dir, run_dir, serve_dir
from core.pack import load_pack
from core.rows import load_rows
from core.schema import Pack
from core.scoring import Scorer, perplexity_from_nll

ALPHA = 0.5  # SmoothQuant's migration strength: the paper's default; 0.5-0.7 measured best on finance
CALIBRATION_ROWS = 32
MAX_TOKENS = 512
WEIGHT_FILES = (".safetensors", ".bin", ".pt")


# ------------------------------------------------------------------------------------ the arithmetic


def quantize_rows(w):
    """Symmetric int8 with one scale per row (output channel): (int8 weights, float scales [rows, 1])."""
    import torch

    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
    return (w / scale).round().clamp(-127, 127).to(torch.int8), scale


def quantize_tokens(x):
    """What the server does to each linear layer's input: int8 per token, back to float (emulation)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    return (x / scale).round().clamp(-127, 127) * scale


BLOCK = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def blocks(model) -> list[dict]:
    """Per decoder layer the modules SmoothQuant rewrites; a clear error for an architecture without them."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(_has(layer, n) for layer in layers for n in BLOCK):
        raise PackError(f"serve.quantization=int8 supports Llama-family models (Llama, Mistral, Qwen2, SmolLM2: "
                        f"q/k/v/o and gate/up/down projections after RMSNorms); this model is "
                        f"{type(model).__name__}. Serve it with serve.quantization=none")
    return [{n: layer.get_submodule(n) for n in BLOCK} for layer in layers]


def _has(module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def input_maxima(model, batches) -> list[dict]:
    """Per layer, the largest |value| of each input channel of q/k/v, gate/up and down over the batches."""
    import torch

    layers = blocks(model)
    found = [dict() for _ in layers]
    hooks = []
    for i, b in enumerate(layers):
        for key in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
            def record(module, args, i=i, key=key):
                x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
                found[i][key] = torch.maximum(found[i][key], x) if key in found[i] else x
            hooks.append(b[key].register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            for ids in batches:
                model(ids)
    finally:
        for h in hooks:
            h.remove()
    return found


def smooth(model, maxima: list[dict], alpha: float = ALPHA) -> None:
    """SmoothQuant's exact rewrite, in place: float outputs stay the same (to rounding)."""
    import torch

    with torch.no_grad():
        for b, seen in zip(blocks(model), maxima):
            for key, before, linears, rows in (
                    ("self_attn.q_proj", b["input_layernorm"], ("self_attn.q_proj", "self_attn.k_proj",
                                                                "self_attn.v_proj"), False),
                    ("mlp.gate_proj", b["post_attention_layernorm"], ("mlp.gate_proj", "mlp.up_proj"), False),
                    ("mlp.down_proj", b["mlp.up_proj"], ("mlp.down_proj",), True)):
                w_max = torch.stack([b[n].weight.abs().amax(dim=0).float() for n in linears]).amax(dim=0)
                s = (seen[key].clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
                if rows:  # down's input is act(gate) * up: scale up's output rows
                    before.weight.div_(s.to(before.weight.dtype)[:, None])
                    if getattr(before, "bias", None) is not None:
                        before.bias.div_(s.to(before.bias.dtype))
                else:  # the norm's elementwise weight
                    before.weight.div_(s.to(before.weight.dtype))
                for n in linears:
                    b[n].weight.mul_(s.to(b[n].weight.dtype)[None, :])


def quantized_names(model) -> list[str]:
    """The Linear layers that become int8: every projection inside the decoder layers (not the LM head)."""
    import torch

    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]


def emulate_int8(model):
    """Round every quantized layer's weights and inputs the way the server will; returns the hooks' undo."""
    import torch

    saved, hooks = {}, []
    with torch.no_grad():
        for name in quantized_names(model):
            m = model.get_submodule(name)
            saved[name] = m.weight.detach().clone()
            q, scale = quantize_rows(m.weight.float())
            m.weight.copy_((q.float() * scale).to(m.weight.dtype))
            hooks.append(m.register_forward_pre_hook(lambda module, args: (quantize_tokens(args[0]), *args[1:])))

    def undo():
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for name, w in saved.items():
                model.get_submodule(name).weight.copy_(w)
    return undo


# ------------------------------------------------------------------------------------------ the copy


def write_int8(model, src: Path, dst: Path) -> None:
    """The compressed-tensors W8A8 checkpoint: int8 `weight` + `weight_scale` per quantized Linear, every
    other tensor as the source stored it, the source's tokenizer and template files copied verbatim."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((src / "config.json").read_text())
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
    out = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        out.pop("lm_head.weight", None)  # stored once, as the embeddings
    for name in quantized_names(model):
        q, scale = quantize_rows(model.get_submodule(name).weight.detach().float())
        out[f"{name}.weight"] = q.contiguous()
        out[f"{name}.weight_scale"] = scale.to(dtype).contiguous()
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix not in WEIGHT_FILES and f.name != "config.json" \
                and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    int8 = {"num_bits": 8, "type": "int", "symmetric": True}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {**int8, "strategy": "channel", "dynamic": False},
                                      "input_activations": {**int8, "strategy": "token", "dynamic": True}}},
        "ignore": ["lm_head"],
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def source_key(src: Path, calibration: list[str], alpha: float) -> str:
    """Changes when the source model's files, the calibration text or alpha change."""
    h = hashlib.sha256(f"alpha={alpha}\n".encode())
    for f in sorted(src.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    for t in calibration:
        h.update(t.encode() + b"\0")
    return h.hexdigest()[:16]


def int8_copy(src: Path, dst: Path, calibration: list[str], held_out: list[str], alpha: float = ALPHA,
              say=print) -> Path:
    """dst, an int8 W8A8 copy of the model folder src (made now, or reused when src and the data are the same)."""
    if not calibration:
        raise PackError("serve.quantization=int8 calibrates on the pack's sft (or cpt) data, and it has none: "
                        "add datasets to sft or serve with serve.quantization=none")
    key = source_key(src, calibration, alpha)
    record = dst / "quantization.json"
    if record.is_file() and json.loads(record.read_text()).get("key") == key:
        return dst
    start = time.perf_counter()
    say(f"[serve] making an int8 copy of {show_path(src)} in {show_path(dst)} "
        f"(SmoothQuant alpha {alpha} on {len(calibration)} of the pack's texts)")
    scorer = Scorer(src)  # core/scoring.py's: the same held-out perplexity as the report's domain_ppl
    model = scorer.model

    def ppl():
        return perplexity_from_nll(*scorer.text_nll(held_out)) if held_out else None

    calib = [scorer.tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :MAX_TOKENS]
             for t in calibration]
    ppl_float = ppl()
    smooth(model, input_maxima(model, calib), alpha)
    undo = emulate_int8(model)
    ppl_int8 = ppl()
    undo()
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_int8(model, src, tmp)
    info = {"key": key, "source": str(src), "alpha": alpha, "calibration_texts": len(calibration),
            "held_out_texts": len(held_out), "perplexity_float": ppl_float, "perplexity_int8_emulated": ppl_int8,
            "seconds": round(time.perf_counter() - start, 1)}
    (tmp / "quantization.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    change = (f"; held-out perplexity {ppl_float:.2f} -> {ppl_int8:.2f} ({100 * (ppl_int8 / ppl_float - 1):+.1f}%, "
              f"int8 emulated)" if held_out else "")
    say(f"[serve] int8 copy ready in {info['seconds']:.0f} s{change}")
    return dst


def pack_texts(pack: Pack, tokenizer_dir: Path) -> tuple[list[str], list[str]]:
    """(calibration, held-out): the pack's sft conversations as the server will see them (its chat template,
    the system prompt first), then cpt text; held-out domain text from eval.text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    calibration, held_out = [], []
    if pack.sft.enabled and pack.sources("sft"):
        for row in load_rows(pack, pack.sources("sft"), "chat", "sft")[:CALIBRATION_ROWS]:
            calibration.append(tok.apply_chat_template(with_system(row["messages"], pack.system_prompt),
                                                       tokenize=False))
    if pack.cpt.enabled and pack.sources("cpt"):
        calibration += [r["text"] for r in load_rows(pack, pack.sources("cpt"), "text", "cpt")[:CALIBRATION_ROWS // 2]]
    if pack.eval.enabled and pack.eval.text:
        held_out = [r["text"] for r in load_rows(pack, pack.eval.text, "text", "eval.text")]
    return calibration, held_out


def served_copies(pack: Pack, run: Path, tuned: Path, base: Path, say=print) -> tuple[Path, Path]:
    """The int8 copies of the tuned and the base model (both, so the arena compares like with like)."""
    calibration, held_out = pack_texts(pack, tuned)
    root = serve_dir(run) / "int8"
    return (int8_copy(tuned, root / "tuned", calibration, held_out, say=say),
            int8_copy(base, root / "base", calibration, held_out, say=say))


def main(argv: list[str] | None = None) -> int:
    args = cli.domain_parser("python -m serve.quantize", __doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                             formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)

    def quantize_domain() -> None:
        pack = load_pack(args.domain, args.overrides)
        run = run_dir(pack.name)
        tuned, base = served_copies(pack, run, model_dir(run, "merge"), model_dir(run, "base"))
        print(f"int8 copies: {show_path(tuned)}, {show_path(base)}")

    return cli.run(quantize_domain)


if __name__ == "__main__":
    sys.exit(main())
