"""`facellava serve BUNDLE`: the OpenAI-compatible server on loopback. Light at import: FastAPI, uvicorn and the
runtime are imported inside `serve`, so `--help` works in any install."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from facellava.errors import FaceLlavaError
from facellava.runtime.cli import pipeline_arguments


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="an exported bundle directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8080)
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 and /metrics (visible in ps: "
                                       "prefer --api-key-file)")
    key.add_argument("--api-key-file", type=Path, help="read the API key from this file")
    parser.add_argument("--allow-local-media", type=Path, metavar="DIR",
                        help="let requests name files under DIR (default: data: URIs only)")
    parser.add_argument("--allow-remote-media", metavar="HOSTS", default="",
                        help="comma-separated hosts whose http(s) URLs requests may name (never private addresses)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow browser requests from this origin (repeatable; default: CORS off)")
    parser.add_argument("--model-name", help="the model id in /v1/models and answers (default: the bundle's name)")
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body")
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                        help="largest image (or video frame) in pixels, width x height")
    parser.add_argument("--max-queue", type=int, default=8, help="requests that may wait (more: HTTP 429)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request, queue included")
    parser.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request")
    parser.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    pipeline_arguments(parser, priority="high")  # a kiosk's answer comes before the work beside it


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise FaceLlavaError(f"cannot read the API key file {args.api_key_file}: {error}") from None
        if not key:
            raise FaceLlavaError(f"the API key file {args.api_key_file} is empty")
        return key
    if args.api_key is not None and not args.api_key.strip():
        raise FaceLlavaError("--api-key is empty")
    return args.api_key.strip() if args.api_key else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_config(args: argparse.Namespace):
    """The ServeConfig the arguments describe. Raises FaceLlavaError for a bad value."""
    from facellava.runtime.serve.app import ServeConfig
    from facellava.runtime.serve.media import MediaPolicy

    if not 0 < args.port < 65536:
        raise FaceLlavaError(f"--port must be from 1 to 65535, got {args.port}")
    for name in ("max_body_mb", "max_image_pixels", "request_timeout", "max_tokens", "max_tokens_limit"):
        if not getattr(args, name) > 0:
            raise FaceLlavaError(f"--{name.replace('_', '-')} must be above 0, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise FaceLlavaError(f"--max-queue must be 0 or more, got {args.max_queue}")
    local = None
    if args.allow_local_media is not None:
        if not args.allow_local_media.is_dir():
            raise FaceLlavaError(f"--allow-local-media {args.allow_local_media} is not a directory")
        local = args.allow_local_media.resolve()
    hosts = frozenset(h.strip().lower() for h in args.allow_remote_media.split(",") if h.strip())
    max_body = int(args.max_body_mb * 1024 * 1024)
    policy = MediaPolicy(max_bytes=max_body, max_image_pixels=args.max_image_pixels, local_dir=local,
                         remote_hosts=hosts)
    return ServeConfig(model_name=args.model_name or args.bundle.resolve().name, api_key=_api_key(args),
                       max_body_bytes=max_body, max_queue=args.max_queue, request_timeout_s=args.request_timeout,
                       default_max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit, media=policy,
                       cors_origins=tuple(args.cors_origin))


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from facellava.runtime.cli import open_pipeline
    from facellava.runtime.serve.app import create_app

    config = serve_config(args)
    if not _is_loopback(args.host) and config.api_key is None:
        print(f"facellava serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              "address can use the model (set --api-key-file)", file=sys.stderr)
    pipeline = open_pipeline(args)
    try:
        app = create_app(pipeline, config)
        print(f"facellava serve: {config.model_name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, server_header=False, log_level="info")
    finally:
        pipeline.close()
    return 0
