"""A small decoder-only (causal) Transformer language model.

Built only from ``nn.Embed``, ``nn.Dense`` and ``nn.LayerNorm`` so that
per-layer gradient rules (``gujax.ghost``) can intercept every parameter by
layer type: attention is written out with plain Dense projections instead
of ``nn.MultiHeadDotProductAttention``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gujax.models.common import add_batch_axis


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t.

    Input and output: (B, T, d_model). q, k, v and the output projection are
    four ``nn.Dense(d_model)`` layers; heads are a reshape of their outputs.
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        head_dim = d // self.num_heads
        split = lambda y: y.reshape(b, t, self.num_heads, head_dim)
        q = split(nn.Dense(d, name="query")(x))
        k = split(nn.Dense(d, name="key")(x))
        v = split(nn.Dense(d, name="value")(x))
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        attn = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhts,bshd->bthd", attn, v).reshape(b, t, d)
        return nn.Dense(d, name="out")(out)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = x + CausalSelfAttention(self.num_heads, name="attn")(nn.LayerNorm(name="ln_attn")(x))
        h = nn.LayerNorm(name="ln_mlp")(x)
        h = nn.Dense(self.mlp_ratio * d, name="mlp_in")(h)
        h = nn.Dense(d, name="mlp_out")(nn.gelu(h))
        return x + h


class TransformerLM(nn.Module):
    """Causal language model: logits for the next token at every position.

    Input: integer tokens (T,) for one sequence or (B, T) for a batch, with
    1 <= T <= max_len and values in [0, vocab_size) (values outside that
    range are not checked under jit; ``nn.Embed`` then returns NaN rows).
    Output: float32 logits (T, vocab_size) or (B, T, vocab_size); position t
    depends only on tokens 0..t.

    Layout: token ``nn.Embed`` + learned positional ``nn.Embed``, num_layers
    pre-LN blocks, a final LayerNorm and an untied ``nn.Dense`` head.
    """

    vocab_size: int = 256
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    max_len: int = 128
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"TransformerLM expects integer tokens; got dtype {tokens.dtype}")
        tokens, single = add_batch_axis(tokens, 1, model="TransformerLM")
        t = tokens.shape[1]
        if not 1 <= t <= self.max_len:
            raise ValueError(f"sequence length {t} is outside [1, max_len={self.max_len}]")
        x = nn.Embed(self.vocab_size, self.d_model, name="token_embed")(tokens)
        x = x + nn.Embed(self.max_len, self.d_model, name="pos_embed")(jnp.arange(t))
        for i in range(self.num_layers):
            x = Block(self.num_heads, self.mlp_ratio, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="ln_final")(x)
        logits = nn.Dense(self.vocab_size, name="head")(x)
        return logits[0] if single else logits
