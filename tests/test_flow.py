"""The Prefect flow's pieces that need no pipeline run: which failures it retries, and how its
overrides set params (the flow end to end is in test_quickstart)."""

import pytest
import yaml
from prefect.states import Completed, Failed

from flows.retrain import (
    StageFailed,
    apply_overrides,
    overridden,
    retry_if_transient,
    run_stage,
)
from tests.helpers.project import PROJECT


def test_transient_stage_failures_are_retried_and_others_are_not():
    locked = StageFailed("train", 255, "ERROR: Unable to acquire lock. Most likely another DVC process is running")
    bad_data = StageFailed("validate", 1, "error: data/train.jsonl: not_null failed: 3 rows")
    assert retry_if_transient(None, None, Failed(data=locked))
    assert not retry_if_transient(None, None, Failed(data=bad_data))
    assert not retry_if_transient(None, None, Failed(data=ValueError("not a stage failure")))
    assert not retry_if_transient(None, None, Completed(data="ran"))
    assert run_stage.retries == 3 and run_stage.retry_condition_fn is retry_if_transient
    assert list(run_stage.retry_delay_seconds) == [10, 20, 40]  # exponential backoff
    assert "stage 'validate' failed (exit 1)" in str(bad_data)


def test_overrides_set_params_as_dvc_exp_run_does_and_are_validated_first(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text((PROJECT / "params.yaml").read_text())
    apply_overrides(["train.learning_rate=1e-4", "push.gate.minimum=0.5", "evaluate.max_active_dims=[16, 32]"],
                    params_file)
    params = yaml.safe_load(params_file.read_text())
    assert params["train"]["learning_rate"] == 1e-4 and params["push"]["gate"]["minimum"] == 0.5
    assert params["evaluate"]["max_active_dims"] == [16, 32]
    before = params_file.read_text()
    with pytest.raises(Exception, match="learning_rat"):
        apply_overrides(["train.learning_rat=1e-4"], params_file)  # an unknown key
    with pytest.raises(ValueError, match="not key=value"):
        apply_overrides(["train.learning_rate"], params_file)
    assert params_file.read_text() == before  # nothing written


def test_overrides_change_values_and_nothing_else_and_are_undone_after_the_run(tmp_path):
    """params.yaml keeps its comments (the schema's documentation) and layout: only the overridden
    lines differ, a new key is one new line; after the run the file is back byte for byte."""
    import difflib

    params_file = tmp_path / "params.yaml"
    original = (PROJECT / "params.yaml").read_bytes()
    params_file.write_bytes(original)
    with overridden(["train.learning_rate=0.001", "push.gate.minimum=0.5", "evaluate.max_active_dims=[16, 32]"],
                    keep=False, params_file=params_file):
        changed = [line for line in difflib.unified_diff(original.decode().splitlines(), params_file.read_text().splitlines(),
                                                          lineterm="", n=0) if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        assert changed == ["-  learning_rate: 0.0003", "+  learning_rate: 0.001",
                           "+  max_active_dims: [16, 32]",
                           "-    minimum: null             #   this value", "+    minimum: 0.5              #   this value"]
    assert params_file.read_bytes() == original
    with pytest.raises(RuntimeError), overridden(["train.epochs=2"], keep=False, params_file=params_file):
        raise RuntimeError("a stage failed")
    assert params_file.read_bytes() == original  # restored after a failure too
    with overridden(["train.epochs=2"], keep=True, params_file=params_file):
        pass
    assert yaml.safe_load(params_file.read_text())["train"]["epochs"] == 2  # --keep-overrides


def test_the_kubernetes_base_job_template_passes_prefects_checks_and_renders_a_gpu_job():
    """deploy/kubernetes/base-job-template.json (no cluster runs it here): Prefect's own checks on
    a work pool's template (every placeholder a declared variable) and on job variables (the
    variables' JSON schema; the image required), everything prefect-kubernetes' own default declares
    kept, and the job it renders: the image, GPUs, the secret's environment, /dev/shm."""
    import json

    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import ValidationError, validate
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import (
        KubernetesWorker,
        KubernetesWorkerJobConfiguration,
    )

    template = json.loads((PROJECT / "deploy/kubernetes/base-job-template.json").read_text())
    WorkPoolCreate(name="k8s-gpu", type="kubernetes", base_job_template=template)
    broken = json.loads(json.dumps(template).replace("{{ secret_name }}", "{{ secret }}"))
    with pytest.raises(ValueError, match="undeclared variable\\(s\\): secret"):
        WorkPoolCreate(name="k8s-gpu", type="kubernetes", base_job_template=broken)
    stock = KubernetesWorker.get_default_base_job_template()
    assert stock["job_configuration"].keys() <= template["job_configuration"].keys()
    assert stock["variables"]["properties"].keys() <= template["variables"]["properties"].keys()

    variables = {"image": "registry.example.com/sparse-pipeline:1", "gpus": 2}
    validate(variables, template["variables"], raise_on_error=True, preprocess=True)
    for wrong in ({"gpus": 2}, {**variables, "gpus": "two"}):  # no image; not a number
        with pytest.raises(ValidationError):
            validate(wrong, template["variables"], raise_on_error=True, preprocess=True)

    # what the worker renders (from_template_and_values without its block lookups, which need a
    # server): the schema's defaults under the given values, prefect's templating, validated by
    # prefect-kubernetes' own job configuration
    defaults = KubernetesWorkerJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    rendered = apply_values(template["job_configuration"], {**defaults, **variables})
    job = KubernetesWorkerJobConfiguration(**rendered).job_manifest
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == variables["image"] and container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["envFrom"] == [{"secretRef": {"name": "sparse-pipeline"}}]
    assert pod["volumes"] == [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    assert (job["apiVersion"], job["kind"], pod["restartPolicy"]) == ("batch/v1", "Job", "Never")
