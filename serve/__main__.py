"""Command line of serving; the Makefile's `serve`, `stop` and `all` call it.

    python -m serve serve --domain finance              # foreground; Ctrl-C stops every child
    python -m serve serve --domain finance --detach     # return once everything answers
    python -m serve stop --domain finance
    python -m serve serve --domain finance serve.port=9000 serve.max_model_len=1024
"""
from __future__ import annotations

import argparse
import signal
import sys

from core import cli

EPILOG = """environment: HOST (bind address, default 127.0.0.1), PORT / BASE_PORT / ARENA_PORT (ports, default
  serve.port 8000 / serve.base_port 8001 / serve.arena_port 7860), API_KEY (else generated once and kept in
  runs/<domain>/serve/api_key, mode 0600), ARENA_USERS="name:password,..." (arena logins; needed, with a
  given key, for any HOST beyond loopback), GPU=0|1 (force CPU or CUDA), RUNS_DIR, DOMAINS_DIR.
logs: runs/<domain>/serve/{tuned,base,arena}.log"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the merged and the base model with vLLM, then the arena",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", required=True, help="a folder under domains/, e.g. finance")
    p.add_argument("--detach", action="store_true", help="leave the servers running and return once ready")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="pack overrides, e.g. serve.port=9000")
    p = sub.add_parser("stop", help="stop the servers and arena a serve of this domain started")
    p.add_argument("--domain", required=True)
    args = parser.parse_args(argv)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # while starting, SIGTERM cleans up like Ctrl-C
    return cli.run(lambda: _command(args), interrupted="interrupted: every child process was stopped")


def _command(args) -> int:
    from core.layout import run_dir, serve_dir
    from core.pack import load_pack
    from serve import launch, procs

    if args.command == "stop":
        procs.stop_domain(serve_dir(run_dir(args.domain)), args.domain)
        return 0
    pack = load_pack(args.domain, args.overrides)
    return launch.serve(pack, run_dir(pack.name), args.overrides, detach=args.detach)


if __name__ == "__main__":
    sys.exit(main())
