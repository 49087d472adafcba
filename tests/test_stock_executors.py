"""Docker, Kubernetes and Vertex AI executors, checked with the stock workers' own classes.

Each test builds the pool's job configuration from the worker's base job template plus
our job variables (what the worker does for a flow run), then calls the worker's own
builder for what it would send: docker-py's create arguments (down to the HostConfig
docker-py sends to the engine), the Kubernetes Job manifest, the Vertex CustomJob spec.
No Docker engine, no cluster, no cloud: nothing here opens a connection.
"""

from __future__ import annotations

import datetime
import json
import uuid

import pytest

from prefect_xm import xm, xm_local
from prefect_xm.executors import (
    KUBERNETES_BASE_JOB_TEMPLATE,
    VERTEX_BASE_JOB_TEMPLATE,
    Docker,
    Kubernetes,
    Vertex,
    vertex_machine,
)
from prefect_xm.core.deployments import validate_job_variables

from conftest import REPO


def _flow_run():
    from prefect.client.schemas.objects import FlowRun

    return FlowRun(id=uuid.uuid4(), name="happy-otter", flow_id=uuid.uuid4())


def _check_schema(pool: str, template: dict, variables: dict) -> None:
    """Our variables are all declared by the pool's template, with the right JSON types."""
    validate_job_variables(pool, variables, template["variables"]["properties"])


def _exe(**kw):
    defaults = dict(name="train", kind="command", command=["python", "-m", "train"])
    defaults.update(kw)
    return xm.Executable(**defaults)


# ---------------------------------------------------------------------- Docker


async def _docker_create_kwargs(variables: dict) -> dict:
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    template = DockerWorker.get_default_base_job_template()
    _check_schema("docker", template, variables)
    config = await DockerWorkerJobConfiguration.from_template_and_values(template, variables)
    config.prepare_for_flow_run(_flow_run())

    class EngineVersion:  # what get_extra_hosts asks the engine; nothing else is called
        def version(self):
            return {"Version": "24.0.7"}

    return DockerWorker(work_pool_name="docker")._build_container_settings(EngineVersion(), config)


async def test_docker_cpus_memory_gpus_env_become_container_create_arguments():
    ex = Docker(xm.JobRequirements(cpu=2.5, memory="12GiB", a100=2), env={"WANDB_MODE": "offline"},
                volumes=["/data:/data"])
    variables = ex.job_variables_for(_exe(kind="container", command=None, image="docker://me/train:1"))
    assert variables == {
        "container_create_kwargs": {
            "nano_cpus": 2_500_000_000,
            "device_requests": [{"driver": "nvidia", "count": 2, "capabilities": [["gpu"]]}],
        },
        "mem_limit": "12g", "volumes": ["/data:/data"], "env": {"WANDB_MODE": "offline"}, "image": "me/train:1",
    }
    kwargs = await _docker_create_kwargs(variables)
    assert kwargs["image"] == "me/train:1"
    assert kwargs["command"] == "prefect flow-run execute"
    assert kwargs["mem_limit"] == "12g" and kwargs["nano_cpus"] == 2_500_000_000
    assert kwargs["environment"]["WANDB_MODE"] == "offline" and "PREFECT__FLOW_RUN_ID" in kwargs["environment"]
    # docker-py's own translation into the engine's HostConfig (what `containers.create` posts).
    from docker.models.containers import _create_container_args

    create = _create_container_args(dict(kwargs, version="1.44"))
    host = create["host_config"]
    assert host["NanoCpus"] == 2_500_000_000
    assert host["Memory"] == 12 * 1024**3
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": 2, "DeviceIDs": [],
                                       "Capabilities": [["gpu"]], "Options": {}}]
    assert host["Binds"] == ["/data:/data"]


async def test_docker_without_requirements_uses_the_templates_defaults():
    variables = Docker(image="python:3.11").job_variables_for(_exe())
    assert variables == {"image": "python:3.11"}
    kwargs = await _docker_create_kwargs(variables)
    assert kwargs["mem_limit"] is None and "nano_cpus" not in kwargs and "device_requests" not in kwargs


# ------------------------------------------------------------------ Kubernetes


def _k8s_template() -> dict:
    return json.loads((REPO / KUBERNETES_BASE_JOB_TEMPLATE).read_text())


async def _k8s_pod_spec(variables: dict) -> dict:
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = _k8s_template()
    _check_schema("kubernetes", template, variables)
    config = await KubernetesWorkerJobConfiguration.from_template_and_values(template, variables)
    config.prepare_for_flow_run(_flow_run())
    manifest = config.job_manifest
    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1"
    return manifest


async def test_kubernetes_requests_limits_gpus_and_accelerator_node_selector():
    ex = xm_local.Kubernetes(xm.JobRequirements(cpu=0.5, memory="1536MiB", a100_80gib=4), image="me/train:1",
                             namespace="ml", env={"A": "1"})
    variables = ex.job_variables_for(_exe())
    assert variables == {
        "namespace": "ml", "cpu_request": "500m", "cpu_limit": "500m", "memory_request": "1536Mi",
        "memory_limit": "1536Mi", "gpu_count": 4,
        "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"},
        "image": "me/train:1", "env": {"A": "1"},
    }
    manifest = await _k8s_pod_spec(variables)
    assert manifest["metadata"]["namespace"] == "ml"
    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "me/train:1"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["resources"] == {
        "limits": {"cpu": "500m", "memory": "1536Mi", "nvidia.com/gpu": 4},
        "requests": {"cpu": "500m", "memory": "1536Mi"},
    }
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}
    assert {"name": "A", "value": "1"} in container["env"]


async def test_kubernetes_without_gpus_has_no_gpu_limit_nor_selector():
    manifest = await _k8s_pod_spec(Kubernetes(xm.JobRequirements(cpu=4), image="me/train:1").job_variables())
    pod = manifest["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {"limits": {"cpu": "4"}, "requests": {"cpu": "4"}}
    assert "nodeSelector" not in pod


async def test_kubernetes_generic_gpu_with_own_selector():
    ex = Kubernetes(xm.JobRequirements(gpu=1), image="i", node_selector={"nvidia.com/gpu.product": "NVIDIA-L4"})
    pod = (await _k8s_pod_spec(ex.job_variables()))["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}


def test_kubernetes_template_is_the_stock_template_plus_gpu_variables():
    from prefect_kubernetes.worker import KubernetesWorker

    stock = KubernetesWorker.get_default_base_job_template()
    ours = _k8s_template()
    props = ours["variables"]["properties"]
    assert set(props) - set(stock["variables"]["properties"]) == {"gpu_count", "node_selector"}
    assert props["gpu_count"]["title"] == "GPUs"
    for key, value in stock["variables"]["properties"].items():
        assert props[key] == value, key


def test_gpu_variables_need_our_kubernetes_template():
    """Against the stock template, the pool-schema check names the missing variable."""
    from prefect_kubernetes.worker import KubernetesWorker

    stock = KubernetesWorker.get_default_base_job_template()["variables"]["properties"]
    with pytest.raises(ValueError, match="'gpu_count'"):
        validate_job_variables("k8s", Kubernetes(xm.JobRequirements(t4=1), image="i").job_variables(), stock)


# -------------------------------------------------------------------- Vertex AI


def _fake_service_account() -> dict:
    """A syntactically valid service-account key made here (never sent anywhere)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {"type": "service_account", "project_id": "xm-test", "private_key_id": "0" * 40,
            "private_key": pem, "client_email": "trainer@xm-test.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}


@pytest.fixture(scope="module")
def gcp_credentials() -> dict:
    return {"service_account_info": _fake_service_account()}


def _vertex_template() -> dict:
    return json.loads((REPO / VERTEX_BASE_JOB_TEMPLATE).read_text())


async def _vertex_job_spec(variables: dict, credentials: dict, template: dict | None = None):
    """(region, the CustomJob spec dict the worker builds its request from, the CustomJob
    proto the worker's own _build_job_spec sends to Vertex AI), from the stock template
    unless another is given."""
    import copy

    from prefect_gcp.workers.vertex import VertexAIWorker, VertexAIWorkerJobConfiguration

    template = template or VertexAIWorker.get_default_base_job_template()
    _check_schema("vertex-ai", template, variables)
    config = await VertexAIWorkerJobConfiguration.from_template_and_values(
        template, dict(variables, credentials=credentials))
    config.prepare_for_flow_run(_flow_run())
    spec = copy.deepcopy(config.job_spec)
    proto = VertexAIWorker(work_pool_name="vertex-ai")._build_job_spec(config)
    return config.region, spec, proto


async def test_vertex_machine_accelerators_region_and_time_limit(gcp_credentials):
    ex = xm_local.Vertex(xm.JobRequirements(a100=2, location="europe-west4"), image="gcr.io/p/train:1",
                         time=datetime.timedelta(hours=5, minutes=1))
    variables = ex.job_variables_for(_exe())
    assert variables == {"machine_type": "a2-highgpu-2g", "accelerator_type": "NVIDIA_TESLA_A100",
                         "accelerator_count": 2, "region": "europe-west4", "maximum_run_time_hours": 6,
                         "image": "gcr.io/p/train:1"}
    region, spec, proto = await _vertex_job_spec(variables, gcp_credentials)
    assert region == "europe-west4"
    assert spec["maximum_run_time_hours"] == 6
    assert spec["service_account_name"] == "trainer@xm-test.iam.gserviceaccount.com"
    [pool] = spec["worker_pool_specs"]
    assert pool["machine_spec"] == {"machine_type": "a2-highgpu-2g", "accelerator_type": "NVIDIA_TESLA_A100",
                                    "accelerator_count": 2}
    assert pool["container_spec"]["image_uri"] == "gcr.io/p/train:1"
    assert pool["container_spec"]["command"] == ["prefect", "flow-run", "execute"]
    assert pool["replica_count"] == 1
    [wp] = proto.worker_pool_specs
    assert (wp.machine_spec.machine_type, wp.machine_spec.accelerator_type.name,
            wp.machine_spec.accelerator_count) == ("a2-highgpu-2g", "NVIDIA_TESLA_A100", 2)
    assert wp.container_spec.image_uri == "gcr.io/p/train:1"
    assert proto.scheduling.timeout == datetime.timedelta(hours=6)
    assert proto.service_account == "trainer@xm-test.iam.gserviceaccount.com"


TENSORBOARD = "projects/xm-test/locations/us-central1/tensorboards/42"


async def test_vertex_tensorboard_reaches_the_custom_job_as_xmanager_sends_it(gcp_credentials):
    """XManager's CustomJob.submit(tensorboard=...) with base_output_dir: the same two
    fields of the CustomJobSpec, through our pool template and the worker's own builder."""
    ex = xm_local.Vertex(xm.JobRequirements(t4=1, location="us-central1"), xm_local.TensorboardCapability(
        name=TENSORBOARD, base_output_directory="xm-bucket/exp-1"), image="gcr.io/p/train:1")
    variables = ex.job_variables()
    assert variables["tensorboard"] == TENSORBOARD
    assert variables["base_output_directory"] == {"output_uri_prefix": "gs://xm-bucket/exp-1"}  # gs:// added
    _, spec, proto = await _vertex_job_spec(variables, gcp_credentials, _vertex_template())
    assert spec["tensorboard"] == TENSORBOARD
    assert proto.tensorboard == TENSORBOARD
    assert proto.base_output_directory.output_uri_prefix == "gs://xm-bucket/exp-1"
    assert proto.service_account == "trainer@xm-test.iam.gserviceaccount.com"  # Vertex needs one with a board


async def test_vertex_without_tensorboard_on_our_template_sends_neither_field(gcp_credentials):
    variables = Vertex(xm.JobRequirements(cpu=4, location="us-central1"), image="gcr.io/p/train:1").job_variables()
    assert not {"tensorboard", "base_output_directory"} & set(variables)
    _, _, proto = await _vertex_job_spec(variables, gcp_credentials, _vertex_template())
    assert "tensorboard" not in proto and "base_output_directory" not in proto
    assert proto.worker_pool_specs[0].machine_spec.machine_type == "n1-standard-4"


def test_vertex_template_is_the_stock_template_plus_tensorboard_variables():
    from prefect_gcp.workers.vertex import VertexAIWorker

    stock = VertexAIWorker.get_default_base_job_template()
    ours = _vertex_template()
    props = ours["variables"]["properties"]
    assert set(props) - set(stock["variables"]["properties"]) == {"tensorboard", "base_output_directory"}
    assert props["tensorboard"]["title"] == "TensorBoard" and props["tensorboard"]["description"]
    for key, value in stock["variables"]["properties"].items():
        assert props[key] == value, key
    assert {k: v for k, v in ours["job_configuration"]["job_spec"].items()
            if k not in ("tensorboard", "base_output_directory")} == stock["job_configuration"]["job_spec"]


def test_tensorboard_needs_our_vertex_template_and_a_well_formed_board():
    from prefect_gcp.workers.vertex import VertexAIWorker

    board = xm_local.TensorboardCapability(name=TENSORBOARD, base_output_directory="gs://b/d")
    variables = Vertex(tensorboard=board, image="i").job_variables()
    stock = VertexAIWorker.get_default_base_job_template()["variables"]["properties"]
    with pytest.raises(ValueError, match="'tensorboard'"):
        validate_job_variables("vertex-ai", variables, stock)
    ours = _vertex_template()["variables"]["properties"]
    validate_job_variables("vertex-ai", variables, ours)
    with pytest.raises(ValueError, match="'base_output_directory'"):  # the schema's own check, as the UI's
        validate_job_variables("vertex-ai", {"base_output_directory": {"output_uri_prefix": "/tmp/x"}}, ours)
    for bad, words in [(dict(name="tb", base_output_directory="gs://b/d"), ["TensorboardCapability.name='tb'"]),
                       (dict(name=TENSORBOARD), ["TensorboardCapability.base_output_directory=None", "gs://"])]:
        with pytest.raises(ValueError) as e:
            Vertex(tensorboard=xm_local.TensorboardCapability(**bad), image="i")
        assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("requirements, machine", [
    (dict(cpu=4), ("n1-standard-4", None, None)),
    (dict(cpu=8, memory=40 * xm.GiB), ("n1-highmem-8", None, None)),
    (dict(a100=1), ("a2-highgpu-1g", "NVIDIA_TESLA_A100", 1)),
    (dict(a100=8), ("a2-highgpu-8g", "NVIDIA_TESLA_A100", 8)),
    (dict(a100=16), ("a2-megagpu-16g", "NVIDIA_TESLA_A100", 16)),
    (dict(a100_80gib=4), ("a2-ultragpu-4g", "NVIDIA_A100_80GB", 4)),
    (dict(h100=8), ("a3-highgpu-8g", "NVIDIA_H100_80GB", 8)),
    (dict(t4=1, cpu=8), ("n1-standard-8", "NVIDIA_TESLA_T4", 1)),
    (dict(v100=4, memory="200GiB"), ("n1-highmem-32", "NVIDIA_TESLA_V100", 4)),
    (dict(l4=1, cpu=6), ("g2-standard-8", "NVIDIA_L4", 1)),
    (dict(l4=4), ("g2-standard-48", "NVIDIA_L4", 4)),
])
def test_vertex_machine_table(requirements, machine):
    assert vertex_machine(xm.JobRequirements(**requirements)) == machine


async def test_vertex_t4_job_spec(gcp_credentials):
    variables = Vertex(xm.JobRequirements(t4=2, cpu=16), image="gcr.io/p/i:1").job_variables()
    region, spec, _ = await _vertex_job_spec(dict(variables, region="us-central1"), gcp_credentials)
    assert spec["worker_pool_specs"][0]["machine_spec"] == {
        "machine_type": "n1-standard-16", "accelerator_type": "NVIDIA_TESLA_T4", "accelerator_count": 2}


# ------------------------------------------------------------ impossible requests


@pytest.mark.parametrize("make, words", [
    (lambda: Vertex(xm.JobRequirements(a100=3)), ["a100=3", "1, 2, 4, 8, 16"]),
    (lambda: Vertex(xm.JobRequirements(h100=2)), ["h100=2", "8"]),
    (lambda: Vertex(xm.JobRequirements(t4=1, cpu=64)), ["cpu=64", "at most 32 vCPUs"]),
    (lambda: Vertex(xm.JobRequirements(a100=1, memory="100GiB")), ["memory", "85"]),
    (lambda: Vertex(xm.JobRequirements(l40s=1)), ["l40s"]),
    (lambda: Vertex(xm.JobRequirements(tpu_v3=8)), ["tpu_v3"]),
    (lambda: Vertex(time=0), ["Vertex.time", "0"]),
    (lambda: Vertex(tensorboard="tb"), ["tensorboard"]),
    (lambda: Docker(xm.JobRequirements(cpu=1, replicas=2)), ["replicas=2"]),
    (lambda: Docker(xm.JobRequirements(location="us")), ["location", "'us'"]),
    (lambda: Kubernetes(xm.JobRequirements(l40s=1)), ["l40s", "node_selector"]),
    (lambda: Kubernetes(image=""), ["Kubernetes.image", "''"]),
    (lambda: xm.JobRequirements(cpu=-1), ["cpu", "-1"]),
    (lambda: xm.JobRequirements(a100=1, t4=1), ["one accelerator", "a100=1", "t4=1"]),
])
def test_impossible_requests_name_field_and_value(make, words):
    with pytest.raises(ValueError) as e:
        make()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_container_executors_need_an_image_and_run_container_args_inside_it():
    with pytest.raises(ValueError, match=r"no container image.*Docker\(image=\.\.\.\)"):
        Docker().job_variables_for(_exe())
    ex = Kubernetes()
    container = _exe(kind="container", command=None, image="docker://me/tool:2")
    assert ex.job_variables_for(container)["image"] == "me/tool:2"
    params = ex.runner_parameters(container.runner_parameters(xm.SequentialArgs.from_collection(
        ["python", "train.py", "--lr=0.1"]), {}))
    assert params["executable"] == {"kind": "command", "command": ["python"]}
    assert params["args"] == ["train.py", "--lr=0.1"]
    with pytest.raises(ValueError, match="args"):
        ex.runner_parameters(container.runner_parameters(xm.SequentialArgs(), {}))
    module = _exe(kind="module", command=None, module="train", image="base:1", path="/code")
    params = ex.runner_parameters(module.runner_parameters(xm.SequentialArgs(), {}))
    assert params["executable"] == {"kind": "module", "module": "train", "path": "/code"}  # no apptainer inside
