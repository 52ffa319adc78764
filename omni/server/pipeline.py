"""The running pipeline behind the server: the router, its stage replicas, the orchestrator.

Two ways to run the stages, one code path for requests:

* stage processes (the default): a `StageSupervisor` starts each LLM replica as
  `omni stage llm --connect ipc://...`, restarts it if it dies, and the router routes to it;
  with several API processes (`api_server_count`), the first one supervises the stages and
  each replica joins every API process's router, while the others start no stages;
* `single_process`: each replica's `StageRuntime` runs on threads of this process and connects
  over `inproc://` (no shared memory, no child processes; tests and demos).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from omni.media.fetch import MediaFetchPolicy
from omni.media.pdf import PdfRenderer
from omni.server.config import ServeConfig
from omni.server.documents import Documents
from omni.server.images import ImageService
from omni.server.metrics import ServerMetrics
from omni.server.orchestrator import LLM_ROLE, Orchestrator
from omni.server.perception import MediaModes, Perception, with_available_speech_recognition
from omni.server.speech_service import SpeechService, speech_stage_model
from omni.server.stage_metrics import StageCollector
from omni.server.tool_calls import default_parser
from omni.server.transcriptions import ASR_MODEL_NAME, TranscriptionService
from omni.stages.contracts import audio, vision
from omni.stages.contracts.asr import ROLE as ASR_ROLE
from omni.stages.contracts.image import ROLE as IMAGE_ROLE
from omni.stages.contracts.ocr import ROLE as OCR_ROLE
from omni.stages.contracts.speech import ROLE as SPEECH_ROLE
from omni.stages.runtime import (
    StageConfig,
    StageRuntime,
    WorkerOptions,
    check_worker_options,
    create_worker,
)
from omni.supervision import ray_placement
from omni.supervision.ray_placement import RayStageSupervisor
from omni.supervision.router import RouterConfig, StageRouter
from omni.supervision.supervisor import StageSpec, StageSupervisor, replica_device
from omni.transport.key_folder import load_server_keys
from omni.transport.sockets import CurveKeys, generate_curve_keypair

logger = logging.getLogger(__name__)


def served_model(config: ServeConfig) -> tuple[str, str]:
    """(local model folder, name clients use) for the configured model."""
    from omni.stages.checkpoint import resolve_model_path

    if config.model is None:
        from omni.default_model import DEFAULT_MODEL_NAME, default_model_path

        return default_model_path(), config.served_model_name or DEFAULT_MODEL_NAME
    path = resolve_model_path(config.model, include_weights=config.single_process)
    return path, config.served_model_name or config.model


def context_length(model_path: str, configured: int | None) -> int:
    """The context the LLM stage will use: the flag, else the model's position limit (the
    same rule as the stage's model runner)."""
    if configured is not None:
        return configured
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_path).get_text_config().max_position_embeddings)


def read_chat_template(given: str) -> str:
    """`--chat-template`: a file's text, or the template itself (as vLLM takes it)."""
    path = Path(given).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" not in given:
        raise ValueError(f"--chat-template {given!r} is neither a file nor a Jinja template")
    return given


def model_type(model_path: str) -> str:
    """The checkpoint's `model_type` ("llama", "qwen2", ...), which picks its tool parser."""
    from transformers import AutoConfig

    return str(AutoConfig.from_pretrained(model_path).model_type)


class Pipeline:
    """Start with `start()`, stop with `close()`; `orchestrator` serves requests between."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.router: StageRouter | None = None
        self.supervisor: StageSupervisor | RayStageSupervisor | None = None
        # Whether this process joined a Ray cluster (placement "ray"), to leave it on close.
        self._on_ray = False
        # In-process replicas (single_process); their workers can be inspected by tests.
        self.runtimes: list[StageRuntime] = []
        self._ipc_dir: str | None = None
        self._orchestrator: Orchestrator | None = None
        # Serves /v1/images/generations when the config names an image model.
        self.image_service: ImageService | None = None
        # Serves /v1/audio/speech and chat audio when a speech stage runs ("" = default voice).
        self.speech_model: str | None = None
        self.speech_service: SpeechService | None = None
        # Names the roles no remote stage has joined for, once startup_timeout_s has passed.
        self._remote_watch: threading.Timer | None = None
        # Serves /v1/audio/transcriptions when a speech recognition stage runs.
        self.transcription_service: TranscriptionService | None = None

    @property
    def orchestrator(self) -> Orchestrator:
        if self._orchestrator is None:
            raise RuntimeError("the pipeline is not started")
        return self._orchestrator

    def start(self) -> Pipeline:
        from transformers import AutoTokenizer

        config = self.config = with_available_speech_recognition(self.config)
        model_path, model_name = served_model(config)
        # Options, tokenizer and context length first: a bad option or model fails here, with
        # one clear error, rather than as a stage process that dies on every restart.
        check_worker_options(
            LLM_ROLE,
            WorkerOptions(
                model=model_path,
                device=config.stage_devices(LLM_ROLE)[0],
                extra=config.llm_options(),
            ),
        )
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if config.chat_template is not None:
            tokenizer.chat_template = read_chat_template(config.chat_template)
        max_model_len = context_length(model_path, config.max_model_len)
        mm = media_prompt_processor(model_path)
        takes = None if mm is None else {vision.ROLE: "image", audio.ROLE: "audio"}[mm[1]]
        modes = MediaModes.resolve(config, takes)
        roles = [(LLM_ROLE, config.llm_replicas)]
        if mm is not None:
            # A vision- or audio-language model: its encoder runs as a stage of its own (in
            # the LLM replicas' processes when colocated).
            roles.append((mm[1], config.encoder_replicas(mm[1])))
        # Perception: OCR where a mode reads images or pages as text; speech recognition for
        # audio heard as text and for /v1/audio/transcriptions.
        if modes.needs_ocr():
            check_worker_options(OCR_ROLE, WorkerOptions(extra=config.stage_options(OCR_ROLE)))
            roles.append((OCR_ROLE, config.ocr_replicas))
        if config.asr_replicas > 0:
            roles.append((ASR_ROLE, config.asr_replicas))
        if config.image_model is not None:
            roles.append((IMAGE_ROLE, config.image_replicas))
        self.speech_model = speech_stage_model(config)
        if self.speech_model is not None:
            roles.append((SPEECH_ROLE, config.speech_replicas))
        try:
            router = self._start_router()
            if config.single_process:
                self._start_in_process(router, model_path, roles)
            elif config.api_server_rank == 0:
                colocated = mm[1] if mm is not None and config.colocate_encoders else ""
                self._start_processes(router, model_path, roles, colocated)
            for role, count in roles:
                self._wait_for_replicas(router, role, count)
            self._watch_remote_roles(router, [role for role, count in roles if count == 0])
        except BaseException:
            self.close()
            raise
        supervisor = self.supervisor

        def restarts() -> int:
            return supervisor.restarts if supervisor is not None else 0

        perception = Perception(router, modes, config.perception_cache_entries)
        metrics = ServerMetrics([StageCollector(router, restarts, perception=perception)])
        self._orchestrator = Orchestrator(
            router,
            tokenizer,
            model_name,
            max_model_len,
            metrics,
            mm_processor=None if mm is None else mm[0],
            fetch_policy=MediaFetchPolicy(
                allowed_domains=frozenset(config.allowed_media_domains),
                allowed_local_path=config.allowed_local_media_path,
                timeout_s=config.media_fetch_timeout_s,
            ),
            documents=Documents(
                PdfRenderer(config.pdf_settings()),
                images="untexted" if modes.pdf == "text" else "all",
            ),
            tool_parser=config.tool_call_parser
            or default_parser(tokenizer, model_type(model_path)),
            roles=[role for role, _ in roles],
            perception=perception,
        )
        if config.asr_replicas > 0:
            self.transcription_service = TranscriptionService(perception, ASR_MODEL_NAME)
        if config.image_model is not None:
            self.image_service = ImageService(router, config.image_model)
        if self.speech_model is not None:
            self.speech_service = SpeechService(router, self.speech_model)
        return self

    def close(self) -> None:
        if self._orchestrator is not None:
            self._orchestrator.media.documents.renderer.close()  # the PDF render workers
        # Stages first (they say GOODBYE to a router that still listens), then the router.
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        for runtime in self.runtimes:
            runtime.stop("server shutting down")
        for runtime in self.runtimes:
            runtime.join(10)
        self.runtimes = []
        if self._remote_watch is not None:
            self._remote_watch.cancel()
            self._remote_watch = None
        if self.router is not None:
            self.router.close()
            self.router = None
        if self._on_ray:
            ray_placement.disconnect()
            self._on_ray = False
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------------

    def _wait_for_replicas(self, router: StageRouter, role: str, wanted: int) -> None:
        """Until every replica of `role` said HELLO; fails early when the supervisor gave up
        on one (bad configuration, or it died on every restart) instead of at the timeout."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        while len(router.replicas(role)) < wanted:
            abandoned = [
                e for e in (self.supervisor.events if self.supervisor else []) if not e.restarted
            ]
            if abandoned:
                event = abandoned[0]
                raise RuntimeError(
                    f"stage {event.replica_id} {event.reason} and was not restarted "
                    "(see its log above)"
                )
            if time.monotonic() > deadline:
                live = len(router.replicas(role))
                raise RuntimeError(
                    f"only {live} of {wanted} {role} replicas started within "
                    f"{self.config.startup_timeout_s} s (see the stage logs above)"
                )
            time.sleep(0.05)

    def _watch_remote_roles(self, router: StageRouter, remote_only: list[str]) -> None:
        """Roles with no local replica wait for stages on other hosts: /health is 503 naming
        them until each has one, and if one still has none after startup_timeout_s the log
        says which, and how to start it."""
        if not remote_only:
            return
        endpoint = router.remote_endpoint
        logger.info(
            "waiting for remote stages of %s to join %s (/health is 503 until they do)",
            ", ".join(remote_only),
            endpoint,
        )

        def report() -> None:
            missing = [role for role in remote_only if not router.replica_ids(role)]
            if missing:
                logger.error(
                    "no stage of %s has joined %s within %g s; start one on a stage host: "
                    "omni stage ROLE --connect %s --model MODEL --server-key "
                    "DIR/server.key --client-key DIR/clients/NAME.key_secret",
                    ", ".join(repr(role) for role in missing),
                    endpoint,
                    self.config.startup_timeout_s,
                    endpoint,
                )

        self._remote_watch = threading.Timer(self.config.startup_timeout_s, report)
        self._remote_watch.daemon = True
        self._remote_watch.start()

    def _start_router(self) -> StageRouter:
        if self.config.single_process:
            endpoint = f"inproc://omni-serve-{uuid.uuid4().hex}"
        elif self.config.api_server_dir is not None:
            # One of several API processes: `omni serve` made (and removes) the folder.
            endpoint = self.config.router_endpoints()[self.config.api_server_rank]
        else:
            # ipc paths are limited to ~100 bytes: a short folder of our own under /tmp.
            self._ipc_dir = tempfile.mkdtemp(prefix="omni-", dir="/tmp")
            endpoint = f"ipc://{self._ipc_dir}/router.sock"
        keys = self.config.stage_keys
        remote = self.config.stage_endpoint
        curve = load_server_keys(keys) if keys is not None else None
        if self.config.on_ray:
            # Ray's actors join over tcp on this node's address, each with a key pair it made
            # and the router admits (`allow_client`); the server's pair is --stage-keys' or
            # made now.
            node_ip = ray_placement.connect(self.config.ray_address)
            self._on_ray = True
            remote = remote or f"tcp://{node_ip}:0"
            curve = (
                dataclasses.replace(curve, allow_list=True)
                if curve is not None
                else CurveKeys(*generate_curve_keypair(), allow_list=True)
            )
        router_config = RouterConfig(
            endpoint=endpoint,
            remote_endpoint=remote,
            curve=curve,
            bulk_port=self.config.stage_bulk_port,
            shared_memory=not self.config.single_process,
            stall_timeout_s=self.config.stage_stall_timeout_s,
        )
        self.router = StageRouter(router_config).start()
        if self.router.remote_endpoint is not None:
            logger.info(
                "stages on other hosts join at %s (%s)",
                self.router.remote_endpoint,
                f"CURVE keys of {keys}" if keys else "INSECURE: no keys, anyone may join",
            )
        return self.router

    def _stage_model(self, role: str, model_path: str) -> str:
        """The image stage serves its own diffusers pipeline, the speech stage its voice model
        ("" for the default voice), the perception stages their embedded models (""); every
        other stage the model."""
        if role == SPEECH_ROLE:
            return self.speech_model or ""
        if role in (OCR_ROLE, ASR_ROLE):
            return ""
        image_model = self.config.image_model
        return image_model if role == IMAGE_ROLE and image_model is not None else model_path

    def _start_in_process(
        self, router: StageRouter, model_path: str, roles: list[tuple[str, int]]
    ) -> None:
        config = self.config
        for role, count in roles:
            devices = config.stage_devices(role)
            extra = config.stage_options(role)
            per_replica = config.tensor_parallel_size if role == LLM_ROLE else 1
            for index in range(count):
                device = replica_device(devices, index, per_replica)
                model = self._stage_model(role, model_path)
                options = WorkerOptions(model=model, device=device, extra=extra)
                stage = StageConfig(
                    role=role,
                    connect=router.endpoint,
                    model=model,
                    device=device,
                    capacity=config.llm_capacity,
                    replica_id=f"{role}-{index}",
                    heartbeat_interval_s=router.config.heartbeat_interval_s,
                )
                runtime = StageRuntime(stage, create_worker(role, options))
                self.runtimes.append(runtime)
                runtime.start()

    def _start_processes(
        self,
        router: StageRouter,
        model_path: str,
        roles: list[tuple[str, int]],
        colocated: str = "",
    ) -> None:
        """A process per replica; a `colocated` role's replicas run in the LLM replicas'."""
        config = self.config
        specs = []
        for role, count in roles:
            if role == colocated or count == 0:  # 0: served by stages on other hosts
                continue
            extra: list[str] = []
            if config.api_server_count > 1:
                for endpoint in config.router_endpoints()[1:]:
                    extra += ["--also-connect", endpoint]
            for key, value in config.stage_options(role).items():
                extra += ["--option", f"{key}={value}"]
            specs.append(
                StageSpec(
                    role=role,
                    replicas=count,
                    devices=config.stage_devices(role),
                    devices_per_replica=config.tensor_parallel_size if role == LLM_ROLE else 1,
                    model=self._stage_model(role, model_path),
                    capacity=config.llm_capacity,
                    extra_args=tuple(extra),
                    colocated_role=colocated if role == LLM_ROLE else "",
                    colocated_model=self._stage_model(colocated, model_path) if colocated else "",
                )
            )
        if config.on_ray:
            resources = {role: config.resources(role) for role, _ in roles}
            self.supervisor = RayStageSupervisor(router, specs, resources).start()
        else:
            self.supervisor = StageSupervisor(router, specs).start()


def media_prompt_processor(model_path: str) -> tuple[Any, str] | None:
    """(prompt processor, encoder stage role) when the model takes images (Qwen2-VL: a vision
    tower) or audio (Qwen2-Audio: an audio tower), else None."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    if getattr(config, "vision_config", None) is not None:
        from omni.multimodal import Qwen2VLPromptProcessor

        return Qwen2VLPromptProcessor.from_pretrained(model_path), vision.ROLE
    if config.model_type == "qwen2_audio":
        from omni.multimodal.qwen2_audio import Qwen2AudioPromptProcessor

        return Qwen2AudioPromptProcessor.from_pretrained(model_path), audio.ROLE
    return None
