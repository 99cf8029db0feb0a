"""Core product speed (issue 2): ratios to the same framework's loss+gradient.

MLP 784-256-256-10, tanh, cross-entropy, batch 1024, float32, on CPU with a
fixed thread count. Every timing is the minimum over repeats of a block of
calls, interleaved across contenders so that background load hits them alike.

Run: ``.venv/bin/python -m benchmarks.bench_core [--threads 2] [--repeats 7]``
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def timeit(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def measure(contenders: dict, repeats: int, number: int) -> dict:
    for fn in contenders.values():  # warm-up (and JAX compilation)
        fn()
        fn()
    best = {name: float("inf") for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            best[name] = min(best[name], timeit(fn, number))
    return best


def torch_contenders(problem):
    import torch
    from torch.func import functional_call, grad, jvp, vjp

    import curvlinops as cl

    fp = problem.torch()
    model, params, loss_func = fp.model_func, fp.params, fp.loss_func
    names = [n for n, _ in model.named_parameters()]
    Xt, yt = fp.data[0]
    H = cl.HessianLinearOperator(model, loss_func, params, fp.data)
    G = cl.GGNLinearOperator(model, loss_func, params, fp.data)
    P = H.shape[0]
    v = torch.randn(P)
    V = torch.randn(P, 16)
    v_np = v.numpy()
    primals = tuple(p.detach() for p in params)

    def f(p):
        return loss_func(functional_call(model, dict(zip(names, p)), (Xt,)), yt)

    def out(p):
        return functional_call(model, dict(zip(names, p)), (Xt,))

    def unflat(vec):
        return tuple(
            t.reshape(p.shape)
            for t, p in zip(torch.split(vec, [p.numel() for p in params]), params)
        )

    def gradient():
        model.zero_grad()
        loss_func(model(Xt), yt).backward()

    def raw_hvp_rev():
        _, pull = vjp(grad(f), primals)
        return pull(unflat(v))

    def raw_hvp_fwd():
        return jvp(grad(f), (primals,), (unflat(v),))[1]

    def raw_ggn():
        z, pull = vjp(out, primals)
        _, jv = jvp(out, (primals,), (unflat(v),))
        p = torch.softmax(z, 1)
        hjv = (p * jv - p * (p * jv).sum(1, keepdim=True)) / z.shape[0]
        return pull(hjv)

    def raw_ggn_aux():
        # forward mode inside reverse mode: one forward pass gives z and Jv
        z, pull, jv = vjp(lambda p: jvp(out, (p,), (unflat(v),)), primals, has_aux=True)
        p = torch.softmax(z, 1)
        hjv = (p * jv - p * (p * jv).sum(1, keepdim=True)) / z.shape[0]
        return pull(hjv)

    return {
        "gradient": gradient,
        "raw torch.func HVP (rev-over-rev)": raw_hvp_rev,
        "raw torch.func HVP (fwd-over-rev)": raw_hvp_fwd,
        "raw torch.func GGN (jvp, then vjp)": raw_ggn,
        "raw torch.func GGN (jvp inside vjp)": raw_ggn_aux,
        "curvlinops H@v (torch)": lambda: H @ v,
        "curvlinops H@v (numpy in/out)": lambda: H @ v_np,
        "curvlinops G@v (torch)": lambda: G @ v,
        "curvlinops H@V K=16": lambda: H @ V,
        "curvlinops 16 x H@v": lambda: [H @ V[:, k] for k in range(16)],
        "curvlinops G@V K=16": lambda: G @ V,
        "curvlinops 16 x G@v": lambda: [G @ V[:, k] for k in range(16)],
    }


def jax_contenders(problem):
    import jax
    import jax.numpy as jnp

    import curvlinops as cl

    fp = problem.jax()
    mlp, params = fp.forward, fp.params

    def loss(p, x, t):
        z = mlp(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), t[:, None], 1))

    Xj, yj = fp.data[0]
    H = cl.HessianLinearOperator(mlp, fp.loss_func, params, fp.data)
    G = cl.GGNLinearOperator(mlp, fp.loss_func, params, fp.data)
    P = H.shape[0]
    rng = np.random.default_rng(1)
    v_np = rng.standard_normal(P).astype(np.float32)
    v = jnp.asarray(v_np)
    V = jnp.asarray(rng.standard_normal((P, 16)).astype(np.float32))
    grad_fn = jax.jit(jax.value_and_grad(loss))
    from jax.flatten_util import ravel_pytree

    _, unravel = ravel_pytree(params)

    @jax.jit
    def raw_hvp(p, x, t, vec):
        return jax.jvp(jax.grad(lambda q: loss(q, x, t)), (p,), (unravel(vec),))[1]

    @jax.jit
    def raw_ggn(p, x, t, vec):
        z, jv = jax.jvp(lambda q: mlp(q, x), (p,), (unravel(vec),))
        _, pull = jax.vjp(lambda q: mlp(q, x), p)
        pr = jax.nn.softmax(z)
        hjv = (pr * jv - pr * (pr * jv).sum(1, keepdims=True)) / z.shape[0]
        return pull(hjv)[0]

    def block(fn):
        return lambda: jax.block_until_ready(fn())

    return {
        "gradient": block(lambda: grad_fn(params, Xj, yj)),
        "raw jax.jit HVP": block(lambda: raw_hvp(params, Xj, yj, v)),
        "raw jax.jit GGN": block(lambda: raw_ggn(params, Xj, yj, v)),
        "curvlinops H@v (jax)": block(lambda: H @ v),
        "curvlinops H@v (numpy in/out)": lambda: H @ v_np,
        "curvlinops G@v (jax)": block(lambda: G @ v),
        "curvlinops H@V K=16": block(lambda: H @ V),
        "curvlinops 16 x H@v": block(lambda: [H @ V[:, k] for k in range(16)]),
        "curvlinops G@V K=16": block(lambda: G @ V),
        "curvlinops 16 x G@v": block(lambda: [G @ V[:, k] for k in range(16)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--number", type=int, default=5)
    parser.add_argument("--backends", default="torch,jax")
    args = parser.parse_args()
    os.environ.setdefault(
        "XLA_FLAGS",
        f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}",
    )
    from benchmarks.problems import make_problem

    problem = make_problem("mlp")  # the suite's MLP: same weights and data in both frameworks
    print("| backend | operation | ms | ratio to gradient |\n|---|---|---:|---:|")
    for name in args.backends.split(","):
        if name == "torch":
            import torch

            torch.set_num_threads(args.threads)
            contenders = torch_contenders(problem)
        else:
            contenders = jax_contenders(problem)
        times = measure(contenders, args.repeats, args.number)
        unit = times["gradient"]
        for op, t in times.items():
            print(f"| {name} | {op} | {1e3 * t:.2f} | {t / unit:.2f} |")


if __name__ == "__main__":
    main()
