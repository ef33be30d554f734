"""Serving: the vLLM launcher, chat-template parity, int8 copies, the crisis guard and the Gradio arena."""
import core  # noqa: F401  (offline and telemetry-free defaults before anything else is imported)
