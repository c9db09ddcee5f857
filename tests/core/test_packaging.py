"""Installable next to the user's PyTorch: version ranges with tested minimums, the exact CI
versions in a constraints file, and a core that imports none of the zoo's dependencies."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _pins(text):
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M))


def _requirements(pyproject):
    """``name -> spec`` of every quoted requirement string in pyproject.toml's [project] tables."""
    pyproject = pyproject[pyproject.index("[project]"):pyproject.index("[project.scripts]")]
    return dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)\s*([<>=!~][^";]*)?[^"]*",', pyproject, re.M))


def test_requirements_are_ranges_whose_minimums_are_the_tested_ones():
    req = _requirements(_read("pyproject.toml"))
    for name in ("torch", "torchvision", "numpy", "numba", "safetensors"):
        assert req.get(name, "").startswith(">="), (name, req.get(name))
    assert not any(spec.startswith("==") for name, spec in req.items() if name != "spconv"), req
    minimum = _pins(_read(".ci", "constraints-min.txt"))
    for name in ("torch", "torchvision", "numpy", "numba", "safetensors"):
        declared = req[name][2:].strip()
        assert minimum[name].startswith(declared), (name, declared, minimum[name])  # 2.11 -> 2.11.0
    exact = _pins(_read(".ci", "constraints.txt"))
    assert exact["torch"] == "2.14.1" and exact["torchvision"] == "0.29.1"
    assert "-c .ci/constraints.txt" in _read(".ci", "run") and "-c .ci/constraints.txt" in _read("README.md")


def test_the_core_works_without_the_zoos_dependencies():
    """``import spconv2d`` and an op, with the zoo's dependencies made unimportable."""
    code = ("import sys\n"
            "BLOCKED = {'torchvision', 'matplotlib', 'mlxtend', 'safetensors', 'tqdm', 'PIL'}\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in BLOCKED:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import torch, spconv2d as sp\n"
            "x = sp.SparseTensor.from_dense(torch.rand(2, 3, 8, 8))\n"
            "y = sp.nn.SparseBatchNorm2d(4)(sp.nn.SubMConv2d(3, 4, 3)(x))\n"
            "print(y.features.shape[1], 'spconv2d.zoo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4 False", out.stdout
