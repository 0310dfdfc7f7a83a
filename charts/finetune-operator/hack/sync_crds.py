#!/usr/bin/env python3
"""Copy the generated CRDs from `crds/` into the chart as Helm templates.

`crds/` (written by `finetune-operator crds` from the pydantic models) is the one source
of truth; the chart only wraps each file: rendered when `crds.enabled`, labelled like the
rest of the release, and annotated `helm.sh/resource-policy: keep` when `crds.keep`, so
`helm uninstall` never deletes the CRDs and with them every user's FineTuneJob.

    python charts/finetune-operator/hack/sync_crds.py          # write the templates
    python charts/finetune-operator/hack/sync_crds.py --check  # exit 1 and diff on drift

`make chart-crds` runs the first; tests/delivery/test_chart.py runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

CHART = Path(__file__).resolve().parent.parent
REPO = CHART.parent.parent
SOURCE = REPO / "crds"
TARGET = CHART / "templates" / "crds"

OPEN = "{{- if .Values.crds.enabled }}\n"
CLOSE = "{{- end }}\n"
# Inserted right after `metadata:` / `  name: ...` of each generated CRD.
METADATA_EXTRA = (
    "  labels:\n"
    '    {{- include "finetune-operator.labels" . | nindent 4 }}\n'
    "  {{- if .Values.crds.keep }}\n"
    "  annotations:\n"
    "    # Uninstalling the chart must not delete the CRDs: that would delete every\n"
    "    # FineTuneJob, AdapterMerge and AdapterDeployment in the cluster.\n"
    "    helm.sh/resource-policy: keep\n"
    "  {{- end }}\n"
)


class SyncError(RuntimeError):
    pass


def template_name(source: Path) -> str:
    return source.name  # e.g. finetune.dev_finetunejobs.yaml


def render_template(source: Path) -> str:
    """The chart template for one generated CRD file."""
    text = source.read_text()
    if "{{" in text or "}}" in text:
        raise SyncError(
            f"{source}: contains '{{{{' or '}}}}', which Helm would read as a "
            "template action; change the model's description or escape it here"
        )
    body = [line for line in text.splitlines(keepends=True) if not line.startswith("#")]
    out: list[str] = []
    in_metadata = inserted = False
    for line in body:
        out.append(line)
        if line.rstrip("\n") == "metadata:":
            in_metadata = True
        elif in_metadata and not inserted and line.startswith("  name:"):
            out.append(METADATA_EXTRA)
            inserted = True
    if not inserted:
        raise SyncError(f"{source}: no top-level `metadata:` with a `name:` line; is it a CRD?")
    header = (
        f"{{{{- /* Copied from crds/{source.name} by charts/finetune-operator/hack/"
        "sync_crds.py (make chart-crds). Do not edit: regenerate. */}}\n"
    )
    return header + OPEN + "".join(out) + CLOSE


def expected() -> dict[str, str]:
    sources = sorted(SOURCE.glob("*.yaml"))
    if not sources:
        raise SyncError(f"no CRDs in {SOURCE}; run `finetune-operator crds` first")
    return {template_name(s): render_template(s) for s in sources}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 with a diff if the chart's copies drifted",
    )
    args = parser.parse_args(argv)
    want = expected()
    have = {p.name: p.read_text() for p in TARGET.glob("*.yaml")} if TARGET.exists() else {}
    if args.check:
        problems = []
        for name in sorted(set(want) | set(have)):
            if name not in have:
                problems.append(f"missing {TARGET / name}\n")
            elif name not in want:
                problems.append(f"{TARGET / name} has no source in {SOURCE}\n")
            elif have[name] != want[name]:
                problems.extend(
                    difflib.unified_diff(
                        have[name].splitlines(keepends=True),
                        want[name].splitlines(keepends=True),
                        f"chart/{name}",
                        f"from crds/{name}",
                    )
                )
        if problems:
            sys.stdout.write("".join(problems))
            print("\nthe chart's CRDs differ from crds/: run `make chart-crds`", file=sys.stderr)
            return 1
        return 0
    TARGET.mkdir(parents=True, exist_ok=True)
    for name in set(have) - set(want):
        (TARGET / name).unlink()
    for name, text in want.items():
        (TARGET / name).write_text(text)
    print(f"wrote {len(want)} CRD templates to {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
