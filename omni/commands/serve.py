"""`omni serve [MODEL]`: the OpenAI-compatible server over a pipeline of stages."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

from omni.config_file import ENGINE_FLAGS, FLAG_SETTINGS, load_config_file
from omni.stages.contracts.ocr import ENGINES as OCR_ENGINES
from omni.stages.contracts.ocr import PRECISIONS as OCR_PRECISIONS
from omni.supervision.memory import pin_mmap_threshold

API_KEY_ENV = "OMNI_API_KEY"


class Terminated(BaseException):
    """SIGTERM arrived: unwind through every `finally`, so the pipeline's cleanup runs."""


_terminating = False


def _terminate(signum: int, frame: FrameType | None) -> None:
    # uvicorn handles SIGTERM itself while it serves (a graceful shutdown), then restores this
    # handler and raises the signal again; the default action would end the process before
    # `Pipeline.close()` stopped the stages, swept /dev/shm and removed the ipc folder, which
    # is what systemd, Docker and Kubernetes send SIGTERM for. A second SIGTERM during the
    # cleanup is ignored rather than cutting it short.
    global _terminating
    if not _terminating:
        _terminating = True
        raise Terminated


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Start the pipeline's stages and serve /v1/chat/completions, "
        "/v1/completions and /v1/models. Flags override --config.",
    )
    # Every default is None so that a flag left out does not override the config file;
    # ServeConfig holds the real defaults.
    p.add_argument("model", nargs="?", default=None, help="model folder (default: SmolLM2)")
    p.add_argument("--config", default=None, help="YAML file with the same settings")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument(
        "--llm-replicas",
        type=int,
        default=None,
        help="LLM replicas to start (0: only stages joining --stage-endpoint serve it; the "
        "same holds for every --ROLE-replicas)",
    )
    p.add_argument("--vision-replicas", type=int, default=None, help="image encoder replicas")
    p.add_argument("--audio-replicas", type=int, default=None, help="audio encoder replicas")
    p.add_argument(
        "--image-model",
        default=None,
        help="diffusers pipeline (folder or hub id) for /v1/images/generations",
    )
    p.add_argument("--image-replicas", type=int, default=None)
    p.add_argument(
        "--speech-model",
        default=None,
        help="VITS / MMS-TTS or SpeechT5 checkpoint for /v1/audio/speech and chat audio "
        "(default: the espeak-ng voice)",
    )
    p.add_argument(
        "--no-speech", dest="speech", action="store_false", default=None, help="no speech stage"
    )
    p.add_argument("--speech-replicas", type=int, default=None)
    p.add_argument("--ocr-replicas", type=int, default=None,
                   help="OCR stage replicas, for images and scanned PDF pages read as text "
                   "(1; 0: none)")
    p.add_argument("--ocr-threads", type=int, default=None,
                   help="runtime threads of each OCR replica (0: every core, at a lower CPU "
                   "priority than the other stages)")
    p.add_argument("--ocr-lanes", type=int, default=None,
                   help="images each OCR replica reads at once when several wait, each on "
                        "threads / lanes (2); a lone image is read on every thread")
    p.add_argument("--ocr-engine", default=None, choices=["auto", *OCR_ENGINES],
                   help="the OCR stage's runtime for PP-OCR (auto: OpenVINO where installed)")
    p.add_argument("--ocr-precision", default=None, choices=["auto", *OCR_PRECISIONS],
                   help="the OCR detector's arithmetic on OpenVINO (auto: bf16 where the CPU "
                   "has bf16 units, else f32)")
    p.add_argument("--asr-replicas", type=int, default=None,
                   help="speech recognition replicas, for audio heard as text and "
                   "/v1/audio/transcriptions (1; 0: none)")
    p.add_argument("--perception-cache-entries", type=int, default=None,
                   help="OCR texts and transcripts each API process keeps by content hash (4096)")
    p.add_argument("--pdf-mode", default=None, choices=["auto", "text", "image", "both"],
                   help="PDF pages reach the model as text (text layer, else OCR), as images, "
                   "or both (auto: images for a vision model, else text)")
    p.add_argument("--image-mode", default=None, choices=["auto", "text", "image", "both"],
                   help="images reach the model as OCR text, as images, or both (auto: images "
                   "for a vision model, else text)")
    p.add_argument("--audio-mode", default=None, choices=["auto", "text", "audio", "both"],
                   help="audio reaches the model as its transcript, as audio, or both (auto: "
                   "audio for an audio model, else text)")
    p.add_argument("--devices", default=None, help="per-role devices, for example llm=0,1")
    p.add_argument(
        "--colocate-encoders",
        action="store_true",
        default=None,
        help="run the model's encoder inside each LLM replica's process, on its device (one "
        "GPU for both: two processes would take turns on it)",
    )
    p.add_argument(
        "--single-process",
        action="store_true",
        default=None,
        help="run every stage inside the API process",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (or set ${API_KEY_ENV})",
    )
    p.add_argument(
        "--public-metrics",
        action="store_true",
        default=None,
        help="with --api-key, serve /metrics without the key (every other route but /health "
        "needs it)",
    )
    p.add_argument(
        "--max-header-bytes",
        type=int,
        default=None,
        help="bytes of an HTTP request's headers; more gets 431 (64 KiB)",
    )
    p.add_argument(
        "--header-timeout",
        dest="header_timeout_s",
        type=float,
        default=None,
        help="seconds a client may take to send a request's headers; then 408 (10)",
    )
    p.add_argument(
        "--stage-stall-timeout",
        dest="stage_stall_timeout_s",
        type=float,
        default=None,
        help="seconds a stage worker may hold requests without progress before it is "
        "declared hung and restarted (60)",
    )
    p.add_argument(
        "--stage-endpoint",
        default=None,
        metavar="tcp://HOST:PORT",
        help="also let stages on other hosts join, at this address (`omni stage ROLE "
        "--connect tcp://HOST:PORT`); needs --stage-keys",
    )
    p.add_argument(
        "--stage-keys",
        default=None,
        metavar="DIR",
        help="CURVE keys from `omni keys generate DIR`: the server's key pair and the "
        "clients/*.key of the stages allowed to join",
    )
    p.add_argument(
        "--stage-bulk-port",
        type=int,
        default=None,
        metavar="PORT",
        help="with --stage-keys, the port on the stage endpoint's address where stages send "
        "large tensors sealed with AES-256-GCM under a session key handed over inside CURVE "
        "(default: any free port, told to each stage; fix it for a firewall)",
    )
    p.add_argument(
        "--insecure-stage-endpoint",
        action="store_true",
        default=None,
        help="allow --stage-endpoint without keys: unencrypted, and any host that reaches "
        "the port may join (trusted private networks only)",
    )
    p.add_argument(
        "--placement",
        default=None,
        choices=["local", "ray"],
        help="where stage replicas run: this host's processes (local, the default) or Ray "
        "actors on any node of a Ray cluster with their resources (ray; pip install omni[ray])",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster to use with --placement ray: auto (the cluster this node "
        "joined with `ray start`) or HOST:PORT (default: start a Ray instance on this host)",
    )
    for role in ("llm", "vision", "audio", "image", "speech"):
        p.add_argument(
            f"--{role}-resources",
            default=None,
            metavar="NAME=N,...",
            help=f"Ray resources of one {role} replica (default GPU=1), e.g. GPU=1,CPU=4",
        )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument(
        "--max-body-bytes", type=int, default=None, help="JSON request body limit (32 MiB)"
    )
    p.add_argument(
        "--encoder-cache-mib",
        type=int,
        default=None,
        help="encoder outputs each LLM replica keeps by content hash (default 512; 0: none)",
    )
    p.add_argument(
        "--allowed-media-domains",
        default=None,
        help="comma-separated host names image_url may fetch http(s) URLs from (default: none)",
    )
    p.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="folder under which image_url may name file:// paths (default: none)",
    )
    p.add_argument("--media-fetch-timeout", dest="media_fetch_timeout_s", type=float, default=None)
    p.add_argument("--pdf-dpi", type=float, default=None, help="DPI PDF pages render at (100)")
    p.add_argument("--pdf-min-dpi", type=float, default=None, help="lowest DPI a request may ask")
    p.add_argument("--pdf-max-dpi", type=float, default=None, help="highest DPI a request may ask")
    p.add_argument("--max-pdf-pages", type=int, default=None, help="PDF pages a request (16)")
    p.add_argument("--max-pdf-bytes", type=int, default=None, help="bytes of one PDF (20 MB)")
    p.add_argument(
        "--no-pdf-text",
        dest="pdf_text",
        action="store_false",
        default=None,
        help="leave PDF pages' text layers out of the prompt",
    )
    p.add_argument("--pdf-workers", type=int, default=None, help="PDF render processes (2)")
    p.add_argument(
        "--pdf-worker-memory-mib",
        type=int,
        default=None,
        help="address-space cap of each PDF render process, MiB (2048)",
    )
    p.add_argument(
        "--max-upload-bytes", type=int, default=None, help="body limit of /v1/uploads/chat"
    )
    p.add_argument("--max-upload-files", type=int, default=None, help="files an upload (8)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="LLM engine option"
    )
    engine = p.add_argument_group("LLM engine (vLLM's flags; each is also an --option)")
    engine.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float16",
                                                           "float32"])
    engine.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="share of GPU memory for weights and KV cache (0.9)")
    engine.add_argument("--enforce-eager", action="store_true", default=None,
                        help="no CUDA graphs")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per forward pass (8192)")
    engine.add_argument("--block-size", type=int, default=None, help="tokens per KV block (16)")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=None, help="reuse KV blocks of shared prefixes (on)")
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                        help="devices (processes) each LLM replica is sharded over (1)")
    engine.add_argument("--enable-expert-parallel", action="store_true", default=None,
                        help="split mixture-of-experts layers' experts across those ranks")
    p.add_argument(
        "--chat-template", default=None,
        help="a Jinja chat template (a file, or the template itself) instead of the model's",
    )
    p.add_argument(
        "--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
        help="how tool calls are read out of answers (default: chosen from the model)",
    )
    # vLLM needs it for tool_choice "auto"; omni always serves "auto", so it is accepted as is.
    p.add_argument("--enable-auto-tool-choice", action="store_true", default=None,
                   help=argparse.SUPPRESS)
    p.add_argument(
        "--api-server-count",
        type=int,
        default=None,
        help="API processes sharing the port, each with its own router (default 1)",
    )
    # How `omni serve` starts its other API processes; not for users.
    p.add_argument("--api-server-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--api-server-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--api-server-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run)


def serve_config(args: argparse.Namespace) -> Any:
    """The ServeConfig from the config file (if any) overridden by the flags given."""
    from omni.server.config import RESOURCE_FIELDS, ServeConfig
    from omni.server.flag_values import parse_devices, parse_domains, parse_resources

    settings = load_config_file(args.config) if args.config else {}
    options = dict(settings.pop("options", {}))
    for pair in args.option:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r} must be KEY=VALUE")
        options[key] = value
    for name in ENGINE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            options[name] = str(value).lower() if isinstance(value, bool) else str(value)
    for name in sorted(FLAG_SETTINGS):
        # A setting with no flag (startup_timeout_s) comes from the file only.
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    # The environment keeps the key out of `ps` listings; a flag or the file still wins.
    if "api_key" not in settings and os.environ.get(API_KEY_ENV):
        settings["api_key"] = os.environ[API_KEY_ENV]
    if "devices" in settings:
        settings["devices"] = parse_devices(str(settings["devices"]))
        llm_devices = settings["devices"].get("llm", ())
        if "llm_replicas" not in settings and len(llm_devices) > 1:
            # vLLM's data parallelism: the named devices hold as many replicas as they fit
            # (--devices llm=0,1,2,3 -tp 2: two replicas of two GPUs each).
            size = int(options.get("tensor_parallel_size", "1"))
            settings["llm_replicas"] = max(1, len(llm_devices) // max(1, size))
    for name in RESOURCE_FIELDS:
        if settings.get(name) is not None:
            settings[name] = parse_resources(name, settings[name])
    if "allowed_media_domains" in settings:
        settings["allowed_media_domains"] = parse_domains(settings["allowed_media_domains"])
    try:
        return ServeConfig(engine_options=options, **settings)
    except TypeError as exc:  # a wrongly typed value from the YAML file
        raise ValueError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, _terminate)
    # An API process decodes every request's media into buffers of a few MiB on its thread
    # pool: they must go back to the system when freed (memory.py). Stage processes keep
    # glibc's default, whose raised threshold spares their step loops an mmap per large
    # host tensor.
    pin_mmap_threshold()
    try:
        return _run(args)
    except Terminated:
        logging.getLogger(__name__).info("stopped by SIGTERM")
        return 0


def _run(args: argparse.Namespace) -> int:
    if (args.api_server_count or 1) > 1 and args.api_server_dir is None:
        # The first API process: the others share its listening socket and its folder.
        from omni.commands.api_servers import serve_with_api_servers

        return serve_with_api_servers(args, run)
    try:
        config = serve_config(args)
    except ValueError as exc:
        print(f"omni serve: error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from omni.server.app import AppSettings, build_app, read_body
    from omni.server.http_limits import bounded_http_protocol
    from omni.server.images import add_image_routes
    from omni.server.pipeline import Pipeline
    from omni.server.speech import add_speech_routes
    from omni.server.transcriptions import add_transcription_routes
    from omni.server.uploads import UploadSettings

    try:
        pipeline = Pipeline(config).start()
    except (ValueError, RuntimeError) as exc:
        print(f"omni serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        settings = AppSettings(
            api_key=config.api_key,
            public_metrics=config.public_metrics,
            max_body_bytes=config.max_body_bytes,
            uploads=UploadSettings(config.max_upload_bytes, config.max_upload_files),
        )
        app = build_app(pipeline.orchestrator, settings)
        if pipeline.image_service is not None:
            add_image_routes(app, pipeline.image_service, settings)
        if pipeline.speech_service is not None:
            add_speech_routes(app, pipeline.speech_service, settings)
        if pipeline.transcription_service is not None:
            add_transcription_routes(app, pipeline.transcription_service,
                                     settings.uploads.max_body_bytes, read_body)
        # uvicorn's httptools protocol plus the header size and time limits it lacks.
        http = bounded_http_protocol(config.http_limits())
        log_level = args.log_level.lower()
        if args.api_server_fd is not None:
            # One of several API processes: they all accept on the socket the first one bound.
            uvicorn.run(app, fd=args.api_server_fd, log_level=log_level, http=http)
        else:
            uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, http=http)
    finally:
        pipeline.close()
    return 0
