"""Report stage: what each stage did to the model, in numbers and pictures.

    python -m pipeline run report --domain finance      # prints the paths; opens nothing

Writes runs/<domain>/report/report.md and a self-contained report.html (plots embedded as PNG): a stage
table (wall time, tokens, tokens/s, final train and eval loss), every eval metric by model with the change
against base, loss curves, sample answers base vs tuned, and the arena leaderboard when votes exist. It also
writes model_card.md, the card to publish with the merged model (data, recipe, held-out metrics, intended use).
Like every stage it writes only into its own folder: the merged model folder keeps mergekit's own README.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from core.errors import show_path
from core.layout import arena_db, read_stage, stage_dir
from core.runlog import plot_logs, read_log
from core.stages import STAGES, TRAIN_STAGES

# metric -> (label, lower is better)
METRICS = {
    "domain_ppl": ("held-out domain perplexity", True),
    "general_ppl": ("general-English perplexity", True),
    "sft_loss": ("held-out conversation loss", True),
    "pref_accuracy": ("preference ranking accuracy", False),
    "pref_margin": ("preference margin (nats/token)", False),
    "reward_accuracy": ("DPO implicit-reward accuracy vs base", False),
    "reward_margin": ("DPO implicit-reward margin", False),
    "benchmark_acc": ("benchmark accuracy (± stderr)", False),
}


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def stage_rows(run_dir: Path) -> list[list[str]]:
    rows = []
    for stage in STAGES[:-1]:
        info = read_stage(run_dir, stage)
        if info is None:
            rows.append([stage, "not built", "", "", "", "", ""])
            continue
        m = info.get("metrics") or {}
        status = "disabled (passes its input through)" if info.get("disabled") else "built"
        rows.append([stage, status, fmt(info.get("wall_time_s"), 4), fmt(m.get("tokens")),
                     fmt(m.get("tokens_per_s"), 4), fmt(m.get("train_loss")), fmt(m.get("eval_loss"))])
    return rows


def metric_rows(metrics: dict) -> list[list[str]]:
    models = list(metrics)
    base = metrics.get("base", {})
    rows = []
    # each lm-eval task the pack names is a row of its own, after the pack's benchmark
    tasks = sorted({k[:-4] for m in metrics.values() for k in m if k.startswith("lm_eval/") and k.endswith("_acc")})
    labels = METRICS | {f"{t}_acc": (f"{t.removeprefix('lm_eval/')} accuracy (± stderr)", False) for t in tasks}
    for key, (label, lower) in labels.items():
        if not any(key in m for m in metrics.values()):
            continue
        row = [label + (" ↓" if lower else " ↑")]
        for model in models:
            value = metrics[model].get(key)
            cell = fmt(value)
            if value is not None and metrics[model].get(f"{key}_stderr") is not None:
                cell += f" ± {metrics[model][key + '_stderr']:.2g}"
            if model != "base" and value is not None and base.get(key) is not None:
                delta = value - base[key]
                cell += f" ({'+' if delta >= 0 else ''}{delta:.3g})"
            row.append(cell)
        rows.append(row)
    return rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def plot_losses(run_dir: Path, out: Path) -> Path | None:
    return plot_logs({s: read_log(stage_dir(run_dir, s) / "log.jsonl") for s in TRAIN_STAGES}, out)


def plot_metrics(metrics: dict, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("domain_ppl", "general_ppl", "pref_accuracy") if any(k in m for m in metrics.values())]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        models = [m for m in metrics if key in metrics[m]]
        values = [metrics[m][key] for m in models]
        bars = ax.bar(models, values, color=["#999"] + ["#3b7dd8"] * (len(models) - 1))
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(METRICS[key][0] + (" (lower is better)" if METRICS[key][1] else " (higher is better)"),
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def arena_section(run_dir: Path, domain: str) -> list[list[str]] | None:
    """The arena leaderboard (tuned vs base, and the ranking of all contestants) as table rows when votes exist."""
    db = arena_db(run_dir)
    if not db.is_file():
        return None
    from core.votes import Store

    s = Store(db).summary(domain, f"{domain}-base")
    if not s["n"]:
        return None

    def interval(pair):
        return f"{pair[0]:.3f} – {pair[1]:.3f}"

    rows = [
        ["battles voted (tuned vs base)", str(s["n"])],
        ["tuned wins / losses / ties", f"{s['wins']} / {s['losses']} / {s['ties']}"],
        ["win rate (ties as half)", fmt(s["win_rate"])],
        ["Wilson 95%", interval(s["wilson_95"])],
        ["bootstrap 95%", interval(s["bootstrap_95"])],
        ["sign test p (decisive votes)", fmt(s["sign_test_p"])],
        ["length-controlled win rate", fmt(s["lc_win_rate"])],
    ]
    if "order" in s:  # more than two models battled (serve.contestants): their ranking
        ranks = [f"{m} {s['bradley_terry'][m]:.0f} [{s['bradley_terry_95'][m][0]:.0f}, "
                 f"{s['bradley_terry_95'][m][1]:.0f}]" for m in s["order"]]
        rows.append(["Bradley-Terry ranking (Elo scale, bootstrap 95%)", "; ".join(ranks)])
    return rows


def model_card(pack, metrics: dict, run_dir: Path) -> str:
    sources = []
    for stage in TRAIN_STAGES:
        section = getattr(pack, stage)
        if section.enabled:
            for s in pack.sources(stage):
                sources.append(f"- {stage}: `{s.label}` — licence {s.licence}"
                               + (f" ({s.licence_name})" if s.licence_name else ""))
    recipe = []
    for stage in TRAIN_STAGES:
        info = read_stage(run_dir, stage)
        if info and not info.get("disabled"):
            sec = getattr(pack, stage)
            extra = f", {sec.method}, beta {sec.beta}" if stage == "pref" else ""
            recipe.append(f"- {stage}: {sec.tuning}, learning rate {sec.learning_rate}, "
                          f"{sec.num_train_epochs} epoch(s){extra}")
    merge = read_stage(run_dir, "merge")
    if merge and not merge.get("disabled"):
        recipe.append(f"- merge: mergekit `{pack.merge.config.get('merge_method')}` with the base model")
    tuned = [m for m in metrics if m != "base"]
    rows = metric_rows({k: metrics[k] for k in ["base"] + tuned[-1:] if k in metrics}) if metrics else []
    table = md_table(["metric", *[m for m in ["base"] + tuned[-1:] if m in metrics]], rows) if rows else "(no eval)"
    base_info = read_stage(run_dir, "base") or {}
    return f"""---
language: en
library_name: transformers
tags: [domain-adaptation, {pack.name}]
---
# {pack.name} model

{pack.description}

Base model: {(base_info.get('metrics') or {}).get('source', pack.base.model)}

## Training data
{chr(10).join(sources) or '- none'}

## Recipe
{chr(10).join(recipe) or '- none'}

## Evaluation (held-out data of the pack)
{table}

## Intended use and limits
{pack.intended_use or 'Domain assistance; answers can be wrong and should be checked.'}
{pack.limitations}

System prompt used in training and serving:

> {pack.system_prompt}
"""


def run(ctx) -> dict:
    run_dir, out, pack = ctx.run_dir, ctx.out, ctx.pack
    eval_dir = run_dir / "eval"
    metrics = json.loads((eval_dir / "metrics.json").read_text()) if (eval_dir / "metrics.json").is_file() else {}
    answers = read_log(eval_dir / "answers.jsonl")
    judge = ((read_stage(run_dir, "eval") or {}).get("metrics") or {}).get("judge")

    stage_header = ["stage", "status", "wall time (s)", "tokens", "tokens/s", "train loss", "eval loss"]
    stages = stage_rows(run_dir)
    metric_header = ["metric", *metrics]
    mrows = metric_rows(metrics)
    plots = [p for p in (plot_losses(run_dir, out / "loss_curves.png"), plot_metrics(metrics, out / "metrics.png")) if p]
    tuned = [m for m in metrics if m != "base"][-1:] or []
    samples = [[a["prompt"], a.get("base", ""), a.get(tuned[0], "") if tuned else ""] for a in answers[:6]]
    sample_header = ["prompt", "base", tuned[0] if tuned else "tuned"]
    arena = arena_section(run_dir, pack.name)

    md = [f"# Run report: {pack.name}", "", pack.description, "", "## Stages", md_table(stage_header, stages), ""]
    md += ["## Metrics by model (change against base in brackets)", md_table(metric_header, mrows) if mrows
           else "No eval results yet.", ""]
    if judge:
        md += ["## Automatic judge (tuned vs base, order swapped)", "```", json.dumps(judge, indent=2), "```", ""]
    md += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if samples:
        md += ["## Sample answers", md_table(sample_header, samples), ""]
    if arena:
        md += ["## Arena (blind human votes)", md_table(["", "value"], arena), ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")

    imgs = "".join(f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   for p in plots)
    parts = [f"<h1>Run report: {html.escape(pack.name)}</h1><p>{html.escape(pack.description)}</p>",
             "<h2>Stages</h2>", html_table(stage_header, stages),
             "<h2>Metrics by model</h2><p>Change against base in brackets; ↓ lower is better, ↑ higher is better.</p>",
             html_table(metric_header, mrows) if mrows else "<p>No eval results yet.</p>"]
    if judge:
        parts.append(f"<h2>Automatic judge</h2><pre>{html.escape(json.dumps(judge, indent=2))}</pre>")
    parts.append(f"<h2>Plots</h2>{imgs}")
    if samples:
        parts += ["<h2>Sample answers</h2>", html_table(sample_header, samples)]
    if arena:
        parts += ["<h2>Arena (blind human votes)</h2>", html_table(["", "value"], arena)]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "vertical-align:top;text-align:left}img{max-width:100%;display:block;margin:1em 0}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(pack.name)}"
                                     f" report</title><style>{style}</style></head><body>{''.join(parts)}</body></html>",
                                     encoding="utf-8")

    (out / "model_card.md").write_text(model_card(pack, metrics, run_dir), encoding="utf-8")
    for name in ("report.md", "report.html", "model_card.md"):
        ctx.log(f"{name}: {show_path(stage_dir(run_dir, 'report') / name)}")
    return {"plots": [p.name for p in plots], "models": list(metrics)}
