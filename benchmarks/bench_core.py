"""Core product speed (issue 2): ratios to the same framework's loss+gradient.

MLP 784-256-256-10, tanh, cross-entropy, batch 1024, float32, on CPU with a
fixed thread count. Every timing is the minimum over repeats of a block of
calls, interleaved across contenders so that background load hits them alike.

Run: ``.venv/bin/python benchmarks/bench_core.py [--threads 2] [--repeats 7]``
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def build_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = [784, 256, 256, 10]
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        weights.append(
            (rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
        )
        weights.append((0.1 * rng.standard_normal(fan_out)).astype(np.float32))
    X = rng.standard_normal((1024, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=1024)
    return weights, X, y


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


def torch_contenders(weights, X, y):
    import torch
    from torch.func import functional_call, grad, jvp, vjp

    import curvlinops as cl

    model = torch.nn.Sequential(
        torch.nn.Linear(784, 256),
        torch.nn.Tanh(),
        torch.nn.Linear(256, 256),
        torch.nn.Tanh(),
        torch.nn.Linear(256, 10),
    )
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(torch.from_numpy(w))
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    loss_func = torch.nn.CrossEntropyLoss()
    data = [(Xt, yt)]
    H = cl.HessianLinearOperator(model, loss_func, params, data)
    G = cl.GGNLinearOperator(model, loss_func, params, data)
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


def jax_contenders(weights, X, y):
    import jax
    import jax.numpy as jnp

    import curvlinops as cl

    params = [jnp.asarray(w) for w in weights]

    def mlp(p, x):
        w1, b1, w2, b2, w3, b3 = p
        h = jnp.tanh(x @ w1.T + b1)
        h = jnp.tanh(h @ w2.T + b2)
        return h @ w3.T + b3

    def loss(p, x, t):
        z = mlp(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), t[:, None], 1))

    Xj, yj = jnp.asarray(X), jnp.asarray(y)
    data = [(X, y)]
    H = cl.HessianLinearOperator(mlp, cl.losses.CrossEntropyLoss(), params, data)
    G = cl.GGNLinearOperator(mlp, cl.losses.CrossEntropyLoss(), params, data)
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
    weights, X, y = build_data()
    print("| backend | operation | ms | ratio to gradient |\n|---|---|---:|---:|")
    for name in args.backends.split(","):
        if name == "torch":
            import torch

            torch.set_num_threads(args.threads)
            contenders = torch_contenders(weights, X, y)
        else:
            contenders = jax_contenders(weights, X, y)
        times = measure(contenders, args.repeats, args.number)
        unit = times["gradient"]
        for op, t in times.items():
            print(f"| {name} | {op} | {1e3 * t:.2f} | {t / unit:.2f} |")


if __name__ == "__main__":
    main()
