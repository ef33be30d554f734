"""The staged domain-adaptation pipeline: the runner, one module per stage, training helpers, evaluation and
the report. Shared concepts (pack, stage table, run layout, rows, chat rendering, scoring) live in core/."""
import core  # noqa: F401  (offline and telemetry-free defaults before anything else is imported)
