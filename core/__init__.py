"""The leaf layer every other part shares: the pack schema and overrides, the stage table, the run-folder
layout, row loading, chat rendering, held-out scoring, the vote store, win-rate statistics and the CLI's
error wrapper.

It imports nothing else of this project and no torch at import time (functions that need torch or
transformers import them inside), so validation, `--help` and the arena statistics stay fast. Imports point
one way: core <- merge <- pipeline, and core <- serve (tests/test_layers.py checks it).

Everything we run is offline and telemetry-free unless the user says otherwise (OFFLINE=0 in make, or
HF_HUB_OFFLINE=0 in the environment): importing any part of the project sets these defaults. Experiment
trackers run only when `tracking` names them, and offline (pipeline/training.py `tracking`).
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
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)
