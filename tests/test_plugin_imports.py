"""The napari plugin's import guard: Triton hidden only while torch and torchvision load, then
restored."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_triton_is_hidden_only_while_torch_loads(tmp_path):
    (tmp_path / "triton").mkdir()
    marker = tmp_path / "loaded.txt"
    (tmp_path / "triton" / "__init__.py").write_text(  # a stand-in for an installed Triton
        "import pathlib, sys\n"
        f"pathlib.Path({str(marker)!r}).write_text(str('torchvision' in sys.modules))\n")
    code = ("import sys\n"
            "from napari_plugin import import_torch_without_triton\n"
            "import_torch_without_triton()\n"
            "assert 'torch' in sys.modules and 'torchvision' in sys.modules\n"
            "assert 'triton' not in sys.modules, 'the mark is left in sys.modules'\n"
            "import triton\n")  # other code of the process imports it as usual
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    assert marker.read_text() == "True"  # loaded by that import, after torch, never during


def test_torch_loaded_first_still_gets_torchvision_without_triton(tmp_path):
    # torch already imported (by the user or another plugin), torchvision not yet: the guard
    # must still hide Triton while torchvision's operators load (they import torch._dynamo,
    # which reaches Triton; under napari's OpenGL context that import crashes)
    (tmp_path / "triton").mkdir()
    marker = tmp_path / "loaded.txt"
    (tmp_path / "triton" / "__init__.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n")
    code = ("import sys, torch\n"
            "assert 'torchvision' not in sys.modules\n"
            "from napari_plugin import import_torch_without_triton\n"
            "import_torch_without_triton()\n"
            "assert 'torchvision.ops' in sys.modules and 'triton' not in sys.modules\n"
            "import pathlib\n"
            f"assert not pathlib.Path({str(marker)!r}).exists(), 'Triton loaded with torchvision'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


def test_nothing_is_touched_once_torchvision_is_loaded():
    code = ("import sys, torch, torchvision.ops\n"
            "before = dict(sys.modules)\n"
            "from napari_plugin import import_torch_without_triton\n"
            "import_torch_without_triton()\n"
            "assert sys.modules.get('triton', 0) is before.get('triton', 0)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
