#!/usr/bin/env bash
# spa's GPU check (python -m spa.bench.gpu_check) with the machine's own Python, from the repository root.
#
#   OUT=/some/dir bash scripts/gpu_check.sh            # on a machine with one NVIDIA GPU (budget 450 s; never run on a GPU yet)
#   bash scripts/gpu_check.sh --device cpu --small     # smoke test of the check on a CPU
#
# Writes results.json, summary.md and run.log under $OUT (default ./gpu_out); exit code 0 when every
# correctness check passed. Extra arguments go to python -m spa.bench.gpu_check (--sections, --budget-s, ...).
#
# Set-up, offline: spa runs from this source tree (PYTHONPATH); what the Python lacks or has in an unsuitable
# version (timm outside spa's range, pycocotools, ...) is installed with pip --no-index --no-deps from the
# wheels in $SPA_GPU_WHEELS (default .gpu/wheels, which `make gpu-check` fills from ../shared/gpu/wheels) into
# .gpu/pydeps, put first on PYTHONPATH. Nothing is installed into the machine's site-packages.
# Knobs: SPA_GPU_PYTHON (default: python3), SPA_GPU_WHEELS.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${SPA_GPU_PYTHON:-python3}
WHEELS=${SPA_GPU_WHEELS:-$ROOT/.gpu/wheels}
DEPS=$ROOT/.gpu/pydeps
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT" "$DEPS"
export OUT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
export SPA_GIT_REV=${SPA_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo "")}
LOG="$OUT/setup.log"
echo "[gpu_check.sh] python: $(command -v "$PY"); wheels: $WHEELS; out: $OUT" | tee "$LOG"

# module -> "pip name" and the version range spa needs (pyproject.toml); prints the pip names to install
MISSING=$("$PY" - <<'PYEOF' 2>>"$LOG"
import importlib
need = {  # module: (distribution, lowest, below)
    "timm": ("timm", (1, 0, 31), (1, 1)), "pycocotools": ("pycocotools", None, None),
    "yaml": ("pyyaml", None, None), "PIL": ("pillow", None, None), "scipy": ("scipy", None, None),
    "skimage": ("scikit-image", None, None), "matplotlib": ("matplotlib", None, None),
    "tqdm": ("tqdm", None, None), "safetensors": ("safetensors", None, None),
}
out = []
for module, (dist, low, below) in need.items():
    try:
        m = importlib.import_module(module)
        if low:
            v = tuple(int(p) for p in m.__version__.split("+")[0].split(".")[:3])
            if v < low or v[: len(below)] >= below:
                out.append(dist)
    except Exception:
        out.append(dist)
print(" ".join(out))
PYEOF
)
echo "[gpu_check.sh] missing or unsuitable: ${MISSING:-none}" | tee -a "$LOG"
INSTALLED=""
for pkg in $MISSING; do
  if ls "$WHEELS"/"${pkg//-/_}"-*.whl "$WHEELS"/"$pkg"-*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install --quiet --no-index --no-deps --upgrade --target "$DEPS" --find-links "$WHEELS" "$pkg" >>"$LOG" 2>&1; then
      INSTALLED="$INSTALLED $pkg"
      echo "[gpu_check.sh] installed $pkg from $WHEELS into $DEPS" | tee -a "$LOG"
    else
      echo "[gpu_check.sh] WARNING: pip could not install $pkg from $WHEELS (see $LOG)" | tee -a "$LOG"
    fi
  else
    echo "[gpu_check.sh] WARNING: $pkg is missing and $WHEELS has no wheel for it" | tee -a "$LOG"
  fi
done
export SPA_GPU_INSTALLED="${INSTALLED# }"
"$PY" -c "import torch; print('[gpu_check.sh] torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"
exec "$PY" -m spa.bench.gpu_check "$@"
