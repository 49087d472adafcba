"""XManager's `--xm_*` flags, defined with absl as XManager defines them.

XManager's launch scripts run under absl (`app.run(main)`) and are launched with
XManager's own flags (`xmanager launch script.py -- --xm_wrap_late_bindings`); absl
refuses a flag nobody defined. prefect-xm defines the same names, types and defaults
(importing `prefect_xm.xm_local` does, as importing `xmanager.xm_local` does), so those
command lines parse. What each does here is in its help: prefect-xm builds no images
and keeps its records in Prefect, so most are accepted and have no effect.
"""

from __future__ import annotations

import enum

from absl import flags

_NO_EFFECT = " (accepted for XManager's launch scripts; no effect in prefect-xm, which builds no images)"

# --------------------- cloud (image builds: XManager's, not ours) ---------------------
BUILD_IMAGE_LOCALLY = flags.DEFINE_boolean(
    "xm_build_image_locally", True, "Build images with the local Docker instead of Cloud Build." + _NO_EFFECT)
USE_DOCKER_COMMAND = flags.DEFINE_boolean(
    "xm_use_docker_command", True, "Build images with the `docker build` command." + _NO_EFFECT)
SHOW_DOCKER_COMMAND_PROGRESS = flags.DEFINE_boolean(
    "xm_show_docker_command_progress", False, "Show `docker build`'s output." + _NO_EFFECT)
WRAP_LATE_BINDINGS = flags.DEFINE_boolean(
    "xm_wrap_late_bindings", False, "Wrap late bindings of network addresses in containers." + _NO_EFFECT)
CLOUD_BUILD_TIMEOUT_SECONDS = flags.DEFINE_integer(
    "xm_cloud_build_timeout_seconds", 1200, "Cloud Build's timeout." + _NO_EFFECT)
USE_CLOUD_BUILD_CACHE = flags.DEFINE_boolean(
    "xm_use_cloud_build_cache", False, "Use Cloud Build's cache." + _NO_EFFECT)
USE_KANIKO = flags.DEFINE_boolean("xm_use_kaniko", False, "Build with kaniko on Cloud Build." + _NO_EFFECT)
KANIKO_CACHE_TTL = flags.DEFINE_string("xm_kaniko_cache_ttl", "336h", "kaniko's cache TTL." + _NO_EFFECT)
GCP_SERVICE_ACCOUNT_NAME = flags.DEFINE_string(
    "xm_gcp_service_account_name", "xmanager",
    "The GCP service account XManager uses (prefect-xm's Vertex jobs take the `service_account_name` "
    "job variable of their work pool)." + _NO_EFFECT)
K8S_SERVICE_ACCOUNT_NAME = flags.DEFINE_string(
    "xm_k8s_service_account_name", "default",
    "The Kubernetes service account of XManager's pods (prefect-xm's Kubernetes jobs take the "
    "`service_account_name` job variable of their work pool)." + _NO_EFFECT)

# -------------------- xm_local (records: Prefect's, not a database of ours) --------------------
DB_YAML_CONFIG_PATH = flags.DEFINE_string(
    "xm_db_yaml_config_path", None,
    "XManager's database config. prefect-xm keeps experiments in the Prefect server named by "
    "PREFECT_API_URL (or its embedded server)." + _NO_EFFECT)
UPGRADE_DB = flags.DEFINE_boolean("xm_upgrade_db", False, "Upgrade XManager's database." + _NO_EFFECT)
BAZEL_COMMAND = flags.DEFINE_string(
    "xm_bazel_command", "bazel", "The command that runs Bazel (xm.bazel_binary raises in prefect-xm)." + _NO_EFFECT)

# -------------------- docker / contrib --------------------
SUBPROCESS_DOCKER = flags.DEFINE_bool(
    "xm_subprocess_docker_impl", False, "Run local Docker jobs with the `docker` command." + _NO_EFFECT)
GCS_PATH = flags.DEFINE_string(
    "xm_gcs_path", None, "A GCS directory for outputs (gs://bucket/directory)." + _NO_EFFECT)


class XMLaunchMode(enum.Enum):
    """Where XManager runs an experiment; in prefect-xm each job's executor says where."""

    VERTEX = "vertex"
    LOCAL = "local"
    INTERACTIVE = "interactive"


XM_LAUNCH_MODE = flags.DEFINE_enum_class(
    "xm_launch_mode", XMLaunchMode.VERTEX, XMLaunchMode,
    "How XManager launches the experiment. In prefect-xm each job's executor (Local, Slurm, "
    "WorkPool, Vertex...) says where it runs." + _NO_EFFECT)
