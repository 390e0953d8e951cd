"""pkd.cpu_memory: freed CPU memory is kept for reuse (each check in a fresh process, since the
setting is process-wide)."""
import json
import os
import platform
import subprocess
import sys

import pytest

from pkd.cpu_memory import OPT_OUT_ENV

# Allocates and frees a 64 MiB tensor ROUNDS times; prints whether the setting took effect and the
# minor page faults of each allocation.
PROBE = r"""
import json, resource, torch
from pkd.cpu_memory import retain_freed_cpu_memory, retains_freed_cpu_memory
applied = retain_freed_cpu_memory()
faults = []
for _ in range(%d):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 1024 * 1024)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "in_effect": retains_freed_cpu_memory(), "faults": faults}))
"""
# The heap grows by a block's size during the first few rounds (measured: 2 to 6 of them), because
# small allocations made between the rounds split the freed block; after that it is reused.
ROUNDS, SETTLED_FROM = 24, 12
PAGES = 64 * 1024 * 1024 // 4096
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def run_probe(**env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop(OPT_OUT_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE % ROUNDS], env={**clean, **env}, capture_output=True,
        text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's (mallopt); elsewhere it is a no-op")
def test_freed_memory_is_reused_without_page_faults():
    kept = run_probe()
    assert kept["applied"] and kept["in_effect"]
    # Once the heap has reached its high-water mark, the same block is reused: no fresh pages.
    assert max(kept["faults"][SETTLED_FROM:]) < PAGES // 100, kept
    # glibc's default gives a 64 MiB block back to the kernel on free: every allocation faults.
    default = run_probe(**{OPT_OUT_ENV: "default"})
    assert not default["applied"] and not default["in_effect"]
    assert min(default["faults"][SETTLED_FROM:]) > PAGES // 2, default


def test_users_own_malloc_settings_are_respected():
    result = run_probe(MALLOC_TRIM_THRESHOLD_="1000000")
    assert not result["applied"] and not result["in_effect"]
    result = run_probe(GLIBC_TUNABLES="glibc.malloc.mmap_max=0")
    assert not result["applied"]
