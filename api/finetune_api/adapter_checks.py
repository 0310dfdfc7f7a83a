"""Whether an adapter can be served: its files against its manifest, and its facts against
a server. Also the adapter's identity, the manifest digest (`files_digest`).

Standard library only, and self-contained, on purpose: this whole file is the program the
`verify-adapters` init container of a vLLM server runs (`python3 -c <this file> <plan>`),
with the serving image's own Python, where none of our packages is installed. Only a pod
can read a PVC, so the checks the operator runs on what it can read (a FineTuneJob's spec
and status, adapter files under `pvc_root`) run again here, the same code, over the mounted
files before vLLM loads anything. Inside the package it is imported like any module: by
the operator, and by `AdapterManifest.digest`, so the digest has one definition.

Reasons are plain strings (`finetune_api.constants.Reason` cannot be imported in the pod);
a test holds them to the constants.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable

MANIFEST_FILENAME = "finetune-manifest.json"
"""`constants.ADAPTER_MANIFEST_FILENAME`, which this file cannot import in the pod."""


def files_digest(files: Iterable[tuple[str, str]]) -> str:
    """The adapter manifest's digest: one sha256 over the (name, sha256) pairs of its files
    sorted by name, the whole adapter's identity."""
    h = hashlib.sha256()
    for name, sha256 in sorted(files, key=lambda f: f[0]):
        h.update(f"{name}\0{sha256}\n".encode())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def base_model_identity(model: dict | None) -> str | None:
    """`name` and `hf://name` are the same model; other URIs compare as written."""
    if not model:
        return None
    if model.get("name"):
        return model["name"]
    uri = model.get("uri")
    return uri[len("hf://") :] if uri and uri.startswith("hf://") else uri


def adapter_problems(facts: dict, server: dict) -> list[list[str]]:
    """Why an adapter cannot be served, as [reason, message] pairs (empty: compatible).

    `facts`: what is known about the adapter: baseModel {name, uri, revision},
    revisionDeclared (True when the revision is a spec's, not a resolved commit), r,
    targetModules, useDoRA, modulesToSave. `server`: baseModel, maxRank (the
    AdapterDeployment's limit), vllmMaxRank, servableModules. Unknown facts are not checked.
    """
    name = facts.get("name", "adapter")
    problems = []

    want, have = server.get("baseModel") or {}, facts.get("baseModel") or {}
    source = facts.get("baseModelFrom")
    if source and not (want.get("name") or (want.get("uri") or "").startswith("hf://")):
        # A PEFT config names a Hub id: comparable with a Hub base only, not with a base
        # served from a volume or a bucket.
        have = {}
    # Hub ids are case-insensitive; a PEFT config holds the id as its user typed it.
    fold = (lambda x: x.lower()) if source else (lambda x: x)
    have_id, want_id = base_model_identity(have), base_model_identity(want)
    if have_id and want_id and fold(have_id) != fold(want_id):
        problems.append(
            [
                "BaseModelMismatch",
                (
                    f"adapter {name!r} was trained on {have_id!r}"
                    + (f" ({source})" if source else "")
                    + f", but this deployment serves {want_id!r}; serve it on "
                    "its own base model or retrain it on this one"
                ),
            ]
        )
    elif have_id:
        a, b = have.get("revision"), want.get("revision")
        if facts.get("revisionDeclared"):
            differ = (a or "default branch") != (b or "default branch")
        else:  # a resolved commit: comparable only with a pinned revision
            differ = bool(a and b and a != b)
        if differ:
            problems.append(
                [
                    "BaseModelMismatch",
                    (
                        f"adapter {name!r} was trained on revision "
                        f"{a or 'default branch'!r} of {have_id!r}, but this "
                        f"deployment serves revision {b or 'default branch'!r}; set "
                        "spec.baseModel.revision to the adapter's"
                    ),
                ]
            )
    r = facts.get("r")
    if r is not None:
        limit, vllm_max = server.get("maxRank"), server.get("vllmMaxRank")
        if vllm_max and r > vllm_max:
            problems.append(
                [
                    "RankAboveLimit",
                    (
                        f"adapter {name!r} has rank {r}; vLLM serves ranks up to "
                        f"{vllm_max}; retrain it with a lower lora.r"
                    ),
                ]
            )
        elif limit and r > limit:
            problems.append(
                [
                    "RankAboveLimit",
                    (
                        f"adapter {name!r} has rank {r}, above spec.maxLoraRank "
                        f"({limit}); raise spec.maxLoraRank to at least {r}"
                    ),
                ]
            )
    servable = set(server.get("servableModules") or [])
    targets = facts.get("targetModules")
    if isinstance(targets, str):
        # PEFT stores a regular expression as a plain string: only `all-linear` is checkable.
        targets = [targets] if targets == "all-linear" else None
    if servable and targets:
        bad = sorted(t for t in targets if t not in servable)
        if bad:
            problems.append(
                [
                    "UnsupportedTargetModules",
                    (
                        f"adapter {name!r} adapts {bad}, which vLLM cannot serve LoRA "
                        f"on; servable modules: {sorted(servable)}; retrain with "
                        "lora.targetModules from that list"
                    ),
                ]
            )
    if facts.get("useDoRA"):
        problems.append(
            [
                "UnsupportedAdapterFeature",
                (
                    f"adapter {name!r} is a DoRA adapter, which vLLM does not serve; "
                    "merge it into the base (AdapterMerge) or retrain without useDoRA"
                ),
            ]
        )
    if facts.get("modulesToSave"):
        problems.append(
            [
                "UnsupportedAdapterFeature",
                (
                    f"adapter {name!r} saves full modules {facts['modulesToSave']}, "
                    "which vLLM does not load; retrain without modules_to_save"
                ),
            ]
        )
    return problems


def verify_adapter_dir(directory: str, expected: dict) -> tuple[list[list[str]], dict]:
    """Check an adapter's files against its manifest, and read what it says about itself.

    -> (problems as [reason, message], facts for `adapter_problems`). `expected`: name,
    sha256 (the digest a FineTuneJob recorded, if any), manifest (file name), uri (what
    the user wrote, e.g. `pvc://claim/path`: messages name it rather than `directory`,
    which is only where this process happens to see the files).
    """
    name = expected.get("name", "adapter")
    where = expected.get("uri") or directory
    manifest_path = os.path.join(directory, expected.get("manifest", MANIFEST_FILENAME))
    if not os.path.isdir(directory):
        return [
            [
                "AdapterFilesMissing",
                (
                    f"adapter {name!r}: {where} does not exist; check "
                    "the adapter's URI (the training job may have written elsewhere)"
                ),
            ]
        ], {}

    facts = {"name": name}
    problems = []
    config_path = os.path.join(directory, "adapter_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as fh:
            peft = json.load(fh)
        facts.update(
            {
                "r": peft.get("r"),
                "targetModules": peft.get("target_modules"),
                "useDoRA": bool(peft.get("use_dora")),
                "modulesToSave": peft.get("modules_to_save") or None,
            }
        )
        # PEFT records the base it was trained on; a Hub id (`owner/name` or `name`) is
        # comparable, a local path of the training machine (`/models/x`, `./x`) is not.
        base_id = peft.get("base_model_name_or_path")
        if isinstance(base_id, str) and re.match(
            r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$", base_id
        ):
            facts["baseModel"] = {
                "name": base_id,
                **({"revision": peft["revision"]} if isinstance(peft.get("revision"), str) else {}),
            }
            facts["revisionDeclared"] = False
            facts["baseModelFrom"] = "base_model_name_or_path in its adapter_config.json"
    if not os.path.isfile(manifest_path):
        # Not written by our worker: check what vLLM itself needs to load it.
        weights = [
            w
            for w in ("adapter_model.safetensors", "adapter_model.bin")
            if os.path.isfile(os.path.join(directory, w))
        ]
        missing = ([] if os.path.isfile(config_path) else ["adapter_config.json"]) + (
            [] if weights else ["adapter_model.safetensors"]
        )
        if missing:
            problems.append(
                ["AdapterFilesMissing", f"adapter {name!r}: {missing} not found in {where}"]
            )
        # Its identity is the digest of its files, by the manifest's formula: new files,
        # new digest, and the server rolls to them.
        listed = []
        for root, _dirs, files in os.walk(directory):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), directory).replace(os.sep, "/")
                listed.append((rel, file_sha256(os.path.join(root, f))))
        facts["sha256"] = files_digest(listed)
        if expected.get("sha256") and expected["sha256"] != facts["sha256"]:
            problems.append(
                [
                    "AdapterChecksumMismatch",
                    (
                        f"adapter {name!r}: no {os.path.basename(manifest_path)} in "
                        f"{where}, and its files' digest {facts['sha256'][:12]}... is not "
                        f"the expected {expected['sha256'][:12]}...; the files changed "
                        "since they were checked, or they are not the adapter its "
                        "FineTuneJob recorded"
                    ),
                ]
            )
        return problems, facts
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    base = manifest.get("baseModel") or {}
    facts.pop("baseModelFrom", None)  # the manifest says what the worker resolved
    facts.update(
        {
            "baseModel": base,
            "revisionDeclared": False,
            "r": manifest.get("r"),
            "targetModules": manifest.get("targetModules"),
            "useDoRA": bool(manifest.get("useDoRA") or facts.get("useDoRA")),
        }
    )
    missing, changed = [], []
    for entry in manifest.get("files") or []:
        path = os.path.join(directory, entry["name"])
        if not os.path.isfile(path):
            missing.append(entry["name"])
        elif (
            os.path.getsize(path) != entry.get("sizeBytes") or file_sha256(path) != entry["sha256"]
        ):
            changed.append(entry["name"])
    if missing:
        problems.append(
            [
                "AdapterFilesMissing",
                (
                    f"adapter {name!r}: files listed in its manifest are missing from "
                    f"{where}: {missing}; copy the whole adapter directory again"
                ),
            ]
        )
    if changed:
        problems.append(
            [
                "AdapterChecksumMismatch",
                (
                    f"adapter {name!r}: files differ from their manifest checksums in "
                    f"{where}: {changed}; the copy is corrupt or was modified"
                ),
            ]
        )
    facts["sha256"] = files_digest((f["name"], f["sha256"]) for f in manifest.get("files") or [])
    if expected.get("sha256") and facts["sha256"] != expected["sha256"]:
        problems.append(
            [
                "AdapterChecksumMismatch",
                (
                    f"adapter {name!r}: the manifest in {where} has digest "
                    f"{facts['sha256'][:12]}..., but its FineTuneJob recorded "
                    f"{expected['sha256'][:12]}...; the directory holds a different "
                    "adapter"
                ),
            ]
        )
    return problems, facts


def main(argv: list[str]) -> int:
    """The init container's entry point: argv[1] is the plan, JSON
    {server: (adapter_problems' `server`), adapters: [{name, path, uri, sha256, manifest}]}.
    Exit 1 with every problem in the termination log when any adapter fails."""
    plan = json.loads(argv[1])
    failures = []
    for adapter in plan["adapters"]:
        problems, facts = verify_adapter_dir(adapter["path"], adapter)
        problems += adapter_problems(facts, plan["server"])
        for reason, message in problems:
            failures.append(f"{reason}: {message}")
        if not problems:
            print(f"adapter {adapter['name']!r} at {adapter['path']}: ok", flush=True)
    if failures:
        text = "\n".join(failures)
        print(text, file=sys.stderr, flush=True)
        try:
            path = os.environ.get("TERMINATION_LOG", "/dev/termination-log")
            with open(path, "w") as fh:
                fh.write(text[:4000])
        except OSError:
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
