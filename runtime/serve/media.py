"""The image or video of a request, fetched into a private temporary file and checked before the model sees it.

`data:` URIs always; a local path only under `--allow-local-media DIR` (resolved, symlinks included, and kept
inside it); an `http(s)` URL only on a host of `--allow-remote-media`, connected to the address that was checked
(no private, loopback or link-local address), following redirects only on the same host. Sizes are bounded (the
body limit for the bytes, a pixel limit for images and video frames) before anything is decoded in full.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from facellava.runtime.serve.api import ApiError, MediaRef, bad_request

MAX_REDIRECTS = 3
SUFFIXES = {"image": ".img", "video": ".mp4"}


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may point at, and how large it may be."""

    max_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_video_frames: int = 3600
    local_dir: Path | None = None  # --allow-local-media
    remote_hosts: frozenset[str] = field(default_factory=frozenset)  # --allow-remote-media
    timeout_s: float = 10.0


def fetch(media: MediaRef, policy: MediaPolicy, workdir: Path) -> Path:
    """The medium as a checked file: a data URI decoded into `workdir`, an allowed local file, or an allowed
    remote URL downloaded into `workdir`. Raises ApiError (400, 413) for anything refused or too large."""
    url = media.url
    if url.startswith("data:"):
        path = workdir / f"medium{SUFFIXES[media.modality]}"
        path.write_bytes(_decode_data_uri(url, media.modality, policy))
    elif url.startswith(("http://", "https://")):
        path = workdir / f"medium{SUFFIXES[media.modality]}"
        path.write_bytes(_download(url, policy))
    else:
        path = _local_file(url, policy)
    check_dimensions(path, media.modality, policy)
    return path


def _decode_data_uri(url: str, modality: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise bad_request(f"the {modality} must be a base64 data URI: data:{modality}/...;base64,...", "messages")
    mime = header[len("data:"):-len(";base64")].split(";")[0].strip().lower()
    if not mime.startswith(f"{modality}/") and mime != "application/octet-stream":
        raise bad_request(f"a {modality} part holds a data URI of type {mime or 'none'!r}; expected {modality}/...",
                          "messages")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"the {modality}'s data URI is not valid base64", "messages") from None
    if not data:
        raise bad_request(f"the {modality}'s data URI is empty", "messages")
    if len(data) > policy.max_bytes:
        raise ApiError(413, f"the {modality} is {len(data)} bytes; at most {policy.max_bytes}", code="media_too_large")
    return data


def _local_file(url: str, policy: MediaPolicy) -> Path:
    if policy.local_dir is None:
        raise bad_request("local file paths and non-data URLs are refused; send the media as a data: URI (or start "
                          "the server with --allow-local-media DIR)", "messages", "local_media_refused")
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file://") else url
    root = policy.local_dir.resolve()
    try:
        path = (root / name).resolve()  # an absolute name replaces root; then it must still lie inside it
    except (OSError, RuntimeError, ValueError):
        raise bad_request("the local media path cannot be resolved", "messages") from None
    if not path.is_relative_to(root):
        raise bad_request("the local media path lies outside the allowed media directory", "messages",
                          "local_media_refused")
    if not path.is_file():
        raise bad_request("the local media file does not exist in the allowed media directory", "messages")
    if path.stat().st_size > policy.max_bytes:
        raise ApiError(413, f"the local media file is larger than {policy.max_bytes} bytes", code="media_too_large")
    return path


def _checked_address(host: str, port: int) -> str:
    """The one address `host` will be reached at, after every address it resolves to was checked public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise bad_request(f"the media host {host!r} cannot be resolved", "messages") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise bad_request(f"the media host {host!r} resolves to a private address; refused", "messages",
                              "remote_media_refused")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to an address checked beforehand (no second DNS lookup that could answer differently)."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _download(url: str, policy: MediaPolicy) -> bytes:
    if not policy.remote_hosts:
        raise bad_request("remote media URLs are refused; send the media as a data: URI (or start the server with "
                          "--allow-remote-media HOSTS)", "messages", "remote_media_refused")
    first_host = None
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise bad_request("a media URL must be http(s)://host/...", "messages")
        if host not in policy.remote_hosts or (first_host is not None and host != first_host):
            raise bad_request(f"the media host {host!r} is not allowed (--allow-remote-media)", "messages",
                              "remote_media_refused")
        first_host = host
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise bad_request("the media URL has an invalid port", "messages") from None
        address = _checked_address(host, port)
        kind = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        connection = kind(host, address, port, policy.timeout_s)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            connection.request("GET", target, headers={"User-Agent": "facellava-serve"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                url = urllib.parse.urljoin(url, response.getheader("Location") or "")
                continue
            if response.status != 200:
                raise bad_request(f"the media URL answered HTTP {response.status}", "messages")
            data = response.read(policy.max_bytes + 1)
        except (OSError, http.client.HTTPException) as error:
            raise bad_request(f"the media URL could not be fetched ({type(error).__name__})", "messages") from None
        finally:
            connection.close()
        if len(data) > policy.max_bytes:
            raise ApiError(413, f"the media is larger than {policy.max_bytes} bytes", code="media_too_large")
        return data
    raise bad_request(f"the media URL redirects more than {MAX_REDIRECTS} times", "messages")


def check_dimensions(path: Path, modality: str, policy: MediaPolicy) -> None:
    """Refuse an image or video too large to decode safely, reading only its header. Raises ApiError (400, 413);
    a file that is no image or video at all is left to the runtime's own one-line error."""
    if modality == "image":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise bad_request("the image is not a JPEG, PNG, BMP, TIFF or WebP file Pillow can read", "messages",
                              "invalid_image") from None
        if width * height > policy.max_image_pixels:
            raise ApiError(413, f"the image is {width}x{height} pixels; at most {policy.max_image_pixels} pixels",
                           code="image_too_large")
        return
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise bad_request("the video cannot be decoded; send an MP4 (or another format OpenCV reads)", "messages",
                              "invalid_video")
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()
    if width * height > policy.max_image_pixels:
        raise ApiError(413, f"the video is {width}x{height} pixels; at most {policy.max_image_pixels} pixels a frame",
                       code="video_too_large")
    if frames > policy.max_video_frames:
        raise ApiError(413, f"the video has {frames} frames; at most {policy.max_video_frames}", code="video_too_large")
