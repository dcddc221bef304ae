"""The method registry: every credit signal declares itself here once.

A method is a pure recipe. It says which model passes it needs (`Needs`), names its parameters
(a dataclass with defaults), says how its weights enter the loss (denominator, selection scope)
and which extra per-token columns it exports, and turns the arrays of those passes into
per-token weights (`compute`). It never runs a model and never touches files: the pipelines
(`vlmcredit weights`) and `vlmcredit.online` run the passes it asks for and write or return
what it computes. So adding a method is one module in `methods/` that calls `register`, and it
then appears in `vlmcredit weights --method`, `online.weights(method=...)`, the signals contract
and the report without touching any other module.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmcredit.errors import VlmCreditError

LOSS_DENOMINATORS = ("all_tokens", "selected_tokens")
SELECTION_SCOPES = ("per_response", "per_batch")
COLUMN_DTYPES = ("float32", "int32", "int64", "bool")
# Optional per-token columns of the signals contract every method may fill (docs/FORMATS.md).
CORE_COLUMNS = {"cluster_id": "int32", "paragraph_id": "int32"}


PASS_NAMES = ("attention", "qk", "qk_states", "logprobs", "images", "text")
LOGPROB_VARIANTS = ("image", "no_image", "perturbed")


@dataclass(frozen=True)
class Needs:
    """The model passes a method reads. Pipelines run each needed pass once per batch, shared by
    every method chosen in the same run (one capture forward serves attention and Q/K)."""

    # response x image attention rows (L, H, T, N), averaged as the run's head choice says
    attention: bool = False
    # post-RoPE queries of response tokens and keys of image tokens, for these layers (-1 = last)
    qk_layers: tuple[int, ...] = ()
    # (kind, layer) pairs of Q/K states recomputed from that layer's input in a forward (KAWHI's
    # Table 3 alignment ablations; kinds in probes.qk_states: "key-key", "pre-rope", ...)
    qk_states: tuple[tuple[str, int], ...] = ()
    # teacher-forced log p of the taken token and next-token entropy per response token, for
    # these input variants ("image", "no_image" = re-templated without the image, "perturbed")
    logprobs: tuple[str, ...] = ()
    # the sample's images (PIL) and each image token's cell/box, for region methods (SGUF)
    images: bool = False
    # the response text and each token's character span in it, for paragraph/sentence methods
    text: bool = False

    def names(self) -> list[str]:
        """The passes that run the model or read inputs beyond the token ids."""
        out = []
        if self.attention:
            out.append("attention")
        if self.qk_layers:
            out.append("qk")
        if self.qk_states:
            out.append("qk_states")
        if self.logprobs:
            out.append("logprobs")
        if self.images:
            out.append("images")
        if self.text:
            out.append("text")
        return out

    def union(self, other: Needs) -> Needs:
        return Needs(
            attention=self.attention or other.attention,
            qk_layers=tuple(sorted(set(self.qk_layers) | set(other.qk_layers))),
            qk_states=tuple(sorted(set(self.qk_states) | set(other.qk_states))),
            logprobs=tuple(v for v in LOGPROB_VARIANTS if v in (*self.logprobs, *other.logprobs)),
            images=self.images or other.images,
            text=self.text or other.text,
        )


@dataclass
class SamplePasses:
    """What the passes measured for one response (arrays only; positions are response-relative).

    attention: (L, H, T, N) float32 response x image attention (H = 1 when heads were averaged),
    with `pairs` the (layer, head) index pairs into it to average (None = all).
    """

    sample_id: str
    token_ids: np.ndarray  # (T,) int64
    attention: np.ndarray | None = None
    pairs: list[tuple[int, int]] | None = None
    queries: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (H, T, D)
    keys: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (H, N, D)
    # Needs.qk_states: (kind, absolute layer) -> ((H, T, D) response states, (H, N, D) image keys)
    qk_states: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    image_boxes: np.ndarray | None = None  # (N, 4) pixel boxes of the image tokens
    image_cells: np.ndarray | None = None  # (N, 3) (t, row, col) merged-grid cell per token
    image_owner: np.ndarray | None = None  # (N,) image index per image token
    images: list[Any] = field(default_factory=list)  # PIL images (Needs.images)
    cell_pixels: int = 0  # side of one merged image token in resized-image pixels
    logprobs: dict[str, np.ndarray] = field(default_factory=dict)  # variant -> (T,) float32
    entropy: dict[str, np.ndarray] = field(default_factory=dict)  # variant -> (T,) float32
    response_text: str | None = None  # Needs.text
    token_spans: np.ndarray | None = None  # (T, 2) character [start, end) per token
    meta: dict[str, Any] = field(default_factory=dict)  # the rollout row's extra fields
    # the run's head choice (--heads, --heads-json, online `heads=`) as absolute (layer, head)
    # pairs, for methods that read Q/K of chosen heads (KAWHI); None = no choice (all heads)
    head_choice: list[tuple[int, int]] | None = None
    # absolute decoder layer of each entry of attention's L axis, and the model's layer count,
    # for methods that read one given layer (SAYO: the last); None = not known
    attention_layers: list[int] | None = None
    num_layers: int | None = None


@dataclass
class MethodOutput:
    """One response's signals: `weight` is what the loss multiplies into the advantage."""

    weight: np.ndarray  # (T,) float32, finite, >= 0
    mask: np.ndarray | None = None  # (T,) bool: tokens the method selected
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # declared extra columns
    sample_weight: float | None = None  # per-response multiplier (e.g. VPPO's alpha)
    detail: Any = None  # the method's own result object, for its command's richer tables


ComputeFn = Callable[[Sequence[SamplePasses], Any], list[MethodOutput]]


@dataclass(frozen=True)
class Method:
    """A registered credit method."""

    name: str
    summary: str  # one line: what the signal is
    paper: str  # where it comes from
    config: type  # dataclass of parameters with defaults
    needs: Callable[[Any], Needs]  # config -> passes (a method may need more for some configs)
    compute: ComputeFn  # a batch of responses -> one output each (batch-scoped methods use all)
    # A value, or config -> value when a parameter changes it (anchors: ratio_scope picks the
    # scope, other_weight the denominator). Read them through denominator_for / scope_for.
    loss_denominator: str | Callable[[Any], str] = "all_tokens"
    selection_scope: str | Callable[[Any], str] = "per_response"
    columns: Mapping[str, str] = field(default_factory=dict)  # extra per-token column -> dtype

    def denominator_for(self, cfg: Any) -> str:
        """The loss denominator of signals computed with `cfg`."""
        value = self.loss_denominator
        return self._checked(value(cfg) if callable(value) else value, "loss_denominator")

    def scope_for(self, cfg: Any) -> str:
        """The selection scope of signals computed with `cfg`."""
        value = self.selection_scope
        return self._checked(value(cfg) if callable(value) else value, "selection_scope")

    def _checked(self, value: str, what: str) -> str:
        allowed = LOSS_DENOMINATORS if what == "loss_denominator" else SELECTION_SCOPES
        if value not in allowed:
            raise VlmCreditError(
                f"method {self.name}: {what} {value!r} is not one of {', '.join(allowed)}"
            )
        return value

    def check(self) -> None:
        """Raise when the declaration is incomplete (called by `register`)."""
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise VlmCreditError(f"method name {self.name!r}: use letters, digits, - and _")
        if not dataclasses.is_dataclass(self.config):
            raise VlmCreditError(f"method {self.name}: config must be a dataclass type")
        # config-dependent declarations are checked on the default config
        self.denominator_for(self.config())
        self.scope_for(self.config())
        for column, dtype in self.columns.items():
            if column in CORE_COLUMNS or column in ("token_ids", "weight", "mask"):
                raise VlmCreditError(f"method {self.name}: {column!r} is a contract column")
            if dtype not in COLUMN_DTYPES:
                raise VlmCreditError(
                    f"method {self.name}: column {column!r} dtype {dtype!r} is not one of "
                    f"{', '.join(COLUMN_DTYPES)}"
                )
        if not callable(self.compute) or not callable(self.needs):
            raise VlmCreditError(f"method {self.name}: compute and needs must be callables")

    def make_config(self, params: Mapping[str, Any] | None = None) -> Any:
        """The method's config with `params` (flat or dotted keys) applied and checked."""
        cfg = self.config()
        for key, value in (params or {}).items():
            _set_param(cfg, key, value, self.name)
        if hasattr(cfg, "check"):
            cfg.check()
        return cfg

    def run(self, passes: Sequence[SamplePasses], cfg: Any) -> list[MethodOutput]:
        """`compute`, with the outputs checked against the contract (lengths, finiteness)."""
        outputs = self.compute(passes, cfg)
        if len(outputs) != len(passes):
            raise VlmCreditError(
                f"method {self.name}: returned {len(outputs)} outputs for {len(passes)} responses"
            )
        for sample, out in zip(passes, outputs, strict=True):
            n = len(sample.token_ids)
            weight = np.asarray(out.weight, dtype=np.float32)
            if weight.shape != (n,) or not np.all(np.isfinite(weight)) or np.any(weight < 0):
                raise VlmCreditError(
                    f"method {self.name}: sample {sample.sample_id}: weights must be {n} finite "
                    "values >= 0"
                )
            out.weight = weight
            undeclared = sorted(set(out.columns) - set(self.columns) - set(CORE_COLUMNS))
            if undeclared:
                raise VlmCreditError(
                    f"method {self.name}: column(s) {', '.join(undeclared)} not declared"
                )
        return outputs


REGISTRY: dict[str, Method] = {}
_BUILTINS_LOADED = False


def register(method: Method) -> Method:
    """Add `method` to the registry (its declaration is checked; a name is taken once)."""
    method.check()
    existing = REGISTRY.get(method.name)
    if existing is not None and existing is not method:
        raise VlmCreditError(f"method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def _load_builtins() -> None:
    """Import every module of this package once, so their `register` calls run."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    package = importlib.import_module("vlmcredit.methods")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "registry":
            importlib.import_module(f"vlmcredit.methods.{info.name}")


def available() -> list[str]:
    _load_builtins()
    return sorted(REGISTRY)


def get(name: str) -> Method:
    """The method called `name`, or a one-line error listing the registered ones."""
    _load_builtins()
    if name not in REGISTRY:
        raise VlmCreditError(f"method {name!r}: unknown; choose one of {', '.join(available())}")
    return REGISTRY[name]


def parse_methods(spec: str) -> list[Method]:
    """`"anchors,kawhi"` -> methods, in order, without repeats."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise VlmCreditError(f"--method {spec!r}: name at least one of {', '.join(available())}")
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return [get(n) for n in seen]


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """`["ratio=0.2", "cluster.seed=3"]` -> {"ratio": 0.2, "cluster.seed": 3} (JSON values,
    else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise VlmCreditError(f"--param {item!r}: write NAME=VALUE, e.g. ratio=0.2")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config as the plain dict manifests record."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)


def _set_param(cfg: Any, key: str, value: Any, method: str) -> None:
    target = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or not hasattr(target, part):
            raise VlmCreditError(f"--param {key}: method {method} has no parameter group {part!r}")
        target = getattr(target, part)
    name = parts[-1]
    fields = (
        {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
    )
    if name not in fields:
        raise VlmCreditError(
            f"--param {key}: method {method} has no parameter {name!r}; it has "
            f"{', '.join(sorted(fields))}"
        )
    current = getattr(target, name)
    if isinstance(current, bool) and not isinstance(value, bool):
        raise VlmCreditError(f"--param {key}={value!r}: expects true or false")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise VlmCreditError(f"--param {key}={value!r}: expects a number")
        if isinstance(current, int) and not float(value).is_integer():
            raise VlmCreditError(f"--param {key}={value!r}: expects a whole number")
        value = float(value) if isinstance(current, float) else int(value)
    setattr(target, name, value)
