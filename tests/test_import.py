"""`import curvlinops` must not import any framework."""

import subprocess
import sys


def test_import_loads_no_framework():
    code = (
        "import sys, curvlinops, curvlinops.losses, curvlinops.backends, curvlinops.utils, "
        "curvlinops.examples, curvlinops.examples.functorch, "
        "curvlinops.papyan2020traces.spectrum; "
        "print(sorted(m for m in ('torch', 'jax', 'cupy', 'mlx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
