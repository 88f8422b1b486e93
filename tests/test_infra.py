"""infra/k8s-work-pool.yaml: a Prefect Kubernetes work pool's base job template, checked as
Prefect renders it (its own templating) without a cluster."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml
from prefect.utilities.templating import apply_values, find_placeholders

TEMPLATE = Path(__file__).resolve().parents[1] / "infra" / "k8s-work-pool.yaml"


def test_the_k8s_work_pool_template_renders_a_gpu_job_with_the_dvc_cache() -> None:
    template = yaml.safe_load(TEMPLATE.read_text())
    variables = template["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    declared = set(variables["properties"])
    assert used == declared, (used - declared, declared - used)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    given = {"name": "round-1", "command": "prefect flow-run execute", "labels": {"a": "b"}}
    values = defaults | given
    jsonschema.validate(values, variables)
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "xopd:latest" and container["args"] == "prefect flow-run execute"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["dvc-cache"] == container["workingDir"] + "/.dvc/cache"
    claims = {v["name"]: v for v in pod["volumes"]}
    assert claims["dvc-cache"]["persistentVolumeClaim"]["claimName"] == "xopd-dvc-cache"
    assert container["env"]["DO_NOT_TRACK"] == "1"
    assert not find_placeholders(job)  # every value the Job needs has a default
