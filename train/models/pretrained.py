"""Where a student's initial encoder weights come from, and how the files users have map onto timm.

`locate` turns a student's config into a local file or folder (downloading ImageNet weights from the
Hugging Face hub for `pretrained: true`); `read_encoder_state` turns any supported form into timm's key
names for the encoder:
- timm / torchvision state dicts (`.safetensors`, `.pth`, `.bin`), as timm's hub stores them;
- transformers SegFormer / MiT checkpoints (`nvidia/mit-b0`): a folder or its `model.safetensors` /
  `pytorch_model.bin`, with or without `config.json`, the `segformer.` prefix and a classifier;
- NVlabs / mmseg MiT files (`mit_b0.pth`: `patch_embed1.proj.weight`, `block1.0.attn.q.weight`, ...),
  with or without a `state_dict` wrapper (timm's PVTv2 filter reads this naming).
`load_decode_head` loads the decode head of a transformers SegformerForSemanticSegmentation checkpoint into the
SegFormer student (its classifier where the class count matches).
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from train.config import ConfigError, StudentConfig
from train.models.segformer import encoder_args

log = logging.getLogger(__name__)

# MiT sizes by (hidden_sizes, depths), to name what a transformers checkpoint holds.
MIT_SIZES = {
    ((32, 64, 160, 256), (2, 2, 2, 2)): "MiT-B0",
    ((64, 128, 320, 512), (2, 2, 2, 2)): "MiT-B1",
    ((64, 128, 320, 512), (3, 4, 6, 3)): "MiT-B2",
    ((64, 128, 320, 512), (3, 4, 18, 3)): "MiT-B3",
    ((64, 128, 320, 512), (3, 8, 27, 3)): "MiT-B4",
    ((64, 128, 320, 512), (3, 6, 40, 3)): "MiT-B5",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in a folder, in this order


class WeightsError(ConfigError):
    """Initial weights that cannot be used; the message names the file (or hub model) and what does not fit."""


def hub_source(cfg: StudentConfig) -> str:
    """The hub repo of a student's ImageNet weights: MiT-Bn from NVIDIA for the SegFormer's pvt_v2_bn
    (timm's own pvt_v2 weights have MLP ratio 8 in stages 1-2, MiT has 4), timm's repo otherwise."""
    if cfg.arch == "segformer" and (m := re.fullmatch(r"pvt_v2_b([0-5])", cfg.backbone.split(".")[0])):
        return f"nvidia/mit-b{m.group(1)}"
    try:
        hub_id = timm.models.get_pretrained_cfg(cfg.backbone).hf_hub_id
    except (RuntimeError, AttributeError):  # unknown name
        hub_id = None
    if not hub_id:
        raise WeightsError(f"timm has no hub weights for '{cfg.backbone}': set pretrained=false or weights=PATH")
    return hub_id


def locate(cfg: StudentConfig, student: str) -> Path | None:
    """The local file or folder of a student's initial encoder weights; None for random initialisation.
    `weights` wins over `pretrained`; hub downloads land in the Hugging Face cache (reused offline)."""
    if cfg.weights is not None:
        path = Path(cfg.weights).expanduser()
        if not path.exists():
            raise WeightsError(f"{student}.weights: encoder weights not found: {path}")
        return path
    if not cfg.pretrained:
        return None
    repo = hub_source(cfg)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        for name in WEIGHT_FILES:
            try:
                path = Path(hf_hub_download(repo, name))
            except RemoteEntryNotFoundError:
                continue
            log.info("%s: ImageNet weights of %s from the Hugging Face hub (%s)", student, cfg.backbone, repo)
            return path.parent
        raise WeightsError(f"{student}.pretrained: the hub repo {repo} holds none of {', '.join(WEIGHT_FILES)}")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise WeightsError(
            f"{student}.pretrained=true needs the ImageNet weights of {cfg.backbone} from the Hugging Face hub "
            f"({repo}), which cannot be fetched here ({type(e).__name__}). On a machine with internet: "
            f"`hf download {repo} --local-dir DIR`, copy DIR here and set {student}.weights=DIR "
            f"(or {student}.pretrained=false to start from random weights)"
        ) from None


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightsError(f"cannot read encoder weights {path}: {e}") from None
    for wrapper in ("state_dict", "model"):  # mmseg / NVlabs / training-script checkpoints
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state dict of tensors")
    return state


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise WeightsError(f"{path}: a weights folder must hold one of {', '.join(WEIGHT_FILES)}")


# transformers' SegFormer naming (as `save_pretrained` writes it) -> NVlabs MiT naming, which timm reads.
_TRANSFORMERS_TO_NVLABS = [
    (r"^patch_embeddings\.(\d)\.proj\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
    (r"^patch_embeddings\.(\d)\.layer_norm\.", lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (r"^layer_norm\.(\d)\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"^block\.(\d)\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
    (r"\.layer_norm_1\.", ".norm1."),
    (r"\.layer_norm_2\.", ".norm2."),
    (r"\.attention\.self\.query\.", ".attn.q."),
    (r"\.attention\.self\.sr\.", ".attn.sr."),
    (r"\.attention\.self\.layer_norm\.", ".attn.norm."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
]


def _from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the encoder (drop `classifier`, `decode_head`), rename, and join key and value into `kv`."""
    encoder = {}
    for key, value in state.items():
        if m := re.match(r"^(?:segformer\.)?encoder\.(.*)", key):
            name = m[1]
            for pattern, repl in _TRANSFORMERS_TO_NVLABS:
                name = re.sub(pattern, repl, name)
            encoder[name] = value
    out = {}
    for name, value in encoder.items():
        if ".attention.self.key." in name:
            value_name = name.replace(".key.", ".value.")
            out[name.replace(".attention.self.key.", ".attn.kv.")] = torch.cat([value, encoder[value_name]])
        elif ".attention.self.value." not in name:
            out[name] = value
    return out


def _mit_size(state: dict[str, torch.Tensor]) -> str | None:
    """'MiT-B1 (widths [...], depths [...])' from a state dict in timm's PVTv2 naming."""
    widths, depths = [], []
    for i in range(4):
        if (norm := state.get(f"stages.{i}.norm.weight")) is None:
            return None
        widths.append(norm.shape[0])
        blocks = {int(m[1]) for k in state if (m := re.match(rf"stages\.{i}\.blocks\.(\d+)\.", k))}
        depths.append(max(blocks, default=-1) + 1)
    name = MIT_SIZES.get((tuple(widths), tuple(depths)), "a MiT/PVTv2 encoder")
    return f"{name} (widths {widths}, depths {depths})"


def read_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file of a file or folder, and its state dict (read once for the encoder and the head)."""
    file = _weights_file(Path(path))
    return file, _read_file(file)


def read_encoder_state(file: Path, state: dict[str, torch.Tensor], cfg: StudentConfig) -> dict[str, torch.Tensor]:
    """Any supported form of `file`'s `state` -> the encoder's state dict in timm's naming for `cfg.backbone`,
    checked against the encoder: every tensor present with its shape, or a WeightsError saying what does not fit."""
    state = {re.sub(r"^(module|backbone)\.", "", k): v for k, v in state.items()}  # DDP / mmseg segmentor
    kind = "timm"
    if any(re.match(r"^(segformer\.)?encoder\.patch_embeddings\.", k) for k in state):
        state, kind = _from_transformers(state), "transformers"
    if cfg.backbone.startswith("pvt_v2"):  # NVlabs MiT / original PVTv2 naming -> timm's
        from timm.models.pvt_v2 import checkpoint_filter_fn

        if "patch_embed1.proj.weight" in state:
            kind = "NVlabs"
        state = checkpoint_filter_fn(state, None)
    kwargs = encoder_args(cfg.backbone) if cfg.arch == "segformer" else {}
    reference = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, **kwargs).state_dict()
    missing = [k for k in reference if k not in state]
    wrong = [k for k in reference if k in state and state[k].shape != reference[k].shape]
    if missing or wrong:
        details = []
        if wrong:
            k = wrong[0]
            shapes = f"file {list(state[k].shape)}, model {list(reference[k].shape)}"
            details.append(f"{len(wrong)} tensors of another shape (e.g. {k}: {shapes})")
        if missing:
            details.append(f"{len(missing)} of {len(reference)} tensors missing (e.g. {', '.join(missing[:3])})")
        sizes = ""
        if (held := _mit_size(state)) and (needed := _mit_size(reference)):
            sizes = f" The file holds {held}; {cfg.backbone} is {needed}."
        raise WeightsError(
            f"encoder weights {file} ({kind} naming) do not fit timm model '{cfg.backbone}': "
            f"{'; '.join(details)}.{sizes}"
        )
    extra = [k for k in state if k not in reference]
    if extra:
        log.info("%s: %d tensors outside the encoder left out (e.g. %s)", file, len(extra), extra[0])
    return {k: state[k] for k in reference}


def decode_head_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' SegformerDecodeHead (`decode_head.*`) in this project's AllMLPHead naming (`decoder.*`):
    its per-stage Linear layers as 1x1 convs, and its fuse conv's input blocks reversed (transformers
    concatenates the stages deepest first, the student shallowest first)."""
    head = {k.removeprefix("decode_head."): v for k, v in state.items() if k.startswith("decode_head.")}
    if not head:
        return {}
    out = {}
    for key, value in head.items():
        if m := re.fullmatch(r"(?:linear_c|linear_projections)\.(\d+)\.proj\.(weight|bias)", key):  # file, module
            out[f"decoder.proj.{m[1]}.{m[2]}"] = value[:, :, None, None] if m[2] == "weight" else value
        elif m := re.fullmatch(r"batch_norm\.(.+)", key):
            out[f"decoder.fuse.1.{m[1]}"] = value
        elif m := re.fullmatch(r"classifier\.(weight|bias)", key):
            out[f"decoder.classifier.1.{m[1]}"] = value
        elif key == "linear_fuse.weight":
            out["decoder.fuse.0.weight"] = torch.cat(value.split(value.shape[0], dim=1)[::-1], dim=1)
    return out


def load_decode_head(model: torch.nn.Module, file: Path, state: dict[str, torch.Tensor], width: int) -> None:
    """The decode head a SegFormer checkpoint's `state` holds, loaded into `model` (nothing when it holds none);
    the classifier only where the class count matches the model's. A head of another width names the file."""
    head = decode_head_state(state)
    if not head:
        return
    theirs = head["decoder.fuse.0.weight"].shape[0] if "decoder.fuse.0.weight" in head else None
    if theirs != width:
        raise WeightsError(
            f"{file}: its decode head is {theirs} wide (decoder_hidden_size), the student's {width}: "
            f"set vit.decoder_channels={theirs}"
        )
    ours = model.state_dict()
    classes = head.get("decoder.classifier.1.weight", torch.empty(0)).shape[0]
    if classes != ours["decoder.classifier.1.weight"].shape[0]:
        head = {k: v for k, v in head.items() if not k.startswith("decoder.classifier.")}
        log.info("%s: its classifier has %d classes, this run %d: left out", file, classes,
                 ours["decoder.classifier.1.weight"].shape[0])  # fmt: skip
    wanted = {k for k in ours if k.startswith("decoder.") and not k.startswith("decoder.classifier.")}
    missing = sorted(wanted - set(head))
    wrong = [k for k in head if k in ours and head[k].shape != ours[k].shape]
    if missing or wrong:
        problem = f"missing {', '.join(missing[:3])}" if missing else f"{wrong[0]} is {list(head[wrong[0]].shape)}"
        raise WeightsError(f"{file}: its decode head does not fit the student's ({problem})")
    model.load_state_dict(head, strict=False)
    log.info("%s: decode head loaded%s", file, " with its classifier" if "decoder.classifier.1.weight" in head else "")
