"""Progress, interrupts and step previews: what a long-running node reports to the user and hears back.

Inside ComfyUI progress is ``comfy.utils.ProgressBar`` (the browser's bar and preview image), interrupts
are ComfyUI's (``comfy.model_management``) and the preview method is ComfyUI's ``--preview-method`` as
the current prompt set it (``comfy.cli_args``). Outside ComfyUI progress is logged
(:class:`LogProgress`), interrupts come from :func:`request_interrupt` (a flag tests set), and previews
are on.
"""

from __future__ import annotations

import logging

from .modules import _comfy

log = logging.getLogger("StepVideo")

PREVIEW_MAX_SIZE = 512


# --------------------------------------------------------------------------- progress


class LogProgress:
    """Progress stand-in used outside ComfyUI: same methods as ``comfy.utils.ProgressBar``.

    Logs at most about ten lines per run, so long loops stay readable in a terminal.
    """

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        self.current = 0
        self._last_logged = -1

    def update_absolute(self, value, total=None, preview=None):
        """Set progress to `value` (of `total` if given); `preview` is ignored here."""
        if total is not None:
            self.total = max(int(total), 1)
        self.current = min(int(value), self.total)
        tenth = self.current * 10 // self.total
        if tenth != self._last_logged:
            self._last_logged = tenth
            log.info("StepVideo progress %d/%d", self.current, self.total)

    def update(self, value=1):
        """Advance progress by `value` steps."""
        self.update_absolute(self.current + value)


def progress_bar(total: int):
    """Return a progress object with ``update(n)`` and ``update_absolute(value, total, preview)``.

    Inside ComfyUI it is ``comfy.utils.ProgressBar`` (browser progress, previews and, on
    every update, an interrupt check); elsewhere a :class:`LogProgress`.
    """
    utils = _comfy("comfy.utils")
    if utils is not None:
        return utils.ProgressBar(total)
    return LogProgress(total)


# --------------------------------------------------------------------------- interrupts


class StepVideoInterrupted(Exception):
    """Raised by :func:`check_interrupt` outside ComfyUI after :func:`request_interrupt`."""


_interrupt_flag = False


def request_interrupt(value: bool = True) -> None:
    """Set (or with False, clear) the stand-in interrupt flag used outside ComfyUI."""
    global _interrupt_flag
    _interrupt_flag = bool(value)


def interrupt_requested() -> bool:
    """Return True if the user asked to stop; polls only (core's ``should_stop`` callback)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return bool(mm.processing_interrupted())
    return _interrupt_flag


def check_interrupt() -> None:
    """Raise if the user asked to stop: ComfyUI's own exception inside ComfyUI, else
    :class:`StepVideoInterrupted` (the flag is cleared when it fires)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
        return
    if _interrupt_flag:
        request_interrupt(False)
        raise StepVideoInterrupted("StepVideo: interrupted")


def is_interrupt(exc: BaseException) -> bool:
    """True when ``exc`` is the host's interrupt: ComfyUI's ``InterruptProcessingException`` (which its
    progress bar raises, clearing the flag, on an update after an interrupt) or :class:`StepVideoInterrupted`."""
    mm = _comfy("comfy.model_management")
    kind = getattr(mm, "InterruptProcessingException", None) if mm is not None else None
    return isinstance(exc, StepVideoInterrupted) or (isinstance(kind, type) and isinstance(exc, kind))


# --------------------------------------------------------------------------- previews


def preview_method() -> str:
    """Return the latent preview method samplers are asked for now: "none", "auto", "latent2rgb" or "taesd".

    Inside ComfyUI that is ``comfy.cli_args.args.preview_method``, read on every call: ComfyUI sets it
    at the start of each prompt (``--preview-method``, overridden by the frontend's preview setting
    that the prompt carries). Outside ComfyUI, or on a ComfyUI without the setting, "auto".
    """
    cli = _comfy("comfy.cli_args")
    method = getattr(getattr(cli, "args", None), "preview_method", None)
    if method is None:
        return "auto"
    return str(getattr(method, "value", method))  # a LatentPreviewMethod enum member inside ComfyUI


def previews_enabled() -> bool:
    """Return False when ComfyUI's preview method is "none" (then nothing should be computed for previews).

    Every other method gets the pack's latent->RGB previews: "auto" and "latent2rgb" ask for exactly
    that, and "taesd" has no Step-Video decoder to use, so it falls back as ComfyUI's samplers do.
    """
    return preview_method() != "none"


def preview_max_size() -> int:
    """Return the largest side a preview image may have: ComfyUI's ``--preview-size`` (default 512), or
    :data:`PREVIEW_MAX_SIZE` outside ComfyUI (or for a value that is not a positive whole number)."""
    cli = _comfy("comfy.cli_args")
    size = getattr(getattr(cli, "args", None), "preview_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else PREVIEW_MAX_SIZE


def preview_image(rgb):
    """Return a preview for ``ProgressBar.update_absolute(value, total, preview)``, or None for no image.

    `rgb` is a uint8 tensor [h, w, 3], or None when there is nothing to show (previews off, no
    preview factors): then None, and the progress bar moves without an image. ComfyUI takes
    ``("JPEG", PIL.Image, max_size)`` (``max_size``: :func:`preview_max_size`); the image is enlarged
    (nearest) to about 256 px so a 34x62 latent preview is visible. Returns None also when Pillow is
    missing (previews are optional).
    """
    if rgb is None:
        return None
    try:
        from PIL import Image
    except ImportError:
        return None
    image = Image.fromarray(rgb.cpu().numpy())
    scale = max(1, 256 // max(image.size))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return ("JPEG", image, preview_max_size())
