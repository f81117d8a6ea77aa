import os

import pytest
import torch

# Triton kernels run on CPU only through the interpreter, and it must be chosen before triton
# is first imported. Where a GPU is present the real kernels run instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
