"""Running Triton kernels in the interpreter from pytest (shared by the kernel tests).

Triton picks interpreted or compiled at decoration time, for its own standard library too
(tl.max, tl.cdiv), so TRITON_INTERPRET must be set before triton is first imported. Another
test may already have imported it in this process, and setting the variable there would leak
into later tests, so each kernel test file runs its kernel tests (named test_interpreter_*)
in a child pytest with the variable set, through `run_interpreter_child`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

IN_INTERPRETER_CHILD = os.environ.get("OMNI_TRITON_INTERPRETER_CHILD") == "1"
in_child_only = pytest.mark.skipif(
    not IN_INTERPRETER_CHILD, reason="runs in the TRITON_INTERPRET=1 child process"
)
not_in_child = pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="runs outside the interpreter")


def run_interpreter_child(test_file: str, num_tests: int) -> None:
    """Run `test_file`'s test_interpreter_* tests under TRITON_INTERPRET=1; all must pass."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMNI_TRITON_INTERPRETER_CHILD="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-k", "interpreter_", test_file]
    child = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert f"{num_tests} passed" in child.stdout, child.stdout[-2000:]


def fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a loaded scalar into a Python int with int() of a
    shape-(1,) array, which numpy >= 2.4 refuses ("only 0-dimensional arrays ..."); a
    `range` over a loaded bound hits it. Convert through .item() instead."""
    from triton.runtime import interpreter

    original_patch = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor: object, scope: object) -> None:
        original_patch(tensor, scope)
        scope.set_attr(  # type: ignore[attr-defined]
            tensor, "__index__", lambda self: int(self.handle.data.item())
        )

    interpreter._patch_lang_tensor = patch_lang_tensor
