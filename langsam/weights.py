"""The registry of default checkpoints, the cache, downloads and offline errors.

Nothing is downloaded at import. Each ``resolve_*`` function takes either a registry name or
a local path; a local path is used as it is, a name is looked up in the cache and downloaded
on first use (with a tqdm progress bar and a SHA-256 check where the registry knows one).

Cache: ``$LANGSAM_CACHE`` if set, else ``$XDG_CACHE_HOME/langsam`` (``~/.cache/langsam``).
SAM ``.pth`` files go to ``<cache>/sam``. Hugging Face models (Grounding DINO, CLIP) use the
Hugging Face cache (``HF_HOME``), or ``<cache>/huggingface`` when ``LANGSAM_CACHE`` is set.

Offline: with ``HF_HUB_OFFLINE=1`` (or ``LANGSAM_OFFLINE=1``), or when the network fails,
a file that is not cached raises :class:`WeightsUnavailableError` naming the file, its URL and
the argument to pass a local path instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MODELS",
    "ChecksumMismatchError",
    "GROUNDING_DINO_MODELS",
    "WeightsAccessError",
    "WeightsError",
    "WeightsUnavailableError",
    "cache_dir",
    "download_file",
    "is_offline",
    "resolve_grounding_dino",
    "resolve_sam_checkpoint",
    "sam_checkpoint_path",
    "sam_checkpoint_spec",
    "sha256_file",
]


class WeightsError(RuntimeError):
    """Base class for weight download / cache problems."""


class WeightsUnavailableError(WeightsError):
    """A checkpoint is not cached and cannot be downloaded (offline, or the network failed)."""


class WeightsAccessError(WeightsUnavailableError):
    """A gated checkpoint (SAM 3) that this account / token may not download yet."""


class ChecksumMismatchError(WeightsError):
    """A downloaded file does not have the expected SHA-256 (it was deleted)."""


# SAM checkpoints of both families (URL, SHA-256, size) live in the one model registry,
# sam.build.MODEL_SPECS. Their SHA-256 values agree with those pinned by several independent
# projects. The 6 hex
# digits in each file name are NOT a SHA-256 prefix (vit_b's SHA-256 starts ec2df6, its name
# says 01ec64), so torch.hub's check_hash=True would reject the files; we check the full digest.


def sam_checkpoint_spec(sam_type: str):
    """The registry spec (``sam.build.SamSpec`` or ``Sam2Spec``) of ``sam_type`` (aliases
    resolved); ValueError lists the valid names."""
    from sam.build import MODEL_SPECS, resolve_model_type

    name = resolve_model_type(sam_type)
    spec = MODEL_SPECS.get(name)
    hub = getattr(spec, "hf_repo", None) is not None  # verified against the hub's own SHA-256
    if spec is None or spec.url is None or (spec.sha256 is None and not hub):
        raise ValueError(f"no official checkpoint for sam_type {sam_type!r}; choose one of {', '.join(MODEL_SPECS)}")
    return spec


#: Short names accepted for ``detector=``; any other value is a hub id or a local folder.
GROUNDING_DINO_MODELS: dict[str, str] = {
    "grounding-dino-tiny": "IDEA-Research/grounding-dino-tiny",
    "grounding-dino-base": "IDEA-Research/grounding-dino-base",
}

#: open_clip model name -> default pretrained tag (and the hub repo open_clip fetches it from).
#: Loading and caching are open_clip's (see langsam.clip_scorer.ClipScorer).
CLIP_MODELS: dict[str, dict[str, str]] = {
    "ViT-B-32": {"pretrained": "laion2b_s34b_b79k", "hf_hub": "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"},
}

# Files a transformers Grounding DINO folder needs; *.bin is left out on purpose (pickle).
_HF_ALLOW_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
_TRUE = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------
# Cache and environment
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of langsam's own cache: ``$LANGSAM_CACHE`` or ``$XDG_CACHE_HOME/langsam``."""
    override = os.environ.get("LANGSAM_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "langsam"


def hf_cache_dir() -> Path | None:
    """Hugging Face cache to use: ``<LANGSAM_CACHE>/huggingface`` or None (HF's default)."""
    return cache_dir() / "huggingface" if os.environ.get("LANGSAM_CACHE") else None


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``LANGSAM_OFFLINE`` is set to a true value."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "LANGSAM_OFFLINE"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def download_file(url: str, destination: str | os.PathLike, sha256: str | None = None,
                  size: int | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``destination`` (tqdm progress), then check size and SHA-256.

    The data goes to a temporary file beside ``destination`` and is moved in place only when
    it checks out; a lock file keeps two processes from downloading the same file at once.
    ``file://`` URLs work (used by tests; no network is touched).

    Raises:
        ChecksumMismatchError: wrong size or SHA-256; the bad download is deleted.
        WeightsUnavailableError: the download itself failed (no network, HTTP error).
    """
    import torch.hub
    from filelock import FileLock

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(destination) + ".lock"):
        if destination.exists():  # another process finished it while we waited
            return destination
        partial = destination.with_name(destination.name + ".partial")
        logger.info("downloading %s to %s", url, destination)
        try:
            torch.hub.download_url_to_file(url, str(partial), hash_prefix=None, progress=progress)
        except Exception as error:
            partial.unlink(missing_ok=True)
            raise WeightsUnavailableError(f"could not download {destination.name} from {url}: {error}") from error
        try:
            actual_size = partial.stat().st_size
            if size is not None and actual_size != size:
                raise ChecksumMismatchError(
                    f"downloaded {destination.name} from {url} has {actual_size} bytes, expected {size}; "
                    "the incomplete file was deleted, try again"
                )
            if sha256 is not None:
                digest = sha256_file(partial)
                if digest != sha256.lower():
                    raise ChecksumMismatchError(
                        f"downloaded {destination.name} from {url} is corrupt: SHA-256 {digest}, expected "
                        f"{sha256}; the file was deleted, try again"
                    )
            os.replace(partial, destination)
        finally:
            partial.unlink(missing_ok=True)
    return destination


# --------------------------------------------------------------------------------------------
# Resolvers
# --------------------------------------------------------------------------------------------


def resolve_sam_checkpoint(sam_type: str, checkpoint: str | os.PathLike | None = None,
                           progress: bool = True) -> Path:
    """Local path of the SAM checkpoint to load.

    Args:
        sam_type: a registry name (``"vit_b"``, ``"sam2.1_hiera_small"``, ...; see
            ``sam.build.valid_model_types()``) or ``"auto"`` (family and size inferred from the
            checkpoint, so ``checkpoint`` is required).
        checkpoint: a local ``.pth``/``.safetensors`` path; None uses the official file for
            ``sam_type`` from the cache, downloading it on first use.

    Raises:
        ValueError: unknown ``sam_type``, missing local file, or ``"auto"`` without a file.
        WeightsUnavailableError: not cached and offline / no network (WeightsAccessError for
            SAM 3's gated file without access: the message says how to get it).
        ChecksumMismatchError: the download was corrupt (SAM 3: differs from the hub's SHA-256;
            WeightsError when the file cannot be checked against it).
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise ValueError(f"SAM checkpoint {str(path)!r} does not exist or is not a file")
        return path
    if sam_type == "auto":
        raise ValueError('sam_type="auto" infers the model size from a checkpoint: pass sam_checkpoint=<path>')
    spec = sam_checkpoint_spec(sam_type)
    if getattr(spec, "hf_repo", None) is not None:
        return _resolve_hub_checkpoint(spec)  # SAM 3: gated, on the Hugging Face hub
    path = cache_dir() / "sam" / spec.filename
    if path.is_file():
        # Checked in full after download; here only the (free) size check, hashing 2.5 GB
        # on every start would cost seconds.
        if path.stat().st_size == spec.size_bytes:
            return path
        logger.warning("cached %s has the wrong size (%d bytes, expected %d); fetching it again",
                       path, path.stat().st_size, spec.size_bytes)
        path.unlink()
    if is_offline():
        raise WeightsUnavailableError(
            f"SAM checkpoint {spec.filename} is not in the cache ({path}) and downloads are off "
            f"(HF_HUB_OFFLINE/LANGSAM_OFFLINE). Download {spec.url} yourself and pass "
            "sam_checkpoint=<path> (CLI: --sam-checkpoint PATH), or put it at that cache path."
        )
    try:
        return download_file(spec.url, path, sha256=spec.sha256, size=spec.size_bytes, progress=progress)
    except WeightsUnavailableError as error:
        raise WeightsUnavailableError(
            f"{error}. Without network, download {spec.url} elsewhere and pass sam_checkpoint=<path> "
            "(CLI: --sam-checkpoint PATH)."
        ) from error


# How a SAM 3 file is given directly (the hub registry rows are SAM 3's).
_LOCAL_FILE = "LangSAM(model='sam3', sam3_checkpoint=PATH) (CLI: --sam3-checkpoint PATH) or sam.sam3.load_sam3(PATH)"


def _hub_help(spec) -> str:
    page = f"https://huggingface.co/{spec.hf_repo}"
    return (
        f"{spec.hf_repo} is gated: request access on {page} (log in, accept the license; approval can take "
        "a while), then log in here with `hf auth login` or set HF_TOKEN to a token with read access. "
        f"Or download {spec.hf_filename} elsewhere and pass it: {_LOCAL_FILE}."
    )


def _resolve_hub_checkpoint(spec) -> Path:
    """A registry file kept on the Hugging Face hub (SAM 3's `sam3.pt`, gated): downloaded into the
    Hugging Face cache, then checked against the SHA-256 pinned in the registry or, where none is
    pinned, the one the hub records for the file (its LFS object id). A file that cannot be
    verified is refused. A verified file is noted in ``<cache>/sam/<name>.verified`` (digest, size,
    mtime), so later starts, offline ones included, skip the hashing."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    offline = is_offline()
    try:
        path = Path(huggingface_hub.hf_hub_download(spec.hf_repo, spec.hf_filename, cache_dir=hf_cache_dir(),
                                                    local_files_only=offline))
    except GatedRepoError as error:
        raise WeightsAccessError(f"cannot download {spec.hf_filename} ({error.__class__.__name__}). " + _hub_help(spec)) from error
    except Exception as error:  # LocalEntryNotFoundError offline; connection / HTTP errors online
        reason = "downloads are off (HF_HUB_OFFLINE/LANGSAM_OFFLINE)" if offline else f"the download failed ({error})"
        raise WeightsUnavailableError(
            f"SAM checkpoint {spec.hf_filename} of {spec.hf_repo} is not in the Hugging Face cache and {reason}. "
            + _hub_help(spec)
        ) from error
    marker = cache_dir() / "sam" / f"{spec.name}.verified"
    stat = path.stat()
    noted = f"{stat.st_size} {stat.st_mtime_ns} {path.resolve()}"
    if marker.is_file() and marker.read_text().split("\n", 1)[-1] == noted:
        return path
    expected = spec.sha256
    if expected is None:
        if offline:
            raise WeightsError(
                f"{path} has not been verified yet and downloads are off, so the SHA-256 the hub records for "
                f"it cannot be read; go online once, or if you trust the file pass it: {_LOCAL_FILE}."
            )
        metadata = huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(spec.hf_repo, spec.hf_filename))
        expected = (metadata.etag or "").strip('"').lower()
        if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
            raise WeightsError(f"the hub gives no SHA-256 for {spec.hf_repo}/{spec.hf_filename} (etag {metadata.etag!r}); "
                               f"refusing the unverified file {path}. For a file you trust, pass it: {_LOCAL_FILE}.")
    digest = sha256_file(path)
    if digest != expected.lower():
        raise ChecksumMismatchError(
            f"{path} has SHA-256 {digest}, but {spec.hf_repo}/{spec.hf_filename} should have {expected}: the file is "
            f"corrupt or not the published one; delete it (and its blob in the Hugging Face cache) and try again"
        )
    from sam.files import atomic_write_text

    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, f"{digest}\n{noted}")
    return path


def resolve_grounding_dino(model: str | os.PathLike) -> str:
    """Local folder of a Grounding DINO model (``config.json`` + safetensors + processor files).

    Args:
        model: a local ``save_pretrained`` folder, a short name from
            :data:`GROUNDING_DINO_MODELS` or a Hugging Face hub id such as
            ``"IDEA-Research/grounding-dino-base"``.

    Raises:
        ValueError: ``model`` looks like a path but the folder does not exist.
        WeightsUnavailableError: a hub model is not cached and offline / no network.
    """
    text = os.fspath(model)
    local = Path(text).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(f"Grounding DINO folder {text!r} has no config.json (expected a save_pretrained folder)")
        return str(local)
    if text in GROUNDING_DINO_MODELS:
        repo_id = GROUNDING_DINO_MODELS[text]
    elif text.count("/") == 1 and not text.startswith((".", "/", "~")):
        repo_id = text
    else:
        raise ValueError(
            f"Grounding DINO model {text!r} is neither an existing folder nor a hub id like "
            f"'IDEA-Research/grounding-dino-tiny' (short names: {', '.join(GROUNDING_DINO_MODELS)})"
        )
    from huggingface_hub import snapshot_download

    url = f"https://huggingface.co/{repo_id}"
    offline = is_offline()
    try:
        return snapshot_download(repo_id, cache_dir=hf_cache_dir(), allow_patterns=_HF_ALLOW_PATTERNS,
                                 local_files_only=offline)
    except Exception as error:  # LocalEntryNotFoundError offline; connection / HTTP errors online
        reason = "downloads are off (HF_HUB_OFFLINE/LANGSAM_OFFLINE)" if offline else f"the download failed ({error})"
        raise WeightsUnavailableError(
            f"Grounding DINO model {repo_id} is not in the Hugging Face cache and {reason}. Fetch {url} "
            "elsewhere (e.g. `huggingface-cli download " + repo_id + " --local-dir DIR`) and pass "
            "detector=DIR (CLI: --detector DIR)."
        ) from error


def sam_checkpoint_path(sam_type: str = "vit_b", checkpoint: str | os.PathLike | None = None) -> Path:
    """Alias of :func:`resolve_sam_checkpoint` (the name the CLI uses)."""
    return resolve_sam_checkpoint(sam_type, checkpoint)
