"""The server over an LLM stage running as its own supervised process, and `omni serve`'s
settings (config file and flags)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures_models import build_tokenizer
from server_fixtures import ENGINE_OPTIONS, MESSAGES, NO_PERCEPTION, free_port, tiny_chat_model

from omni import LLM, SamplingParams
from omni.cli import build_parser
from omni.commands.serve import serve_config
from omni.server.app import build_app
from omni.server.config import ServeConfig
from omni.server.flag_values import parse_devices
from omni.server.pipeline import Pipeline


def _post_chat(app: Any, body: dict[str, Any]) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://omni") as client:
            return await client.post("/v1/chat/completions", json=body, timeout=60)

    return asyncio.run(call())


def test_llm_stage_as_a_subprocess_serves_and_is_restarted(tmp_path: Path) -> None:
    model = tiny_chat_model(tmp_path / "model")
    greedy = SamplingParams(temperature=0, max_tokens=8)
    expected = LLM(str(model), device="cpu", num_kv_blocks=64).chat(
        MESSAGES, greedy, use_tqdm=False
    )[0]
    config = ServeConfig(
        model=str(model), devices={"llm": ("cpu",)}, engine_options=ENGINE_OPTIONS,
        **NO_PERCEPTION,
    )
    body = {"model": str(model), "messages": MESSAGES, "temperature": 0, "max_tokens": 8}
    with Pipeline(config) as pipeline:
        assert pipeline.supervisor is not None and pipeline.runtimes == []
        [replica] = pipeline.orchestrator.router.replicas("llm")
        assert replica.pid != os.getpid()
        app = build_app(pipeline.orchestrator)
        reply = _post_chat(app, body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected.outputs[0].text

        # Kill the stage: the supervisor restarts it, metrics count it, requests work again.
        os.kill(replica.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live = pipeline.orchestrator.router.replicas("llm")
            if live and live[0].pid != replica.pid:
                break
            time.sleep(0.1)
        assert [r.pid != replica.pid for r in pipeline.orchestrator.router.replicas("llm")] == [
            True
        ]
        metrics = pipeline.orchestrator.metrics.render().decode()
        assert "omni:stage_restarts_total 1.0" in metrics
        again = _post_chat(app, body)
        assert again.json()["choices"][0]["message"]["content"] == expected.outputs[0].text


def test_config_file_settings_and_flags_that_win(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "model: /models/a\n"
        "llm-replicas: 2\n"
        "devices: {llm: [0, 1]}\n"
        "max_model_len: 4096\n"
        "port: 9000\n"
        "options: {enable_prefix_caching: false, cpu_kv_cache_gib: 0.5}\n"
    )
    args = build_parser().parse_args(
        ["serve", "/models/b", "--config", str(path), "--port", "8123",
         "--option", "cpu_kv_cache_gib=2", "--single-process"]
    )  # fmt: skip
    config = serve_config(args)
    assert config == ServeConfig(
        model="/models/b",
        port=8123,
        llm_replicas=2,
        devices={"llm": ("cuda:0", "cuda:1")},
        max_model_len=4096,
        single_process=True,
        engine_options={"enable_prefix_caching": "false", "cpu_kv_cache_gib": "2"},
    )
    assert config.host == "127.0.0.1"
    assert config.llm_options() == {
        "enable_prefix_caching": "false",
        "cpu_kv_cache_gib": "2",
        "max_model_len": "4096",
        "encoder_cache_mib": "512",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("llm-replicas: 0\n", "llm_replicas is 0: a role with no local replica"),
        ("gpus: 2\n", "unknown setting 'gpus'"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("options: {max_model_len: 5}\n", "with their own flags"),
    ],
)
def test_bad_config_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    args = build_parser().parse_args(["serve", "--config", str(path)])
    with pytest.raises(ValueError, match=message):
        serve_config(args)


def test_colocated_encoders_flag_and_what_it_excludes() -> None:
    args = build_parser().parse_args(["serve", "--colocate-encoders", "--llm-replicas", "2"])
    config = serve_config(args)
    assert config.colocate_encoders
    # One encoder replica in each LLM replica's process.
    assert (config.encoder_replicas("vision"), config.encoder_replicas("audio")) == (2, 2)
    assert ServeConfig(llm_replicas=2, vision_replicas=3).encoder_replicas("vision") == 3
    for fields, message in (
        ({"single_process": True}, "colocate_encoders needs stage processes"),
        ({"vision_replicas": 2}, r"vision_replicas \(2\) does not apply"),
        ({"devices": {"audio": ("cpu",)}}, "the audio encoder runs on its LLM replica's device"),
    ):
        with pytest.raises(ValueError, match=message):
            ServeConfig(colocate_encoders=True, **fields)  # type: ignore[arg-type]


def test_devices_flag() -> None:
    assert parse_devices("llm=0,1;vision=cpu") == {
        "llm": ("cuda:0", "cuda:1"),
        "vision": ("cpu",),
    }
    assert parse_devices("llm=cpu,vision=2") == {"llm": ("cpu",), "vision": ("cuda:2",)}
    with pytest.raises(ValueError, match="must be a GPU index"):
        parse_devices("llm=tpu")
    with pytest.raises(ValueError, match="must look like llm=0,1"):
        parse_devices("0,1")


def test_serve_exits_2_with_a_one_line_error_for_a_bad_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(["serve", "--llm-replicas", "-1"])
    assert args.func(args) == 2
    assert capsys.readouterr().err == "omni serve: error: llm_replicas is -1; it must be >= 0\n"


def test_unknown_engine_option_fails_before_any_stage_starts(tmp_path: Path) -> None:
    config = ServeConfig(model=str(tmp_path), engine_options={"max_num_sequences": "4"})
    pipeline = Pipeline(config)
    with pytest.raises(ValueError, match="unknown LLM stage option 'max_num_sequences'"):
        pipeline.start()
    assert pipeline.router is None and pipeline.supervisor is None


def test_omni_serve_command_with_the_example_client(tmp_path: Path) -> None:
    model = tiny_chat_model(tmp_path / "model")
    port = free_port()
    command = [
        sys.executable, "-m", "omni.cli", "serve", str(model), "--single-process",
        "--port", str(port), "--served-model-name", "tiny", "--devices", "llm=cpu",
        "--option", "num_kv_blocks=64", "--log-level", "WARNING",
    ]  # fmt: skip
    server = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, "omni serve exited early"
            assert time.monotonic() < deadline, "omni serve did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            time.sleep(0.2)
        example = Path(__file__).parent.parent / "examples" / "openai_chat.py"
        answer = subprocess.run(
            [sys.executable, str(example), "Hello", "--max-tokens", "5",
             "--base-url", f"http://127.0.0.1:{port}/v1"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        tokenizer = build_tokenizer()
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
        )
        prompt_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
        assert answer.stdout.endswith(f"[{prompt_tokens} prompt + 5 completion tokens]\n")
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(30)
    assert code == 0


def test_api_key_from_the_environment_unless_a_flag_names_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMNI_API_KEY", "from-env")
    assert serve_config(build_parser().parse_args(["serve"])).api_key == "from-env"
    flagged = build_parser().parse_args(["serve", "--api-key", "from-flag"])
    assert serve_config(flagged).api_key == "from-flag"
