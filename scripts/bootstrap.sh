#!/usr/bin/env bash
# Creates a venv with the exact package set we verified and installs prefect-xm into it,
# editable:
#   bash scripts/bootstrap.sh                     .venv from constraints.txt (the current Prefect)
#   bash scripts/bootstrap.sh VENV CONSTRAINTS    another venv from another verified set
#                                                 (test.sh: .venv-prefect38 from constraints-prefect-3.8.txt)
#   bash scripts/bootstrap.sh VENV CONSTRAINTS EXTRAS   with these extras (default below)
# The extras: all,test, and docs (mkdocs, for the documentation site) where the
# constraints pin mkdocs: only a verified set installs it, so the second venv goes
# without the site's tools unless its constraints pin them too.
# A second run costs a hash, not a pip run: pip runs again only when what the venv was
# built from changed (the constraints, pyproject.toml, the extras, the Python), recorded in a stamp
# inside the venv. (pip over an unchanged venv took 11 s of every main.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
constraints=${2:-constraints.txt}
if [ -n "${3:-}" ]; then
    extras=$3
elif grep -qi '^mkdocs==' "$constraints"; then
    extras=all,test,docs
else
    extras=all,test
fi
built_from() {
    { sha256sum "$constraints" pyproject.toml; echo "$extras"; python3 --version; readlink -f "$(command -v python3)"; } |
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
"$venv/bin/pip" install -q --disable-pip-version-check -c "$constraints" -e ".[$extras]"
echo "$want" > "$stamp"
