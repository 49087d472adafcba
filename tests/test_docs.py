"""The documentation site: it builds with `mkdocs build --strict` (a broken link, anchor
or reference fails), its worker reference names every job variable of every worker type
(read from the schemas the workers publish, so a variable added without a title and a
description fails here), and the README still opens with the two commands.

mkdocs comes with the `docs` extra (scripts/bootstrap.sh installs it into .venv). Where
it is missing the build tests skip, saying so; with CI=true they fail instead."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, require_service

MKDOCS = Path(sys.executable).parent / "mkdocs"
HOOK = REPO / "docs" / "hooks" / "worker_reference.py"


def _reference_module():
    spec = importlib.util.spec_from_file_location("worker_reference", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker_types() -> list[type]:
    from prefect_xm.workers import batch_worker_types

    return batch_worker_types()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    require_service("mkdocs", MKDOCS.exists(), f"{MKDOCS} is missing: pip install -e '.[docs]' "
                                               "(bash scripts/bootstrap.sh installs it)")
    out = tmp_path_factory.mktemp("site")
    # (mkdocs-material prints a notice about its successor unless this is set)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run([str(MKDOCS), "build", "--strict", "-d", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-5000:]
    return out


def test_the_site_builds_strict_with_every_page(site):
    nav_pages = re.findall(r":\s*([\w/-]+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), re.M)
    assert nav_pages, "mkdocs.yml has no nav"
    for page in nav_pages:
        built = site / ("index.html" if page == "index.md" else page[:-3] + "/index.html")
        assert built.is_file(), f"{page} was not built ({built})"
    for png in ("ui-experiment-run.png", "ui-xm-slurm-pool.png"):
        assert (site / png).is_file(), png
    assert not (site / "hooks").exists(), "the hook's code was published as a page"


def test_the_built_reference_names_every_job_variable_of_every_worker_type(site):
    text = (site / "workers" / "reference" / "index.html").read_text()
    sections = re.split(r"<h2[^>]*>", text)
    for worker in _worker_types():
        section = next((s for s in sections if s.startswith(f"<code>{worker.type}</code>")), None)
        assert section is not None, f"no section for {worker.type} in the worker reference"
        properties = worker.get_default_base_job_template()["variables"]["properties"]
        missing = [name for name in properties if f"<td><code>{name}</code></td>" not in section]
        assert not missing, f"{worker.type}: job variables missing from the reference: {missing}"
        # (the page renders a description's `code` as HTML: compare the words, as shown)
        words = " ".join(html.unescape(re.sub(r"<[^>]+>", "", section)).split())
        undocumented = [name for name, prop in properties.items()
                        if " ".join(prop["description"].replace("`", "").split()) not in words]
        assert not undocumented, f"{worker.type}: descriptions missing from the reference: {undocumented}"


def test_the_generated_reference_has_a_row_for_every_variable():
    # the generator itself, without mkdocs: one table row per variable, its directive
    # column filled from the template where the template uses it
    reference = _reference_module()
    assert [w.type for w in reference.worker_types()] == [w.type for w in _worker_types()]
    text = reference.reference_markdown()
    for worker in _worker_types():
        section = text.split(f"## `{worker.type}`", 1)[1].split("\n## ", 1)[0]
        rows = {line.split(" | ", 1)[0].strip("| `") for line in section.splitlines() if line.startswith("| `")}
        assert rows == set(worker.get_default_base_job_template()["variables"]["properties"]), worker.type
    slurm = text.split("## `xm-slurm`", 1)[1].split("\n## ", 1)[0]
    assert "`#SBATCH --partition={{ partition }}`" in slurm
    assert "`#SBATCH --requeue`" in slurm
    htcondor = text.split("## `xm-htcondor`", 1)[1].split("\n## ", 1)[0]
    assert "`request_cpus = <request_cpus>` (submit description)" in htcondor


def test_a_variable_without_a_description_fails_the_reference(monkeypatch):
    reference = _reference_module()
    from prefect_xm.workers.slurm import SlurmWorker

    template = SlurmWorker.get_default_base_job_template()
    del template["variables"]["properties"]["partition"]["description"]
    monkeypatch.setattr(SlurmWorker, "get_default_base_job_template", classmethod(lambda cls: template))
    with pytest.raises(ValueError, match="partition"):
        reference.worker_table(SlurmWorker)


def test_the_readme_starts_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    before_first_section = readme.split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", before_first_section, re.S)
    assert block, "the README's first section has no bash block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["bash ./scripts/main.sh", "bash ./scripts/test.sh"], commands
