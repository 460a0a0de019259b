"""Model classes for pruned checkpoints whose blocks have different FFN widths.

This file needs only torch, transformers and its sibling ``layouts.py``, because both are also
copied, unchanged apart from a footer that names the class, into every saved pruned directory
(as ``modeling_cfsp.py`` and ``layouts.py``). That lets
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` load the model without cfsp
installed, through the very code that ``cfsp.load_pruned`` uses.

The per-block widths live in ``config.json`` as ``per_layer_config`` (``{"<i>": {"intermediate_size":
w}}``, beside any per-layer settings the family has itself), and a block whose attention was
dropped has ``"skip": ["self_attn"]`` there; ``mlp_bias: true`` means every MLP
projection has a bias (pruning with a compensation stores it in the down projection's bias).
"""

from __future__ import annotations

from .layouts import (
    decoder_layers,
    drop_attention,
    dropped_attention,
    homogeneous_config,
    layer_widths,
    resize_mlp,
)


class PrunedModelMixin:
    """Builds the stock model, then narrows each block's MLP to the width in the config and
    removes the attention sublayers the config lists as skipped."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(homogeneous_config(config), *args, **kwargs)
        bias = bool(getattr(config, "mlp_bias", False))
        blocks = decoder_layers(self)
        for block, width in zip(blocks, layer_widths(config), strict=True):
            resize_mlp(block.mlp, width, bias)
        for index in dropped_attention(config):
            drop_attention(blocks[index])
        self.config = config  # keep the per-layer widths so save_pretrained writes them back


def pruned_class(base: type) -> type:
    """The pruned variant of a transformers causal-LM class, e.g. ``LlamaForCausalLM``."""
    return type(f"Cfsp{base.__name__}", (PrunedModelMixin, base), {})
