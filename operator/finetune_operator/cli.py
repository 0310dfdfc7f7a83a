"""`finetune-operator` command line: one entry point, subcommands loaded lazily.

Each subcommand lives with the code it drives (`plan` with the planner, `crds` with the API
models); this module only dispatches, so `--help` stays fast
and the operator's image never imports what it does not run.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "crds": ("finetune_api.crdgen", "write the CRD YAML generated from the API models"),
    "plan": ("finetune_operator.planner.cli", "predict peak GPU memory and choose a plan"),
    "run": ("finetune_operator.main", "run the operator (kopf) against the current cluster"),
}


def usage() -> str:
    lines = ["usage: finetune-operator <command> [options]", "", "commands:"]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"finetune-operator: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
