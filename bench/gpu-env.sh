# shellcheck shell=bash
# Sourced by the bench/*.sh scripts (run from the repository root): makes the repository's
# packages importable, sets the allocator as the worker's pod does, and defines $B, the
# benchmark command. On a GPU machine without network, the packages its image lacks (trl,
# datasets, dill, multiprocess, bitsandbytes, liger-kernel, pydantic and its dependencies)
# can be carried as wheels in .whl/; they are installed into /tmp/site.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
fi
export PYTHONPATH=/tmp/site:$PWD/api:$PWD/worker:$PWD/operator:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# shellcheck disable=SC2034  # $B is for the scripts that source this file
B="python3 -m finetune_bench.cli"
