"""The fused image-attention kernel (ipadapter_core/fused.py), run on the CPU by Triton's interpreter: the same
kernel source the GPU compiles, checked against hand-written float32 attention and against the unfused patch.
(The interpreter's bf16 matrix products are wrong, so it checks fp16; bf16 is checked on the GPU by
tests/gpu/test_fused_cuda.py.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fused_interpreted.py")


def test_fused_kernel_matches_unfused_attention_in_triton_interpreter():
    pytest.importorskip("triton", reason="LOUD SKIP: Triton is not installed, so the fused kernel (GPU only) cannot "
                                         "be checked here; PyTorch's Linux builds ship it")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "checked 16 cases" in run.stdout, run.stdout


def test_a_broken_triton_install_leaves_the_pack_loading_without_the_fused_kernel(tmp_path):
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('broken install: libcuda.so not found')\n")
    code = ("import ipadapter_core, torch; from ipadapter_core import fused; "
            "assert fused.triton is None; assert not fused.usable(torch.zeros(1, 2, 8, dtype=torch.float16)); "
            "print('loaded')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(SCRIPT.parents[2])]))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "loaded" in run.stdout, run.stdout + run.stderr
