"""vLLM-shaped flags of `omni serve` and their config-file keys: the engine's (each an LLM
engine option), the chat template and the tool-call parser."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_tools import QWEN_STYLE_TEMPLATE

from omni.cli import build_parser
from omni.commands.serve import serve_config
from omni.server.pipeline import read_chat_template


def test_engine_flags_are_llm_options_and_win_over_the_file(tmp_path: Path) -> None:
    settings = tmp_path / "serve.yaml"
    settings.write_text("block-size: 32\nenable-prefix-caching: false\ndtype: float16\n"
                        "options: {max_num_batched_tokens: 1024}\n")
    args = build_parser().parse_args(
        ["serve", "--config", str(settings), "--dtype", "bfloat16", "--enforce-eager",
         "--gpu-memory-utilization", "0.5", "--max-num-batched-tokens", "2048",
         "--enable-prefix-caching"])
    assert serve_config(args).llm_options() == {
        "block_size": "32", "dtype": "bfloat16", "enable_prefix_caching": "true",
        "enforce_eager": "true", "gpu_memory_utilization": "0.5",
        "max_num_batched_tokens": "2048", "encoder_cache_mib": "512",
    }
    args = build_parser().parse_args(["serve", "--no-enable-prefix-caching"])
    assert serve_config(args).llm_options()["enable_prefix_caching"] == "false"


def test_serve_flags_and_config_keys_for_tools(tmp_path: Path) -> None:
    template = tmp_path / "tools.jinja"
    template.write_text(QWEN_STYLE_TEMPLATE)
    args = build_parser().parse_args(
        ["serve", "--tool-call-parser", "llama3_json", "--chat-template", str(template),
         "--enable-auto-tool-choice"])
    config = serve_config(args)
    assert (config.tool_call_parser, config.chat_template) == ("llama3_json", str(template))
    assert read_chat_template(config.chat_template) == QWEN_STYLE_TEMPLATE
    assert read_chat_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    settings = tmp_path / "serve.yaml"
    settings.write_text("tool-call-parser: hermes\n")
    assert serve_config(build_parser().parse_args(
        ["serve", "--config", str(settings)])).tool_call_parser == "hermes"
    settings.write_text("tool-call-parser: mistral\n")
    with pytest.raises(ValueError, match="tool_call_parser 'mistral' is unknown"):
        serve_config(build_parser().parse_args(["serve", "--config", str(settings)]))


def test_every_setting_of_a_flag_is_a_config_key(tmp_path: Path) -> None:
    settings = tmp_path / "serve.yaml"
    settings.write_text("pdf-dpi: 150\nmax-pdf-pages: 8\nno-such-setting: 1\n")
    with pytest.raises(ValueError, match="unknown setting 'no-such-setting'"):
        serve_config(build_parser().parse_args(["serve", "--config", str(settings)]))
    settings.write_text("pdf-dpi: 150\nmax-pdf-pages: 8\npdf-workers: 3\nmax-upload-files: 4\n"
                        "max-upload-bytes: 1000\napi-server-count: 1\n")
    config = serve_config(build_parser().parse_args(["serve", "--config", str(settings)]))
    assert (config.pdf_dpi, config.max_pdf_pages, config.pdf_workers) == (150, 8, 3)
    assert (config.max_upload_files, config.max_upload_bytes) == (4, 1000)
    # A flag still wins over the file.
    config = serve_config(build_parser().parse_args(
        ["serve", "--config", str(settings), "--max-upload-files", "2"]))
    assert config.max_upload_files == 2


def test_tensor_parallel_flags_give_each_replica_its_group_of_devices(tmp_path: Path) -> None:
    from omni.supervision.supervisor import StageSpec

    args = build_parser().parse_args(
        ["serve", "--devices", "llm=0,1,2,3", "--tensor-parallel-size", "2",
         "--enable-expert-parallel"])
    config = serve_config(args)
    # Four devices hold two replicas of two ranks each, as vLLM's data parallelism would.
    assert (config.llm_replicas, config.tensor_parallel_size) == (2, 2)
    options = config.llm_options()
    assert (options["tensor_parallel_size"], options["enable_expert_parallel"]) == ("2", "true")
    spec = StageSpec("llm", replicas=2, devices=config.stage_devices("llm"), devices_per_replica=2)
    assert [spec.replica_device(i) for i in range(2)] == ["cuda:0,cuda:1", "cuda:2,cuda:3"]
    # Flags and the file still say how many replicas; too few devices for them is an error.
    args = build_parser().parse_args(
        ["serve", "--devices", "llm=0,1,2", "-tp", "2", "--llm-replicas", "2"])
    with pytest.raises(ValueError, match=r"2 LLM replica\(s\) of tensor_parallel_size 2 need 4 "
                       "devices; --devices names 3 for llm"):
        serve_config(args)
    settings = tmp_path / "serve.yaml"
    settings.write_text("tensor-parallel-size: 2\n")
    config = serve_config(build_parser().parse_args(["serve", "--config", str(settings)]))
    assert (config.llm_replicas, config.tensor_parallel_size) == (1, 2)
