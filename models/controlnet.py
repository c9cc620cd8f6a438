"""PixArt-δ's ControlNet-Transformer: trainable copies of the first base blocks joined by zero-initialised linears."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

if TYPE_CHECKING:
    from diffusers import PixArtTransformer2DModel

# The block hyper-parameters PixArtTransformer2DModel passes to every BasicTransformerBlock. The released
# diffusers-format HED adapter's config holds only `num_layers`, so the defaults are PixArt-XL-2's.
_BLOCK_CONFIG_KEYS = (
    "num_attention_heads",
    "attention_head_dim",
    "dropout",
    "cross_attention_dim",
    "attention_bias",
    "activation_fn",
    "num_embeds_ada_norm",
    "upcast_attention",
    "norm_type",
    "norm_elementwise_affine",
    "norm_eps",
    "attention_type",
)


class _AdapterBlock(nn.Module):
    """One trainable copy of a base block, with `before_proj` on copy 0 and `after_proj` on every copy."""

    def __init__(self, index: int, inner_dim: int, block: BasicTransformerBlock) -> None:
        super().__init__()
        if index == 0:
            self.before_proj = nn.Linear(inner_dim, inner_dim)
            nn.init.zeros_(self.before_proj.weight)
            nn.init.zeros_(self.before_proj.bias)
        self.transformer_block = block
        self.after_proj = nn.Linear(inner_dim, inner_dim)
        nn.init.zeros_(self.after_proj.weight)
        nn.init.zeros_(self.after_proj.bias)

    def forward(
        self, hidden_states: torch.Tensor, control: torch.Tensor, **block_kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (residual for the next base block, this copy's output for the next copy)."""
        if hasattr(self, "before_proj"):
            control = hidden_states + self.before_proj(control)
        control = self.transformer_block(control, **block_kwargs)
        return self.after_proj(control), control


class PixArtControlNetAdapter(ModelMixin, ConfigMixin):
    """N trainable copies of base blocks 0..N-1; loads the released diffusers-format adapter unchanged."""

    @register_to_config
    def __init__(
        self,
        num_layers: int = 13,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        dropout: float = 0.0,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        attention_type: str | None = "default",
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        inner_dim = num_attention_heads * attention_head_dim
        self.controlnet_blocks = nn.ModuleList(
            [
                _AdapterBlock(
                    index,
                    inner_dim,
                    BasicTransformerBlock(
                        inner_dim,
                        num_attention_heads,
                        attention_head_dim,
                        dropout=dropout,
                        cross_attention_dim=cross_attention_dim,
                        activation_fn=activation_fn,
                        num_embeds_ada_norm=num_embeds_ada_norm,
                        attention_bias=attention_bias,
                        upcast_attention=upcast_attention,
                        norm_type=norm_type,
                        norm_elementwise_affine=norm_elementwise_affine,
                        norm_eps=norm_eps,
                        attention_type=attention_type,
                    ),
                )
                for index in range(num_layers)
            ]
        )

    @classmethod
    def from_transformer(cls, transformer: PixArtTransformer2DModel, num_layers: int = 13) -> PixArtControlNetAdapter:
        """Copy base blocks 0..num_layers-1 into a fresh adapter whose projections are all zero."""
        base_layers = transformer.config.num_layers
        # Copies feed base blocks 1..N, so there must be a base block N after the last copy.
        if not 1 <= num_layers < base_layers:
            raise ValueError(
                f"num_layers must be between 1 and {base_layers - 1} for this transformer, got {num_layers}"
            )
        block_config = {key: transformer.config[key] for key in _BLOCK_CONFIG_KEYS}
        adapter = cls(num_layers=num_layers, **block_config)
        for index, copy in enumerate(adapter.controlnet_blocks):
            copy.transformer_block.load_state_dict(transformer.transformer_blocks[index].state_dict())
        return _move(adapter, transformer.device, transformer.dtype)


def _move(
    adapter: PixArtControlNetAdapter, device: str | torch.device | None, dtype: torch.dtype | None
) -> PixArtControlNetAdapter:
    """Move an adapter; ModelMixin.to warns on any dtype argument, so pass one only when it changes."""
    if dtype is not None and dtype != adapter.dtype:
        adapter = adapter.to(dtype=dtype)
    return adapter.to(device=device) if device is not None else adapter


class PixArtControlNetTransformer(nn.Module):
    """A PixArt transformer driven by an adapter; pipelines use it as `pipe.transformer`."""

    def __init__(
        self,
        transformer: PixArtTransformer2DModel,
        controlnet: PixArtControlNetAdapter,
        controlnet_cond: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if controlnet.config.num_layers >= transformer.config.num_layers:
            raise ValueError(
                f"the adapter has {controlnet.config.num_layers} copies but the transformer only "
                f"{transformer.config.num_layers} blocks; copies must be fewer than base blocks"
            )
        self.transformer = transformer
        self.controlnet = controlnet
        # Pipelines call the transformer without a condition, so one can be bound for a whole pipeline call.
        self.controlnet_cond = controlnet_cond
        self.conditioning_scale = conditioning_scale

    @property
    def config(self) -> Any:
        """The base transformer's config: the pipeline reads sample_size, in_channels and out_channels."""
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        """The base transformer's dtype."""
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        """The base transformer's device."""
        return self.transformer.device

    def _condition_tokens(self, cond: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Patch-embed the condition latents, repeated to the batch the pipeline runs (2B under CFG)."""
        if cond.shape[-2:] != hidden_states.shape[-2:]:
            raise ValueError(
                f"condition latents are {tuple(cond.shape[-2:])} but the latents are "
                f"{tuple(hidden_states.shape[-2:])}; encode the condition at the size the pipeline renders"
            )
        batch, cond_batch = hidden_states.shape[0], cond.shape[0]
        if batch % cond_batch:
            raise ValueError(f"cannot spread {cond_batch} conditions over a batch of {batch}")
        # CFG runs torch.cat([latents] * 2), so [c0..cB-1] repeated twice lines up with [uncond; cond].
        cond = cond.to(device=hidden_states.device, dtype=hidden_states.dtype).repeat(batch // cond_batch, 1, 1, 1)
        return self.transformer.pos_embed(cond)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        controlnet_cond: torch.Tensor | None = None,
        conditioning_scale: float | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """PixArtTransformer2DModel.forward plus the ControlNet-Transformer residuals, as PixArt-δ wires them."""
        base = self.transformer
        cond = self.controlnet_cond if controlnet_cond is None else controlnet_cond
        scale = self.conditioning_scale if conditioning_scale is None else conditioning_scale
        if cond is None:
            return base(
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                timestep=timestep,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                attention_mask=attention_mask,
                encoder_attention_mask=encoder_attention_mask,
                return_dict=return_dict,
            )
        if base.use_additional_conditions and added_cond_kwargs is None:
            raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")

        # 1. Masks become additive biases, exactly as the base forward does.
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = ((1 - attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)

        # 2. Input: patches, timestep embedding and caption projection from the base model's own modules.
        batch_size = hidden_states.shape[0]
        patch = base.config.patch_size
        height, width = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
        control = self._condition_tokens(cond, hidden_states)
        hidden_states = base.pos_embed(hidden_states)
        timestep, embedded_timestep = base.adaln_single(
            timestep, added_cond_kwargs, batch_size=batch_size, hidden_dtype=hidden_states.dtype
        )
        if base.caption_projection is not None:
            encoder_hidden_states = base.caption_projection(encoder_hidden_states)
            encoder_hidden_states = encoder_hidden_states.view(batch_size, -1, hidden_states.shape[-1])

        # 3. Blocks: copy i-1's projected output joins the input of base block i, for i = 1..N.
        block_kwargs = {
            "attention_mask": attention_mask,
            "encoder_hidden_states": encoder_hidden_states,
            "encoder_attention_mask": encoder_attention_mask,
            "timestep": timestep,
            "cross_attention_kwargs": cross_attention_kwargs,
            "class_labels": None,
        }
        copies = self.controlnet.controlnet_blocks
        for index, block in enumerate(base.transformer_blocks):
            if 1 <= index <= len(copies):
                residual, control = copies[index - 1](hidden_states, control, **block_kwargs)
                hidden_states = hidden_states + scale * residual
            hidden_states = block(hidden_states, **block_kwargs)

        # 4. Output: final modulation, projection and unpatchify, as in the base forward.
        shift, scale_out = (
            base.scale_shift_table[None] + embedded_timestep[:, None].to(base.scale_shift_table.device)
        ).chunk(2, dim=1)
        hidden_states = base.norm_out(hidden_states)
        hidden_states = hidden_states * (1 + scale_out.to(hidden_states.device)) + shift.to(hidden_states.device)
        hidden_states = base.proj_out(hidden_states)
        hidden_states = hidden_states.squeeze(1)
        hidden_states = hidden_states.reshape(shape=(-1, height, width, patch, patch, base.out_channels))
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(shape=(-1, base.out_channels, height * patch, width * patch))
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


# Original PixArt-α checkpoint names (inside `copied_block.`) → diffusers' BasicTransformerBlock names; the
# fused projections are split below. Same mapping as diffusers' convert_pixart_alpha_to_diffusers.py.
_PLAIN_RENAMES = {
    "scale_shift_table": "scale_shift_table",
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_FUSED_SPLITS = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}
_ORIGINAL_KEY = re.compile(r"controlnet\.(\d+)\.(.+)")


def _convert_copied_block_key(rest: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Convert one `copied_block.*` suffix; None when the name is unknown."""
    if rest == "scale_shift_table":
        return {"scale_shift_table": tensor}
    module, _, param = rest.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    if module in _PLAIN_RENAMES:
        return {f"{_PLAIN_RENAMES[module]}.{param}": tensor}
    if module in _FUSED_SPLITS:
        targets = _FUSED_SPLITS[module]
        parts = torch.chunk(tensor, len(targets), dim=0)
        return {f"{target}.{param}": part.clone() for target, part in zip(targets, parts, strict=True)}
    return None


def convert_original_controlnet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn the original repository's `controlnet.{i}.*` keys into PixArtControlNetAdapter keys."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        # DDP-saved checkpoints prefix everything with "module."; base-model keys are not ours to convert.
        match = _ORIGINAL_KEY.fullmatch(key.removeprefix("module."))
        if match is None:
            continue
        index, rest = match.group(1), match.group(2)
        prefix = f"controlnet_blocks.{index}"
        mapped: dict[str, torch.Tensor] | None = None
        if rest.startswith("copied_block."):
            inner = _convert_copied_block_key(rest.removeprefix("copied_block."), tensor)
            if inner is not None:
                mapped = {f"{prefix}.transformer_block.{name}": value for name, value in inner.items()}
        elif rest in ("before_proj.weight", "before_proj.bias", "after_proj.weight", "after_proj.bias"):
            mapped = {f"{prefix}.{rest}": tensor}
        if mapped is None:
            raise ValueError(f"unknown ControlNet key in original checkpoint: {key!r}")
        converted.update(mapped)
    if not converted:
        raise ValueError("no `controlnet.{i}.*` keys found: this is not an original PixArt ControlNet checkpoint")
    return converted


def load_controlnet(
    source: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> PixArtControlNetAdapter:
    """Load an adapter from a diffusers-format folder or an original `.pth`/`.safetensors` checkpoint file."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(path)
        else:
            # weights_only: a checkpoint from the internet must not be able to run code on unpickling.
            raw = torch.load(path, map_location="cpu", weights_only=True)
        converted = convert_original_controlnet(raw)
        num_layers = 1 + max(int(key.split(".")[1]) for key in converted)
        # Original checkpoints carry no config: block sizes follow from the weights, the rest is PixArt-XL-2's.
        width = converted["controlnet_blocks.0.after_proj.weight"].shape[0]
        adapter = PixArtControlNetAdapter(num_layers=num_layers, num_attention_heads=width // 72, attention_head_dim=72)
        adapter.load_state_dict(converted, strict=True)
    else:
        adapter = PixArtControlNetAdapter.from_pretrained(str(source))
    return _move(adapter, device, dtype).eval()


def make_tiny_controlnet(path: str | Path, transformer_source: str | Path, *, seed: int = 0) -> Path:
    """Write a 1-copy adapter for the tiny model with non-zero projections, so controlled renders differ."""
    from diffusers import PixArtTransformer2DModel

    source = Path(transformer_source)
    # Accept either a whole pipeline folder or the transformer's own folder.
    subfolder = "transformer" if (source / "model_index.json").is_file() else None
    transformer = PixArtTransformer2DModel.from_pretrained(source, subfolder=subfolder)
    adapter = PixArtControlNetAdapter.from_transformer(transformer, num_layers=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The tiny VAE's latents are small (|z| ~ 0.06), so before_proj amplifies them enough for different
        # conditions to give different images; after_proj at 0.2 shifts renders by ~14 levels of 255.
        for block in adapter.controlnet_blocks:
            for proj, std in ((getattr(block, "before_proj", None), 1.0), (block.after_proj, 0.2)):
                if proj is not None:
                    nn.init.normal_(proj.weight, std=std)
                    nn.init.normal_(proj.bias, std=std)
    target = Path(path)
    adapter.save_pretrained(target, safe_serialization=True)
    return target


def controlled_pipeline(
    pipe: Any, controlnet: PixArtControlNetAdapter, controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0
) -> Any:
    """Return a pipeline sharing `pipe`'s components whose transformer runs the adapter on `controlnet_cond`.

    A new pipeline object rather than swapping `pipe.transformer`: the worker's cached pipeline is never
    mutated, so an exception mid-render cannot leave it controlled.
    """
    base = pipe.transformer
    if isinstance(base, PixArtControlNetTransformer):
        base = base.transformer
    controlnet = _move(controlnet, base.device, base.dtype)
    transformer = PixArtControlNetTransformer(base, controlnet, controlnet_cond, conditioning_scale)
    controlled = type(pipe)(**{**pipe.components, "transformer": transformer})
    controlled.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return controlled
