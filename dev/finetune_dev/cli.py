"""`finetune-dev` command line: the developer tools, subcommands loaded lazily."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "cluster": ("finetune_dev.devcluster.cli", "start, stop or inspect the local control plane"),
    "demo": ("finetune_dev.demo.cli", "a real fine-tune through the operator, locally"),
}


def usage() -> str:
    lines = ["usage: finetune-dev <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"finetune-dev: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
