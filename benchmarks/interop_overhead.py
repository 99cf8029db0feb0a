"""What a product pays for converting the caller's array, on a vector of P = 270,000.

The operator's own work is a scale (``2 * X``) in the backend's framework, so
the times are the conversion path of ``LinearOperator._apply`` (import, NaN
check, export) plus that scale; the row whose input is the backend's own
array is the baseline, and ``raw 2*x`` the scale alone. Each time is the
minimum over ``--repeats`` blocks of ``--number`` calls, as process CPU time
(all threads; other processes' load hardly changes it) and as wall time.

Run: ``.venv/bin/python benchmarks/interop_overhead.py [--size 270000] [--dtype float32]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def min_time(fn, repeats: int, number: int, clock=time.perf_counter) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(number):
            fn()
        best = min(best, (clock() - start) / number)
    return best


def cpu_and_wall(fn, repeats: int, number: int) -> tuple[float, float]:
    """Process CPU time (all threads; robust to other processes' load) and wall time."""
    return (
        min_time(fn, repeats, number, time.process_time),
        min_time(fn, repeats, number, time.perf_counter),
    )


def scale_operator(backend):
    """A curvlinops operator ``2 I`` computed by ``backend`` (no model involved)."""
    from curvlinops._base import LinearOperator

    class Scale(LinearOperator):
        def _native(self, X, adjoint):
            return 2.0 * X

    n = sum(int(np.prod(s)) for s in backend.param_shapes)
    op = Scale(backend.dtype, (n, n))
    op.backend = backend
    return op


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=270_000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--number", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads")
    args = parser.parse_args()

    import array_api_strict as xps
    import jax
    import jax.numpy as jnp
    import torch

    from curvlinops.backends._jax import JaxBackend
    from curvlinops.backends._torch import TorchBackend

    jax.config.update("jax_enable_x64", True)
    torch.set_num_threads(args.threads)
    n, dtype = args.size, np.dtype(args.dtype)
    host = np.random.default_rng(0).normal(size=n).astype(dtype)
    inputs = {
        "numpy": host,
        "torch": torch.as_tensor(host.copy()),
        "jax": jnp.asarray(host),
        "array_api_strict": xps.asarray(host.copy()),
    }
    backends = {
        "jax": JaxBackend(lambda p, X: X, {"w": jnp.zeros(n, dtype=dtype)}),
        "torch": TorchBackend(lambda p, X: X, [torch.zeros(n, dtype=getattr(torch, dtype.name))]),
    }
    raw = {
        "jax": jax.jit(lambda x: 2.0 * x),
        "torch": lambda x: 2.0 * x,
    }
    print(f"P = {n}, {dtype}, torch threads = {torch.get_num_threads()}, JAX on "
          f"{jax.devices()[0]}; minimum over {args.repeats} x {args.number} calls")  # fmt: skip
    print(
        f"{'backend':8} | {'input':17} | {'CPU time':>10} | {'wall time':>10} | {'extra CPU':>12}"
    )
    print("-" * 70)
    for name, backend in backends.items():
        _rows(name, backend, inputs, raw[name], args)


def _rows(name, backend, inputs, raw, args) -> None:
    import jax

    op = scale_operator(backend)
    native_input = inputs[name]

    def sync(y):
        return jax.block_until_ready(y) if name == "jax" else y

    t_raw = cpu_and_wall(lambda: sync(raw(native_input)), args.repeats, args.number)
    t_native = cpu_and_wall(lambda: sync(op @ native_input), args.repeats, args.number)
    print(f"{name:8} | {'raw 2*x':17} | {_us(t_raw)} | {'':>12}")
    for label, x in inputs.items():
        if label == name:
            t, extra = t_native, "baseline"
        else:
            t = cpu_and_wall(lambda x=x: sync(op @ x), args.repeats, args.number)
            extra = f"{(t[0] - t_native[0]) * 1e6:+.0f} us"
        print(f"{name:8} | {label:17} | {_us(t)} | {extra:>12}")


def _us(times: tuple[float, float]) -> str:
    return f"{times[0] * 1e6:7.0f} us | {times[1] * 1e6:7.0f} us"


if __name__ == "__main__":
    main()
