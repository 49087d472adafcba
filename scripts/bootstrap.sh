#!/usr/bin/env bash
# Creates a venv with the exact package set we verified and installs prefect-xm into it,
# editable:
#   bash scripts/bootstrap.sh                     .venv from constraints.txt (the current Prefect)
#   bash scripts/bootstrap.sh VENV CONSTRAINTS    another venv from another verified set
#                                                 (test.sh: .venv-prefect38 from constraints-prefect-3.8.txt)
# A second run costs a hash, not a pip run: pip runs again only when what the venv was
# built from changed (the constraints, pyproject.toml, the Python), recorded in a stamp
# inside the venv. (pip over an unchanged venv took 11 s of every main.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
constraints=${2:-constraints.txt}
built_from() {
    { sha256sum "$constraints" pyproject.toml; python3 --version; readlink -f "$(command -v python3)"; } |
        sha256sum | cut -d' ' -f1
}
stamp="$venv/.prefect-xm-built-from"
want=$(built_from)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
rm -f "$stamp"
"$venv/bin/pip" install -q --disable-pip-version-check -c "$constraints" -e '.[all,test]'
echo "$want" > "$stamp"
