"""``FastloadHandler``: TorchServe's ``BaseHandler`` with an ``initialize`` that loads through fastload.

TorchServe starts each worker as its own process and calls ``initialize(context)`` once, before the
worker registers; it offers no hook that runs once per node before the workers. So every worker asks
the tiered store for the weights, and the store's single flight makes exactly one of them download
while the others wait and then map the same ``/dev/shm`` copy. Each worker pins its entry for its whole
life; the pin is a ``flock`` the kernel drops when TorchServe ends the worker (scaling down,
unregistering the model), so nothing has to run at unload for the entry to become evictable again.

Everything ``BaseHandler`` does after loading (``preprocess``, ``inference``, ``postprocess``,
``handle``) is inherited unchanged.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import list_classes_from_module, load_label_mapping

import fastload_core
from fastload_core import LoadReport, load_model, report_of
from fastload_core.errors import FastloadError
from fastload_core.serving import (
    WeightsUnavailableError,
    device_for_worker,
    hold_warmed,
    hold_weights,
    set_default_compile_cache,
    warm,
)
from fastload_core.storage import Pin, redact

from .config import HandlerConfig, HandlerConfigError

logger = logging.getLogger("fastload.torchserve")

# Of startupTimeout, the share the weights may take: the rest is for building, assigning and replying,
# so a fetch that cannot finish fails with fastload's message rather than TorchServe killing the worker.
FETCH_SHARE = 0.9

_R = TypeVar("_R")


class ArchiveError(FastloadError):
    """The model archive lacks what the handler needs (its ``model.py`` class, or the weights file)."""


class FastloadHandler(BaseHandler):
    """A TorchServe handler whose ``initialize`` builds the archive's model class without random init and
    gives it weights through fastload: from ``handler.fastload.uri`` via the tiers, or from the archive's
    ``serializedFile`` (safetensors, or a legacy pickle read with ``weights_only=True`` and converted once).

    Subclass it and override ``preprocess``/``postprocess`` as with ``BaseHandler``. Override
    ``example_inputs`` to compile (``pt2`` in model-config.yaml) during start-up instead of at the first
    request.
    """

    def __init__(self) -> None:
        super().__init__()
        self.model: nn.Module | None = None
        self.fastload_config: HandlerConfig | None = None
        self.load_report: LoadReport | None = None
        self._pin: Pin | None = None

    def initialize(self, context: Any) -> None:
        """Load the model onto this worker's device; on failure log one line naming the problem and what to
        do, then raise (TorchServe marks the worker failed and retries it)."""
        started = time.monotonic()
        self.context = context
        self.manifest = context.manifest
        self.model_yaml_config = getattr(context, "model_yaml_config", None) or {}
        properties = context.system_properties
        model_dir = properties.get("model_dir") or "."
        name = getattr(context, "model_name", None) or self.manifest.get("model", {}).get("modelName", "?")
        try:
            config = HandlerConfig.from_model_config(self.model_yaml_config)
            self.fastload_config = config
            self.device = worker_device(properties.get("gpu_id"))
            self.map_location = self.device.type
            model_class = model_class_from_archive(model_dir, self.manifest)
            source = self._weights(config, model_dir, deadline=started + FETCH_SHARE * config.startup_timeout)
            if config.compile_cache is not None:
                set_default_compile_cache(config.compile_cache)
            report = LoadReport(source=str(source), device=str(self.device))
            self.model = load_model(model_class, source, self.device, report=report)
            if config.compile is not None:
                self.model = self._compiled(self.model, config.compile, report)
        except FastloadError as exc:
            self.release()
            logger.error("fastload: model %r cannot start: %s", name, exc)
            raise
        self.load_report = report
        compiled = report_of(self.model)
        logger.info("fastload: model %r ready on %s in %.2fs (%s%s%s)", name, self.device,
                    time.monotonic() - started, report.strategy, f" from tier {report.tier}" if report.tier else "",
                    f", compile cache {compiled.status}" if compiled is not None else "")
        self.mapping = load_label_mapping(os.path.join(model_dir, "index_to_name.json"))
        self.initialized = True

    def example_inputs(self) -> Any:
        """Inputs to run once at start-up when ``pt2`` asks for a compile (a tensor, a tuple of arguments
        or a dict of keyword arguments), so the compile, or its restore from the cache, happens before
        the worker registers. None (the default) compiles at the first request instead."""
        return None

    def _compiled(self, model: nn.Module, options: dict[str, Any], report: LoadReport) -> nn.Module:
        """``model`` compiled through the compile cache, and run once on ``example_inputs`` if any.

        Only this runs under inference_mode, as BaseHandler.inference does: a warm-up under another grad
        mode would make dynamo compile again at the first request. The weights were loaded outside it, since
        inference tensors would refuse backward (Captum's explain_handle) and in-place updates under no_grad.
        """
        started = time.perf_counter()
        with torch.inference_mode():
            compiled = fastload_core.compile(model, example_inputs=self.example_inputs(), **options)
        spent = time.perf_counter() - started
        report.add_stage("compile", spent)  # as load_model records its own compile
        report.seconds += spent
        return compiled

    def release(self) -> None:
        """Drop the model and release this worker's pin on its weights (TorchServe ends the worker process
        instead, which releases it too)."""
        self.model = None
        self.initialized = False
        if self._pin is not None:
            self._pin.release()
            self._pin = None

    def _weights(self, config: HandlerConfig, model_dir: str, *, deadline: float) -> str | Path:
        serialized = self.manifest.get("model", {}).get("serializedFile")
        if config.uri is None:
            if not serialized:
                raise HandlerConfigError(
                    "handler.fastload.uri",
                    "the archive has no weights (no --serialized-file) and no URI is set; set "
                    "handler.fastload.uri to the weights, e.g. s3://bucket/model/, or archive them")
            path = Path(model_dir) / serialized
            if not path.is_file():
                raise ArchiveError(f"{path}: the archive's serializedFile is missing; rebuild the .mar")
            return path
        if serialized:
            logger.warning("fastload: weights come from %s; the archive's serializedFile %r is not read (build "
                           "the .mar without --serialized-file to keep it small)", redact(config.uri), serialized)
        uri, revision, tier = config.uri, config.revision, config.prefetch
        budget = deadline - time.monotonic()

        def fetch() -> Pin:
            if tier is None:
                return hold_weights(uri, revision=revision)
            # Promote into the tier once per node (a tier too small only warns), then hold exactly the copy
            # warmed, with no second request to the origin.
            return hold_warmed(warm(uri, tier=tier, revision=revision)[0], uri, revision=revision)

        try:
            self._pin = within(budget, fetch)
        except TimeoutError:
            raise WeightsUnavailableError(
                redact(uri),
                f"not fetched within {budget:.0f}s, {FETCH_SHARE:.0%} of startupTimeout "
                f"({config.startup_timeout:.0f}s); raise startupTimeout in model-config.yaml, or warm the node "
                "first with `fastload warm URI`") from None
        return self._pin.path


def worker_device(gpu_id: int | str | None, *, gpu_count: int | None = None) -> torch.device:
    """The device for TorchServe's ``gpu_id``: ``cuda:(gpu_id % n)`` over the ``n`` visible GPUs, else CPU.

    TorchServe hands out ``gpu_id`` from a round-robin counter that starts at 1 and wraps over the GPUs
    it was told about (``number_of_gpu``), which may be more than this worker sees; no ``gpu_id`` means a
    CPU worker.
    """
    if gpu_id is None:
        return torch.device("cpu")
    try:
        index = int(gpu_id)
    except (TypeError, ValueError):
        raise HandlerConfigError("gpu_id", f"TorchServe passed {gpu_id!r}, not a GPU index") from None
    if index < 0:
        raise HandlerConfigError("gpu_id", f"TorchServe passed {index}, not a GPU index")
    count = (torch.cuda.device_count() if torch.cuda.is_available() else 0) if gpu_count is None else gpu_count
    return device_for_worker(index, first=0, gpu_count=count)


def model_class_from_archive(model_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> type[nn.Module]:
    """The one class defined in the archive's ``modelFile``, found as ``BaseHandler`` finds it: the module
    is imported by name (TorchServe puts the extracted archive on ``sys.path``) and must define exactly
    one class. It is returned, not built: ``load_model`` builds it on the meta device."""
    model_file = manifest.get("model", {}).get("modelFile")
    if not model_file:
        raise ArchiveError("the archive has no model file; build it with torch-model-archiver --model-file "
                           "model.py (one nn.Module class whose constructor takes no arguments)")
    if not os.path.isfile(os.path.join(model_dir, model_file)):
        raise ArchiveError(f"{os.path.join(model_dir, model_file)}: the archive's model file is missing")
    module = importlib.import_module(model_file.split(".")[0])
    classes = list_classes_from_module(module)
    if len(classes) != 1:
        names = ", ".join(c.__name__ for c in classes) or "none"
        raise ArchiveError(f"{model_file} must define exactly one class, the model; it defines {names}. Move "
                           "helpers into another module (--extra-files)")
    if not issubclass(classes[0], nn.Module):
        raise ArchiveError(f"{model_file}: {classes[0].__name__} is not a torch.nn.Module")
    return classes[0]


def within(seconds: float, function: Callable[[], _R]) -> _R:
    """``function()`` if it finishes within ``seconds``, else ``TimeoutError``. It runs on a daemon thread
    that is left behind on timeout: the worker is about to fail and exit, which ends it."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="fastload-weights", daemon=True)
    thread.start()
    thread.join(max(seconds, 0.0))
    if thread.is_alive():
        raise TimeoutError(f"not done within {seconds:.1f}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
