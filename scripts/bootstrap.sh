#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine for edgetune: Debian packages, the Python
# environment in .venv/, and the Go-built Kubernetes/kwok/helm/S3 binaries (cached by version
# under ${XDG_CACHE_HOME:-~/.cache}/edgetune). A second run does no work.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

# 1. Debian packages: Prometheus and its Pushgateway for the metric and analysis tests; buildah,
#    runc and mmdebstrap to build the images offline and run them as real containers (docs/images.md);
#    the tools docs/quickstart.md uses.
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-pushgateway >/dev/null 2>&1 || missing+=(prometheus-pushgateway)
for tool in buildah runc mmdebstrap jq curl openssl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
# The quickstart's shell blocks (run by tests/e2e/test_quickstart.py) use envsubst, jq, curl, openssl.
command -v envsubst >/dev/null 2>&1 || missing+=(gettext-base)
if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "need root or sudo to apt-get install ${missing[*]}"
    sudo=sudo
  fi
  say "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  # The packages would start system services where an init system runs; our tests start their own.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. Go builds the control plane; the pinned modules need Go >= 1.26.
command -v go >/dev/null 2>&1 || die "Go >= 1.26 is required on PATH (it builds kube-apiserver, etcd, kwok, helm, versitygw)"
go_minor=$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
[ "${go_minor:-0}" -ge 26 ] || die "Go >= 1.26 is required, found $(go env GOVERSION)"

# 3. Python environment in .venv/, reinstalled only when pyproject.toml changes.
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
[ -n "$python" ] || die "Python >= 3.11 is required"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python >= 3.11 is required, found $("$python" --version)"
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi
stamp=.venv/.edgetune-deps
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python dependencies (edgetune[dev]) into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  # Data only: the UCR/UEA .ts files sktime ships in its wheel (real sensor data sets for the
  # trainer tests). --no-deps: we parse .ts ourselves and never import sktime.
  .venv/bin/python -m pip install -q --no-deps 'sktime==1.2.0'
  echo "$want" >"$stamp"
fi

# 4. Go-built binaries, cached by version; verified by running them.
.venv/bin/python -m edgetune_testenv binaries
