"""Arena votes as training data: every voted battle, the decisive ones as preference pairs for the next
pref round (prompt/chosen/rejected), and the "both bad" ones as rated answers for pref.method=kto
(prompt/completion/label false), skipping and counting those that teach nothing. A tie teaches nothing.

    python -m core.pairs export --domain finance      # runs/finance/votes/{battles,pairs,kto}.jsonl (make export-votes)
    python -m core.pairs summary --domain finance     # the leaderboard numbers as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

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


def broken(battle: dict) -> str | None:
    """Why a battle's answers are no example of anything (an errored or missing generation, a blank answer),
    else None. The store refuses votes on such battles; databases from before that can still hold them."""
    if battle["errored"]:
        return "errored generation"
    if any(not m["content"].strip() for side in ("a", "b") for m in battle[f"conversation_{side}"]
           if m["role"] == "assistant"):
        return "empty answer"
    return None


def unusable(battle: dict, pair: dict) -> str | None:
    """Why a decisive vote's pair teaches nothing (or the wrong thing), else None."""
    if broken(battle):
        return broken(battle)
    if pair["chosen"] == pair["rejected"]:
        return "identical answers"  # no preference to learn, and the pref stage rejects such pairs
    return None


def rated_answers(battle: dict) -> list[dict]:
    """A "both bad" vote as KTO rows, each side's answer labelled false (one row when both sides said the same);
    [] for any other vote. Shaped as preference_pair's: strings for one turn, else the shared start as the prompt
    and that side's continuation as the completion."""
    if battle["winner"] != "tie (bothbad)":
        return []
    rows = []
    for side in ("a", "b"):
        conv = battle[f"conversation_{side}"]
        head = 2 if conv and conv[0]["role"] == "system" else 1
        prompt, completion = (conv[head - 1]["content"], conv[head]["content"]) if battle["turns"] == 1 else (
            conv[:head], conv[head:])
        if rows and rows[0]["completion"] == completion:
            continue
        rows.append({"prompt": prompt, "completion": completion, "label": False, "battle_id": battle["battle_id"],
                     "model": battle[f"model_{side}"], "rater": battle["rater"]})
    return rows


class Exported(NamedTuple):
    battles_file: Path
    pairs_file: Path
    kto_file: Path
    battles: int
    pairs: int
    rated: int  # rows of kto.jsonl
    skipped: dict[str, int]  # decisive votes whose pair teaches nothing, by unusable()'s reason
    skipped_bothbad: int  # both-bad votes with an errored or empty answer


def export(domain: str, out_dir: Path | None = None) -> Exported:
    """Write battles.jsonl, pairs.jsonl and kto.jsonl (written even when empty, so a pack can list it)."""
    path = db_path(domain)
    if not path.is_file():
        raise PackError(f"no votes yet for domain '{domain}': {show_path(path)} does not exist. "
                        f"Start the arena (make domain={domain} serve) and vote first.")
    store = Store(path)
    out_dir = Path(out_dir or votes_dir(run_dir(domain)))
    out_dir.mkdir(parents=True, exist_ok=True)
    battles = store.voted_battles()
    pairs, rated, bad = [], [], 0
    skipped = {"errored generation": 0, "empty answer": 0, "identical answers": 0}
    for battle in battles:
        pair = preference_pair(battle)
        rows = rated_answers(battle)
        if pair is not None:
            why = unusable(battle, pair)
            if why:
                skipped[why] += 1
            else:
                pairs.append(pair)
        elif rows:
            if broken(battle):
                bad += 1
            else:
                rated += rows
    # Write then rename, so a pack that lists pairs.jsonl never reads a half-written file.
    files = []
    for name, rows in (("battles.jsonl", battles), ("pairs.jsonl", pairs), ("kto.jsonl", rated)):
        tmp = out_dir / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out_dir / name)
        files.append(out_dir / name)
    return Exported(*files, len(battles), len(pairs), len(rated), skipped, bad)


def yaml_snippet(domain: str, pairs_file: Path, kto_file: Path | None = None) -> str:
    """The pref.datasets entry that makes the next run train on the exported pairs; with kto_file, the entry of
    the rated answers below it as a comment, to uncomment with pref.method: kto (the only method that reads
    single rated answers)."""
    def entry(file: Path) -> str:
        rel = os.path.relpath(Path(file).resolve(), (domains_dir() / domain).resolve())
        return f"- {{path: {rel}, licence: permissive, licence_name: arena votes of this deployment}}"

    out = f"pref:\n  datasets:\n    {entry(pairs_file)}"
    if kto_file is not None:
        out += ("\n    # with pref.method: kto, the both-bad answers too (thumbs-down rows):"
                f"\n    # {entry(kto_file)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.pairs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write runs/<domain>/votes/battles.jsonl, pairs.jsonl and kto.jsonl")
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
        ex = export(args.domain, args.out)
        print(f"{ex.battles} voted battles -> {show_path(ex.battles_file)}")
        reasons = ", ".join(f"{n} {why}" for why, n in ex.skipped.items() if n)
        note = f" ({sum(ex.skipped.values())} skipped: {reasons})" if reasons else ""
        print(f"{ex.pairs} preference pairs (decisive votes){note} -> {show_path(ex.pairs_file)}")
        note = f" ({ex.skipped_bothbad} votes skipped: an errored or empty answer)" if ex.skipped_bothbad else ""
        print(f"{ex.rated} rated answers (both-bad votes, label false; for pref.method=kto){note} "
              f"-> {show_path(ex.kto_file)}")
        print(f"\nTo train on them, add this source to domains/{args.domain}/pack.yaml "
              "(next to the existing pref datasets):\n")
        print(yaml_snippet(args.domain, ex.pairs_file, ex.kto_file))
    else:
        path = db_path(args.domain)
        if not path.is_file():
            raise PackError(f"no votes yet: {show_path(path)} does not exist")
        s = Store(path).summary(args.tuned_model or args.domain, args.base_model or f"{args.domain}-base")
        print(json.dumps(s, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
