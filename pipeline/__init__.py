"""The staged domain-adaptation pipeline: pack schema, runner, one module per stage.

Everything we run is offline and telemetry-free unless the user says otherwise (OFFLINE=0 in make,
or HF_HUB_OFFLINE=0 in the environment).
"""
import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "TRANSFORMERS_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "VLLM_NO_USAGE_STATS": "1",
    "WANDB_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)
