"""experiments.overhead: block-median timing (fake timers, no timing
assertions), the batched plain step, and a tiny end-to-end run."""
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import overhead


def _fake_timer(durations):
    """A timer whose successive (start, stop) pairs are ``durations`` apart."""
    clock = itertools.accumulate(itertools.chain.from_iterable((0.0, d) for d in durations))
    return lambda: next(clock)


def test_measure_blocks_structure_and_interleaving():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"),
             "c": lambda: calls.append("c")}
    out = overhead.measure_blocks(steps, blocks=3, repeats=4, warmup=2)
    assert set(out) == {"a", "b", "c"}
    for r in out.values():
        assert set(r) >= {"median", "spread", "block_medians", "all_seconds"}
        assert len(r["block_medians"]) == 3 and [len(b) for b in r["all_seconds"]] == [4] * 3
        lo, hi = r["spread"]
        assert lo <= r["median"] <= hi
    assert calls[:6] == ["a", "b", "c"] * 2  # warm-up
    rounds = [calls[i:i + 3] for i in range(6, len(calls), 3)]
    assert len(rounds) == 12 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert rounds[0] != rounds[1]  # order rotates between rounds


def test_median_of_block_medians_on_fake_timer():
    # One step, 3 blocks of 3 repeats; block medians 2, 10, 4 -> median 4, spread (2, 10).
    durations = [1, 2, 3, 10, 50, 9, 4, 4, 100]
    out = overhead.measure_blocks({"s": lambda: None}, blocks=3, repeats=3, warmup=0,
                                  timer=_fake_timer(durations))["s"]
    assert out["block_medians"] == [2, 10, 4]
    assert out["median"] == 4 and tuple(out["spread"]) == (2, 10)
    assert out["all_seconds"] == [[1, 2, 3], [10, 50, 9], [4, 4, 100]]


def test_measure_blocks_rejects_empty_blocks():
    with pytest.raises(ValueError):
        overhead.measure_blocks({"s": lambda: None}, blocks=0, repeats=3)


@pytest.mark.parametrize("model", ["mlp", "transformer"])  # cnn shares mlp's loss
def test_batched_loss_equals_mean_of_per_example_losses(model):
    w = overhead.make_workload(model, 3, seq_len=5)
    both = jax.jit(lambda p, b: (w.batch_loss(p, b),
                                 jax.vmap(w.loss_fn, in_axes=(None, 0))(p, b).mean()))
    batched, per_example_mean = both(w.params, w.batch)
    np.testing.assert_allclose(batched, per_example_mean, rtol=1e-5)


def test_plain_steps_agree():
    w = overhead.make_workload("mlp", 4, seq_len=8)
    steps = overhead.make_steps(w)
    got = jax.jit(steps["plain_batched"][0])(*steps["plain_batched"][1])
    want = jax.jit(steps["plain"][0])(*steps["plain"][1])
    for g, h in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model", ["scatter_linear", "transformer"])
def test_stage_batch_is_the_kernel_batch_in_the_trainers_form(model):
    w = overhead.make_workload(model, 3, seq_len=5)
    loss_fn, batch = overhead.stage_inputs(w)
    assert set(batch) == ({"tokens", "id", "mask"} if model == "transformer"
                          else {"image", "label", "id", "mask"})
    assert batch["id"].dtype == jnp.int32 and batch["mask"].dtype == jnp.bool_
    examples = {k: v for k, v in batch.items() if k not in ("id", "mask")}
    per_example = jax.vmap(loss_fn, in_axes=(None, 0))(w.params, examples)
    np.testing.assert_allclose(per_example,
                               jax.vmap(w.loss_fn, in_axes=(None, 0))(w.params, w.batch),
                               rtol=1e-6)
    if model == "scatter_linear":
        assert batch["image"].shape == (3, 8, 8, 243) and batch["image"].dtype == jnp.float32


def _saved(tmp_path):
    with open(os.path.join(tmp_path, "overhead.json")) as f:
        return json.load(f)


ROW_FIELDS = {"section", "model", "batch_size", "method", "step_seconds", "spread_seconds",
              "block_medians", "ratio_to_plain", "ratio_spread", "baseline", "load",
              "peak_memory_bytes", "peak_memory_mb", "memory_ratio_to_plain", "flops",
              "flop_ratio"}


@pytest.mark.slow  # minutes on 2 cores: out of CI (conftest), run locally
def test_smoke_preset_has_a_stage_row_per_policy_and_model(tmp_path):
    result = overhead.main(["--preset", "smoke", "--out", str(tmp_path)])
    saved = _saved(tmp_path)
    assert saved["cpu_count"] == os.cpu_count()
    assert len(saved["load"]["before"]) == 3 and len(saved["load"]["after"]) == 3
    assert saved["settings"]["preset"] == "smoke" and saved["settings"]["blocks"] == 2
    models = ("mlp", "cnn", "transformer", "scatter_linear")
    methods = overhead.PLAIN_METHODS + overhead.STAGE_METHODS
    by = {(r["model"], r["method"]): r for r in saved["rows"]}
    assert set(by) == {(m, k) for m in models for k in methods}
    for model in models:
        base = min(overhead.PLAIN_METHODS, key=lambda k: by[model, k]["step_seconds"])
        for method in methods:
            r = by[model, method]
            assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
            assert r["section"] == "stage" and r["baseline"] == base
            assert len(r["block_medians"]) == 2 and len(r["load"]["before"]) == 3
            assert r["spread_seconds"][0] <= r["step_seconds"] <= r["spread_seconds"][1]
            assert r["ratio_to_plain"] == pytest.approx(
                r["step_seconds"] / by[model, base]["step_seconds"])
            assert r["flop_ratio"] == pytest.approx(r["flops"] / by[model, base]["flops"])
            assert r["peak_memory_bytes"] > 0 and r["flops"] > 0
        assert by[model, base]["ratio_to_plain"] == 1.0
        # The censor's budget refuses part of the batch; the clip's cap clips.
        censor, clip = by[model, "censor"], by[model, "clip"]
        assert 0 < censor["refused_fraction"] < 1 and censor["budget"] > 0
        assert clip["clipped_fraction"] > 0 and clip["cap"] > 0
    assert saved["kernel_rows"] == [] and saved["memory_rows"] == []
    assert result["targets"] and os.path.exists(tmp_path / "overhead.png")


@pytest.mark.slow  # 62 s on 2 cores: out of CI (conftest), run locally
def test_kernel_memory_rows_and_curves(tmp_path):
    overhead.main(["--preset", "smoke", "--models", "mlp", "--batch-sizes", "4", "8",
                   "--methods", "monitor", "--kernels", "gnq_ghost", "dpsgd",
                   "--memory-batch-sizes", "4", "8", "--widths", "16",
                   "--out", str(tmp_path)])
    saved = _saved(tmp_path)
    kernels = {(r["batch_size"], r["method"]) for r in saved["kernel_rows"]}
    assert kernels == {(b, m) for b in (4, 8) for m in ("gnq_ghost", "dpsgd")}
    for r in saved["kernel_rows"]:
        assert ROW_FIELDS <= set(r) and r["section"] == "kernel"
    # Timed points: B = 4 and 8 at width 64, and width 16 at B = 4.
    assert {(r["batch_size"], r["width"]) for r in saved["rows"]} == {(4, 64), (8, 64), (4, 16)}
    memory = {(r["batch_size"], r["method"]) for r in saved["memory_rows"]}
    assert memory == {(b, m) for b in (4, 8) for m in overhead.MEMORY_METHODS}
    for r in saved["memory_rows"]:
        assert r["section"] == "memory" and "step_seconds" not in r
        assert r["peak_memory_bytes"] > 0 and r["flops"] > 0 and r["baseline"] == "plain_batched"
    factors = saved["memory_factors"]["mlp"]
    assert set(factors) == set(overhead.MEMORY_METHODS) - {"plain_batched"}
    assert set(factors["monitor"]) == {"4", "8"}
    assert os.path.exists(tmp_path / "ratio_vs_batch.png")
    assert os.path.exists(tmp_path / "ratio_vs_width.png")


@pytest.mark.slow  # 45 s on 2 cores: out of CI (conftest), run locally
def test_gpu_preset_parses_and_its_workloads_build():
    settings, out = overhead.parse_settings(["--preset", "gpu"])
    assert settings["models"] == ("wrn", "transformer_big") and settings["seq_len"] == 256
    assert set(settings["methods"]) == set(overhead.STAGE_METHODS)
    for model in settings["models"]:
        w = overhead.make_workload(model, 2, seq_len=8)
        steps, _ = overhead.make_stage_steps(w, ["monitor", "dpsgd"], num_examples=4)
        for fn, args in steps.values():
            new_params, _, metrics = jax.eval_shape(fn, *args)
            assert (jax.tree_util.tree_structure(new_params)
                    == jax.tree_util.tree_structure(w.params))
            assert "loss" in metrics


def test_settings_reject_bad_sizes():
    with pytest.raises(ValueError):
        overhead.parse_settings(["--batch-sizes", "0"])
    with pytest.raises(ValueError):
        overhead.parse_settings(["--num-examples", "8", "--batch-sizes", "16"])


def test_verdicts_use_the_stated_batch_size():
    def row(model, b, method, ratio):
        return dict(model=model, batch_size=b, method=method, ratio_to_plain=ratio,
                    ratio_spread=[ratio, ratio], flop_ratio=1.1, memory_ratio_to_plain=1.2)
    lines = overhead.verdicts([row("mlp", 64, "monitor", 2.0), row("mlp", 256, "monitor", 1.2),
                               row("mlp", 256, "censor", 1.5), row("transformer", 64, "clip", 3.0)])
    assert len(lines) == 3  # mlp B=256 monitor time + memory, censor; no clip target
    assert "met" in lines[0] and "MISSED" in lines[2]


# --- gnq_ghost's fused Gram + update (gujax.ghost.kernels) -------------------

import flax.linen as nn  # noqa: E402

from gujax.ghost import kernels  # noqa: E402
from gujax.ghost.capture import capture  # noqa: E402


class _Mixed(nn.Module):
    """Embed, Dense over 6 positions, 2-D Conv, grouped 1-D Conv, Dense head:
    at T = 6 every layer but the head takes the materialised route."""

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(7, 5)(tokens)                                   # (6, 5)
        h = jnp.tanh(nn.Dense(4)(h))                                 # (6, 4)
        img = jnp.reshape(jnp.tile(h, (1, 6)), (6, 6, 4))
        img = jnp.tanh(nn.Conv(4, (3, 2), padding="SAME")(img))      # (6, 6, 4)
        seq = jnp.reshape(img, (12, 12))
        seq = jnp.tanh(nn.Conv(6, (3,), feature_group_count=2, padding="VALID")(seq))
        return nn.Dense(3)(jnp.mean(seq, axis=0))


def _mixed_case():
    """(loss_fn, params, tokens (5, 6), weights (5,)) for _Mixed."""
    model = _Mixed()
    tokens = jax.random.randint(jax.random.key(0), (5, 6), 0, 7)
    params = model.init(jax.random.key(1), tokens[0])["params"]

    def loss_fn(p, t):
        return jnp.sum(jnp.square(model.apply({"params": p}, t)))

    return loss_fn, params, tokens, jnp.array([0.5, 0.0, 1.0, 2.0, -1.0])


def test_fused_gram_and_update_match_separate():
    loss_fn, params, tokens, weights = _mixed_case()

    @jax.jit
    def both(p, b):
        tape = capture(loss_fn, p, b)
        fused = kernels.tape_gram_and_weighted_grad(tape, p, weights)
        return fused, (kernels.tape_gram(tape), kernels.tape_weighted_grad(tape, p, weights))

    (k, g), (k_ref, g_ref) = both(params, tokens)
    kinds = kernels.describe(loss_fn, params, tokens)
    assert list(kinds.values()).count("materialise") >= 4, kinds
    np.testing.assert_allclose(k, k_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ghost_engine_update_reuses_the_grams_materialised_gradients():
    from gujax.engine import ghost_engine
    loss_fn, params, tokens, weights = _mixed_case()

    def engine_step(p, b):
        grad_pass = ghost_engine(loss_fn).run(p, b)
        stats = grad_pass.statistics(True)
        return stats.gram, grad_pass.weighted_sum(weights, stats)

    def separate(p, b):
        tape = capture(loss_fn, p, b)
        return kernels.tape_gram(tape), kernels.tape_weighted_grad(tape, p, weights)

    from gujax.models.cost import compiled_flops

    # The update of every materialised layer sums the kept gradients (B P)
    # instead of a VJP through the layer (B T P): fewer flops, same result.
    assert (compiled_flops(jax.jit(engine_step), params, tokens)
            < compiled_flops(jax.jit(separate), params, tokens))
    (k, g), (k_ref, g_ref) = jax.jit(engine_step)(params, tokens), jax.jit(separate)(params, tokens)
    np.testing.assert_allclose(k, k_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_update_drops_nan_example_with_zero_weight():
    model = nn.Dense(2)
    x = jax.random.normal(jax.random.key(2), (4, 8, 3)).at[1, 3, 0].set(jnp.nan)
    params = model.init(jax.random.key(3), x[0])["params"]

    def loss_fn(p, ex):
        return jnp.sum(jnp.square(model.apply({"params": p}, ex)))

    weights = jnp.array([1.0, 0.0, 0.5, 2.0])

    @jax.jit
    def both(p, b):
        tape = capture(loss_fn, p, b)
        return (kernels.tape_gram_and_weighted_grad(tape, p, weights)[1],
                kernels.tape_weighted_grad(tape, p, weights))

    assert "materialise" in kernels.describe(loss_fn, params, x).values()
    got, want = both(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_split_parts_add_up_in_flops(tmp_path):
    from experiments import overhead_split
    rows = overhead_split.main(["--preset", "smoke", "--out", str(tmp_path)])
    by = {r["part"]: r for r in rows}
    assert set(by) == {"plain_batched", "capture", "capture+update", "capture+gram",
                       "capture+gram+update", "gnq_from_gram", "gnq_ghost"}
    # The ghost update is plain's weight-gradient half: capture + update has
    # the plain step's flops but for the SGD update's 2 P (5% at B = 8).
    assert 0.9 < by["capture+update"]["flop_ratio"] < 1.0
    assert by["capture"]["flops"] < by["capture+gram"]["flops"] < by["capture+gram+update"]["flops"]
    assert by["gnq_ghost"]["flops"] >= by["capture+gram+update"]["flops"]
    saved = json.load(open(tmp_path / "split.json"))
    assert len(saved["rows"]) == 7 and saved["cpu_count"] == os.cpu_count()
    assert saved["settings"]["batch_size"] == 8 and (tmp_path / "run.json").exists()
    for argv in (["--batch-size", "0"], ["--model", "wrn"], []):  # [] : --out is in use
        with pytest.raises(SystemExit) as err:
            overhead_split.main(["--preset", "smoke", "--out", str(tmp_path), *argv])
        assert err.value.code == 2, argv


def test_command_line_is_the_experiments_one(tmp_path, capsys):
    """Typed settings through ``experiments.cli``: bad input is one line and
    exit 2, before any folder; --help lists the presets; run.json is written."""
    with pytest.raises(SystemExit) as info:
        overhead.main(["--blocks", "0", "--out", str(tmp_path / "bad")])
    assert info.value.code == 2 and "--blocks must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        overhead.main(["--help"])
    assert "presets (--preset; default: default)" in capsys.readouterr().out
    overhead.main(["--preset", "memory", "--models", "mlp", "--memory-batch-sizes", "4",
                   "--out", str(tmp_path / "run")])
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["experiment"] == "overhead" and saved["settings"]["memory_batch_sizes"] == [4]
