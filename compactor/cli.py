"""The command line: thin, parses arguments, calls the library, prints.

User errors print one line and exit 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .errors import CompactionError

__all__ = ["main"]


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    demo.run(args.out, amount=args.amount, epochs=args.epochs, force=args.force)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compactor",
        description="Turn models pruned with torch.nn.utils.prune into smaller, faster, exactly equivalent dense models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo",
        help="train, prune, compact and time the tutorials' LeNet on bundled handwritten digits",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  compactor demo --out compactor-demo",
    )
    p.add_argument("--out", default="compactor-demo", help="folder for the artifacts (default: %(default)s)")
    p.add_argument("--amount", type=float, default=0.5, help="ln_structured amount per layer (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite existing artifacts")
    p.set_defaults(func=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UserError, CompactionError, FileExistsError, FileNotFoundError) as exc:
        print(f"compactor {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
