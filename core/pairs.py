"""Arena votes as training data: every voted battle, and the decisive ones as preference pairs for the next
pref round (prompt/chosen/rejected), skipping and counting those that teach nothing.

    python -m core.pairs export --domain finance      # runs/finance/votes/{battles,pairs}.jsonl (make export-votes)
    python -m core.pairs summary --domain finance     # the leaderboard numbers as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from core import cli
from core.errors import PackError, show_path
from core.layout import domains_dir, run_dir, votes_dir
from core.votes import Store, db_path


def preference_pair(battle: dict) -> dict | None:
    """prompt/chosen/rejected from a decisive battle; None for ties.

    A single-turn battle gives strings. A multi-turn one gives message lists: the prompt is the system
    prompt and first user turn, chosen/rejected the rest of each side's conversation (the later user
    turns are the same on both sides, the answers differ).
    """
    if battle["winner"] not in ("model_a", "model_b"):
        return None
    win, lose = ("a", "b") if battle["winner"] == "model_a" else ("b", "a")
    cw, cl = battle[f"conversation_{win}"], battle[f"conversation_{lose}"]
    head = 2 if cw and cw[0]["role"] == "system" else 1
    meta = {"battle_id": battle["battle_id"], "chosen_model": battle[f"model_{win}"],
            "rejected_model": battle[f"model_{lose}"], "rater": battle["rater"]}
    if battle["turns"] == 1:
        return {"prompt": cw[head - 1]["content"], "chosen": cw[head]["content"], "rejected": cl[head]["content"],
                **meta}
    return {"prompt": cw[:head], "chosen": cw[head:], "rejected": cl[head:], **meta}


def unusable(battle: dict, pair: dict) -> str | None:
    """Why a decisive vote's pair teaches nothing (or the wrong thing), else None. The store refuses such
    votes since it checks answers; databases from before that can still hold them."""
    if battle["errored"]:
        return "errored generation"
    if any(not m["content"].strip() for side in ("a", "b") for m in battle[f"conversation_{side}"]
           if m["role"] == "assistant"):
        return "empty answer"
    if pair["chosen"] == pair["rejected"]:
        return "identical answers"  # no preference to learn, and the pref stage rejects such pairs
    return None


def export(domain: str, out_dir: Path | None = None) -> tuple[Path, Path, int, int, dict[str, int]]:
    """Write battles.jsonl and pairs.jsonl; return (battles file, pairs file, battles, pairs, {reason: pairs
    skipped for it}) with the reasons of unusable()."""
    path = db_path(domain)
    if not path.is_file():
        raise PackError(f"no votes yet for domain '{domain}': {show_path(path)} does not exist. "
                        f"Start the arena (make domain={domain} serve) and vote first.")
    store = Store(path)
    out_dir = Path(out_dir or votes_dir(run_dir(domain)))
    out_dir.mkdir(parents=True, exist_ok=True)
    battles = store.voted_battles()
    pairs, skipped = [], {"errored generation": 0, "empty answer": 0, "identical answers": 0}
    for battle in battles:
        pair = preference_pair(battle)
        if pair is None:
            continue
        why = unusable(battle, pair)
        if why:
            skipped[why] += 1
        else:
            pairs.append(pair)
    # Write then rename, so a pack that lists pairs.jsonl never reads a half-written file.
    files = []
    for name, rows in (("battles.jsonl", battles), ("pairs.jsonl", pairs)):
        tmp = out_dir / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out_dir / name)
        files.append(out_dir / name)
    return files[0], files[1], len(battles), len(pairs), skipped


def yaml_snippet(domain: str, pairs_file: Path) -> str:
    """The pref.datasets entry that makes the next run train on the exported pairs."""
    rel = os.path.relpath(Path(pairs_file).resolve(), (domains_dir() / domain).resolve())
    return ("pref:\n  datasets:\n"
            f"    - {{path: {rel}, licence: permissive, licence_name: arena votes of this deployment}}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.pairs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write runs/<domain>/votes/battles.jsonl and pairs.jsonl")
    ex.add_argument("--domain", required=True)
    ex.add_argument("--out", type=Path, help="output folder (default runs/<domain>/votes)")
    sm = sub.add_parser("summary", help="print the leaderboard numbers as JSON")
    sm.add_argument("--domain", required=True)
    sm.add_argument("--tuned-model", help="served name of the tuned model (default: the domain)")
    sm.add_argument("--base-model", help="served name of the base model (default: <domain>-base)")
    args = ap.parse_args(argv)
    return cli.run(lambda: _command(args))


def _command(args) -> None:
    if args.command == "export":
        battles_file, pairs_file, nb, np_, skipped = export(args.domain, args.out)
        print(f"{nb} voted battles -> {show_path(battles_file)}")
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.items() if n)
        note = f" ({sum(skipped.values())} skipped: {reasons})" if reasons else ""
        print(f"{np_} preference pairs (decisive votes){note} -> {show_path(pairs_file)}")
        print(f"\nTo train on them, add this source to domains/{args.domain}/pack.yaml "
              "(next to the existing pref datasets):\n")
        print(yaml_snippet(args.domain, pairs_file))
    else:
        path = db_path(args.domain)
        if not path.is_file():
            raise PackError(f"no votes yet: {show_path(path)} does not exist")
        s = Store(path).summary(args.tuned_model or args.domain, args.base_model or f"{args.domain}-base")
        print(json.dumps(s, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
