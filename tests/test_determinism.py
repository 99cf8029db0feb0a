"""check_deterministic: data or models that change between passes are refused.

The error names the likely cause (shuffled loader, dropout, changing data,
random loss); ``check_deterministic=False`` skips the check.
"""

import numpy as np
import pytest

import curvlinops
from curvlinops import GGNLinearOperator, HessianLinearOperator, JacobianLinearOperator

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

N, D_IN, C = 12, 3, 2


def operator(kind, model, loss, params, data, **options):
    if kind == "J":
        return JacobianLinearOperator(model, params, data, **options)
    cls = HessianLinearOperator if kind == "H" else GGNLinearOperator
    return cls(model, loss, params, data, **options)


class ChangingData:
    """Re-iterable whose values change on every pass (as random augmentation would)."""

    def __init__(self, library):
        self.library, self.passes = library, 0

    def __iter__(self):
        self.passes += 1
        rng = np.random.default_rng(self.passes)
        for n in (4, 3):
            X, y = rng.normal(size=(n, D_IN)), rng.normal(size=(n, C))
            if self.library == "torch":
                X, y = torch.as_tensor(X), torch.as_tensor(y)
            yield X, y


class GrowingData:
    """Re-iterable that yields one more batch on every pass."""

    def __init__(self, library):
        self.library, self.passes = library, 0

    def __iter__(self):
        self.passes += 1
        rng = np.random.default_rng(0)
        for _ in range(self.passes):
            X, y = rng.normal(size=(3, D_IN)), rng.normal(size=(3, C))
            if self.library == "torch":
                X, y = torch.as_tensor(X), torch.as_tensor(y)
            yield X, y


def torch_setup(dropout=False):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(D_IN, 4), torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(0.5))
    model = torch.nn.Sequential(*layers, torch.nn.Linear(4, C)).double()
    return model, torch.nn.MSELoss(), list(model.parameters())


def jax_setup(noise=False):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(D_IN, C)))}
    noise_rng = np.random.default_rng(1)

    def model(p, X):
        out = jnp.tanh(X @ p["w"])
        if noise:  # randomness outside JAX's PRNG: every eager call differs
            out = out + noise_rng.normal(size=out.shape)
        return out

    return model, curvlinops.losses.MSELoss(), params


def setup(backend):
    return torch_setup() if backend == "torch" else jax_setup()


def shuffled_loader():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, D_IN, dtype=torch.float64, generator=gen)
    y = torch.randn(N, C, dtype=torch.float64, generator=gen)
    dataset = torch.utils.data.TensorDataset(X, y)
    return torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, generator=gen)


@pytest.mark.parametrize("kind", ["H", "G", "J"])
def test_shuffled_dataloader(kind):
    model, loss, params = torch_setup()
    with pytest.raises(RuntimeError, match=r"data: batch 0 differed .*shuffle=True"):
        operator(kind, model, loss, params, shuffled_loader())
    # skipped on request: the operator is built and works
    A = operator(kind, model, loss, params, shuffled_loader(), check_deterministic=False)
    assert np.isfinite(A @ np.ones(A.shape[1])).all()


def test_unshuffled_dataloader_passes():
    model, loss, params = torch_setup()
    loader = shuffled_loader()
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=5, shuffle=False)
    H = HessianLinearOperator(model, loss, params, loader)
    assert H.num_data == N


@pytest.mark.parametrize("kind", ["H", "G", "J"])
def test_dropout_in_train_mode(kind):
    model, loss, params = torch_setup(dropout=True)
    data = [(torch.randn(5, D_IN, dtype=torch.float64), torch.randn(5, C, dtype=torch.float64))]
    model.train()
    with pytest.raises(RuntimeError, match=r"model_func: two evaluations .*Dropout.*model\.eval"):
        operator(kind, model, loss, params, data)
    operator(kind, model, loss, params, data, check_deterministic=False)
    model.eval()
    operator(kind, model, loss, params, data)  # deterministic now


def test_random_model_jax():
    model, loss, params = jax_setup(noise=True)
    data = [(np.ones((3, D_IN)), np.ones((3, C)))]
    with pytest.raises(RuntimeError, match=r"model_func: two evaluations on batch 0"):
        HessianLinearOperator(model, loss, params, data)
    HessianLinearOperator(model, loss, params, data, check_deterministic=False)


def test_random_loss():
    """Same data and outputs, but the loss draws random numbers: the products differ."""
    model, _, params = torch_setup()

    class NoisyLoss:
        reduction = "sum"

        def __call__(self, outputs, targets):
            scale = 1.0 + torch.rand(()).to(outputs.dtype)
            return scale * ((outputs - targets) ** 2).sum()

    data = [(torch.randn(5, D_IN, dtype=torch.float64), torch.randn(5, C, dtype=torch.float64))]
    with pytest.raises(RuntimeError, match=r"two products with the same vector differ"):
        HessianLinearOperator(model, NoisyLoss(), params, data)
    HessianLinearOperator(model, NoisyLoss(), params, data, check_deterministic=False)


@pytest.mark.parametrize("kind", ["H", "J"])
def test_data_that_changes_between_passes(backend_name, kind):
    model, loss, params = setup(backend_name)
    with pytest.raises(RuntimeError, match=r"data: batch 0 differed between two passes"):
        operator(kind, model, loss, params, ChangingData(backend_name))
    operator(kind, model, loss, params, ChangingData(backend_name), check_deterministic=False)


def test_data_whose_length_changes(backend_name):
    model, loss, params = setup(backend_name)
    with pytest.raises(RuntimeError, match=r"data: two passes gave 2 and 3 batches"):
        HessianLinearOperator(model, loss, params, GrowingData(backend_name))
    H = HessianLinearOperator(
        model, loss, params, GrowingData(backend_name), check_deterministic=False
    )
    assert H.shape[0] == sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
