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


Subcommands = dict[str, tuple[str, str]]
"""name -> (module with a `main(argv)`, one line of help)"""


def usage(prog: str = "finetune-operator", subcommands: Subcommands = SUBCOMMANDS) -> str:
    width = max(len(name) for name in subcommands)
    lines = [f"usage: {prog} <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in subcommands.items()]
    return "\n".join(lines)


def dispatch(prog: str, subcommands: Subcommands, argv: list[str] | None = None) -> int:
    """Run the subcommand named first in `argv`, importing only its module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(prog, subcommands))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in subcommands:
        print(f"{prog}: unknown command {name!r}\n\n{usage(prog, subcommands)}", file=sys.stderr)
        return 2
    module = importlib.import_module(subcommands[name][0])
    return int(module.main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    return dispatch("finetune-operator", SUBCOMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
