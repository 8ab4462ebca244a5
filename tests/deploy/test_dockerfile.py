"""Dockerfile.airflow: the official Airflow image of the pinned version, cpu and gpu targets,
Airflow pinned on every pip call, packages baked in at build time (no _PIP_ADDITIONAL_REQUIREMENTS).

No Docker engine runs here, so these read the Dockerfile; what its pip calls install is the
environment the rest of the suite runs in (requirements-airflow.txt + constraints-airflow.txt).
"""

from __future__ import annotations

import fnmatch
import re

import pytest

from tests.deploy.compose import DOCKERFILE, ROOT

TEXT = DOCKERFILE.read_text()
LINES = re.sub(r"\\\n\s*", " ", TEXT).splitlines()  # continuation lines joined


def pinned(name: str, path: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)", (ROOT / path).read_text(), re.M)
    assert match, f"{name} not pinned in {path}"
    return match.group(1)


def arg_default(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)", TEXT, re.M)
    assert match, name
    return match.group(1)


def stages() -> dict[str, list[str]]:
    """stage name -> its instructions."""
    found: dict[str, list[str]] = {}
    current = None
    for line in LINES:
        if m := re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I):
            current = m.group(2)
            found[current] = [line]
        elif current and line.strip() and not line.lstrip().startswith("#"):
            found[current].append(line)
    return found


def test_base_is_the_official_image_of_the_pinned_airflow_and_python():
    version = arg_default("AIRFLOW_VERSION")
    assert version == pinned("apache-airflow", "requirements-airflow.txt") == "3.3.2"
    assert version == pinned("apache-airflow", "constraints-airflow.txt")
    assert arg_default("PYTHON_VERSION") == "3.11"
    assert stages()["base"][0].split()[1] == "apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}"


def test_cpu_and_gpu_targets_are_what_compose_builds(model):
    built = {svc["build"]["target"] for svc in model["services"].values() if svc.get("build")}
    assert built == {"cpu", "gpu"} and built <= set(stages())
    images = {svc["build"]["target"]: svc["image"] for svc in model["services"].values() if svc.get("build")}
    assert images["cpu"] != images["gpu"]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_every_pip_call_pins_airflow_and_uses_the_constraints(target):
    stage = stages()[target]
    installs = [line for line in stage if "pip install" in line]
    assert installs
    for line in installs:
        for call in line.split("&&"):
            if "pip install" in call:
                assert '"apache-airflow==${AIRFLOW_VERSION}"' in call, call
                if " -r " in call:
                    assert "-c /opt/vtm/constraints-airflow.txt" in call
                    assert "-r /opt/vtm/requirements-airflow.txt" in call
    assert any(line.startswith("COPY") and "dags/" in line for line in stage)
    assert any("VTM_GIT_COMMIT=${VTM_GIT_COMMIT}" in line for line in stage)


def test_cpu_image_takes_cpu_torch_and_gpu_image_cuda_torch():
    cpu, gpu = " ".join(stages()["cpu"]), " ".join(stages()["gpu"])
    assert "https://download.pytorch.org/whl/cpu" in cpu and "torch.version.cuda is None" in cpu
    assert "download.pytorch.org" not in gpu and "assert torch.version.cuda" in gpu
    # The GPU image installs the CUDA wheels that the constraints pin (the ones tested here).
    constraints = (ROOT / "constraints-airflow.txt").read_text()
    assert re.search(r"^nvidia-cudnn-cu\d+==", constraints, re.M)
    assert pinned("torch", "requirements-airflow.txt") == pinned("torch", "constraints-airflow.txt")


def test_no_install_at_container_start(model):
    for path in ("Dockerfile.airflow", "docker-compose-mlops.yml", ".env.example"):
        code = [line for line in (ROOT / path).read_text().splitlines() if not line.lstrip().startswith("#")]
        assert not any("_PIP_ADDITIONAL_REQUIREMENTS" in line for line in code), path
    for name, svc in model["services"].items():
        assert "_PIP_ADDITIONAL_REQUIREMENTS" not in (svc.get("environment") or {}), name


def test_dockerignore_keeps_what_the_image_copies_and_nothing_else():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*"

    def sent(path: str) -> bool:
        keep = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                keep = negate
        return keep

    copied = [src for line in LINES if line.startswith("COPY")
              for src in line.split()[1:-1] if not src.startswith("--")]
    assert copied
    for src in copied:
        assert sent(src.rstrip("/")), src
    for secret in (".env", ".local/airflow/simple_auth_manager_passwords.json.generated", ".venv/bin/python"):
        assert not sent(secret), secret
