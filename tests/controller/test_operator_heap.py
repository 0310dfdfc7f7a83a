"""The operator gives a burst's memory back to the system after each resync cycle
(finetune_operator.heap): without it, glibc keeps freed blocks and the resident size stays
at the burst's peak."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune_operator import heap

ROOT = Path(__file__).resolve().parents[2]

# A burst of API objects decoded from JSON (dicts and strings of a few hundred bytes, more
# than pymalloc's small-object limit, so they come from glibc's heap), one in 97 kept alive:
# the survivors pin the heap's top, so freeing the rest returns nothing by itself.
BURST = """
import gc, json, os, sys
sys.path[:0] = sys.argv[1:]
from finetune_operator import heap

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

item = {"metadata": {"name": "j", "labels": {"a": "b" * 600}}, "status": {"s": "y" * 900}}
burst = [json.loads(json.dumps(item)) for _ in range(60000)]
survivors = burst[::97]
del burst
gc.collect()
before = rss()
trimmed = heap.release()
print(trimmed, before, rss())
"""


@pytest.mark.skipif(heap._malloc_trim() is None, reason="glibc's malloc_trim only")
def test_release_returns_a_bursts_freed_heap_to_the_system():
    paths = [str(ROOT / "operator"), str(ROOT / "api")]
    out = subprocess.run(
        [sys.executable, "-c", BURST, *paths], capture_output=True, text=True, check=True
    ).stdout.split()
    trimmed, before, after = out[0] == "True", int(out[1]), int(out[2])
    assert trimmed
    # ~100 MiB were freed before release(); a collection alone returned none of it
    assert before - after > 30 * 2**20, (before, after)


def test_release_is_a_collection_where_the_c_library_cannot_trim(monkeypatch):
    collected = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    monkeypatch.setattr(heap.gc, "collect", lambda: collected.append(True) or 0)
    assert heap.release() is False
    assert collected == [True]
