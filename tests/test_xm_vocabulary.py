"""Unit tests on the pure parts of the experiment API: args, requirements, jobs, executors."""

import datetime
import re

import pytest

from prefect_xm import xm, xm_local
from prefect_xm.core.deployments import validate_job_variables
from prefect_xm.executors import Slurm


# ------------------------------------------------------------------ args


def test_dict_args_become_flags_in_insertion_order():
    assert xm.to_argv({"b": 1, "a": "x y", "lr": 0.1}) == ["--b=1", "--a=x y", "--lr=0.1"]


def test_bool_none_and_list_args():
    assert xm.to_argv({"t": True, "f": False, "n": None, "l": [1, 2], "tu": ("a", "b")}) == [
        "--t", "--nof", "--l=1", "--l=2", "--tu=a", "--tu=b"]


def test_positional_and_sequential_args():
    assert xm.to_argv(["pos", 3, "--raw"]) == ["pos", "3", "--raw"]
    merged = xm.merge_args({"foo": "1", "bar": "42"}, ["--"], {"foo": "2", "n": 16})
    assert merged.to_list() == ["--foo=2", "--bar=42", "--", "--n=16"]
    assert merged.to_dict(kwargs_only=True) == {"foo": "2", "bar": "42", "n": 16}


def test_a_shell_safe_arg_reaches_the_program_as_its_text_unsubstituted():
    # as on XManager's argv backends: nothing is quoted, and no shell substitutes
    args = [xm.ShellSafeArg("$HOME/data"), {"out": xm.ShellSafeArg("$(hostname)")}]
    assert xm.to_argv(args[0:1]) == ["$HOME/data"]
    assert xm.to_argv(args[1]) == ["--out=$(hostname)"]
    assert xm.merge_args(args[1]).to_json() == {"out": "$(hostname)"}
    with pytest.raises(RuntimeError, match="ShellSafe semantics"):
        f"{xm.ShellSafeArg('x')}"


def test_string_args_are_rejected():
    with pytest.raises(ValueError, match="Wrap it in a list"):
        xm.to_argv("--lr=0.1")


def test_nul_bytes_are_rejected():
    with pytest.raises(ValueError, match="NUL"):
        xm.to_argv(["a\0b"])


def test_env_var_names_are_validated():
    exe = xm.Executable(name="x", command=["true"])
    with pytest.raises(ValueError, match="1BAD"):
        xm.Job(exe, xm_local.Local(), env_vars={"1BAD": "x"})
    with pytest.raises(ValueError, match="A-B"):
        xm.Packageable(xm.Binary("/bin/true"), xm_local.Local.Spec(), env_vars={"A-B": "1"})
    assert xm.Job(exe, xm_local.Local(), env_vars={"OK_1": 5}).env_vars == {"OK_1": "5"}


# ------------------------------------------------------------------ requirements


def test_requirements_units_and_accelerators():
    r = xm.JobRequirements(cpu=4, memory=16 * xm.GiB, a100=2, replicas=3)
    assert (r.cpu, r.memory, r.accelerator, r.accelerator_count, r.replicas) == (
        4, 16 * 1024**3, xm.ResourceType.A100, 2, 3)
    assert xm.JobRequirements(ram="512MiB").memory == 512 * 1024**2
    assert xm.JobRequirements(memory="2G").memory == 2 * 1024**3
    assert xm.JobRequirements(memory="2GB").memory == 2 * 1000**3
    assert xm.JobRequirements({xm.ResourceType.T4: 1, "cpu": 0.5}).accelerator is xm.ResourceType.T4


@pytest.mark.parametrize("kwargs, field, value", [
    ({"cpu": -1}, "cpu", "-1"),
    ({"cpu": "many"}, "cpu", "many"),
    ({"memory": "lots"}, "memory", "lots"),
    ({"ram": 0}, "ram", "0"),
    ({"a100": 1.5}, "a100", "1.5"),
    ({"replicas": 0}, "replicas", "0"),
    ({"location": ""}, "location", "''"),
])
def test_invalid_requirements_name_field_and_value(kwargs, field, value):
    with pytest.raises(ValueError) as e:
        xm.JobRequirements(**kwargs)
    assert field in str(e.value) and value in str(e.value)


def test_unknown_resource_and_two_accelerator_types():
    with pytest.raises(ValueError, match="warp_drive"):
        xm.JobRequirements(warp_drive=1)
    with pytest.raises(ValueError, match="one accelerator"):
        xm.JobRequirements(a100=1, t4=1)


# ------------------------------------------------------------------ jobs, packaging


def test_package_and_add_args_follow_xmanager(tmp_path):
    from prefect_xm.core.job_blocks import apply_args, flatten_jobs, package_spec

    exe = package_spec(xm.Packageable(xm.Binary("/bin/echo"), xm_local.Local.Spec(),
                                      args={"platform": "gpu"}, env_vars={"A": "1"}))
    job = xm.Job(exe, xm_local.Local(), args={"lr": 0.1})
    params = exe.runner_parameters(job.args, job.env_vars)
    assert params["executable"] == {"kind": "command", "command": ["/bin/echo"]}
    assert params["args"] == ["--platform=gpu", "--lr=0.1"]
    assert params["env"] == {"A": "1"}

    group = xm.JobGroup(train=job, eval=xm.Job(exe, xm_local.Local()))
    applied = apply_args(group, {"train": {"args": {"lr": 0.5}}, "eval": {"env_vars": {"B": "2"}}})
    members = flatten_jobs(applied)
    assert list(members) == ["train", "eval"]
    assert members["train"].args.to_list() == ["--lr=0.5"]
    assert members["eval"].env_vars == {"B": "2"}
    assert job.args.to_list() == ["--lr=0.1"]  # the original is untouched
    with pytest.raises(ValueError, match="evaluator"):
        apply_args(group, {"evaluator": {}})
    with pytest.raises(ValueError, match="argz"):
        apply_args(job, {"argz": {}})
    assert xm.get_args_for_all_jobs(group, {"x": 1}) == {"train": {"args": {"x": 1}}, "eval": {"args": {"x": 1}}}

    (tmp_path / "mod.py").write_text("")
    py = package_spec(xm.Packageable(xm.PythonContainer(entrypoint=xm.ModuleName("mod"), path=str(tmp_path)),
                                     xm_local.Local.Spec()))
    assert (py.kind, py.module, py.path) == ("module", "mod", str(tmp_path))


def test_job_runner_argv_never_uses_a_shell_for_args(tmp_path):
    from prefect_xm.job_spec import build_argv

    argv, _ = build_argv({"kind": "command", "command": ["/bin/echo"]}, ["$(touch x)", "a;b"])
    assert argv == ["/bin/echo", "$(touch x)", "a;b"]
    argv, env = build_argv({"kind": "module", "module": "m", "path": str(tmp_path)}, ["--x=1"])
    assert argv[1:] == ["-m", "m", "--x=1"] and env["PYTHONPATH"].startswith(str(tmp_path))
    argv, _ = build_argv({"kind": "commands", "commands": ["echo hi", "echo"]}, ["`id`"])
    assert argv == ["bash", "-c", 'echo hi\necho "$@"', "xm-entrypoint", "`id`"]


def test_a_command_lists_last_command_gets_the_jobs_args_as_in_xmanager(tmp_path):
    """XManager's entrypoint.sh is the commands with ` $@` after the last: the job's args
    reach the last command (quoted here, so each arg stays one word, as given)."""
    import subprocess

    from prefect_xm.job_spec import build_argv

    args = ["--lr=0.1", "two words", "$(touch pwned)", "`id`"]
    argv, _ = build_argv({"kind": "commands", "commands": ["cd /", "printf '%s\\n'"]}, args)
    out = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert out.splitlines() == args
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ executors


def test_slurm_maps_requirements_to_job_variables():
    s = Slurm(requirements=xm.JobRequirements(cpu=4, memory=16 * xm.GiB, a100=2, replicas=2),
              partition="gpu", account="proj", time="1-02:00:00", modules=["cuda/12"],
              extra_directives=["--exclusive"], work_pool="hpc")
    assert s.work_pool_name == "hpc"
    assert s.job_variables() == {
        "cpus_per_task": 4, "memory": "16G", "gpus": 2, "gpu_type": "a100", "ntasks": 2,
        "partition": "gpu", "account": "proj", "modules": ["cuda/12"],
        "extra_directives": ["--exclusive"], "time_limit": "1-02:00:00"}
    assert Slurm(requirements=xm.JobRequirements(gpu=1, cpu=0.5)).job_variables() == {"gpus": 1, "cpus_per_task": 1}
    assert Slurm(time=datetime.timedelta(hours=1, minutes=30)).job_variables() == {"time_limit": "01:30:00"}
    assert Slurm(time=90).job_variables() == {"time_limit": "90"}
    assert Slurm(job_variables={"qos": "high"}).job_variables() == {"qos": "high"}


def test_slurm_units_and_errors():
    assert Slurm(requirements=xm.JobRequirements(memory=1536 * xm.MiB)).job_variables() == {"memory": "1536M"}
    assert Slurm(time="30:00").job_variables() == {"time_limit": "30:00"}
    with pytest.raises(ValueError, match="two hours"):
        Slurm(time="two hours")
    # the executor and the xm-slurm worker take the same times (the worker's rule checks both)
    from prefect_xm.workers.slurm import SlurmJobConfiguration

    for value in ("unlimited", "INFINITE", "1-02:00:00", "90"):
        assert Slurm(time=value).job_variables()["time_limit"] == SlurmJobConfiguration(time_limit=value).time_limit == value
    with pytest.raises(ValueError, match="partition"):
        Slurm(partition="")
    with pytest.raises(ValueError, match="location"):
        Slurm(requirements=xm.JobRequirements(location="us-east"))
    with pytest.raises(ValueError, match="qos"):
        Slurm(qos="a", job_variables={"qos": "b"})


def test_job_variables_are_checked_against_the_pool_schema():
    props = {"partition": {"type": "string"}, "gpus": {"type": "integer"},
             "modules": {"type": "array", "items": {"type": "string"}},
             "memory": {"anyOf": [{"type": "string"}, {"type": "null"}]}}
    validate_job_variables("hpc", {"partition": "a", "gpus": 2, "modules": ["x"], "memory": "1G"}, props)
    with pytest.raises(ValueError) as e:
        validate_job_variables("hpc", {"partiton": "a"}, props)
    assert "'partiton'" in str(e.value) and "'hpc'" in str(e.value)
    with pytest.raises(ValueError, match="gpus"):
        validate_job_variables("hpc", {"gpus": "two"}, props)
    with pytest.raises(ValueError, match="gpus"):
        validate_job_variables("hpc", {"gpus": True}, props)


def test_xmanagers_small_helpers():
    import types

    from prefect_xm import xm
    from prefect_xm.core.api import WorkUnit

    @xm.run_in_asyncio_loop
    async def main(a, b=1):
        return a + b

    assert main(1, b=2) == 3 and main.__name__ == "main"
    wu = WorkUnit(types.SimpleNamespace(experiment_id="17"), 3, {}, None)
    assert wu.get_full_job_name("trainer") == "17_3_trainer"


def test_xmanagers_factory_functions_make_packageables_with_its_signatures(tmp_path):
    """`xm.python_container(executor_spec=..., path=..., ...)` and friends, keyword for
    keyword as in XManager's packagables.py (they were the spec classes: a TypeError)."""
    from prefect_xm import xm, xm_local
    from prefect_xm.core.job_blocks import package_spec

    (tmp_path / "cifar10.py").write_text("")
    spec = xm_local.Local.Spec()
    p = xm.python_container(executor_spec=spec, path=str(tmp_path), base_image="python:3.11",
                            docker_instructions=["RUN true"], entrypoint=xm.ModuleName("cifar10"),
                            use_deep_module=False, args={"platform": "cpu"}, env_vars={"A": "1"})
    assert isinstance(p, xm.Packageable) and isinstance(p.executable_spec, xm.PythonContainer)
    assert p.executor_spec is spec and p.env_vars == {"A": "1"}
    exe = package_spec(p)
    assert exe.kind == "module" and exe.args.to_list() == ["--platform=cpu"]
    b = xm.binary(spec, "/bin/echo", args=["hi"])
    assert b.executable_spec.path == "/bin/echo" and package_spec(b).command == ["/bin/echo"]
    c = xm.container(executor_spec=spec, image_path="docker://alpine:3")
    assert c.executable_spec.image_path == "docker://alpine:3"
    for make, target in ((lambda: xm.bazel_binary(spec, "//cifar:train"), "//cifar:train"),
                         (lambda: xm.bazel_container(spec, label="//cifar:image.tar"), "//cifar:image.tar"),
                         (lambda: package_spec(xm.dockerfile_container(spec, path=".")), "'.'")):
        with pytest.raises(NotImplementedError, match="build it yourself|build the image") as raised:
            make()
        assert target in str(raised.value)
    d = xm.dockerfile_container(xm_local.Docker.Spec(), "image-dir", "image-dir/Dockerfile.gpu", args=["--x=1"])
    assert d.executable_spec == xm.Dockerfile(path="image-dir", dockerfile="image-dir/Dockerfile.gpu")


def test_an_empty_job_group_is_filled_afterwards_and_refused_only_if_still_empty():
    from prefect_xm import xm, xm_local
    from prefect_xm.core.job_blocks import flatten_jobs

    exe = xm.Executable(name="echo", command=["/bin/echo"])
    group = xm.JobGroup()
    with pytest.raises(ValueError, match="has no jobs"):
        flatten_jobs(group)
    group.jobs["a"] = xm.Job(exe, xm_local.Local())
    assert list(flatten_jobs(group)) == ["a"]
    group.jobs["b"] = "not a job"
    with pytest.raises(ValueError, match="member 'b' must be a Job"):
        flatten_jobs(group)


def test_start_deadline_is_a_constraint_checked_with_its_field_and_value():
    import datetime

    from prefect_xm import xm, xm_local
    from prefect_xm.core.job_blocks import DEFAULT_START_DEADLINE_SECONDS, start_deadline_of

    exe = xm.Executable(name="echo", command=["/bin/echo"])
    job = xm.Job(exe, xm_local.Local())
    assert start_deadline_of(xm.JobGroup(a=job)) == DEFAULT_START_DEADLINE_SECONDS
    group = xm.JobGroup(a=job, b=job, constraints=[xm_local.StartDeadline(minutes=2, seconds=30)])
    assert start_deadline_of(group) == 150 and isinstance(group.constraints[0], xm.Constraint)
    assert xm_local.StartDeadline(datetime.timedelta(hours=1)).seconds == 3600
    with pytest.raises(ValueError, match=r"StartDeadline.minutes must be a number >= 0, got -1"):
        xm_local.StartDeadline(minutes=-1)
    with pytest.raises(ValueError, match="longer than 0"):
        xm_local.StartDeadline()
    with pytest.raises(ValueError, match=r"JobGroup.constraints must be xm.Constraint objects.*'10m'"):
        xm.JobGroup(a=job, constraints=["10m"])


def test_xm_local_names_of_xmanager_exist_with_its_signatures_or_say_what_is_not_here():
    from prefect_xm import xm, xm_local

    local = xm_local.Local(xm.JobRequirements(), xm_local.DockerOptions(ports={8080: 8080}, volumes={"/a": "/b"}),
                           False)
    assert local.experimental_stream_output is False and local.docker_options.ports == {8080: 8080}
    assert xm_local.Local().experimental_stream_output is True  # XManager's default
    with pytest.raises(ValueError, match="docker_options"):
        local.runner_parameters({"executable": {"kind": "container", "image": "docker://alpine:3"}})
    # XManager's own default cloud provider is accepted; another says why not
    xm_local.Kubernetes(cloud_provider=xm_local.GOOGLE_KUBERNETES_ENGINE_CLOUD_PROVIDER)
    with pytest.raises(ValueError, match="cloud_provider='EKS'"):
        xm_local.Kubernetes(cloud_provider="EKS")
    with pytest.raises(ValueError, match="tpu_capability"):
        xm_local.Kubernetes(tpu_capability=xm_local.TpuCapability(tpu_runtime_version="2.12"))
    board = xm_local.TensorboardCapability(name="projects/p/locations/us-central1/tensorboards/1",
                                           base_output_directory="gs://bucket/logs")
    assert xm_local.Vertex(xm.JobRequirements(), board).job_variables()["tensorboard"] == board.name
    with pytest.raises(ValueError, match="TensorboardCapability.name='tb'"):
        xm_local.Vertex(tensorboard=xm_local.TensorboardCapability(name="tb"))
    # where package() pushes a python_container's image (tests/test_images.py)
    assert xm_local.Kubernetes.Spec(push_image_tag="gcr.io/p/img:1").push_image_tag == "gcr.io/p/img:1"
    assert xm_local.KubernetesSpec is xm_local.VertexSpec is xm_local.CaipSpec and xm_local.Caip is xm_local.Vertex


def test_roles_have_xmanagers_names_and_check_their_fields():
    from prefect_xm import xm

    job = xm.AuxiliaryUnitJob("a job", importance=xm.Importance.HIGH, termination_delay_secs=30)
    assert job.role == xm.AuxiliaryUnitRole(importance=xm.Importance.HIGH, termination_delay_secs=30)
    assert isinstance(job.role, xm.ExperimentUnitRole) and xm.WorkUnitRole().importance is xm.Importance.NORMAL
    with pytest.raises(ValueError, match="termination_delay_secs: -1"):
        xm.AuxiliaryUnitRole(termination_delay_secs=-1)
    with pytest.raises(TypeError):
        xm.AuxiliaryUnitRole(30)  # keyword-only, as XManager's attrs class


async def test_package_async_queues_until_package_packages_the_batch():
    import uuid

    from prefect_xm.core.api import Experiment

    experiment = Experiment("e1", "t", uuid.uuid4())
    later = experiment.package_async(xm.Packageable(xm.Binary("/bin/true"), xm_local.Local.Spec()))
    bad = experiment.package_async(xm.Packageable(xm.PythonContainer(entrypoint=xm.ModuleName("train"), path="/no/such/dir"), xm_local.Local.Spec()))
    with pytest.raises(RuntimeError, match="package"):
        later.result()
    assert experiment.package() == []  # packages the queued ones
    executable = await later
    assert executable == later.result() and isinstance(executable, xm.Executable)
    with pytest.raises(ValueError, match="/no/such/dir"):
        await bad
    with pytest.raises(ValueError, match="one xm.Packageable"):
        experiment.package_async([])


def test_resource_names_topologies_and_service_tiers_as_xmanager_has_them():
    assert xm.ResourceType["v100"] is xm.ResourceType.V100 and str(xm.ResourceType.V100) == "V100"
    assert xm.GpuType.A100 is xm.ResourceType.A100 and xm.ResourceType.TPU_V3 in xm.TpuType
    assert xm.ResourceType.A100 not in xm.TpuType and xm.ResourceType.CPU not in xm.GpuType
    tpu = xm.JobRequirements(tpu_v3="2x2", service_tier=xm.ServiceTier.BATCH)
    assert tpu.topology == xm.Topology("2x2") and tpu.accelerator_count == 4
    assert tpu.service_tier is xm.ServiceTier.BATCH and "service_tier=xm.ServiceTier.BATCH" in repr(tpu)
    gpus = xm.JobRequirements({xm.ResourceType["a100"]: 4})
    assert gpus.topology.name == "4" and gpus.service_tier is xm.ServiceTier.PROD
    with pytest.raises(xm.InvalidTpuTopologyError, match="2x"):
        xm.JobRequirements(v100="2x")
    with pytest.raises(ValueError, match="cpu='2x2': a topology is for accelerators only"):
        xm.JobRequirements(cpu="2x2")
    with pytest.raises(ValueError, match="service_tier"):
        xm.JobRequirements(service_tier="batch")
    # a TPU where none can run says so; local_gpu is any GPU of the place
    with pytest.raises(ValueError, match="tpu_v5e"):
        Slurm(requirements=xm.JobRequirements(tpu_v5e=8)).job_variables()
    assert Slurm(requirements=xm.JobRequirements(local_gpu=2)).job_variables() == {"gpus": 2}


def test_specs_with_a_build_step_exist_and_package_refuses_them_saying_what_to_use():
    from prefect_xm.core.job_blocks import package_spec

    for spec, what in ((xm.BazelBinary(label="//:trainer"), "bazel_binary('//:trainer')"),
                       (xm.BazelContainer(label="//:image"), "bazel_container('//:image')"),
                       (xm.Dockerfile(path="."), "dockerfile_container('.')")):
        with pytest.raises(NotImplementedError, match=re.escape(f"xm.{what}") + ".*xm.container"):
            package_spec(xm.Packageable(spec, xm_local.Local.Spec()))
    assert issubclass(xm.Job, xm.JobConfig) and issubclass(xm.JobGroup, xm.JobConfig)


def test_xmanagers_job_operators_walk_a_job_structure():
    """xm.job_operators as libraries built on XManager call it: names filled by path,
    a shallow copy that leaves the original alone, jobs collected and constraint cliques."""
    from prefect_xm import xm, xm_local

    exe = xm.Executable(name="echo", command=["/bin/echo"])
    deadline = xm_local.StartDeadline(minutes=5)
    inner = xm.JobGroup(actor=xm.Job(exe, xm_local.Local()), constraints=[deadline])
    group = xm.JobGroup(learner=xm.Job(exe, xm_local.Local()), actors=inner)
    copied = xm.job_operators.shallow_copy_job_type(group)
    xm.job_operators.populate_job_names(copied)
    assert [j.name for j in xm.job_operators.flatten_jobs(copied)] == ["learner", "actors_actor"]
    assert group.jobs["learner"].name is None and copied.jobs["learner"].executable is exe
    alone = xm.Job(exe, xm_local.Local())
    xm.job_operators.populate_job_names(alone)
    assert alone.name == "echo"
    assert xm.job_operators.collect_jobs_by_filter(copied, lambda j: j.name.startswith("actors")) == [
        copied.jobs["actors"].jobs["actor"]]
    [clique] = xm.job_operators.aggregate_constraint_cliques(copied)
    assert clique.constraint is deadline and clique.jobs == [copied.jobs["actors"].jobs["actor"]]
    assert xm.PiB == 1024**5 and xm.PB == 10**15
    assert issubclass(xm.ReloadError, xm.ExperimentUnitError)


def test_xmanagers_accelerator_type_architecture_auxiliary_unit_and_debug_interrupt_exist():
    from prefect_xm.core.work_units import AuxiliaryUnit

    assert {"AcceleratorType", "Architecture", "AuxiliaryUnit", "DebugInterrupt"} <= set(xm.__all__)
    # the accelerators among ResourceType, as GpuType and TpuType are subsets of it
    assert xm.AcceleratorType.A100 is xm.ResourceType.A100 and xm.ResourceType["tpu_v3"] in xm.AcceleratorType
    assert set(xm.GpuType) | set(xm.TpuType) <= set(xm.AcceleratorType)
    assert xm.ResourceType.CPU not in xm.AcceleratorType and xm.ResourceType.RAM not in xm.AcceleratorType
    assert xm.JobRequirements(v100=2).accelerator in xm.AcceleratorType
    assert [a.value for a in xm.Architecture] == ["x86_64", "arm64"] and xm.Architecture("arm64") is xm.Architecture.ARM64
    # what `experiment.add(..., role=xm.AuxiliaryUnitRole(...))` returns
    assert xm.AuxiliaryUnit is AuxiliaryUnit and issubclass(xm.AuxiliaryUnit, xm.ExperimentUnit)
    # a BaseException: `except Exception` in a launch script lets it through
    assert issubclass(xm.DebugInterrupt, BaseException) and not issubclass(xm.DebugInterrupt, Exception)
    with pytest.raises(xm.DebugInterrupt):
        try:
            raise xm.DebugInterrupt()
        except Exception:  # pragma: no cover - it is not one
            pass
