"""The app's allocator setting: applied on glibc, the user's environment variables win."""

import subprocess
import sys

import pytest

from lightning_qat.app import allocator


def test_the_users_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert allocator.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_stop_being_mmapped():
    """After the call a 64 MB tensor comes from the heap: no new mapping appears."""
    probe = (
        "import torch\n"
        "from lightning_qat.app.allocator import keep_freed_memory\n"
        "def maps(): return sum(1 for _ in open('/proc/self/maps'))\n"
        "assert keep_freed_memory()\n"
        "before = maps(); x = torch.empty(16 * 2**20); x.fill_(1); after = maps()\n"
        "print(after - before)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert int(out.split()[-1]) == 0
