"""The HED soft-edge network PixArt-δ's ControlNet was trained on, and the soft-edge recipe around it.

HEDNetwork is lllyasviel's Apache-2.0 HED (ControlNetHED_Apache2), an RGB-input network whose module names
match the released weights, ControlNetHED.pth of the hub repo lllyasviel/Annotators (~29 MB, float16), so that
file loads strictly. soft_edges is the preprocessing of PixArt-alpha's HEDdetector (diffusion/model/hed.py)
without its VAE step: the five side outputs upsampled to the image size, averaged, then a sigmoid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

HED_HUB_ID = "lllyasviel/Annotators"
HED_FILENAME = "ControlNetHED.pth"

# (in channels, out channels, 3×3 convs) of block1..block5.
_BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


class HEDLoadError(RuntimeError):
    """HED weights that are missing, unreadable, not the expected file, or not ControlNetHED's layout."""


class _HEDBlock(nn.Module):
    """3×3 convs with a ReLU after each, and a 1×1 projection of the result to one side-output channel."""

    def __init__(self, in_channels: int, out_channels: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *(
                nn.Conv2d(in_channels if index == 0 else out_channels, out_channels, kernel_size=3, padding=1)
                for index in range(layers)
            )
        )
        self.projection = nn.Conv2d(out_channels, 1, kernel_size=1)

    def forward(self, h: torch.Tensor, downsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if downsample:
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        for conv in self.convs:
            h = F.relu(conv(h))
        return h, self.projection(h)


class HEDNetwork(nn.Module):
    """ControlNetHED_Apache2: `norm` subtracted from the 0..255 RGB input, five blocks, five side outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = _HEDBlock(*_BLOCKS[0])
        self.block2 = _HEDBlock(*_BLOCKS[1])
        self.block3 = _HEDBlock(*_BLOCKS[2])
        self.block4 = _HEDBlock(*_BLOCKS[3])
        self.block5 = _HEDBlock(*_BLOCKS[4])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Side outputs of an N×3×H×W batch in 0..255: N×1×H×W, then halved (floored) by each 2×2 max-pool."""
        h = x - self.norm
        projections = []
        for index, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            h, projection = block(h, downsample=index > 0)
            projections.append(projection)
        return tuple(projections)


def weights_sha256(path: str | Path) -> str:
    """The hex sha256 of a weights file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).expanduser().open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_state(path: Path) -> Mapping[str, object]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a pickle with objects, a wrong format: all are the file's fault
        raise HEDLoadError(f"HED weights {path} cannot be read: {exc}") from exc
    if not isinstance(state, Mapping):
        raise HEDLoadError(f"HED weights {path} hold a {type(state).__name__}, not a state dict")
    return state


def load_hed(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    expected_sha256: str | None = None,
    local_files_only: bool = False,
) -> HEDNetwork:
    """Load HEDNetwork from a .pth or .safetensors file, or from the hub (`source` == HED_HUB_ID), strictly.

    Every key of the file must be one of the network's with the same shape, and every one of the network's
    must be there; otherwise HEDLoadError names the file and the keys. With `expected_sha256`, a file whose
    sha256 differs is refused before it is read. The network comes back in eval mode, without gradients, in
    float32 on `device`.
    """
    if str(source) == HED_HUB_ID:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(HED_HUB_ID, HED_FILENAME, local_files_only=local_files_only))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise HEDLoadError(f"HED weights {path} do not exist (or are not a file)")
    if expected_sha256 is not None:
        actual = weights_sha256(path)
        if actual != expected_sha256.lower():
            raise HEDLoadError(f"HED weights {path} have sha256 {actual}, expected {expected_sha256}")
    state = _read_state(path)

    net = HEDNetwork()
    wanted = net.state_dict()
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(str(key) for key in set(state) - set(wanted))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key, tensor in state.items():
        if key not in wanted:
            continue
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{key} is a {type(tensor).__name__}, not a tensor")
        elif tensor.shape != wanted[key].shape:
            problems.append(f"{key} has shape {tuple(tensor.shape)}, expected {tuple(wanted[key].shape)}")
    if problems:
        raise HEDLoadError(f"HED weights {path} are not ControlNetHED's layout: {'; '.join(problems)}")
    # copy_ casts the checkpoint's float16 into the float32 parameters.
    net.load_state_dict(dict(state), strict=True)
    net.eval().requires_grad_(False)
    return net.to(device=device, dtype=torch.float32)


def soft_edges(net: HEDNetwork, image: Image.Image) -> torch.Tensor:
    """The soft HED edges of `image` at its own size: 1×1×H×W float32 in [0, 1], on the network's device.

    PixArt-alpha's HEDdetector.forward: ToTensor (0..1), the network on that × 255, each side output resized
    to H×W, concatenated, sigmoid of their mean, clipped.
    """
    import numpy as np

    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width = rgb.shape[:2]
    device = next(net.parameters()).device
    with torch.inference_mode():
        # As torchvision's ToTensor: HWC uint8 → CHW float / 255; the recipe then multiplies back by 255.
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255)[None].to(device)
        projections = net(x * 255.0)
        # The original uses torchvision's TF.resize, which on tensors is bilinear with antialias=True. The
        # antialias filter only differs from plain bilinear when shrinking, and the side outputs (at H×W or
        # smaller) are only ever enlarged here, so plain bilinear interpolation is the same resize.
        upsampled = torch.cat(
            [
                F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
                for p in projections
            ],
            dim=1,
        )
        edges = torch.sigmoid(upsampled.mean(dim=1, keepdim=True)).clip(0.0, 1.0)
    # A clone outside inference mode: callers may use it in ordinary autograd-free code, in place included.
    return edges.clone().float()


def edge_map_image(edges: torch.Tensor) -> Image.Image:
    """An RGB image of a 1×1×H×W (or H×W) edge map in [0, 1]: round(edge × 255) in all three channels."""
    import numpy as np

    if edges.ndim < 2 or edges[..., 0, 0].numel() != 1:
        raise ValueError(f"expected one edge map (1×1×H×W or H×W), got shape {tuple(edges.shape)}")
    plane = edges.detach().float().cpu().reshape(edges.shape[-2], edges.shape[-1])
    grey = (plane.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def save_random_hed(path: str | Path, seed: int = 0) -> Path:
    """Write random HEDNetwork weights in ControlNetHED.pth's layout (float16, ~29 MB) to `path`.

    For demos and tests in place of the released weights: the edges they give mean nothing. The same seed
    always writes the same tensors; the caller's global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only, restored when the block ends
        net = HEDNetwork()
    with torch.no_grad():
        # Any fixed non-zero values: the released norm is a per-channel RGB offset of this order.
        net.norm.copy_(torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1) * 255.0)
    state = {key: tensor.detach().to(torch.float16).contiguous() for key, tensor in net.state_dict().items()}
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target
