"""Handing freed host memory back after frozen forwards (`restuning.precision.release_freed_memory`)."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import CASES

import restuning
from restuning import BypassConfig, precision

_SCRIPT = """
import os, torch
from restuning.precision import release_freed_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big = torch.ones(8 * 2**20 // 4); del big  # freeing a mapped 8 MiB block raises glibc's mmap threshold
blocks = [torch.ones(2**20) for _ in range(64)]  # so these 64 blocks of 4 MiB come from the heap
keep = blocks[-1]  # and the heap's top stays in use: free() alone cannot shrink it
del blocks[:-1]
before = rss()
ran = release_freed_memory()
print(ran, (before - rss()) / 2**20)
"""


def test_release_freed_memory_hands_the_heaps_free_pages_back():
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True)
    ran, released_mib = done.stdout.split()
    assert ran == "True"  # glibc, as on every machine this project runs on
    assert float(released_mib) > 200, released_mib  # of the 252 MiB freed


def _counted(monkeypatch) -> list[int]:
    calls = [0]
    monkeypatch.setattr(precision, "release_freed_memory", lambda: calls.__setitem__(0, calls[0] + 1) or True)
    return calls


def test_the_frozen_forward_hands_memory_back_before_it_and_after_each_tapped_block_and_chunk_on_the_cpu(monkeypatch):
    case = CASES["vit"]
    calls = _counted(monkeypatch)
    for batch, chunks in ((None, 1), (1, 2)):  # the whole batch of 2, then one example per chunk
        torch.manual_seed(0)
        model = restuning.get_restuning_model(case.model(), BypassConfig(num_classes=3, backbone_batch=batch))
        taps = len(model.taps.points)
        assert taps >= 2
        calls[0] = 0
        model(**case.inputs())
        # before the forward, then per chunk: after each tapped block but the last, and after the chunk
        assert calls[0] == 1 + chunks * taps, (batch, calls[0])
    model.release_host_memory = False
    calls[0] = 0
    model(**case.inputs())
    assert calls[0] == 0
