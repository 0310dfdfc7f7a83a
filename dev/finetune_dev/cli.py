"""`finetune-dev` command line: the developer tools, subcommands loaded lazily (the
operator's dispatcher, so both commands read and fail alike)."""

from __future__ import annotations

import sys

from finetune_operator.cli import dispatch

SUBCOMMANDS = {
    "cluster": ("finetune_dev.devcluster.cli", "start, stop or inspect the local control plane"),
    "demo": ("finetune_dev.demo.cli", "a real fine-tune through the operator, locally"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("finetune-dev", SUBCOMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
