"""The demo's models: one :class:`LazyPipeline` per app builds the ``LangSAM`` pipeline on the
first request, exactly once, and lets the page switch the SAM model among the registry's types."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from langsam.cli.options import MODEL_ENVIRONMENT

logger = logging.getLogger(__name__)

#: The settings ``build_app`` accepts as a dict: the ``LangSAM`` keywords the model options set.
PIPELINE_KEYS = tuple(MODEL_ENVIRONMENT)
#: SAM choice meaning "the checkpoint the demo was started with".
LAUNCH_CHECKPOINT = "checkpoint"

PipelineSource = Any  # a LangSAM, a zero-argument factory returning one, or LangSAM settings


class ModelLoadError(RuntimeError):
    """The models could not be built (missing weights while offline, a bad checkpoint...)."""


def new_pipeline(settings: Mapping[str, Any]) -> Any:
    """``LangSAM(**settings)``; nothing loads until the pipeline is first used."""
    from langsam.pipeline import LangSAM

    return LangSAM(**settings)


@functools.cache
def default_sam_type() -> str:
    """``LangSAM``'s own default ``sam_type``."""
    from langsam.pipeline import LangSAM

    return inspect.signature(LangSAM).parameters["sam_type"].default


def official_sam_types() -> list[str]:
    """The registry's model types that have official weights (no aliases, no ``auto``)."""
    from sam.build import resolve_model_type, valid_model_types

    return [name for name in valid_model_types() if name != "auto" and resolve_model_type(name) == name]


class LazyPipeline:
    """Builds the LangSAM pipeline on first use, exactly once, whatever thread asks first.

    ``source`` is a LangSAM (used as is), a zero-argument factory returning one, or a dict of
    LangSAM settings (keys in :data:`PIPELINE_KEYS`; None values are dropped). Only with
    settings can the SAM model be switched (:meth:`choose_sam`): the pipeline is then rebuilt
    on the next request, with the official weights of the chosen type.
    """

    def __init__(self, source: PipelineSource):
        self._lock = threading.Lock()
        self._pipeline: Any = None
        self._factory: Callable[[], Any] | None = None
        self._launch_settings: dict[str, Any] | None = None
        self._settings: dict[str, Any] | None = None
        if source is None:
            source = {}
        if isinstance(source, Mapping):
            unknown = sorted(set(source) - set(PIPELINE_KEYS))
            if unknown:
                raise ValueError(f"unknown model settings {unknown}; valid ones are {list(PIPELINE_KEYS)}")
            self._launch_settings = {key: value for key, value in source.items() if value is not None}
            self._settings = dict(self._launch_settings)
        elif callable(source) and not hasattr(source, "segment"):
            self._factory = source
        elif hasattr(source, "segment"):
            self._pipeline = source
            self._factory = lambda: source
        else:
            raise TypeError(
                "build_app expects a LangSAM instance, a function that returns one, or a dict "
                f"of LangSAM settings; got {type(source).__name__}"
            )

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    @property
    def concept_model(self) -> str:
        """The concept model the app starts with (the text tab's choice): the settings' ``model``,
        a given pipeline's, else Grounding DINO. Loads nothing."""
        if self._settings is not None and self._settings.get("model"):
            return self._settings["model"]
        return getattr(self._pipeline, "model", None) or "grounding-dino"

    def get(self) -> Any:
        """The pipeline, built now if this is the first request (or the SAM model changed)."""
        pipeline = self._pipeline
        if pipeline is not None:
            return pipeline
        with self._lock:
            if self._pipeline is None:
                logger.info("loading models")
                try:
                    self._pipeline = new_pipeline(self._settings) if self._factory is None else self._factory()
                except Exception as error:
                    logger.exception("could not load the models")
                    raise ModelLoadError(f"Could not load the models: {error}") from error
            return self._pipeline

    # ----- choosing the SAM model ----------------------------------------------------------

    @property
    def can_choose_sam(self) -> bool:
        """Whether the app was given settings (not a ready pipeline), so SAM can be switched."""
        return self._launch_settings is not None

    def sam_choices(self) -> list[tuple[str, str]]:
        """``(label, value)`` of every SAM the app can use: the checkpoint it was started with (if
        any, value :data:`LAUNCH_CHECKPOINT`), then each official type of the registry."""
        choices = []
        checkpoint = (self._launch_settings or {}).get("sam_checkpoint")
        if checkpoint is not None:
            sam_type = self._launch_settings.get("sam_type", default_sam_type())
            choices.append((f"{Path(checkpoint).name} ({sam_type})", LAUNCH_CHECKPOINT))
        return choices + [(name, name) for name in official_sam_types()]

    @property
    def sam_choice(self) -> str | None:
        """The current value among :meth:`sam_choices` (None for a pipeline given ready-made)."""
        if self._launch_settings is None:
            return None
        if self._settings.get("sam_checkpoint") is not None:
            return LAUNCH_CHECKPOINT
        return self._settings.get("sam_type", default_sam_type())

    def choose_sam(self, choice: str) -> bool:
        """Use SAM ``choice`` (a value of :meth:`sam_choices`) from the next request on, for every
        visitor; returns whether that changes the model. Raises ValueError for an unknown choice,
        or when the app was given a ready pipeline."""
        if not self.can_choose_sam:
            raise ValueError("this demo was given its models in code; start it with settings to switch SAM")
        values = [value for _, value in self.sam_choices()]
        if choice not in values:
            raise ValueError(f"unknown SAM model {choice!r}; choose one of {', '.join(values)}")
        if choice == LAUNCH_CHECKPOINT:
            settings = dict(self._launch_settings)
        else:
            settings = {key: value for key, value in self._launch_settings.items() if key != "sam_checkpoint"}
            settings["sam_type"] = choice
        with self._lock:
            if settings == self._settings:
                return False
            logger.info("SAM model changed to %s", choice)
            self._settings = settings
            self._pipeline = None  # built on the next request; running jobs keep the one they hold
        return True
