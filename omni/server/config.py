"""`omni serve` settings: one frozen dataclass whose fields are the launch flags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from omni.media.pdf import PdfSettings
from omni.server.flag_values import default_device, parse_resources
from omni.server.http_limits import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_HEADER_BYTES, HttpLimits
from omni.stages.contracts.ocr import ENGINES as OCR_ENGINES
from omni.stages.contracts.ocr import PRECISIONS as OCR_PRECISIONS

# The JSON body limit of the /v1 routes (see AppSettings).
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


# The per-role scaling settings (`--vision-replicas N` and so on).
REPLICA_FIELDS = (
    "llm_replicas",
    "vision_replicas",
    "audio_replicas",
    "image_replicas",
    "speech_replicas",
)


# Perception stages (media to text for models that do not take the media): 0 replicas is none.
PERCEPTION_REPLICA_FIELDS = ("ocr_replicas", "asr_replicas")

# How each kind of media reaches the model (`--pdf-mode`, `--image-mode`, `--audio-mode`):
# as the model's own input (a vision or audio stage), as text from a perception stage (OCR,
# the text layer, a transcript), or both; "auto" picks the model's own input where it takes
# the media, else text.
MEDIA_MODES = {
    "pdf_mode": ("auto", "text", "image", "both"),
    "image_mode": ("auto", "text", "image", "both"),
    "audio_mode": ("auto", "text", "audio", "both"),
}

# Per-role Ray resources (`--llm-resources GPU=1,CPU=4`), for `placement="ray"`.
RESOURCE_FIELDS = tuple(name.replace("_replicas", "_resources") for name in REPLICA_FIELDS)
PLACEMENTS = ("local", "ray")


# The encoder roles `colocate_encoders` moves into the LLM replicas' processes.
COLOCATED_ROLES = ("vision", "audio")


@dataclass(frozen=True)
class ServeConfig:
    # Model folder or hub id; None serves the embedded default (SmolLM2-135M-Instruct).
    model: str | None = None
    # The name clients put in "model"; defaults to the model argument (or the default's name).
    served_model_name: str | None = None
    # Loopback by default: exposing the server is a decision, not an accident.
    host: str = "127.0.0.1"
    port: int = 8000
    llm_replicas: int = 1
    # Encoder replicas, used when the model takes images (vision) or audio (audio).
    vision_replicas: int = 1
    audio_replicas: int = 1
    # Replica i of a role runs on devices[role][i % len]; unnamed roles use default_device().
    devices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Every stage inside the API process (threads over inproc://): tests and small demos.
    single_process: bool = False
    # Each LLM replica's process also runs the model's encoder (one replica each, on the LLM
    # replica's device): for an encoder and an LLM on one GPU, whose two processes would
    # otherwise take turns on it (see omni.stages.runtime.process.run_stage_process).
    colocate_encoders: bool = False
    api_key: str | None = None
    # With api_key: /metrics answers without the key too (every other route but /health needs it).
    public_metrics: bool = False
    # HTTP request heads: bytes before the headers end, and seconds to send them (nginx's
    # large_client_header_buffers and client_header_timeout; see omni.server.http_limits).
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    # A stage replica whose worker makes no progress for this long while it holds requests is
    # hung, however well its I/O thread heartbeats: its requests fail (503) and it is
    # restarted. Longer than any one step of a stage's worker takes.
    stage_stall_timeout_s: float = 60.0
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    # More LLM engine options, as `--option key=value` (EngineConfig fields).
    engine_options: Mapping[str, str] = field(default_factory=dict)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Seconds to wait for every stage replica to say HELLO (model loading included).
    startup_timeout_s: float = 300.0
    # A diffusers pipeline (folder or hub id) to serve /v1/images/generations with; None: no
    # image stage. Its name in requests' "model" is this string.
    image_model: str | None = None
    image_replicas: int = 1
    # A speech stage serves /v1/audio/speech and chat answers with audio: the default voice
    # (espeak-ng, when installed) unless speech_model names a VITS / SpeechT5 checkpoint.
    speech: bool = True
    speech_model: str | None = None
    speech_replicas: int = 1
    # Perception stages: OCR (PP-OCR, for images and PDF pages without a usable text layer)
    # and speech recognition (Whisper tiny.en; also /v1/audio/transcriptions).
    # Either runs only where a media mode needs it (and asr for the transcription route).
    ocr_replicas: int = 1
    asr_replicas: int = 1
    # The OCR stage's runtime threads (0: every core, at a lower CPU priority than the other
    # stages) and the images each replica reads at once when several are queued (each lane
    # gets threads / lanes; a lone image gets every thread).
    ocr_threads: int = 0
    ocr_lanes: int = 2
    # The OCR stage's runtime: auto (OpenVINO where installed), openvino or onnxruntime.
    ocr_engine: str = "auto"
    # The OCR detector's arithmetic on OpenVINO: auto (bf16 where the CPU has bf16 units),
    # f32 or bf16.
    ocr_precision: str = "auto"
    pdf_mode: str = "auto"
    image_mode: str = "auto"
    audio_mode: str = "auto"
    # Perception results (OCR text, transcripts) each API process keeps by content hash.
    perception_cache_entries: int = 4096
    # Encoder outputs each LLM replica keeps by content hash, so an image or clip seen before
    # (after different text, where the prefix cache cannot help) skips the encoder; 0: none.
    encoder_cache_mib: int = 512
    # Remote media: http(s) image URLs only from these host names (none by default: the
    # server fetching URLs a client names is an SSRF risk the operator opts into), and file://
    # URLs only under this folder (None: refused).
    allowed_media_domains: tuple[str, ...] = ()
    allowed_local_media_path: str | None = None
    media_fetch_timeout_s: float = 10.0
    # PDFs (`file` parts and uploads): see omni.media.pdf.PdfSettings for each default's why.
    pdf_dpi: float = PdfSettings.dpi
    pdf_min_dpi: float = PdfSettings.min_dpi
    pdf_max_dpi: float = PdfSettings.max_dpi
    max_pdf_pages: int = PdfSettings.max_pages
    max_pdf_bytes: int = PdfSettings.max_bytes
    pdf_text: bool = PdfSettings.text
    pdf_workers: int = PdfSettings.workers
    pdf_worker_memory_mib: int = PdfSettings.worker_memory_mib
    # API processes sharing the port (as vLLM's --api-server-count): each parses, templates and
    # tokenizes its own requests and has its own router, which every stage replica joins.
    api_server_count: int = 1
    # Set by `omni serve` for the API processes it starts beside itself (not flags to use):
    # which one this is, and the folder of the routers' ipc endpoints.
    api_server_rank: int = 0
    api_server_dir: str | None = None
    # Stages on other hosts join at this tcp://HOST:PORT (beside the local stages' ipc
    # endpoint), with the CURVE keys of `stage_keys` (a folder from `omni keys generate`):
    # only stages holding a client key listed there get in. TCP without keys is refused unless
    # `insecure_stage_endpoint` says so explicitly (a trusted, private network).
    stage_endpoint: str | None = None
    stage_keys: str | None = None
    insecure_stage_endpoint: bool = False
    # With keys, stages send large tensors sealed (AES-256-GCM, a session key handed over inside
    # CURVE) on a second TCP port of the stage endpoint's address: this one (0: any free port,
    # told to each stage inside CURVE; fix it where a firewall sits between the hosts).
    stage_bulk_port: int = 0
    # Where the stage replicas run: "local" (child processes of this one, on this host's
    # devices) or "ray" (each a Ray actor on a node of the cluster at `ray_address` that has
    # its role's resources; "auto" joins the cluster of this node, None starts a local one).
    placement: str = "local"
    ray_address: str | None = None
    # What one replica of a role needs on Ray (default: one GPU), e.g. {"GPU": 1, "CPU": 4}.
    llm_resources: Mapping[str, float] | None = None
    vision_resources: Mapping[str, float] | None = None
    audio_resources: Mapping[str, float] | None = None
    image_resources: Mapping[str, float] | None = None
    speech_resources: Mapping[str, float] | None = None
    # POST /v1/uploads/chat (multipart): files make bodies larger than JSON requests.
    max_upload_bytes: int = 64 * 1024 * 1024
    max_upload_files: int = 8
    # How tool calls are read out of answers ("hermes" or "llama3_json"); None: chosen from
    # the model (see omni.server.tool_calls.default_parser).
    tool_call_parser: str | None = None
    # A Jinja chat template (a file path, or the template text) instead of the model's own,
    # for example one that renders tools.
    chat_template: str | None = None

    def __post_init__(self) -> None:
        from omni.server.tool_calls import PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"tool_call_parser {self.tool_call_parser!r} is unknown; known: "
                             f"{', '.join(PARSERS)}")
        self.pdf_settings()  # raises ValueError naming a bad PDF setting
        self.http_limits()  # and a bad HTTP limit
        if not self.stage_stall_timeout_s > 0:
            raise ValueError(
                f"stage_stall_timeout_s is {self.stage_stall_timeout_s}; it must be > 0"
            )
        for name in ("max_upload_bytes", "max_upload_files", "api_server_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be >= 1")
        if self.api_server_count > 1 and self.single_process:
            raise ValueError("api_server_count > 1 needs stage processes, not single_process")
        if self.colocate_encoders:
            self._check_colocation()
        if not 0 <= self.api_server_rank < self.api_server_count:
            raise ValueError(
                f"api_server_rank is {self.api_server_rank}; it must be in "
                f"[0, {self.api_server_count})"
            )
        if self.api_server_count > 1 and self.api_server_dir is None:
            raise ValueError("api_server_count > 1 needs api_server_dir (omni serve sets it)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port is {self.port}; it must be in [0, 65535]")
        for name in REPLICA_FIELDS + PERCEPTION_REPLICA_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} is {value!r}; it must be an integer")
            if value < 0:
                raise ValueError(f"{name} is {value}; it must be >= 0")
            if value == 0 and name not in PERCEPTION_REPLICA_FIELDS and self.stage_endpoint is None:
                raise ValueError(
                    f"{name} is 0: a role with no local replica is served by stages on other "
                    "hosts, which need --stage-endpoint tcp://HOST:PORT to join"
                )
        self._check_stage_endpoint()
        for name, choices in MEDIA_MODES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} is {getattr(self, name)!r}; it must be one of {', '.join(choices)}"
                )
        if self.ocr_threads < 0 or self.ocr_lanes < 1:
            raise ValueError(f"ocr_threads is {self.ocr_threads} and ocr_lanes "
                             f"{self.ocr_lanes}; they must be >= 0 and >= 1")
        if self.ocr_precision not in ("auto", *OCR_PRECISIONS):
            raise ValueError(f"ocr_precision is {self.ocr_precision!r}; it must be one of "
                             f"auto, {', '.join(OCR_PRECISIONS)}")
        if self.ocr_engine not in ("auto", *OCR_ENGINES):
            raise ValueError(f"ocr_engine is {self.ocr_engine!r}; it must be one of auto, "
                             f"{', '.join(OCR_ENGINES)}")
        if self.perception_cache_entries < 0:
            raise ValueError(
                f"perception_cache_entries is {self.perception_cache_entries}; it must be >= 0"
            )
        self._check_placement()
        for domain in self.allowed_media_domains:
            if not isinstance(domain, str) or not domain or "/" in domain or ":" in domain:
                raise ValueError(
                    f"allowed_media_domains entry {domain!r} must be a host name such as "
                    "images.example.com (no scheme, port or path)"
                )
        if self.allowed_local_media_path is not None and not self.allowed_local_media_path:
            raise ValueError("allowed_local_media_path is empty; leave it unset to refuse files")
        if self.encoder_cache_mib < 0:
            raise ValueError(f"encoder_cache_mib is {self.encoder_cache_mib}; it must be >= 0")
        if not self.media_fetch_timeout_s > 0:
            raise ValueError(
                f"media_fetch_timeout_s is {self.media_fetch_timeout_s}; it must be > 0"
            )
        if self.image_model is not None and not self.image_model:
            raise ValueError("image_model is empty; leave it unset to serve no images")
        if self.speech_model is not None and not self.speech_model:
            raise ValueError("speech_model is empty; leave it unset for the default voice")
        for name in ("max_model_len", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} is {value}; it must be >= 1")
        reserved = {"model", "device", "max_model_len", "max_num_seqs"} & set(self.engine_options)
        if reserved:
            raise ValueError(f"set {sorted(reserved)} with their own flags, not --option")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty; leave it unset to serve without a key")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s is {self.startup_timeout_s}; it must be > 0")
        self._check_tensor_parallel()

    def _check_stage_endpoint(self) -> None:
        from omni.transport.sockets import check_endpoint

        if not 0 <= self.stage_bulk_port < 65536:
            raise ValueError(f"stage_bulk_port is {self.stage_bulk_port}; it must be a TCP port")
        if self.stage_bulk_port and self.stage_keys is None and not self.on_ray:
            raise ValueError(
                "stage_bulk_port needs stage_keys: the sealed bulk channel exists only beside a "
                "CURVE-keyed stage endpoint"
            )
        if self.stage_endpoint is None:
            if self.stage_keys is not None or self.insecure_stage_endpoint:
                raise ValueError("stage_keys and insecure_stage_endpoint need a stage_endpoint")
            return
        if not self.stage_endpoint.startswith("tcp://"):
            raise ValueError(
                f"stage_endpoint {self.stage_endpoint!r} must be tcp://HOST:PORT (local stages "
                "already join over ipc)"
            )
        check_endpoint(self.stage_endpoint, binding=True, allow_tcp=True)
        if self.stage_keys is None and not self.insecure_stage_endpoint and not self.on_ray:
            raise ValueError(
                f"stage_endpoint {self.stage_endpoint} needs CURVE keys: --stage-keys DIR (make "
                "them with `omni keys generate DIR`), or --insecure-stage-endpoint to let any "
                "host that reaches the port join unencrypted and unauthenticated"
            )
        if self.stage_keys is not None and self.insecure_stage_endpoint:
            raise ValueError("stage_keys and insecure_stage_endpoint contradict each other")
        if self.api_server_count > 1:
            raise ValueError(
                "stage_endpoint with api_server_count > 1 is not supported: each API process "
                "has its own router, and remote stages would have to join every one"
            )

    @property
    def on_ray(self) -> bool:
        return self.placement == "ray"

    def _check_placement(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} is not one of {list(PLACEMENTS)}")
        given = [name for name in RESOURCE_FIELDS if getattr(self, name) is not None]
        if self.ray_address is not None:
            given.insert(0, "ray_address")
        if not self.on_ray:
            if given:
                raise ValueError(f"{given[0]} needs placement 'ray'")
            return
        for name in RESOURCE_FIELDS:
            if getattr(self, name) is not None:
                parse_resources(name, getattr(self, name))
        clashes = {
            "single_process": self.single_process,
            "colocate_encoders": self.colocate_encoders,
            "api_server_count > 1": self.api_server_count > 1,
            "tensor_parallel_size > 1": self.tensor_parallel_size > 1,
            "insecure_stage_endpoint (Ray's stages always get keys)": (
                self.insecure_stage_endpoint
            ),
            "devices (Ray picks the GPUs; use --ROLE-resources)": bool(self.devices),
        }
        for what, present in clashes.items():
            if present:
                raise ValueError(f"placement 'ray' does not go with {what}")

    def resources(self, role: str) -> dict[str, float]:
        """What one replica of `role` needs on Ray: its --ROLE-resources, else one GPU (one
        CPU for the perception stages, OCR and speech recognition, which have no flag)."""
        name = f"{role}_resources"
        if name not in RESOURCE_FIELDS:
            return {"CPU": 1.0}
        value = getattr(self, name)
        return parse_resources(name, value) if value is not None else {"GPU": 1.0}

    def _check_colocation(self) -> None:
        if self.single_process:
            raise ValueError("colocate_encoders needs stage processes, not single_process")
        for role in COLOCATED_ROLES:
            if self.replicas(role) != 1:
                raise ValueError(
                    f"with colocate_encoders every LLM replica runs one {role} replica: "
                    f"{role}_replicas ({self.replicas(role)}) does not apply"
                )
            if role in self.devices:
                raise ValueError(
                    f"with colocate_encoders the {role} encoder runs on its LLM replica's "
                    "device: name llm's devices only"
                )

    def replicas(self, role: str) -> int:
        """How many replicas of `role` to run (`llm`, `vision`, `audio`, `image`, `speech`,
        `ocr`, `asr`)."""
        name = f"{role}_replicas"
        if name not in REPLICA_FIELDS + PERCEPTION_REPLICA_FIELDS:
            raise ValueError(f"no replica count for stage role {role!r}")
        return int(getattr(self, name))

    def encoder_replicas(self, role: str) -> int:
        """How many replicas of the model's encoder `role` run: one in each LLM replica's
        process when colocated."""
        return self.llm_replicas if self.colocate_encoders else self.replicas(role)

    def pdf_settings(self) -> PdfSettings:
        return PdfSettings(
            dpi=self.pdf_dpi,
            min_dpi=self.pdf_min_dpi,
            max_dpi=self.pdf_max_dpi,
            max_pages=self.max_pdf_pages,
            max_bytes=self.max_pdf_bytes,
            text=self.pdf_text,
            workers=self.pdf_workers,
            worker_memory_mib=self.pdf_worker_memory_mib,
        )

    def http_limits(self) -> HttpLimits:
        return HttpLimits(
            max_header_bytes=self.max_header_bytes, header_timeout_s=self.header_timeout_s
        )

    def stage_devices(self, role: str) -> tuple[str, ...]:
        named = tuple(self.devices.get(role, ()))
        if named:
            return named
        default = default_device()
        if role == "llm" and default != "cpu" and self.tensor_parallel_size > 1:
            # As vLLM: -tp N on a GPU host uses its first N GPUs (per replica).
            return tuple(f"cuda:{i}" for i in range(self.tensor_parallel_size * self.llm_replicas))
        return (default,)

    @property
    def tensor_parallel_size(self) -> int:
        """Processes (devices) per LLM replica: the engine option of that name."""
        text = self.engine_options.get("tensor_parallel_size", "1")
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"tensor_parallel_size must be an integer, got {text!r}") from None

    def _check_tensor_parallel(self) -> None:
        size = self.tensor_parallel_size
        if size < 1:
            raise ValueError(f"tensor_parallel_size is {size}; it must be >= 1")
        needed = size * self.llm_replicas
        if size == 1 or needed == 0:
            return
        named = self.devices.get("llm", ())
        if named and named != ("cpu",) and len(named) < needed:
            raise ValueError(
                f"{self.llm_replicas} LLM replica(s) of tensor_parallel_size {size} need "
                f"{needed} devices; --devices names {len(named)} for llm"
            )
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not named and gpus and gpus < needed:
            raise ValueError(
                f"{self.llm_replicas} LLM replica(s) of tensor_parallel_size {size} need "
                f"{needed} GPUs; this host has {gpus}"
            )

    def llm_options(self) -> dict[str, str]:
        """The LLM stage's worker options (strings, as on its command line)."""
        options = dict(self.engine_options)
        if self.max_model_len is not None:
            options["max_model_len"] = str(self.max_model_len)
        if self.max_num_seqs is not None:
            options["max_num_seqs"] = str(self.max_num_seqs)
        # The LLM stage keeps the encoder outputs it fetched (the media items' embeddings).
        options.setdefault("encoder_cache_mib", str(self.encoder_cache_mib))
        return options

    def stage_options(self, role: str) -> dict[str, str]:
        """A role's worker options (strings, as on its command line): the LLM engine's, the
        OCR stage's thread budget; none for the others."""
        if role == "llm":
            return self.llm_options()
        if role == "ocr":
            return {"threads": str(self.ocr_threads), "lanes": str(self.ocr_lanes),
                    "engine": self.ocr_engine, "precision": self.ocr_precision}
        return {}

    def router_endpoints(self) -> list[str]:
        """Each API process's router endpoint (ipc, in api_server_dir), rank order."""
        if self.api_server_dir is None:
            raise ValueError("router endpoints need api_server_dir")
        return [
            f"ipc://{self.api_server_dir}/router-{rank}.sock"
            for rank in range(self.api_server_count)
        ]

    @property
    def llm_capacity(self) -> int:
        # The router should never hold back a request that the engine could batch.
        return self.max_num_seqs or 256
