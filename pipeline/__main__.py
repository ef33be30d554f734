"""Command line of the pipeline; the Makefile calls it, and so can you.

    python -m pipeline validate --domain finance                  # check pack.yaml and every data file
    python -m pipeline run sft --domain finance sft.learning_rate=1e-4
    python -m pipeline run all --domain finance --force
    python -m pipeline show --domain finance data=hub              # the resolved pack as YAML
    python -m pipeline keys                                        # every pack key, its type and default
    NPROC=2 python -m pipeline run sft --domain finance            # training stages under accelerate launch
"""
from __future__ import annotations

import argparse
import sys

from core import cli
from core.errors import PackError
from core.stages import STAGES

EPILOG = """overrides: any pack key as key.path=value, e.g. sft.learning_rate=1e-4, data=hub,
  pref.method=orpo, cpt.enabled=false, eval.prompts.0.path=data/other.jsonl (see `keys`).
environment: RUNS_DIR (default ./runs), DOMAINS_DIR (default ./domains), HF_HUB_OFFLINE (default 1)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("validate", "check the pack and its data files, listing every problem"),
                       ("show", "print the resolved pack (after overrides) as YAML"),
                       ("run", "run stages up to STAGE, skipping those whose fingerprint is unchanged")):
        p = sub.add_parser(name, help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "run":
            p.add_argument("stage", choices=(*STAGES, "all"), help="the last stage to build ('all': every one)")
            p.add_argument("--force", action="store_true", help="rerun STAGE even when it is up to date")
        p.add_argument("--domain", required=True, help="a folder under domains/, e.g. finance")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="pack overrides")
    sub.add_parser("keys", help="list every pack key with its type, default and meaning")
    p = sub.add_parser("stage", help="(started by the runner under accelerate launch) one training stage on "
                                     "this rank, from the runner's spec file")
    p.add_argument("--spec", required=True, help="the JSON spec the runner wrote (pipeline/distributed.py)")
    # Overrides may follow --domain (as make writes them); argparse leaves those over as unknown.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]

    return cli.run(lambda: _command(args))


def _command(args) -> None:
    if args.command == "stage":
        from pipeline.runner import run_one_rank

        run_one_rank(args.spec)
        return
    if args.command == "keys":
        from core.overrides import describe

        print("\n".join(describe()))
        return
    from core.pack import load_pack

    pack = load_pack(args.domain, args.overrides)
    if args.command == "show":
        import yaml

        print(yaml.safe_dump(pack.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")
    elif args.command == "validate":
        from pipeline.validate import validate_data

        problems = validate_data(pack)
        if problems:
            raise PackError(problems, f"domain '{pack.name}' has problems")
        print(f"{pack.name}: pack.yaml and its data are valid")
    else:
        from pipeline.runner import run

        run(pack, args.stage, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
