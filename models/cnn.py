"""A small CNN classifier in Flax NNX: convolutions, a max-pool, then dense layers.

Every conv and dense layer runs through ``models.ops`` so a broadcast plan can
run each in kernel- or map-broadcast mode. The layers form one chain (only channel-wise
ops between them), so a map-mode layer can hand its channel-split output straight on.
Input rows are the data pipeline's int32 rows: ``image_size**2 * image_channels`` pixel
values in 0..16, then the label.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from framework.config import ConfigError, ModelConfig
from models import ops

PIXEL_MAX = 16.0


class ConvLayer(nnx.Module):
    """3x3 convolution, stride 1, SAME padding, NHWC."""

    def __init__(self, c_in: int, c_out: int, *, first: bool, dtype, param_dtype, rngs):
        self.dtype, self.first, self.name = dtype, first, ""
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (3, 3, c_in, c_out), param_dtype))
        self.bias = nnx.Param(jnp.zeros((c_out,), param_dtype))

    def __call__(self, x):
        return ops.conv(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype),
                              name=self.name, input_grad=not self.first, chained=True)


class DenseLayer(nnx.Module):
    """Dense over all non-batch dims of its input (so it also flattens the last feature map)."""

    def __init__(self, in_shape: tuple[int, ...], out: int, *, last: bool, dtype, param_dtype, rngs):
        self.dtype, self.last, self.name = dtype, last, ""
        self.n_in = len(in_shape)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal(in_axis=tuple(range(self.n_in)), out_axis=-1)(
            rngs.params(), (*in_shape, out), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out,), param_dtype))

    def __call__(self, x):
        return ops.dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype),
                               name=self.name, n_in=self.n_in, chained=not self.last)


class CNN(nnx.Module):
    """pixels (B, H*W*C) int32 -> logits (B, classes) float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat_policy=None, stream_params: bool = False):
        if stream_params:
            raise ConfigError("memory.params=pinned_host: model.name=cnn does not stream its weights; use device")
        self.cfg, self.dtype = cfg, dtype
        self.remat_policy = remat_policy  # memory tiers: each layer is a remat unit when a policy is set
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths = [cfg.image_channels, *cfg.conv_channels]
        self.convs = nnx.List([ConvLayer(a, b, first=i == 0, **kw) for i, (a, b) in enumerate(zip(widths, widths[1:]))])
        side = cfg.image_size // 2  # one 2x2 max-pool after the convolutions
        shapes = [(side, side, widths[-1])] + [(f,) for f in cfg.dense_features]
        outs = [*cfg.dense_features, cfg.num_classes]
        self.denses = nnx.List([DenseLayer(s, o, last=i == len(outs) - 1, **kw) for i, (s, o) in enumerate(zip(shapes, outs))])
        ops.name_layers(self, (ConvLayer, DenseLayer))

    def __call__(self, pixels):
        c, s = self.cfg.image_channels, self.cfg.image_size
        x = pixels.reshape(pixels.shape[0], s, s, c).astype(self.dtype) / PIXEL_MAX
        call = (lambda layer, h: layer(h))
        if self.remat_policy is not None:
            call = nnx.remat(call, policy=self.remat_policy)
        for conv in self.convs:
            x = jax.nn.relu(call(conv, x))
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        for i, dense in enumerate(self.denses):
            x = call(dense, x)
            if i + 1 < len(self.denses):
                x = jax.nn.relu(x)
        return x.astype(jnp.float32)

    def loss(self, batch):
        """Mean cross-entropy of a (B, pixels + 1) batch whose last column is the label."""
        logits = self(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, -1]).mean()
