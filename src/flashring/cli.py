"""The ``flashring`` command: ``flashring bench ...``, ``flashring train ...``.

Each subcommand lives in its own module with a ``main(argv) -> int``; they are imported lazily so ``flashring
--help`` stays fast and one subcommand's optional dependencies never break another.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    "bench": ("flashring.bench", "benchmark flashring against PyTorch's attention backends (GPU: full table; "
                                 "CPU: a small, quick run)"),
    "train": ("flashring.train", "train the long-context GPT example with a choice of attention"),
}


def _usage() -> str:
    lines = ["usage: flashring <command> [options]", "", "commands:"]
    lines += [f"  {name:<8}{help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`flashring <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"flashring: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
