"""Mixture-of-experts blocks: where the routed experts and their router are, and removing experts.

Every MoE family in transformers 5 keeps a block's routed experts in one module whose tensors are
stacked along a leading expert axis (``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``,
gpt-oss transposed and with biases), called as ``experts(hidden, top_k_index, top_k_weights)``.
Beside it sits the router, whose per-expert tensors (the logit rows, a logit bias, DeepSeek's
``e_score_correction_bias``, Gemma 4's ``per_expert_scale``) share that axis. So one rule finds and
prunes them all: keep the same rows of every per-expert tensor of the experts and of the router,
and write the new count wherever the model or its config keeps the old one. Shared experts and
dense MLPs are ordinary MLPs (``cfsp.layouts``) and are not touched here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cfsp.errors import CfspError

# Where a family keeps its routed-expert count, top-k and group-limited routing, in config and modules.
COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "top_k_experts", "moe_k", "moe_topk", "top_k")
GROUP_KEYS = ("n_group", "num_group")
GROUP_TOP_K_KEYS = ("topk_group",)
WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size")  # the experts' width, first the one that holds it
EXPERTS_MODULE = "experts"
ROUTER_MODULES = ("gate", "router")
MOE_FAMILIES = (
    "Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, gpt-oss, DeepSeek-V3 / Kimi-K2, GLM-4.5+, ERNIE-4.5-MoE, "
    "Granite-MoE, Hunyuan-MoE, MiniMax, Qwen3-Next, Qwen3.5-MoE, Gemma 4 MoE"
)


@dataclass
class MoeBlock:
    """The routed part of one decoder block: its experts, its router, and the module holding both."""

    owner: nn.Module  # the module whose children are the experts and the router (the MoE MLP, or the block)
    experts: nn.Module
    router: nn.Module

    @property
    def count(self) -> int:
        return expert_count(self.experts)

    @property
    def width(self) -> int:
        """The experts' intermediate width (every expert has the same)."""
        down = self.experts.down_proj
        return int(down.shape[1] if getattr(self.experts, "is_transposed", False) else down.shape[2])

    @property
    def parameters_per_expert(self) -> int:
        return sum(p[0].numel() for p in self.experts.parameters(recurse=False))

    @property
    def top_k(self) -> int | None:
        return _first_int(self.router, TOP_K_KEYS)

    @property
    def groups(self) -> int:
        """Groups of group-limited routing (DeepSeek-V3, GLM-4.5+, Kimi-K2); 1 when it has none."""
        return _first_int(self.router, GROUP_KEYS) or 1


def _first_int(module: nn.Module, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(module, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    config = getattr(module, "config", None)
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def expert_count(experts: nn.Module) -> int:
    return int(next(experts.parameters()).shape[0])


def _stacked(module: nn.Module) -> bool:
    """An experts module: its own parameters are all stacked along one leading expert axis (3-D
    weights, 2-D biases), as in every MoE family of transformers 5."""
    own = list(module.parameters(recurse=False))
    return bool(own) and any(p.dim() == 3 for p in own) and len({p.shape[0] for p in own}) == 1


def _router_of(owner: nn.Module, count: int) -> nn.Module | None:
    for name in ROUTER_MODULES:
        router = getattr(owner, name, None)
        if isinstance(router, nn.Module) and any(
            p.dim() == 2 and p.shape[0] == count for p in router.parameters()
        ):
            return router
    return None


def find_moe(block: nn.Module) -> MoeBlock | None:
    """The routed experts of a decoder block (at ``block.mlp``, ``block.block_sparse_moe`` or the
    block itself, as Gemma 4 has them), or None for a dense block."""
    for owner in (getattr(block, "mlp", None), getattr(block, "block_sparse_moe", None), block):
        experts = getattr(owner, EXPERTS_MODULE, None) if owner is not None else None
        if isinstance(experts, nn.Module) and _stacked(experts):
            router = _router_of(owner, expert_count(experts))
            if router is not None:
                return MoeBlock(owner, experts, router)
    return None


def has_experts_module(block: nn.Module) -> bool:
    """Whether the block has anything named like experts (found by ``find_moe`` or not)."""
    return any("expert" in name.lower() for name, _ in block.named_modules())


def moe_blocks(blocks) -> list[MoeBlock | None]:
    return [find_moe(block) for block in blocks]


def check_expert_count(moe: MoeBlock, keep: int, where: str) -> None:
    """What routing needs of the kept count: at least top-k experts, and with group-limited routing
    the same number in every group, enough for the groups it picks."""
    count, top_k, groups = moe.count, moe.top_k or 1, moe.groups
    if not 0 < keep <= count:
        raise CfspError(f"{where}: cannot keep {keep} of {count} experts")
    if keep < top_k:
        raise CfspError(
            f"{where}: keeping {keep} of {count} experts leaves fewer than the {top_k} each token is routed "
            f"to; use an --expert-sparsity of at most {1 - top_k / count:.3f}"
        )
    if groups > 1:
        per_group = keep // groups
        chosen = _first_int(moe.router, GROUP_TOP_K_KEYS) or groups
        if keep % groups or per_group < 2 or per_group * chosen < top_k:
            step = groups / count
            raise CfspError(
                f"{where}: group-limited routing ({groups} groups, {chosen} chosen per token, top-{top_k}) "
                f"needs the same number of experts kept in every group, at least 2 and at least {top_k} in "
                f"the chosen groups; {keep} of {count} is not; use an --expert-sparsity that is a multiple "
                f"of {step:g}"
            )


def choose_experts(scores: torch.Tensor, keep: int, groups: int = 1) -> torch.Tensor:
    """The ``keep`` highest-scoring experts, ascending; with group-limited routing, the same number
    from each of the ``groups`` contiguous groups, so every kept expert stays in its group."""
    per_group = scores.view(groups, -1)
    size, take = per_group.shape[1], keep // groups
    order = torch.argsort(per_group, dim=1, descending=True, stable=True)[:, :take]
    kept = order + torch.arange(groups, device=order.device).unsqueeze(1) * size
    return torch.sort(kept.flatten()).values.cpu()


def expert_intermediate(experts: nn.Module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s intermediate activation (what its down projection reads) on the rows
    ``hidden`` [n, H]: the family's own gate (``_apply_gate``: SiLU-gated halves, gpt-oss's clamped
    interleaved SwiGLU) on the gate/up projection, with its bias where it has one."""
    if not getattr(experts, "has_gate", True):
        raise CfspError("pruning channels inside experts needs gated experts (gate_up_proj)")
    weight = experts.gate_up_proj[expert]
    out = hidden @ weight if getattr(experts, "is_transposed", False) else hidden @ weight.T
    bias = getattr(experts, "gate_up_proj_bias", None)
    if bias is not None:
        out = out + bias[expert]
    return experts._apply_gate(out)


def down_columns(experts: nn.Module) -> torch.Tensor:
    """The down projections as [E, H, I] (columns = intermediate channels), whatever the layout."""
    down = experts.down_proj
    return down.transpose(1, 2) if getattr(experts, "is_transposed", False) else down


def keep_expert_channels(moe: MoeBlock, kept: torch.Tensor) -> None:
    """Keep intermediate channels ``kept`` [E, I'] (ascending per expert) of every routed expert:
    their gate and up rows (halves, or gpt-oss's interleaved pairs), biases and down columns; one
    width for every expert, as engines stack them."""
    experts, width = moe.experts, moe.width
    transposed = getattr(experts, "is_transposed", False)
    concatenated = getattr(experts, "is_concatenated", True)
    if concatenated:
        paired = torch.cat([kept, kept + width], dim=1)  # gate rows, then up rows
    else:
        paired = torch.stack([2 * kept, 2 * kept + 1], dim=2).flatten(1)  # gate, up interleaved
    gate_axis = 2 if transposed else 1
    down_axis = 1 if transposed else 2

    def gather(tensor: torch.Tensor, index: torch.Tensor, axis: int) -> nn.Parameter:
        index = index.to(tensor.device)
        if tensor.dim() == 3:  # [E, k] -> [E, k, 1] along axis 1, [E, 1, k] along axis 2
            index = index.unsqueeze(3 - axis)
            size = list(tensor.shape)
            size[axis] = index.shape[axis]
            index = index.expand(*size)
        rows = tensor.detach().gather(axis, index).clone()
        return nn.Parameter(rows, requires_grad=tensor.requires_grad)

    experts.gate_up_proj = gather(experts.gate_up_proj, paired, gate_axis)
    if getattr(experts, "gate_up_proj_bias", None) is not None:
        experts.gate_up_proj_bias = gather(experts.gate_up_proj_bias, paired, 1)
    experts.down_proj = gather(experts.down_proj, kept, down_axis)
    for key in ("intermediate_dim", "intermediate_size"):
        if getattr(experts, key, None) == width:
            setattr(experts, key, int(kept.shape[1]))


def set_expert_width(config, old: int, new: int) -> None:
    """Write the experts' new intermediate width into the config (the first width key that holds it)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in WIDTH_KEYS:
        if getattr(text, key, None) == old:
            setattr(text, key, new)
            return
    raise CfspError(f"cannot find the experts' width ({old}) in the {type(text).__name__} config")


def _expert_axis(tensor: torch.Tensor, count: int) -> int | None:
    """The expert axis of a per-expert tensor: the leading one ([E, ...]), or the second of a
    single-row matrix (ERNIE's ``e_score_correction_bias`` is [1, E])."""
    if tensor.dim() and tensor.shape[0] == count:
        return 0
    if tensor.dim() == 2 and tensor.shape[0] == 1 and tensor.shape[1] == count:
        return 1
    return None


def _slice_experts(module: nn.Module, count: int, kept: torch.Tensor) -> None:
    """Keep experts ``kept`` of every parameter and buffer of ``module`` (and its children) that
    has an expert axis."""
    for child in module.modules():
        for name, tensor in list(child.named_parameters(recurse=False)):
            axis = _expert_axis(tensor, count)
            if axis is not None:
                rows = tensor.detach().index_select(axis, kept.to(tensor.device)).clone()
                setattr(child, name, nn.Parameter(rows, requires_grad=tensor.requires_grad))
        for name, tensor in list(child.named_buffers(recurse=False)):
            axis = None if tensor is None else _expert_axis(tensor, count)
            if axis is not None:
                child._buffers[name] = tensor.index_select(axis, kept.to(tensor.device)).clone()


def keep_experts(moe: MoeBlock, kept: torch.Tensor) -> None:
    """Remove every routed expert of ``moe`` but ``kept`` (ascending indices): their weights, their
    router rows and per-expert router tensors, and the count the modules cache."""
    count = moe.count
    hidden = moe.router.weight.shape[-1] if hasattr(moe.router, "weight") else None
    if hidden == count:
        raise CfspError(
            f"this router's hidden size equals its expert count ({count}): cannot tell its axes apart"
        )
    _slice_experts(moe.experts, count, kept)
    _slice_experts(moe.router, count, kept)
    for module in moe.owner.modules():
        for key in COUNT_KEYS:
            if getattr(module, key, None) == count and not isinstance(getattr(module, key), bool):
                setattr(module, key, int(kept.numel()))


def set_expert_count(config, old: int, new: int) -> None:
    """Write the routed-expert count into the config (every engine reads one number)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    written = False
    for key in COUNT_KEYS:
        if getattr(text, key, None) == old and not isinstance(getattr(text, key), bool):
            setattr(text, key, new)
            written = True
    if not written:
        raise CfspError(f"cannot find the expert count in the {type(text).__name__} config")


# On disk, checkpoints keep one tensor per routed expert and projection (``experts.3.gate_proj.weight``)
# where the model stacks them; transformers stacks them when it loads a whole model, and the stock
# output keeps the checkpoint's own form. The stacked tensor, and the per-expert projections
# concatenated into it along the output axis, in order:
PER_EXPERT_PROJECTIONS = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
# Where some families' checkpoints keep a tensor under another module path than the model (model
# prefix, checkpoint prefix): Mixtral, MiniMax and PhiMoE keep the MoE module under its old name,
# ERNIE-4.5 its routing bias beside the router instead of inside it, Granite-MoE its stacked experts
# and router under older names. Each a module path and its checkpoint path, both ending in a dot.
STORED_NAMES = (
    ("mlp.", "block_sparse_moe."),
    ("mlp.gate.moe_statics.", "mlp.moe_statics."),
    ("block_sparse_moe.experts.gate_up_proj.", "block_sparse_moe.input_linear.weight."),
    ("block_sparse_moe.experts.down_proj.", "block_sparse_moe.output_linear.weight."),
    ("block_sparse_moe.router.weight.", "block_sparse_moe.router.layer.weight."),
)


@dataclass
class StoredTensor:
    """Where one tensor of a block lives in a checkpoint: under one key, or as one tensor per expert
    and projection (``base.<e>.<projection>.weight``) to concatenate and stack."""

    key: str | None = None
    base: str | None = None
    projections: tuple[str, ...] = ()
    count: int = 0

    def expert_keys(self, expert: int) -> list[str]:
        return [f"{self.base}.{expert}.{projection}.weight" for projection in self.projections]

    def split(self, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-expert tensors of a stacked one, numbered from 0 (as many as it now has)."""
        out = {}
        for expert in range(stacked.shape[0]):
            parts = stacked[expert].chunk(len(self.projections), dim=0)
            out.update(zip(self.expert_keys(expert), parts, strict=True))
        return out


def _stored_names(name: str) -> list[str]:
    names = [name]
    for module, stored in STORED_NAMES:
        if (name + ".").startswith(module):
            names.append((stored + (name + ".")[len(module) :]).rstrip("."))
    return names


def stored_tensor(prefix: str, name: str, files) -> StoredTensor | None:
    """How the block tensor ``name`` (under ``prefix``, e.g. ``model.layers.3.``) is stored among the
    checkpoint keys ``files``, or None if it is not."""
    for candidate in _stored_names(name):
        if prefix + candidate in files:
            return StoredTensor(key=prefix + candidate)
    parent, _, last = name.rpartition(".")
    for base in _stored_names(parent) if parent else []:
        for projections in PER_EXPERT_PROJECTIONS.get(last, ()):
            stored = StoredTensor(base=prefix + base, projections=projections)
            while all(key in files for key in stored.expert_keys(stored.count)):
                stored.count += 1
            if stored.count:
                return stored
    return None
