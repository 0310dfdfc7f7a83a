# Sourced by the device-call scripts: install the carried wheels, set the environment.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl-worker/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/worker:$PWD/operator PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false
B="python3 -m finetune_bench.cli"
