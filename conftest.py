"""pytest set-up for `pytest test_all.py`: Triton kernels run under the CPU interpreter, and the
session-scoped fixtures of tests/helpers.py are visible to every test module."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import task_dir, tiny_model_dir  # noqa: E402,F401  (fixtures)
