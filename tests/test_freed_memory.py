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


def test_the_frozen_forward_hands_memory_back_before_it_after_each_chunk_and_between_blocks_where_it_grew(monkeypatch):
    case = CASES["vit"]
    calls = _counted(monkeypatch)
    for batch, chunks in ((None, 1), (1, 2)):  # the whole batch of 2, then one example per chunk
        torch.manual_seed(0)
        model = restuning.get_restuning_model(case.model(), BypassConfig(num_classes=3, backbone_batch=batch))
        taps = len(model.taps.points)
        assert taps >= 2
        calls[0] = 0
        model(**case.inputs())
        assert calls[0] == 1 + chunks, (batch, calls[0])  # a tiny model's blocks grow nothing like 128 MiB
        model.hand_back_growth = -2**62  # whatever the growth: after each tapped block but the last, too
        calls[0] = 0
        model(**case.inputs())
        assert calls[0] == 1 + chunks * taps, (batch, calls[0])
        model.hand_back_growth = 2**62
    model.release_host_memory = False
    calls[0] = 0
    model(**case.inputs())
    assert calls[0] == 0


def test_between_blocks_the_frozen_forward_hands_back_only_once_the_resident_set_grew_by_the_bound(monkeypatch):
    case = CASES["vit"]
    calls = _counted(monkeypatch)
    resident = [0]

    def growing() -> int:  # every read finds the process 100 MiB larger
        resident[0] += 100 * 2**20
        return resident[0]

    monkeypatch.setattr(precision, "resident_bytes", growing)
    torch.manual_seed(0)
    model = restuning.get_restuning_model(case.model(), BypassConfig(num_classes=3, backbone_batch=1))
    taps = len(model.taps.points)
    for bound, between in ((150 * 2**20, 0), (50 * 2**20, 2 * (taps - 1))):
        model.hand_back_growth = bound
        calls[0] = 0
        model(**case.inputs())
        # before the forward and after each of its 2 chunks; between blocks where 100 MiB >= the bound
        assert calls[0] == 1 + 2 + between, (bound, calls[0])


def _growing(monkeypatch, step: int) -> None:
    """Every read of the resident set finds the process `step` bytes larger than the last."""
    resident = [0]

    def read() -> int:
        resident[0] += step
        return resident[0]

    monkeypatch.setattr(precision, "resident_bytes", read)


def test_an_int8_backbones_forward_also_hands_back_after_each_int8_layer_where_it_grew(monkeypatch):
    case = CASES["vit"]
    backbone = restuning.set_backbone_dtype(case.model(), "int8")
    int8_layers = [m for m in backbone.modules() if any(precision.is_quantized(p) for p in m.parameters(False))]
    assert int8_layers
    run = [0]
    for layer in int8_layers:  # counts the int8 layers a forward runs (it stops after the last tap)
        layer.register_forward_hook(lambda *_: run.__setitem__(0, run[0] + 1))
    torch.manual_seed(0)
    model = restuning.get_restuning_model(backbone, BypassConfig(num_classes=3))
    taps = len(model.taps.points)
    calls = _counted(monkeypatch)
    _growing(monkeypatch, 100 * 2**20)
    for bound, checks in ((150 * 2**20, None), (50 * 2**20, "every")):
        model.hand_back_growth = bound
        calls[0] = run[0] = 0
        model(**case.inputs())
        assert run[0] > 0
        between = taps - 1 + run[0]  # checks: after each tapped block but the last, and each int8 layer run
        # before and after the forward; between, at every check, or (100 MiB a read) at every other one: the
        # second check after a hand-back is the first to find 150 MiB more
        assert calls[0] == 2 + (between if checks == "every" else between // 2), (calls[0], taps, run[0])
    backbone = model.unload()  # the int8 layers' checks go with the taps
    model.hand_back_growth = 0
    calls[0] = 0
    with torch.no_grad():
        backbone(**case.inputs())
    assert calls[0] == 0


def test_building_or_converting_a_held_model_hands_back_after_a_module_where_the_resident_set_grew(monkeypatch):
    def build() -> torch.nn.Module:
        return torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(5)))

    def converted() -> torch.nn.Module:
        return restuning.set_backbone_dtype(build(), "int8")

    modules, layers = len(list(build().modules())), 5
    # flat: only the first check (nothing handed back before it) and the conversion's own hand-back at its end;
    # growing: after each module built, or layer quantized, too
    for step, built, quantized in ((0, 2, 2), (precision.CONVERSION_GROWTH, modules + 1, layers + 1)):
        calls = _counted(monkeypatch)
        _growing(monkeypatch, step)
        precision.build_held(build, "bfloat16", lambda name, meta: torch.zeros(meta.shape))
        assert calls[0] == built, (step, calls[0])
        calls[0] = 0
        converted()
        assert calls[0] == quantized, (step, calls[0])
