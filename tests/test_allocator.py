"""The allocator setting: applied on glibc by the app and by the callback's ``fit`` on the
CPU, the user's environment variables win; the old import path keeps working."""

import os
import subprocess
import sys

import pytest

from lightning_qat.app import allocator


def test_the_users_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert allocator.keep_freed_memory() is False


PROBE = """
import ctypes
import torch
from lightning_qat import keep_freed_memory

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if APPLY:
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd  # bytes in blocks glibc mmapped on their own
x = torch.empty(16 * 2**20)  # 64 MB: above glibc's largest dynamic mmap threshold
x.fill_(1)
print(libc.mallinfo2().hblkhd - before)
"""


def _mmapped_bytes(apply: bool) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    code = PROBE.replace("APPLY", str(apply))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_stop_being_mmapped():
    """A 64 MB tensor is a block of its own that glibc mmaps (and unmaps on free, so the
    next step maps and zero-fills it again); after the call it comes from the heap."""
    assert _mmapped_bytes(apply=False) >= 64 * 2**20
    assert _mmapped_bytes(apply=True) == 0


def test_the_old_import_path_is_the_same_function():
    import lightning_qat

    assert allocator.keep_freed_memory is lightning_qat.keep_freed_memory


FIT = """
import sys
import lightning as L
sys.path.insert(0, TESTS)
from lightning_helpers import DigitsClassifier, DigitsData, trainer_kwargs
from lightning_qat import QuantizationAwareTraining

callback = QuantizationAwareTraining(verbose=False, keep_freed_memory=KEEP)
L.Trainer(callbacks=[callback], **trainer_kwargs(TMP, max_epochs=1, limit_train_batches=2,
          limit_val_batches=0)).fit(DigitsClassifier(), DigitsData())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("keep", [True, False])
def test_fit_with_the_callback_applies_it_unless_told_not_to(tmp_path, keep):
    """Plain-Python Lightning users get the setting from the callback without asking (the
    QAT step's ratio to FP32 under glibc's default rests on it), and can refuse it."""
    fit = FIT.replace("TESTS", repr(os.path.dirname(__file__))).replace("TMP", repr(str(tmp_path)))
    code = PROBE.replace("if APPLY:", fit.replace("KEEP", str(keep)) + "\nif False:")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    mmapped = int(out.split()[-1])
    assert mmapped == 0 if keep else mmapped >= 64 * 2**20
