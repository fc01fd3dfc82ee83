"""What ``inferno pull SOURCE`` names, turned into one URL to download.

SOURCE is one of:

* ``https://host/path/model.gguf`` (or ``http://``, or ``.onnx``, or a ``.tar``/``.tar.gz``/
  ``.zip`` of an ONNX model directory, see ``unpack``): that URL;
* ``hf://org/repo/path/file.gguf``: that file of a Hugging Face repository;
* ``org/repo:QUANT`` (``hf.co/`` or ``huggingface.co/`` in front is allowed): the repository's
  ``.gguf`` file of that quantisation, picked as llama-server's ``-hf`` does: the repository's
  files are listed, the quantisation is matched case-insensitively as a word of the ``.gguf``
  names (``mmproj`` projectors left out), and a single-file model wins over a split one;
  without ``:QUANT``, ``Q4_K_M`` if there is one, else the first ``.gguf`` file.

Hugging Face requests go through ``huggingface_hub`` (imported only here, only when needed),
so ``HF_ENDPOINT``, ``HF_TOKEN`` (or a stored ``hf auth login`` token) and
``HF_HUB_OFFLINE`` act as they do for every other Hugging Face tool; the listing's LFS
metadata gives the file's sha256 and size, which the download is then held to.

``parse`` is pure; ``resolve`` makes network requests and runs in a worker thread.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from infernod.daemon.unpack import archive_of
from infernod.protocol.errors import InfernoError

KINDS = (".gguf", ".onnx")
DEFAULT_QUANT = "Q4_K_M"
_REPO_RE = re.compile(r"^(?:(?:hf\.co|huggingface\.co)/)?([A-Za-z0-9][\w.-]*/[\w.-]+)"
                      r"(?::([\w.-]+))?$")
_QUANT_NAME_RE = re.compile(r"[-._]((?:I?Q\d[A-Z0-9_]*)|B?F16|F32)(?:-\d{5}-of-\d{5})?\.gguf$",
                            re.I)
_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.I)
_FORMS = ("an https:// URL of a .gguf/.onnx file, hf://org/repo/file.gguf, or org/repo:QUANT "
          "(e.g. ggml-org/gemma-3-270m-GGUF:Q8_0)")


@dataclass(frozen=True)
class Spec:
    """SOURCE as parsed, before any network request."""

    source: str
    url: str | None = None  # a plain URL
    repo: str | None = None  # a Hugging Face repository ...
    filename: str | None = None  # ... and a file in it (hf://)
    quant: str | None = None  # ... or a quantisation to pick (org/repo:QUANT)


@dataclass(frozen=True)
class Target:
    """One file to download: where from, what it is and what it must hash to."""

    source: str
    url: str
    label: str  # the file's own name, for messages and the default model name
    kind: str  # gguf | onnx
    sha256: str | None = None
    size: int | None = None
    headers: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    hub: bool = False

    @property
    def archive(self) -> str | None:
        """``tar`` or ``zip`` for an archive of an ONNX model directory."""
        return archive_of(self.label)

    @property
    def key(self) -> str:
        """Names the partial download: the same URL finds its partial file again."""
        return hashlib.sha256(self.url.encode()).hexdigest()[:32]


def shown(url: str) -> str:
    """A URL as logs, replies and events show it: without credentials or query string (a
    presigned URL's signature is a secret; monitors see ``models.pulls`` and events)."""
    if not url.startswith(("http://", "https://")):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" + ("?..." if parts.query else "")


def _kind_of(name: str, source: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    if archive_of(name):
        return "onnx"  # an ONNX model directory, packed
    if suffix not in KINDS:
        raise InfernoError("bad_request", f"{shown(source)}: {name!r} is not a .gguf or .onnx "
                           "file (or a .tar, .tar.gz, .zip of an ONNX model directory)",
                           "pull a single .gguf or .onnx file (an ONNX model with external "
                           "data or a tokenizer is a directory: copy it onto the host)")
    return suffix[1:]


def parse(source: str) -> Spec:
    source = source.strip()
    if source.startswith(("http://", "https://")):
        parts = urlsplit(source)
        if not parts.hostname:
            raise InfernoError("bad_request", f"{source!r} has no host", _FORMS)
        _kind_of(unquote(parts.path), source)
        return Spec(source, url=source)
    if source.startswith("hf://"):
        parts_ = [p for p in source[5:].split("/") if p]
        if len(parts_) < 3 or ".." in parts_:
            raise InfernoError("bad_request", f"{source!r} is not hf://org/repo/file", _FORMS)
        filename = "/".join(parts_[2:])
        _kind_of(filename, source)
        return Spec(source, repo="/".join(parts_[:2]), filename=filename)
    m = _REPO_RE.match(source)
    if m is None:
        raise InfernoError("bad_request", f"cannot tell what {source!r} is", _FORMS)
    return Spec(source, repo=m.group(1), quant=m.group(2))


def _quant_re(quant: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.I)


def pick_file(files: list[str], quant: str | None, repo: str) -> str:
    """The ``.gguf`` file of ``repo`` for ``quant``, as llama-server's ``-hf`` picks it."""
    ggufs = sorted((f for f in files if f.lower().endswith(".gguf")
                    and "mmproj" not in PurePosixPath(f).name.lower()),
                   key=lambda f: (f.count("/"), f))
    if not ggufs:
        raise InfernoError("source_not_found", f"{repo} has no .gguf file",
                           "pick a repository with GGUF files (their names usually end in "
                           "-GGUF), or pull a file by URL")
    wanted = [quant] if quant else [DEFAULT_QUANT]
    for q in wanted:
        hits = [f for f in ggufs if _quant_re(q).search(PurePosixPath(f).name)]
        single = [f for f in hits if not _SPLIT_RE.search(f)]
        if single:
            return single[0]
        if hits:
            raise InfernoError("not_supported", f"{repo}: the {q} model is split into "
                               f"{len(hits)} files ({hits[0]}, ...); split GGUF models cannot "
                               "be pulled yet", "pick another quantisation, or merge the "
                               "parts with llama-gguf-split --merge and import the result")
    if quant is None:
        return ggufs[0]
    have = sorted({m.group(1).upper() for f in ggufs
                   if (m := _QUANT_NAME_RE.search(PurePosixPath(f).name))})
    raise InfernoError("source_not_found", f"{repo} has no .gguf file for {quant}",
                       f"the repository has: {', '.join(have) or ', '.join(ggufs[:5])}")


def _hub_error(e: BaseException, what: str) -> InfernoError:
    """huggingface_hub's exceptions as Inferno errors (imported lazily, as the hub is)."""
    from huggingface_hub import errors as hf_errors

    if isinstance(e, hf_errors.OfflineModeIsEnabled):
        return InfernoError("pull_failed", f"{what}: Hugging Face offline mode is on",
                            "unset HF_HUB_OFFLINE in the daemon's environment to pull "
                            "from the hub")
    if isinstance(e, hf_errors.GatedRepoError):
        return InfernoError("pull_failed", f"{what}: the repository is gated (HTTP "
                            f"{_status(e)})", "accept its terms on huggingface.co and give "
                            "the daemon a token: HF_TOKEN in its environment",
                            http_status=_status(e))
    if isinstance(e, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError)) \
            or (isinstance(e, hf_errors.HfHubHTTPError) and _status(e) == 404):
        return InfernoError("source_not_found", f"{what}: no such repository (or it is "
                            "private)", "check the name; a private repository needs HF_TOKEN "
                            "in the daemon's environment", http_status=_status(e))
    if isinstance(e, hf_errors.HfHubHTTPError):
        return InfernoError("pull_failed", f"{what}: HTTP {_status(e)} from the hub",
                            "retry later; see the daemon log", http_status=_status(e))
    return InfernoError("pull_failed", f"{what}: {type(e).__name__}: {e}",
                        "check the daemon host's network, HF_ENDPOINT and proxy settings")


def _status(e: Any) -> int:
    response = getattr(e, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def resolve(spec: Spec) -> Target:
    """The download of ``spec`` (blocking: Hugging Face references list the repository)."""
    if spec.url is not None:
        name = PurePosixPath(unquote(urlsplit(spec.url).path)).name
        return Target(spec.source, spec.url, name, _kind_of(name, spec.source))
    assert spec.repo is not None
    from huggingface_hub import HfApi, constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    what = f"{spec.repo} on {constants.ENDPOINT}"
    try:
        entries = [e for e in HfApi().list_repo_tree(spec.repo, recursive=True)
                   if hasattr(e, "size")]
    except Exception as e:  # noqa: BLE001 - every hub failure becomes a coded error
        raise _hub_error(e, what) from None
    by_path = {e.path: e for e in entries}
    filename = spec.filename or pick_file(list(by_path), spec.quant, spec.repo)
    entry = by_path.get(filename)
    if entry is None:
        raise InfernoError("source_not_found", f"{spec.repo} has no file {filename!r}",
                           "list its files on the hub; names are case-sensitive")
    lfs = getattr(entry, "lfs", None)
    sha = str(lfs.sha256).lower() if lfs is not None else None
    size = int(lfs.size) if lfs is not None else int(entry.size)
    headers = build_hf_headers()
    return Target(spec.source, hf_hub_url(spec.repo, filename), PurePosixPath(filename).name,
                  _kind_of(filename, spec.source), sha if sha and len(sha) == 64 else None,
                  size, headers, hub=True)


def offline() -> bool:
    """Whether the hub's offline mode is on (checked before a hub file is downloaded)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
