"""int8 inference on CPUs without native half precision (AVX2, AVX-512 without BF16).

Where a CPU computes bf16 natively, ``precision="mixed"`` halves the cost of the convolutions;
on an AVX2-only CPU bf16 is emulated and slower than float32, so the fast path there is int8:
the trunk, the proposal head and the mask head run as statically quantised oneDNN kernels
(``torch.ao.quantization`` FX graph mode, per-channel symmetric weights, per-tensor
activations), everything else (RoI features, box head, box decoding, NMS) in float32. The FPN
is quantised with the trunk, as one graph, when the calibration says so (``cellmask calibrate
--fpn``; a "backbone" part instead of "trunk"): with AVX2 kernels it made the trunk and FPN
0.39-0.42 -> 0.32 s per 1,152 px tile at one thread, and ``val`` / ``fluo_test`` AP@0.5 0.841 /
0.856 against 0.839 / 0.850 at fp32 and 0.844 / 0.855 with the trunk alone in int8 (the
earlier calibration; the shipped file now has the FPN in int8). Files calibrated without it
keep the FPN in float32.

Static quantisation needs the range of every activation. Those ranges are measured once, by
``cellmask calibrate`` on training images (never test images), and stored in the weights file
as tensors named ``int8.<part>.<observer>.min_val|max_val``: the range each histogram
observer's quantisation-error search chose, searched once at calibration (plain float tensors:
nothing is unpickled; files calibrated before hold the histograms themselves, and are searched
when loaded). :func:`quantize_runner` rebuilds the same FX graphs, loads those observer states
and converts: the int8 network is a pure function of the weights file, identical on every
machine with the same oneDNN.

The quantised engine is process-wide state in torch (``torch.backends.quantized.engine``);
it is set only while the kernels are packed and restored afterwards (:func:`_engine`).
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch import nn

from cellmask.errors import WeightsError
from cellmask.model.network import MASK_CHUNK

#: The quantised kernels: oneDNN. The x86/fbgemm kernels on AVX2 lose precision in their
#: 16-bit intermediate sums (measured: 50% mean relative error on the FPN output against 15%).
ENGINE = "onednn"
PREFIX = "int8."
#: The FPN's level names (strides 4, 8, 16 and the max-pooled 32).
LEVELS = ("0", "1", "2", "pool")
#: The int8 parts a calibration may hold: "trunk" alone (the FPN in float32) or "backbone"
#: (trunk and FPN as one graph), then always the proposal head and the mask head.
TRUNK_PARTS = ("trunk", "backbone")
#: FX tracing patches module-level state: tile workers build their copies one at a time.
_TRACE_LOCK = threading.Lock()


def int8_supported() -> bool:
    """Whether this torch build has the oneDNN quantised kernels."""
    return ENGINE in torch.backends.quantized.supported_engines


@contextlib.contextmanager
def _engine() -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = ENGINE
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class _UnrolledRPNHead(nn.Module):
    """torchvision's ``RPNHead`` over the network's four levels as four arguments (FX traces
    neither a list nor ``*args``): returns ``[logits_0, deltas_0, logits_1, ...]``."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.conv, self.cls_logits, self.bbox_pred = head.conv, head.cls_logits, head.bbox_pred

    def forward(self, l0: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor, l3: torch.Tensor
                ) -> list[torch.Tensor]:
        out = []
        for t in (l0, l1, l2, l3):
            h = self.conv(t)
            out.append(self.cls_logits(h))
            out.append(self.bbox_pred(h))
        return out


class Int8Trunk(nn.Module):
    """The trunk graph (quantised or observing): ``(B, C, H, W)`` -> stage outputs."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(self.graph(x.contiguous(memory_format=torch.channels_last)))


class _TrunkFPN(nn.Module):
    """The trunk and the FPN as one graph (FX traces neither a dict input nor a dict output
    of the FPN): ``(B, C, H, W)`` -> the FPN's levels as a list, finest first."""

    def __init__(self, body: nn.Module, fpn: nn.Module):
        super().__init__()
        self.body, self.fpn = body, fpn

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.fpn(self.body(x)).values())


class Int8Backbone(nn.Module):
    """The trunk + FPN graph (quantised or observing) in the trunk's place: ``(B, C, H, W)``
    -> the FPN's levels by name (the FPN's own place then holds an identity)."""

    def __init__(self, graph: nn.Module, names: tuple[str, ...] = LEVELS):
        super().__init__()
        self.graph, self.names = graph, names

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = self.graph(x.contiguous(memory_format=torch.channels_last))
        return OrderedDict(zip(self.names, out))


class Int8RPNHead(nn.Module):
    """The proposal head graph: per-level maps -> (objectness list, box-delta list)."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, maps: list[torch.Tensor]):
        out = self.graph(*[t.contiguous(memory_format=torch.channels_last) for t in maps])
        return out[0::2], out[1::2]


class Int8MaskHead(nn.Module):
    """The mask head graph over RoI features ``(N, C, S, S)``, in chunks of MASK_CHUNK."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if len(x) <= MASK_CHUNK:
            return self.graph(x)
        return torch.cat([self.graph(part) for part in x.split(MASK_CHUNK)])


def _float_parts(runner: nn.Module, trunk_part: str = "trunk"
                 ) -> dict[str, tuple[nn.Module, tuple, type]]:
    """Float copies of the parts to quantise, each with example inputs and its wrapper;
    ``trunk_part`` is one of :data:`TRUNK_PARTS`."""
    bb = runner.backbone
    levels = len(LEVELS)  # build_network checks
    width = bb.out_channels
    x = torch.rand(1, runner.backbone.body.stem[0].in_channels, 64, 64)
    trunk = copy.deepcopy(bb.body).float().eval()
    if trunk_part == "backbone":
        trunk = _TrunkFPN(trunk, copy.deepcopy(bb.fpn).float()).eval()
    head = _UnrolledRPNHead(copy.deepcopy(runner.rpn.head).float()).eval()
    maps = tuple(torch.rand(1, width, 16 >> i, 16 >> i) for i in range(levels))
    mask = nn.Sequential(*copy.deepcopy(runner.roi_heads.mask_head).children()).float().eval()
    rois = torch.rand(2, width, runner.roi_heads.mask_roi_pool.size,
                      runner.roi_heads.mask_roi_pool.size)
    return {trunk_part: (trunk, (x,), Int8Backbone if trunk_part == "backbone" else Int8Trunk),
            "rpn_head": (head, maps, Int8RPNHead), "mask_head": (mask, (rois,), Int8MaskHead)}


def _qconfig_mapping(ranges: bool):
    """torch's default oneDNN mapping (histogram observers for activations), or with
    ``ranges`` the same with min/max observers of the same dtype and range, which take the
    ranges a calibration stored (:func:`_searched_ranges`) and convert without a search."""
    from torch.ao.quantization import MinMaxObserver, QConfig, get_default_qconfig_mapping

    mapping = get_default_qconfig_mapping(ENGINE)
    if not ranges:
        return mapping
    default = mapping.global_qconfig
    minmax = MinMaxObserver.with_args(**_minmax_args(default.activation()))
    return mapping.set_global(QConfig(activation=minmax, weight=default.weight))


def _minmax_args(observer) -> dict:
    """The arguments of a min/max observer quantising as ``observer`` does (same dtype,
    scheme and integer range)."""
    return dict(dtype=observer.dtype, qscheme=observer.qscheme,
                reduce_range=observer.reduce_range, quant_min=observer.quant_min,
                quant_max=observer.quant_max, eps=float(observer.eps))


def _prepare(module: nn.Module, example: tuple, ranges: bool = False) -> nn.Module:
    from torch.ao.quantization.quantize_fx import prepare_fx

    with warnings.catch_warnings():  # torch's notice that FX mode moves to another package
        warnings.simplefilter("ignore")
        return prepare_fx(module, _qconfig_mapping(ranges), example_inputs=example)


def _searched_ranges(prepared: nn.Module) -> dict[str, torch.Tensor]:
    """The ``min_val``/``max_val`` of every histogram observer of ``prepared`` replaced by the
    range its quantisation-error search chooses, so that a min/max observer holding them gives
    the same scale and zero point.

    The search (torch's ``HistogramObserver``) is what makes converting slow: about a second
    per part on a 2-core CPU, paid by every process that loads the int8 network. Done here,
    once, when the calibration is written. Each range is checked to reproduce the observer's
    own quantisation parameters exactly.
    """
    from torch.ao.quantization import HistogramObserver, MinMaxObserver

    out: dict[str, torch.Tensor] = {}
    done: dict[int, dict[str, torch.Tensor]] = {}  # an observer can be reached by two names
    for key in _observer_state(prepared):
        if not key.endswith(".histogram"):
            continue
        name = key[:-len(".histogram")]
        obs = prepared.get_submodule(name)
        if not isinstance(obs, HistogramObserver):
            raise RuntimeError(f"{name} is a {type(obs).__name__}, not a histogram observer")
        if id(obs) not in done:
            check = MinMaxObserver(**_minmax_args(obs))
            if not torch.isinf(obs.min_val).any():  # else it never saw data: defaults
                # torch has no public call for the searched range (calculate_qparams returns
                # only its result); the check below catches a torch whose search differs
                lo, hi = obs._non_linear_param_search()
                check(torch.stack([lo, hi]).reshape(-1).float())
            want, got = obs.calculate_qparams(), check.calculate_qparams()
            if not all(torch.equal(a, b) for a, b in zip(want, got)):
                raise RuntimeError(f"the stored range of {name} does not reproduce its "
                                   f"quantisation parameters ({want} vs {got})")
            done[id(obs)] = {k: v.detach().clone() for k, v in check.state_dict().items()}
        out.update({f"{name}.{k}": v for k, v in done[id(obs)].items()})
    return out


def _convert(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared)


def _install(runner: nn.Module, wrapped: dict[str, nn.Module]) -> None:
    if "backbone" in wrapped:
        runner.backbone.body, runner.backbone.fpn = wrapped["backbone"], nn.Identity()
    else:
        runner.backbone.body = wrapped["trunk"]
    runner.rpn.head = wrapped["rpn_head"]
    runner.roi_heads.mask_head = wrapped["mask_head"]


def trunk_part_of(calibration: dict[str, torch.Tensor]) -> str:
    """Which of :data:`TRUNK_PARTS` a stored calibration quantises."""
    return "backbone" if any(k.startswith(f"{PREFIX}backbone.") for k in calibration) \
        else "trunk"


def _observer_state(prepared: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in prepared.state_dict().items() if "activation_post_process" in k}


def calibrate(runner: nn.Module, run_images: Callable[[], None], trunk_part: str = "trunk",
              histograms: bool = False) -> dict[str, torch.Tensor]:
    """Activation ranges of the int8 parts of ``runner`` (a float32 CPU inference network;
    ``trunk_part``: :data:`TRUNK_PARTS`), observed while ``run_images()`` segments calibration
    images with it; returns the tensors to store in a weights file (names start with
    :data:`PREFIX`): the searched ranges, or with ``histograms`` the observers' histograms
    as files written before ranges were stored hold them. ``runner`` is restored."""
    if trunk_part not in TRUNK_PARTS:
        raise ValueError(f"trunk_part must be one of {TRUNK_PARTS}, not {trunk_part!r}")
    saved = (runner.backbone.body, runner.backbone.fpn, runner.rpn.head,
             runner.roi_heads.mask_head)
    parts = _float_parts(runner, trunk_part)
    with _TRACE_LOCK:
        prepared = {name: _prepare(m, ex) for name, (m, ex, _) in parts.items()}
    wrappers = {name: wrap for name, (_, _, wrap) in parts.items()}
    try:
        _install(runner, {name: wrappers[name](p) for name, p in prepared.items()})
        run_images()
    finally:
        (runner.backbone.body, runner.backbone.fpn, runner.rpn.head,
         runner.roi_heads.mask_head) = saved
    return {f"{PREFIX}{name}.{k}": v.detach().clone().contiguous()
            for name, p in prepared.items()
            for k, v in (_observer_state(p) if histograms else _searched_ranges(p)).items()}


def copy_runner(runner: nn.Module) -> nn.Module:
    """A copy of an int8 ``runner`` for another thread, without tracing again (tracing patches
    ``nn.Module.__call__`` for every thread, so it must not run while others segment). The
    packed kernels are re-packed on copy for the current engine: copy under oneDNN."""
    with _TRACE_LOCK, _engine():
        return copy.deepcopy(runner)


def split_calibration(state: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(network state, int8 calibration)`` of a weights file's tensors."""
    net = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    return net, {k: v for k, v in state.items() if k.startswith(PREFIX)}


def quantize_runner(runner: nn.Module, calibration: dict[str, torch.Tensor]) -> nn.Module:
    """Replace the trunk (with the FPN, for a "backbone" calibration), proposal head and mask
    head of ``runner`` (float32, CPU, in place) by int8 kernels with the stored activation
    ranges ``calibration``."""
    if not int8_supported():
        raise WeightsError(f"this torch build has no {ENGINE} quantised kernels: use fp32")
    wrapped = {}
    with _TRACE_LOCK, _engine():
        # calibrations written before ranges were stored hold the observers' histograms
        ranges = not any(k.endswith(".histogram") for k in calibration)
        for name, (module, example, wrap) in _float_parts(runner,
                                                          trunk_part_of(calibration)).items():
            prepared = _prepare(module, example, ranges)
            expected = _observer_state(prepared)
            given = {k[len(PREFIX) + len(name) + 1:]: v for k, v in calibration.items()
                     if k.startswith(f"{PREFIX}{name}.")}
            if set(given) != set(expected):
                raise WeightsError(f"the int8 calibration of {name} does not match the network "
                                   f"({len(given)} tensors, {len(expected)} expected): "
                                   "re-run `cellmask calibrate`")
            for key, tensor in given.items():
                if tensor.dtype != expected[key].dtype or tensor.shape != expected[key].shape:
                    raise WeightsError(f"int8 calibration tensor {name}.{key} has "
                                       f"{tensor.dtype} {tuple(tensor.shape)}")
                if not torch.isfinite(tensor).all():
                    raise WeightsError(f"int8 calibration tensor {name}.{key} is not finite")
            prepared.load_state_dict(given, strict=False)
            wrapped[name] = wrap(_convert(prepared))
    _install(runner, wrapped)
    return runner
