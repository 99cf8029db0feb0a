"""The comparison helper of helpers.py: it passes what is close, fails what is not."""

import numpy as np
import pytest
from helpers import assert_close, run_processes, tolerance


def test_passes_within_tolerance():
    expected = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    assert_close(expected * (1 + 1e-12), expected)
    # entries near zero are judged against the largest entry, not their own size
    assert_close(expected + 1e-12, expected)


def test_fails_and_names_the_worst_entries():
    expected = np.zeros((3, 4))
    expected[0, 0] = 1.0
    actual = expected.copy()
    actual[2, 1] = 1e-3
    actual[1, 3] = 5e-3
    with pytest.raises(AssertionError) as info:
        assert_close(actual, expected, name="M")
    message = str(info.value)
    assert "M: 2 of 12 entries differ" in message
    lines = message.splitlines()
    # worst entry first, with index, values and the allowed error
    assert lines[1].strip().startswith("(1, 3): actual=np.float64(0.005)")
    assert lines[2].strip().startswith("(2, 1): actual=np.float64(0.001)")
    assert "allowed=" in lines[1]


def test_nan_fails():
    with pytest.raises(AssertionError, match="1 of 3 entries differ"):
        assert_close(np.array([1.0, np.nan, 2.0]), np.array([1.0, 1.0, 2.0]))


def test_tolerance_scales_with_dtype():
    expected = np.ones(5)
    actual32 = (expected * (1 + 1e-7)).astype(np.float32)
    assert_close(actual32, expected)  # float32 tolerance
    with pytest.raises(AssertionError):
        assert_close(expected * (1 + 1e-7), expected)  # float64 tolerance
    assert tolerance(np.float32, np.float64) == tolerance(np.float32)
    assert tolerance(np.float64) < tolerance(np.float32) < tolerance(np.float16)


def test_shapes_and_structures_must_match():
    with pytest.raises(AssertionError, match=r"shape \(3,\) != expected shape \(3, 1\)"):
        assert_close(np.ones(3), np.ones((3, 1)))
    with pytest.raises(AssertionError, match="structures differ"):
        assert_close([np.ones(2)], [np.ones(2), np.ones(2)])
    assert_close({"a": [np.ones(2)]}, {"a": [np.ones(2)]})
    with pytest.raises(AssertionError, match=r"x\['a'\]\[0\]: 1 of 2 entries differ"):
        assert_close({"a": [np.array([1.0, 2.0])]}, {"a": [np.ones(2)]}, name="x")


def test_accepts_framework_arrays():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    a = np.arange(4.0)
    assert_close(torch.tensor(a, requires_grad=True) * 1.0, jnp.asarray(a))
    with pytest.raises(AssertionError):
        assert_close(torch.tensor(a + 1.0), jnp.asarray(a))


def test_run_processes_reports_a_failing_process():
    import os

    ok, bad = ["-c", "pass"], ["-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    run_processes([ok, ok], dict(os.environ), 30, "two good ones")
    expected = r"processes \[1\] failed[\s\S]*exit 3[\s\S]*boom"
    with pytest.raises(pytest.fail.Exception, match=expected):
        run_processes([ok, bad], dict(os.environ), 30, "one bad one")


def test_xla_flags_are_ones_this_jaxlib_knows():
    """The tests' compile flags: only flags XLA has (it aborts on others), and they work."""
    pytest.importorskip("jax")
    import os
    import subprocess
    import sys

    from helpers import fast_compile_xla_flags

    from curvlinops.backends._namespaces import xla_knows

    assert xla_knows("xla_backend_optimization_level")
    assert not xla_knows("xla_no_such_flag_anywhere")
    flags = fast_compile_xla_flags()
    assert "--xla_backend_optimization_level=0" in flags
    code = "import jax.numpy as jnp; print(float(jnp.arange(4.0).sum()))"
    env = {**os.environ, "XLA_FLAGS": flags}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "6.0", result.stderr
