"""experiments.overhead_peers: the PyTorch ghost-GNQ Gram against explicit
per-example gradients, GNQ against gujax's, a smoke run, and the clean exit
without the optional peers (torch, opacus)."""
import json

import numpy as np
import pytest

from experiments import overhead_peers


def test_exits_cleanly_with_a_message_without_torch(monkeypatch, capsys, tmp_path):
    real = overhead_peers.importlib.import_module

    def no_torch(name, *args, **kwargs):
        if name in ("torch", "opacus"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(overhead_peers.importlib, "import_module", no_torch)
    assert overhead_peers.main(["--out", str(tmp_path / "peers")]) is None
    out = capsys.readouterr().out
    assert "pip install -e '.[peers]'" in out and "Skipping" in out
    assert not (tmp_path / "peers").exists()
    # The command line is checked first: bad input is still exit status 2.
    with pytest.raises(SystemExit) as err:
        overhead_peers.main(["--batch-sizes", "1", "--out", str(tmp_path / "peers")])
    assert err.value.code == 2


def _tiny(torch):
    torch.manual_seed(0)
    model = overhead_peers.torch_mlp(torch, d_in=7, hidden=(5, 4), num_classes=3).double()
    x = torch.randn(6, 7, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    return model, x, y


def _explicit_gram(torch, model, x, y):
    from torch.func import functional_call, grad, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)
    return flat @ flat.T


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_ghost_gram_equals_the_explicit_per_example_gram():
    torch = pytest.importorskip("torch")
    model, x, y = _tiny(torch)
    hooks = overhead_peers.GhostGram(torch, model)
    torch.nn.functional.cross_entropy(model(x), y).backward()  # mean loss
    ghost = hooks.gram(scale=float(x.shape[0]))
    hooks.remove()
    explicit = _explicit_gram(torch, model, x, y)
    np.testing.assert_allclose(ghost.numpy(), explicit.numpy(), rtol=1e-10, atol=1e-12)


def test_torch_gnq_matches_gujax_gnq_from_gram():
    torch = pytest.importorskip("torch")
    import jax
    jax.config.update("jax_enable_x64", True)
    try:
        from gujax.uniqueness import gnq_from_gram
        model, x, y = _tiny(torch)
        k = _explicit_gram(torch, model, x, y)
        ours = overhead_peers.torch_gnq_from_gram(torch, k, reg=overhead_peers.REG)
        ref = np.asarray(gnq_from_gram(np.asarray(k.numpy()), reg=overhead_peers.REG))
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-8, atol=1e-12)
        assert np.all(ref > 0)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_smoke_run_writes_every_method(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("opacus")
    out = tmp_path / "peers"
    result = overhead_peers.main(["--preset", "smoke", "--out", str(out)])
    saved = json.loads((out / "overhead_peers.json").read_text())
    methods = [r["method"] for r in saved["rows"]]
    assert methods == list(overhead_peers.TORCH_METHODS + overhead_peers.JAX_METHODS)
    assert all(r["step_seconds"] > 0 for r in saved["rows"])
    assert saved["versions"]["torch"] == result["versions"]["torch"]
    assert saved["torch_threads"] >= 1 and "ghost" in saved["notes"]["opacus_dpsgd"]
    assert saved["settings"]["batch_sizes"] == [8] and saved["noise"] == []
    assert json.loads((out / "run.json").read_text())["experiment"] == "overhead_peers"
    printed = capsys.readouterr().out
    assert "opacus_dpsgd" in printed and "jax_gnq_ghost" in printed
