"""Where the block kernels cannot be built (no C compiler) or are switched off,
``decode_mode='quantized'`` keeps torch's int4 kernel and says why. Runs with or without a
compiler: each case is a fresh Python process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**os.environ, **env}, timeout=300)


def test_without_a_compiler_quantized_decoding_keeps_torchs_int4_kernel(tmp_path: Path) -> None:
    sys_path = str(Path(__file__).parent)
    code = f"""
import sys; sys.path.insert(0, {sys_path!r})
from pathlib import Path
from tinymodels import write_tiny_llama
from kernel_ext.gguf import blockdot
from kernel_ext.gguf.loader import load_transformers
from kernel_ext.providers.decode import Source, prepare
print(blockdot.unavailable())
path = write_tiny_llama(Path({str(tmp_path)!r}) / "q8.gguf", quant="Q8_0", seed=1)
ready = prepare(load_transformers(path).model, "quantized", source=Source(path))
print(ready.mode, "|", ready.summary)
"""
    done = _python(code, {"KERNEL_EXT_CACHE": str(tmp_path), "CC": "/bin/false"})
    assert done.returncode == 0, done.stderr
    why, result = done.stdout.strip().split("\n")[-2:]
    assert "failed" in why
    assert result.startswith("quantized |") and "int4 from the file's blocks" in result
    assert "block kernels unavailable: " in result and "failed" in result  # %model info says why
    off = _python(code, {"KERNEL_EXT_BLOCKDOT": "0"})
    assert "KERNEL_EXT_BLOCKDOT=0" in off.stdout and "int4 from the file's blocks" in off.stdout
